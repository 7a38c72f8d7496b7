"""Benchmark: looking inside one large array, and exporting a checkpoint.

Writes (or takes, with --path) a float32 checkpoint of about --gib GiB (default 2) sharded on 8
simulated CPU devices, half of it one array ``big``, then measures wall time and peak RSS of each
of these as a separate process:

  (f0) start-up of (f): its script, decoding nothing
  (f)  the floor: TensorStore decoding ``big`` alone (slabs within the budget, discarded)
  (a)  paramscope show CKPT big --axis 0      (per-row norm, max |x|, mean, NaN/Inf)
  (t)  paramscope show CKPT big --top 100
  (n)  paramscope show CKPT big --nonfinite
  (s)  paramscope show CKPT 'big[7]'          (one row; beside (s0), a tiny array: start-up)
  (F)  the floor of the whole checkpoint: TensorStore decoding every array
  (e)  paramscope export CKPT OUT.safetensors (write, hash the file again, compare digests)

Start-up counts in every wall time; (f0) and (s0) give it for the floor and for the command
line, and the "beyond start-up" lines (for information) set the work alone against the decode
alone, in wall time and in CPU seconds (user + system, all threads: steadier than wall time
where other work shares the machine). The processes run with Python's bytecode cache (in a
temporary folder) even where PYTHONDONTWRITEBYTECODE is set, as an installed package has it.

Targets (issue 25): (a), (t), (n) each <= 1.15x (f), peak RSS <= budget + 300 MiB; (s) - (s0)
<= 0.3 s, reading only the chunks row 7 touches (printed); (e) <= 1.5x (F), peak RSS bounded
by the budget. Each command runs once to warm up, then --repeats times (median wall and CPU,
largest RSS).

Usage: python scripts/bench_show.py [--path DIR] [--gib 2.0] [--budget 256MiB] [--repeats 3] [--keep]
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _bench import MESH_WRITER, PYTHON, machine, medians_of, report  # noqa: E402

WRITE = (
    MESH_WRITER
    + """
