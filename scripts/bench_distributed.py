"""Benchmark: `paramscope norms` as 1, 2 and 4 cooperating local processes (jax.distributed).

Writes (or takes, with --path) a float32 checkpoint of at least 1 GiB and runs
`paramscope norms --per-param` as N processes joined on 127.0.0.1, for N = 1, 2, 4. It prints
the wall time of each run and the array bytes each process read (from the report's bytes_read),
and checks that every run gives the same global norm. On a machine with few cores the wall time
cannot scale; the bytes per process must (about 1/N each).

Usage: python scripts/bench_distributed.py [--path DIR] [--gib 1.0] [--budget 256MiB]
"""

import argparse
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _bench import PYTHON, machine  # noqa: E402
from bench_norms import WRITE  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(path: str, processes: int, budget: str) -> tuple[float, dict]:
    port = free_port()
    command = [
        PYTHON,
        "-m",
        "paramscope",
        "norms",
        path,
        "--per-param",
        "--memory-budget",
        budget,
        "-f",
        "json",
        "--quiet",
    ]
    if processes > 1:
        command += ["--coordinator", f"127.0.0.1:{port}", "--num-processes", str(processes)]
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    start = time.perf_counter()
    children = [
        subprocess.Popen(
            command + (["--process-id", str(i)] if processes > 1 else []),
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(processes)
    ]
    outputs = [child.communicate() for child in children]
    wall = time.perf_counter() - start
    for child, (_, err) in zip(children, outputs):
        if child.returncode != 0:
            raise SystemExit(f"{processes} processes: exit {child.returncode}: {err}")
    return wall, json.loads(outputs[0][0])


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--path")
    parser.add_argument("--gib", type=float, default=1.0)
    parser.add_argument("--budget", default="256MiB")
    args = parser.parse_args()
    tmp = tempfile.mkdtemp(prefix="paramscope-bench-")
    try:
        path = args.path or os.path.join(tmp, "ckpt")
        if not args.path:
            print(f"writing a {args.gib} GiB checkpoint to {path}", file=sys.stderr)
            subprocess.run([PYTHON, "-c", WRITE, path, str(args.gib)], check=True, capture_output=True)
        run(path, 1, args.budget)  # warm the file cache
        results = {n: run(path, n, args.budget) for n in (1, 2, 4)}
        total = sum(p["count"] * 4 for p in results[1][1]["params"])
        reference = results[1][1]["global_norm"]
        print(
            f"bench_distributed: {total / 2**30:.2f} GiB of float32 arrays, budget {args.budget}; {machine()}"
        )
        agree = True
        for n, (wall, report) in results.items():
            agree &= math.isclose(report["global_norm"], reference, rel_tol=1e-6)
            shares = ", ".join(f"{b / 2**20:.0f} MiB ({b / total:.0%})" for b in report["bytes_read"])
            print(f"  {n} process(es): {wall:6.2f} s   read per process: {shares}")
        print(f"  global norms {'agree' if agree else 'DIFFER'} to 1e-6")
        sys.exit(0 if agree else 1)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
