"""Several real processes joined by jax.distributed on 127.0.0.1, 4 simulated CPU devices each."""

import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import replace

import numpy as np
import orbax.checkpoint as ocp
import pytest
from test_cli import run_json

ENV = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "PYTHONUNBUFFERED": "1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(args, process_id, port, n=2, env=None, base=None):
    command = [sys.executable, "-m", "paramscope", *map(str, args)]
    extra = {}
    if env is None:
        command += [
            "--coordinator",
            f"127.0.0.1:{port}",
            "--num-processes",
            str(n),
            "--process-id",
            str(process_id),
        ]
    else:
        extra = {
            "PARAMSCOPE_COORDINATOR": f"127.0.0.1:{port}",
            "PARAMSCOPE_NUM_PROCESSES": str(n),
            "PARAMSCOPE_PROCESS_ID": str(process_id),
        }
    return subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**(base or ENV), **extra}
    )


def launch(args, n=2, limit=180, env=None, base=None):
    """Runs the command as n cooperating processes; always cleans up; returns (code, out, err) each.

    ``base``: the processes' environment, instead of this one's (with ``XLA_FLAGS`` as here).
    """
    port = free_port()
    base = None if base is None else {**base, "XLA_FLAGS": ENV["XLA_FLAGS"], "PYTHONUNBUFFERED": "1"}
    processes = [start(args, i, port, n, env, base) for i in range(n)]
    try:
        results = []
        for process in processes:
            out, err = process.communicate(timeout=limit)
            results.append((process.returncode, out, err))
        return results
    finally:
        for p in processes:
            if p.poll() is None:
                p.kill()
                p.wait()


@pytest.fixture(scope="module")
def shared_ckpt(tmp_path_factory):
    """Arrays of many sizes, some larger than the budget the tests read them with."""
    rng = np.random.default_rng(5)
    tree = {
        f"layer_{i}": {
            "w": rng.standard_normal((64 * (i + 1), 96)).astype(np.float32),
            "b": rng.standard_normal(96).astype(np.float32),
        }
        for i in range(8)
    }
    tree["embed"] = rng.standard_normal((1024, 128)).astype(np.float32)
    tree["embed"][3, 4] = np.nan
    path = str(tmp_path_factory.mktemp("dist") / "ckpt")
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(path, tree)
    checkpointer.wait_until_finished()
    return path


def assert_same_numbers(single, multi):
    assert [p["path"] for p in single["params"]] == [p["path"] for p in multi["params"]]
    for a, b in zip(single["params"], multi["params"]):
        for key, value in a.items():
            if isinstance(value, float):
                assert b[key] == pytest.approx(value, rel=1e-6, abs=1e-12), (a["path"], key)
            else:
                assert b[key] == value, (a["path"], key)
    if single.get("global_norm") is not None:
        assert multi["global_norm"] == pytest.approx(single["global_norm"], rel=1e-6)


def test_two_processes_read_a_sharded_safetensors_set():
    """Tensors read by byte range travel to the other process as JSON like zarr arrays do."""
    folder = os.path.join(os.path.dirname(__file__), "data", "safetensors", "sharded")
    args = ["norms", folder, "--per-param", "--digest", "--memory-budget", "1KiB", "--format", "json"]
    single = run_json(*args)
    results = launch(args)
    assert [code for code, _, _ in results] == [0, 0], [err for _, _, err in results]
    multi = json.loads(results[0][1])
    assert_same_numbers(single, multi)
    assert len(multi["bytes_read_by_process"]) == 2 and all(multi["bytes_read_by_process"])
    assert sum(multi["bytes_read_by_process"]) == sum(single["bytes_read_by_process"])


