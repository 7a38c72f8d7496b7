"""Benchmark: per-parameter norms of a checkpoint larger than the memory budget.

Writes (or takes, with --path) a float32 checkpoint of at least 2 GiB sharded on 8 simulated
CPU devices, then measures wall time and peak RSS of each of these as a separate process:

  (a) paramscope norms CKPT --per-param --memory-budget 256MiB
  (b) the naive way: an Orbax restore of the whole tree to host numpy, then numpy float64 sums
      of squares per array
  (c) the floor: TensorStore decoding every array and discarding it, no reduction
  (d) paramscope norms with the mesh engine (8 simulated devices)
  (e) paramscope stats --digest: every statistic and every array's SHA-256 digest, one pass

It checks that (a) and (b) agree to 1e-6 and prints the ratios against the targets:
(a)/(c) wall <= 1.25, (a)/(b) wall <= 0.6, (a) peak RSS <= 0.25 x (b) and < 1.2 GiB,
(e)/(c) wall <= 1.5.

Each command runs --repeats times (default 3), interleaved; the median wall time and the largest
peak RSS are reported.

Usage: python scripts/bench_norms.py [--path DIR] [--gib 2.0] [--budget 256MiB] [--repeats 3] [--keep]
"""

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _bench import MESH_WRITER, PYTHON, machine, measure, report  # noqa: E402

WRITE = (
    MESH_WRITER
    + """
tree = {"embed": normal(key, (65536, 2048), P("model", "data"))}  # 512 MiB: larger than the budget
layers = max(1, round((gib * 2**30 - 512 * 2**20) / (64 * 2**20)))
for i in range(layers):
    k1, k2, k3 = jax.random.split(jax.random.fold_in(key, i), 3)
    tree[f"layer_{i:02d}"] = {
        "w_in": normal(k1, (2048, 4096), P("data", "model")),
        "w_out": normal(k2, (4096, 2048), P("model", "data")),
        "bias": normal(k3, (4096,), P("model")),
    }
ckpt = ocp.StandardCheckpointer()
ckpt.save(path, tree)
ckpt.wait_until_finished()
"""
)

NAIVE = """
import json, math, sys
import numpy as np, jax, orbax.checkpoint as ocp
path = sys.argv[1]
metadata = ocp.StandardCheckpointer().metadata(path)
tree = metadata.item_metadata.tree if hasattr(metadata, "item_metadata") else metadata
restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
restored = ocp.PyTreeCheckpointer().restore(path, args=ocp.args.PyTreeRestore(restore_args=restore_args))
sums = [float(np.sum(np.square(x, dtype=np.float64))) for x in jax.tree.leaves(restored)]
print(json.dumps({"global_norm": math.sqrt(math.fsum(sums)), "arrays": len(sums)}))
"""

FLOOR = """
import ast, json, os, sys
import tensorstore as ts
path = sys.argv[1]
with open(os.path.join(path, "_METADATA")) as f:
    names = [".".join(ast.literal_eval(k)) for k in json.load(f)["tree_metadata"]]
base = {"driver": "ocdbt", "base": "file://" + os.path.abspath(path) + "/"}
for name in names:
    spec = {"driver": "zarr", "kvstore": {**base, "path": name + "/"}}
    ts.open(spec, read=True, open=True).result().read().result()
"""


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--path", help="an existing checkpoint item folder to use instead of writing one")
    parser.add_argument("--gib", type=float, default=2.0, help="size of the checkpoint to write")
    parser.add_argument("--budget", default="256MiB")
    parser.add_argument("--keep", action="store_true", help="keep the written checkpoint")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each command (median wall, max RSS)")
    args = parser.parse_args()
    tmp = tempfile.mkdtemp(prefix="paramscope-bench-")
    try:
        path = args.path or os.path.join(tmp, "ckpt")
        if not args.path:
            print(f"writing a {args.gib} GiB checkpoint to {path}", file=sys.stderr)
            subprocess.run([PYTHON, "-c", WRITE, path, str(args.gib)], check=True, capture_output=True)
        size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)
        norms = [
            PYTHON,
            "-m",
            "paramscope",
            "norms",
            path,
            "--per-param",
            "--memory-budget",
            args.budget,
            "--format",
            "json",
            "--quiet",
        ]
        commands = {
            "(a) paramscope norms": norms,
            "(b) orbax restore + numpy": [PYTHON, "-c", NAIVE, path],
            "(c) tensorstore decode only": [PYTHON, "-c", FLOOR, path],
            "(d) paramscope norms --engine mesh": [*norms, "--engine", "mesh"],
            "(e) paramscope stats --digest": [*norms[:3], "stats", *norms[4:5], *norms[6:], "--digest"],
        }
        mesh_env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
        measure(commands["(c) tensorstore decode only"])  # warm the file cache
        runs, outputs = {name: [] for name in commands}, {}
        for _ in range(args.repeats):  # interleaved, so that a slow spell hits every command alike
            for name, command in commands.items():
                out = os.path.join(tmp, "out.json")
                with open(out, "w") as f:
                    runs[name].append(measure(command, env=mesh_env if "mesh" in name else None, stdout=f))
                with open(out) as f:
                    text = f.read()
                outputs[name] = json.loads(text) if text.strip() else None
        results = {
            name: (statistics.median(w for w, _ in r), max(m for _, m in r)) for name, r in runs.items()
        }
        ours = outputs["(a) paramscope norms"]
        naive = outputs["(b) orbax restore + numpy"]["global_norm"]
        on_mesh = outputs["(d) paramscope norms --engine mesh"]["global_norm"]
        agree = all(math.isclose(x, naive, rel_tol=1e-6) for x in (ours["global_norm"], on_mesh))
        a, b, c, _, e = (results[n] for n in commands)
        data = sum(p["count"] * 4 for p in ours["params"])
        print(
            f"bench_norms: {data / 2**30:.2f} GiB of float32 arrays ({size / 2**30:.2f} GiB on disk),"
            f" {len(ours['params'])} arrays, budget {args.budget}, median of {args.repeats}; {machine()}"
        )
        print(
            f"  global norm: host {ours['global_norm']:.9g}, mesh {on_mesh:.9g}, numpy float64 {naive:.9g}"
            f" ({'agree' if agree else 'DIFFER'} to 1e-6)"
        )
        ok = report(
            [(name, wall, rss) for name, (wall, rss) in results.items()],
            [
                ("(a)/(c) wall", a[0] / c[0], 1.25),
                ("(a)/(b) wall", a[0] / b[0], 0.6),
                ("(a)/(b) peak RSS", a[1] / b[1], 0.25),
                ("(a) peak RSS in GiB", a[1] / 2**30, 1.2),
                ("(e)/(c) wall: statistics and digests", e[0] / c[0], 1.5),
            ],
        )
        sys.exit(0 if ok and agree else 1)
    finally:
        if args.keep and not args.path:
            print(f"kept {path}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
