"""Helpers shared by the benchmark scripts: run a command as its own process, measure it."""

import os
import statistics
import subprocess
import sys
import time

PYTHON = sys.executable

# The start of a script that writes a sharded checkpoint on 8 simulated devices: argv[1] the
# folder, argv[2] the size in GiB; it defines mesh, normal(key, shape, spec) and key.
MESH_WRITER = """import os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
import jax, jax.numpy as jnp, orbax.checkpoint as ocp
from jax.sharding import NamedSharding, PartitionSpec as P
path, gib = sys.argv[1], float(sys.argv[2])
mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
def normal(key, shape, spec):
    sharding = NamedSharding(mesh, spec)
    return jax.jit(lambda k: jax.random.normal(k, shape, jnp.float32) * 0.02, out_shardings=sharding)(key)
key = jax.random.key(0)
"""


def measure(command, env=None, stdout=None):
    """(wall seconds, peak RSS bytes) of one process, from its own rusage (Linux: KiB units)."""
    wall, rss, _ = measure_cpu(command, env, stdout)
    return wall, rss


def measure_cpu(command, env=None, stdout=None):
    """(wall seconds, peak RSS bytes, CPU seconds: user + system, all threads) of one process.
    CPU seconds hold steadier than wall time on a machine that other work shares."""
    start = time.perf_counter()
    process = subprocess.Popen(
        command,
        stdout=stdout or subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={**os.environ, **(env or {})},
    )
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - start
    stderr = process.stderr.read().decode()
    process.stderr.close()
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise SystemExit(f"{' '.join(map(str, command))} failed ({process.returncode}):\n{stderr}")
    rss = usage.ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    return wall, rss, usage.ru_utime + usage.ru_stime


def median_of(command, repeats, env=None):
    wall, rss, _ = medians_of(command, repeats, env)
    return wall, rss


def medians_of(command, repeats, env=None):
    """Median wall seconds, largest peak RSS and median CPU seconds of ``repeats`` runs."""
    runs = [measure_cpu(command, env) for _ in range(repeats)]
    return (
        statistics.median(w for w, _, _ in runs),
        max(r for _, r, _ in runs),
        statistics.median(c for _, _, c in runs),
    )


def machine() -> str:
    cpus = os.cpu_count()
    try:
        with open("/proc/meminfo") as f:
            total = int(f.readline().split()[1]) * 1024
        memory = f"{total / 2**30:.0f} GiB"
    except OSError:
        memory = "? GiB"
    return f"{cpus} cores, {memory} memory, Python {sys.version.split()[0]}, {sys.platform}"


def report(rows, ratios):
    """Prints measured rows and target ratios; returns whether every target held."""
    width = max(len(name) for name, *_ in rows)
    for name, wall, rss in rows:
        rss_text = f"{rss / 2**20:8.0f} MiB" if rss is not None else ""
        print(f"  {name:<{width}}  {wall:8.3f} s  {rss_text}")
    ok = True
    for name, value, target in ratios:
        if target is None:  # for information
            print(f"  {name:<40} {value:6.3f}")
            continue
        held = value <= target
        ok &= held
        print(f"  {name:<40} {value:6.3f}  (target <= {target}: {'met' if held else 'MISSED'})")
    return ok