@pytest.mark.parametrize("command", [["norms", "--per-param"], ["stats"]])
def test_two_processes_equal_one_and_share_the_reading(shared_ckpt, command):
    args = [
        command[0],
        shared_ckpt,
        *command[1:],
        "--memory-budget",
        "256KiB",
        "--format",
        "json",
        "--digest",
    ]
    single = run_json(*args)
    assert all(len(p["digest"]) == 64 for p in single["params"])  # compared with the 2 processes' below
    results = launch(args)
    assert [code for code, _, _ in results] == [0, 0], [err for _, _, err in results]
    (_, out0, err0), (_, out1, err1) = results
    assert out1 == "" and err1 == ""  # process 0 alone reports, and warns of the NaN
    assert err0.splitlines() == ["paramscope: warning: 1 NaN/Inf value(s) in 1 parameter(s): embed"]
    multi = json.loads(out0)
    assert_same_numbers(single, multi)
    total = sum(p["count"] * 4 for p in multi["params"])
    assert sum(multi["bytes_read_by_process"]) == total
    assert all(0.4 * total <= b <= 0.6 * total for b in multi["bytes_read_by_process"]), multi[
        "bytes_read_by_process"
    ]


def test_mesh_engine_and_environment_variables(shared_ckpt, manager_ckpt):
    args = [
        "stats",
        shared_ckpt,
        "--engine",
        "mesh",
        "--format",
        "json",
        "--memory-budget",
        "1MiB",
        "--digest",
    ]
    single = run_json(*args)
    results = launch(args, env=True)
    assert [code for code, _, _ in results] == [0, 0], [err for _, _, err in results]
    multi = json.loads(results[0][1])
    assert multi["engine"] == "mesh" and multi["mesh"] == {"devices": 8}  # the mesh spans both processes
    assert_same_numbers(single, multi)
    sharded = [
        "norms",
        manager_ckpt.path,
        "--per-param",
        "-f",
        "json",
        "--mesh",
        "data=2,model=4",
        "--digest",
    ]
    results = launch(sharded)  # the saved (2, 4) mesh, its rows on different processes
    assert [code for code, _, _ in results] == [0, 0], [err for _, _, err in results]
    multi = json.loads(results[0][1])
    assert multi["mesh"] == {"data": 2, "model": 4}
    assert_same_numbers(run_json(*sharded), multi)


def test_diff_and_table_norms_across_processes(manager_ckpt):
    diff = [
        "diff",
        manager_ckpt.path,
        manager_ckpt.path,
        "--step-a",
        "100",
        "--step-b",
        "200",
        "--format",
        "json",
    ]
    single = run_json(*diff)
    results = launch(diff)
    assert [code for code, _, _ in results] == [0, 0]
    multi = json.loads(results[0][1])
    assert multi["summary"] == single["summary"]
    for a, b in zip(single["params"], multi["params"]):
        assert b["diff_norm"] == pytest.approx(a["diff_norm"], rel=1e-6, abs=1e-12)
        assert b["identical"] == a["identical"]
    table = ["table", manager_ckpt.path, "--norms", "--format", "json"]
    results = launch(table)
    assert [code for code, _, _ in results] == [0, 0] and results[1][1] == ""
    assert_same_numbers(run_json(*table), json.loads(results[0][1]))

    # history: each process reads its share of the parameters over every step; no cache
    history = ["history", manager_ckpt.path, "--stats", "--format", "json"]
    single = run_json(*history, "--no-cache")
    results = launch(history)
    assert [code for code, _, _ in results] == [0, 0] and results[1][1] == ""
    assert "cache is not used under --distributed" in results[0][2]
    multi = json.loads(results[0][1])
    assert multi["bytes_read"] == single["bytes_read"]
    assert multi["steps"] == single["steps"] and len(multi["series"]) == len(single["series"])
    for a, b in zip(single["series"], multi["series"]):
        assert (a["step"], a["path"], a["metric"]) == (b["step"], b["path"], b["metric"])
        assert b["value"] == pytest.approx(a["value"], rel=1e-9, abs=1e-12, nan_ok=True)


