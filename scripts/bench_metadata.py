"""Benchmark: metadata-only commands and start-up, each a separate process.

Writes a checkpoint of 3,000 small arrays (or takes one with --path) and measures, as processes,
the median wall time of

  paramscope count CKPT
  paramscope table CKPT --format json
  python -c "ocp.StandardCheckpointer().metadata(CKPT)"   (the baseline: Orbax's own metadata)
  paramscope --help
  a one-command Typer app's --help, in panels like paramscope's (the baseline for start-up)

and prints the ratios. Targets: count and table <= 0.35 of the Orbax baseline; --help <= 1.5x
Typer's own help (rich panels cost any Typer app the same; the ratio is what paramscope adds).

Usage: python scripts/bench_metadata.py [--path DIR] [--arrays 3000] [--repeats 5]
"""

import argparse
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _bench import PYTHON, machine, median_of, report  # noqa: E402

WRITE = """
import sys, numpy as np, orbax.checkpoint as ocp
n = int(sys.argv[2])
rng = np.random.default_rng(0)
tree = {f"layer_{i // 10:04d}": {f"w{j}": rng.standard_normal((16, 8)).astype(np.float32) for j in range(10)}
        for i in range(0, n, 10)}
ckpt = ocp.StandardCheckpointer()
ckpt.save(sys.argv[1], tree)
ckpt.wait_until_finished()
"""

ORBAX_METADATA = """
import sys, orbax.checkpoint as ocp
metadata = ocp.StandardCheckpointer().metadata(sys.argv[1])
tree = metadata.item_metadata.tree if hasattr(metadata, "item_metadata") else metadata
assert tree
"""


TYPER_HELP = """
import typer
app = typer.Typer(rich_markup_mode="markdown")
@app.command()
def one(path: str, quiet: bool = typer.Option(False, rich_help_panel="Output")):
    "One command."
app(["--help"])
"""


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--path")
    parser.add_argument("--arrays", type=int, default=3000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = args.path or os.path.join(tmp, "ckpt")
        if not os.path.exists(path):
            print(f"writing {args.arrays} arrays to {path}", file=sys.stderr)
            subprocess.run([PYTHON, "-c", WRITE, path, str(args.arrays)], check=True, capture_output=True)
        paramscope = [PYTHON, "-m", "paramscope"]
        # one untimed run of each warms the file cache and Python's bytecode cache
        for command in ([*paramscope, "count", path], [PYTHON, "-c", ORBAX_METADATA, path]):
            median_of(command, 1)
        rows = [
            ("paramscope count", *median_of([*paramscope, "count", path], args.repeats)),
            (
                "paramscope table --format json",
                *median_of([*paramscope, "table", path, "-f", "json"], args.repeats),
            ),
            (
                "orbax StandardCheckpointer().metadata",
                *median_of([PYTHON, "-c", ORBAX_METADATA, path], args.repeats),
            ),
            ("paramscope --help", *median_of([*paramscope, "--help"], args.repeats)),
            ("typer app --help", *median_of([PYTHON, "-c", TYPER_HELP], args.repeats)),
        ]
    wall = {name: w for name, w, _ in rows}
    base = wall["orbax StandardCheckpointer().metadata"]
    print(f"bench_metadata: {args.arrays} arrays, median of {args.repeats}; {machine()}")
    ok = report(
        [(name, w, None) for name, w, _ in rows],
        [
            ("count / orbax metadata", wall["paramscope count"] / base, 0.35),
            ("table --format json / orbax metadata", wall["paramscope table --format json"] / base, 0.35),
            ("--help / typer app --help", wall["paramscope --help"] / wall["typer app --help"], 1.5),
        ],
    )
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