rows = max(8, int(gib / 2 * 2**30 / (8192 * 4)) // 8 * 8)
tree = {"big": normal(key, (rows, 8192), P("data", "model")), "tiny": normal(key, (8,), P())}
layers = max(1, round((gib * 2**30 - rows * 8192 * 4) / (64 * 2**20)))
for i in range(layers):
    k1, k2 = jax.random.split(jax.random.fold_in(key, i))
    tree[f"layer_{i:02d}"] = {
        "w_in": normal(k1, (2048, 4096), P("data", "model")),
        "w_out": normal(k2, (4096, 2048), P("model", "data")),
    }
ckpt = ocp.StandardCheckpointer()
ckpt.save(path, tree)
ckpt.wait_until_finished()
"""
)

# TensorStore decoding arrays through the handles paramscope opens, in slabs of the budget, discarded
DECODE = """
import sys
import paramscope as ps
from paramscope.compute.plan import parse_size
from paramscope.compute.values import pieces, select
from paramscope.io import checkpoint
path, budget, only = sys.argv[1], parse_size(sys.argv[2]), sys.argv[3:]
ck = ps.open(path)
params = [p for p in ck.params if not only or p.path in only]
for param in params:
    handle = checkpoint.open_array(param.stored)
    for piece in pieces(select(param.shape, None), param.itemsize, budget, param.stored.chunks):
        handle[piece.box()].read().result()
"""


def paramscope(*args):
    return [PYTHON, "-m", "paramscope", *args]


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--path")
    parser.add_argument("--gib", type=float, default=2.0)
    parser.add_argument("--budget", default="256MiB")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="bench_show_")
    path = args.path or os.path.join(work, "ckpt")
    try:
        if not args.path:
            subprocess.run([PYTHON, "-c", WRITE, path, str(args.gib)], check=True)
        out = os.path.join(work, "out.safetensors")
        budget = ["--memory-budget", args.budget]
        info = json.loads(
            subprocess.run(
                paramscope("show", path, "big[7]", "-f", "json", "-q"), check=True, capture_output=True
            ).stdout
        )
        shape = info["shape"]
        print(f"machine: {machine()}")
        print(f"checkpoint: big {shape} float32, budget {args.budget}")
        print(
            f"one-row slice big[7]: read {info['bytes_read']:,} bytes, "
            f"{info['chunks_read']} of {info['chunks_total']} chunks (chunks {info['chunks']})"
        )
        commands = {
            "(f0) decode nothing": [PYTHON, "-c", DECODE, path, args.budget, "no such array"],
            "(f) decode big": [PYTHON, "-c", DECODE, path, args.budget, "big"],
            "(a) show big --axis 0": paramscope("show", path, "big", "--axis", "0", *budget, "-q"),
            "(t) show big --top 100": paramscope("show", path, "big", "--top", "100", *budget, "-q"),
            "(n) show big --nonfinite": paramscope("show", path, "big", "--nonfinite", *budget, "-q"),
            "(s0) show tiny": paramscope("show", path, "tiny", "-q"),
            "(s) show big[7]": paramscope("show", path, "big[7]", "-q"),
            "(F) decode all": [PYTHON, "-c", DECODE, path, args.budget],
            "(e) export": paramscope("export", path, out, "--force", *budget, "-q"),
        }
        # an empty PYTHONDONTWRITEBYTECODE is unset for Python
        env = {"PYTHONDONTWRITEBYTECODE": "", "PYTHONPYCACHEPREFIX": os.path.join(work, "pycache")}
        for command in commands.values():  # compiles the modules once, as an install does
            medians_of(command, 1, env)
        measured = {name: medians_of(command, args.repeats, env) for name, command in commands.items()}
        limit_mib = (
            int(args.budget.lower().replace("mib", "")) if args.budget.lower().endswith("mib") else None
        )
        rows = [(f"{name}  ({cpu:.2f} s CPU)", wall, rss) for name, (wall, rss, cpu) in measured.items()]
        floor, whole = measured["(f) decode big"][0], measured["(F) decode all"][0]
        ratios = [
            ("(a) / (f) wall", measured["(a) show big --axis 0"][0] / floor, 1.15),
            ("(t) / (f) wall", measured["(t) show big --top 100"][0] / floor, 1.15),
            ("(n) / (f) wall", measured["(n) show big --nonfinite"][0] / floor, 1.15),
            ("(s) - (s0) seconds", measured["(s) show big[7]"][0] - measured["(s0) show tiny"][0], 0.3),
            ("(e) / (F) wall", measured["(e) export"][0] / whole, 1.5),
        ]
        # the work alone against the decode alone, start-up taken off: wall, and CPU seconds
        for k, unit in ((0, "wall"), (2, "CPU")):
            start, cli = measured["(f0) decode nothing"][k], measured["(s0) show tiny"][k]
            floor_k, whole_k = measured["(f) decode big"][k], measured["(F) decode all"][k]
            for name in ("(a) show big --axis 0", "(t) show big --top 100", "(n) show big --nonfinite"):
                beyond = (measured[name][k] - cli) / (floor_k - start)
                ratios.append((f"{name[:3]} / (f) {unit} beyond start-up", beyond, None))
            beyond = (measured["(e) export"][k] - cli) / (whole_k - start)
            ratios.append((f"(e) / (F) {unit} beyond start-up", beyond, None))
        if limit_mib is not None:
            for name in (
                "(a) show big --axis 0",
                "(t) show big --top 100",
                "(n) show big --nonfinite",
                "(e) export",
            ):
                ratios.append(
                    (
                        f"{name[:3]} peak RSS / (budget + 300 MiB)",
                        measured[name][1] / ((limit_mib + 300) << 20),
                        1.0,
                    )
                )
        ok = report(rows, ratios)
        return 0 if ok else 1
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"kept {work}")


if __name__ == "__main__":
    sys.exit(main())