def test_every_process_exits_with_the_same_code(shared_ckpt):
    results = launch(["norms", shared_ckpt, "--fail-on-nonfinite", "--quiet"])
    assert [code for code, _, _ in results] == [1, 1]
    results = launch(["norms", shared_ckpt, "--step", "3"])  # process 0 reads the metadata, for all
    assert [code for code, _, _ in results] == [3, 3]
    (_, _, err0), (_, _, err1) = results
    assert err0 == err1 and len(err0.splitlines()) == 1, (err0, err1)
    assert err0.startswith("paramscope: error: process 0: --step 3 given, but") and "(hint: " in err0


def test_an_inventory_travels_as_json(manager_ckpt, nnx_ckpt, special_ckpt, storage_ckpt):
    """What process 0 hands the others is the inventory it read, every field of it."""
    from conftest import LEGACY_DIR

    from paramscope.io.inventory import inventory_from_json, inventory_to_json, open_checkpoint
    from paramscope.io.orbax import SavedSharding

    opened = [
        open_checkpoint(manager_ckpt.path, step=100, subtree="layers"),
        open_checkpoint(manager_ckpt.path, item="opt_state"),
        open_checkpoint(os.path.join(LEGACY_DIR, "checkpoints")),
    ]
    opened += [open_checkpoint(c.path) for c in (nnx_ckpt, special_ckpt, storage_ckpt)]
    assert opened[0].saved_mesh and opened[0].params[0].stored.sharding is not None
    # an axis sharded over two mesh axes, which no fixture saves
    first = opened[0].params[0]
    spec = (("data", "model"),) + (None,) * (len(first.shape) - 1)
    opened[0].params[0] = replace(
        first, sharding=spec, stored=replace(first.stored, sharding=SavedSharding(opened[0].saved_mesh, spec))
    )
    for inv in opened:
        text = inventory_to_json(inv)
        back = inventory_from_json(text)
        assert back == inv
        assert [p.stored for p in back.params] == [p.stored for p in inv.params]
        templates = [p.stored.metadata_template for p in back.params]
        assert templates == [p.stored.metadata_template for p in inv.params] and all(templates)
        assert len({id(t) for t in templates}) == len(set(templates))  # one string per template
        assert inventory_to_json(back) == text


def test_msgpack_arrays_shared_out_across_processes():
    """A flax msgpack root: byte ranges, chunked pieces and 0-d values read by two processes
    give the one-process numbers, each process reading about half of the bytes."""
    from paramscope.io.inventory import inventory_from_json, inventory_to_json, open_checkpoint

    path = os.path.join(os.path.dirname(__file__), "data", "flax_msgpack", "checkpoints")
    inv = open_checkpoint(path)
    assert {p.stored.driver for p in inv.params} == {"bytes", "value"}
    back = inventory_from_json(inventory_to_json(inv))
    assert back == inv and [p.stored for p in back.params] == [p.stored for p in inv.params]
    args = ["norms", path, "--per-param", "--memory-budget", "2KiB", "--format", "json"]
    results = launch(args)
    assert [code for code, _, _ in results] == [0, 0], [err for _, _, err in results]
    multi = json.loads(results[0][1])
    assert_same_numbers(run_json("norms", path, "--per-param"), multi)
    total = sum(p.nbytes for p in inv.params)
    assert sum(multi["bytes_read_by_process"]) == total and min(multi["bytes_read_by_process"]) > 0.4 * total


def test_a_killed_process_stops_the_other_within_the_bound(tmp_path):
    path = str(tmp_path / "ckpt")
    rng = np.random.default_rng(1)
    checkpointer = ocp.StandardCheckpointer()
    # enough work (about 10 s a process) that the victim is killed mid-run on any machine
    checkpointer.save(path, {f"w{i}": rng.standard_normal((256, 1024)).astype(np.float32) for i in range(40)})
    checkpointer.wait_until_finished()
    port = free_port()
    args = ["stats", path, "--memory-budget", "2KiB", "--timeout", "60"]
    survivor, victim = start(args, 0, port), start(args, 1, port)
    try:
        time.sleep(4)
        assert survivor.poll() is None and victim.poll() is None
        victim.kill()
        began = time.monotonic()
        out, err = survivor.communicate(timeout=90)
        elapsed = time.monotonic() - began
    finally:
        for p in (survivor, victim):
            if p.poll() is None:
                p.kill()
                p.wait()
    assert survivor.returncode == 3 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "process 1 stopped" in lines[0], err
    assert elapsed < 60


