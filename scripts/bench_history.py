"""Benchmark: the history of a run against one process per step.

Writes a CheckpointManager root of --steps steps (default 20) of a float32 model of --mib MiB
(default 256), then measures, each a separate process:

  (a) paramscope history ROOT                       cold: an empty cache
  (b) paramscope norms ROOT --per-param --step N    once per step, one process each (the baseline)
  (c) paramscope history ROOT                       after one more step is saved: the warm cache
  (d) paramscope norms ROOT --per-param             one step, for (c)'s target

  (e) TensorStore itself decoding the new step and the one before (no paramscope)

and prints the ratios. Targets: (a)/(b) <= 0.5 (one process, metadata parsed once, every step
read once); (c) reads exactly the new step and the one before it (for the change), bytes
printed, and (c)/(e) <= 1.3: the warm run costs at most 1.3x the decode of the two steps it must
read. (c)/(d) is printed for information (the old target of 1.3 compared two steps' reads with
one's).

(c) and (d) are each run --repeats times (default 3), interleaved, every (c) from the cache the
cold run left; their medians are compared.

Usage: python scripts/bench_history.py [--steps 20] [--mib 256] [--repeats 3]
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _bench import PYTHON, machine, measure, report  # noqa: E402

WRITE = """
import sys, numpy as np, orbax.checkpoint as ocp
root, steps, mib = sys.argv[1], [int(s) for s in sys.argv[2].split(",")], float(sys.argv[3])
rows = int(mib * 2**20 / 4 / 4096 / 16)
rng = np.random.default_rng(0)
base = {f"layer_{i:02d}": rng.standard_normal((rows, 4096)).astype(np.float32) for i in range(16)}
with ocp.CheckpointManager(root) as manager:
    for step in steps:
        tree = {k: v * np.float32(1 + step / 1000) for k, v in base.items()}
        manager.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(tree)))
        manager.wait_until_finished()
"""


DECODE = """
import ast, json, os, sys
import tensorstore as ts
context = ts.Context({"cache_pool": {"total_bytes_limit": 64 << 20}})
reads = []
for step in sys.argv[1:]:  # every array of each step, all opens and reads concurrent
    item = os.path.join(step, "params")
    with open(os.path.join(item, "_METADATA")) as f:
        names = [".".join(ast.literal_eval(k)) for k in json.load(f)["tree_metadata"]]
    base = "file://" + os.path.abspath(item) + "/"
    kv = ts.KvStore.open({"driver": "ocdbt", "base": base}, context=context).result()
    opens = [ts.open({"driver": "zarr"}, kvstore=kv / (n + "/"), read=True, context=context) for n in names]
    reads += [o.result().read() for o in opens]
for read in reads:
    read.result()
"""


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--mib", type=float, default=256)
    parser.add_argument("--repeats", type=int, default=3, help="runs of (c) and (d); their median")
    args = parser.parse_args()
    tmp = tempfile.mkdtemp(prefix="paramscope-history-")
    try:
        root, cache = os.path.join(tmp, "run"), os.path.join(tmp, "cache")
        steps = [100 * (k + 1) for k in range(args.steps)]
        print(f"writing {args.steps} steps of {args.mib:g} MiB to {root}", file=sys.stderr)
        subprocess.run([PYTHON, "-c", WRITE, root, ",".join(map(str, steps)), str(args.mib)], check=True)
        paramscope = [PYTHON, "-m", "paramscope"]
        history = [*paramscope, "history", root, "--cache", cache, "-f", "json", "-q"]
        measure([*paramscope, "norms", root, "-q"])  # warm the file cache
        out = os.path.join(tmp, "out.json")
        with open(out, "w") as f:
            cold = measure(history, stdout=f)
        cold_read = json.load(open(out))["bytes_read"]
        per_step = [0.0, 0]
        for step in steps:
            wall, rss = measure([*paramscope, "norms", root, "--per-param", "--step", str(step), "-q"])
            per_step = [per_step[0] + wall, max(per_step[1], rss)]
        new = steps[-1] + 100
        subprocess.run([PYTHON, "-c", WRITE, root, str(new), str(args.mib)], check=True)
        cold_cache = os.path.join(tmp, "cache-after-cold")
        shutil.copytree(cache, cold_cache)
        warms, ones, decodes = [], [], []
        two_steps = [os.path.join(root, str(s)) for s in (steps[-1], new)]
        for _ in range(args.repeats):  # interleaved, each warm run from the cache the cold run left
            shutil.rmtree(cache)
            shutil.copytree(cold_cache, cache)
            with open(out, "w") as f:
                warms.append(measure(history, stdout=f))
            ones.append(measure([*paramscope, "norms", root, "--per-param", "-q"]))
            decodes.append(measure([PYTHON, "-c", DECODE, *two_steps]))
        warm = (statistics.median(w for w, _ in warms), max(r for _, r in warms))
        one = (statistics.median(w for w, _ in ones), max(r for _, r in ones))
        decode = (statistics.median(w for w, _ in decodes), max(r for _, r in decodes))
        warm_read = json.load(open(out))["bytes_read"]
        step_bytes = args.mib * 2**20
        print(
            f"bench_history: {args.steps} steps of {args.mib:g} MiB (+1 for the warm run); "
            f"(c) and (d) median of {args.repeats}; {machine()}"
        )
        print(
            f"  bytes read: cold {cold_read / 2**20:.0f} MiB, warm {warm_read / 2**20:.0f} MiB"
            f" ({warm_read / step_bytes:.2f} steps)"
        )
        ok = report(
            [
                ("(a) history, cold", *cold),
                (f"(b) norms, {args.steps} processes", per_step[0], per_step[1]),
                ("(c) history, one new step", *warm),
                ("(d) norms of one step", *one),
                ("(e) TensorStore decoding the two steps", *decode),
            ],
            [
                ("(a)/(b) wall", cold[0] / per_step[0], 0.5),
                ("(c)/(e) wall", warm[0] / decode[0], 1.3),
                ("(c)/(d) wall", warm[0] / one[0], None),
            ],
        )
        if abs(warm_read - 2 * step_bytes) > step_bytes / 100:
            print(f"  (c) read {warm_read / step_bytes:.2f} steps, not the new step and the one before")
            ok = False
        sys.exit(0 if ok else 1)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