def test_a_process_that_never_joins(shared_ckpt):
    began = time.monotonic()
    alone = start(["norms", shared_ckpt, "--timeout", "5"], 0, free_port())
    try:
        out, err = alone.communicate(timeout=60)
    finally:
        if alone.poll() is None:
            alone.kill()
    assert alone.returncode == 3 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "waiting for all 2 processes to join" in lines[0]
    assert time.monotonic() - began < 30


WRITER = """
import sys, jax, numpy as np, orbax.checkpoint as ocp
from jax.sharding import NamedSharding, PartitionSpec as P
jax.distributed.initialize(f"127.0.0.1:{sys.argv[2]}", num_processes=2, process_id=int(sys.argv[3]))
mesh = jax.make_mesh((2, 4), ("data", "model"), devices=jax.devices())
rng = np.random.default_rng(11)
tree = {
    "w": rng.standard_normal((64, 40)).astype(np.float32),
    "v": rng.standard_normal((8, 1000)).astype(np.float16),
}
placed = {
    name: jax.make_array_from_callback(x.shape, NamedSharding(mesh, spec), lambda i, x=x: x[i])
    for (name, x), spec in zip(tree.items(), (P("data", "model"), P(None, "data")))
}
checkpointer = ocp.StandardCheckpointer()
checkpointer.save(sys.argv[1], placed)
checkpointer.wait_until_finished()
"""


def test_two_writing_processes_give_the_digests_of_the_tree(tmp_path):
    import paramscope

    path, port = str(tmp_path / "two_writers"), free_port()
    writers = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, path, str(port), str(i)], env=ENV, stderr=subprocess.PIPE
        )
        for i in range(2)
    ]
    try:
        for writer in writers:
            assert writer.wait(timeout=180) == 0, writer.stderr.read()[-2000:]
    finally:
        for writer in writers:
            if writer.poll() is None:
                writer.kill()
                writer.wait()
    assert sorted(os.listdir(path)).count("ocdbt.process_1") == 1  # each process wrote its own part
    rng = np.random.default_rng(11)
    tree = {
        "w": rng.standard_normal((64, 40)).astype(np.float32),
        "v": rng.standard_normal((8, 1000)).astype(np.float16),
    }
    doc = run_json("table", path, "--digest")
    assert {p["path"]: p["digest"] for p in doc["params"]} == paramscope.digest(tree)


def test_many_small_arrays_stacked_across_processes_and_on_the_mesh(tmp_path):
    """100 small arrays, read from the b-tree and stacked: two processes, and the mesh engine,
    give the numbers and digests of one process on the host."""
    rng = np.random.default_rng(8)
    tree = {f"block_{i:03d}": {"w": rng.standard_normal((8, 16)).astype(np.float32)} for i in range(100)}
    path = str(tmp_path / "ckpt")
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(path, tree)
    checkpointer.wait_until_finished()
    args = ["stats", path, "--digest", "--format", "json"]
    single = run_json(*args)
    norms = ["norms", path, "--per-param", "--digest", "--format", "json"]
    assert_same_numbers(run_json(*norms), run_json(*norms, "--engine", "mesh"))  # float32 on the mesh
    results = launch(args)
    assert [code for code, _, _ in results] == [0, 0], [err for _, _, err in results]
    multi = json.loads(results[0][1])
    assert_same_numbers(single, multi)
    assert all(multi["bytes_read_by_process"]) and sum(multi["bytes_read_by_process"]) == 100 * 8 * 16 * 4
    for name, p in zip(sorted(tree), single["params"]):
        x = tree[name]["w"].astype(np.float64)
        assert p["std"] == pytest.approx(float(np.std(x)), rel=1e-9)
