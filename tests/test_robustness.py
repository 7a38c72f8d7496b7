"""Never crash, never touch: bad input of every kind, damaged data, read-only use, fuzzing, Ctrl-C."""

import base64
import ctypes
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import tree_snapshot
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_cli import run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory):
    """A manager root with one finished step (params, a JSON item) and one unfinished step."""
    root = str(tmp_path_factory.mktemp("tiny") / "run")
    rng = np.random.default_rng(0)
    params = {
        "dense": {
            "kernel": rng.standard_normal((64, 32)).astype(np.float32),
            "bias": np.zeros(32, np.float32),
        },
        "embed": jnp.asarray(rng.standard_normal((128, 16)), jnp.bfloat16),
    }
    manager = ocp.CheckpointManager(root)
    manager.save(
        5,
        args=ocp.args.Composite(params=ocp.args.StandardSave(params), config=ocp.args.JsonSave({"lr": 0.1})),
    )
    manager.wait_until_finished()
    manager.close()
    tmp_step = os.path.join(root, "6.orbax-checkpoint-tmp-99")
    shutil.copytree(os.path.join(root, "5"), tmp_step)
    os.remove(os.path.join(tmp_step, "params", "_METADATA"))
    for dirpath, _, filenames in os.walk(tmp_step):
        if "commit_success.txt" in filenames:
            os.remove(os.path.join(dirpath, "commit_success.txt"))
    return root


@pytest.fixture
def ckpt(tiny_root, tmp_path):
    copy = str(tmp_path / "run")
    shutil.copytree(tiny_root, copy)
    return copy


def params_dir(root):
    return os.path.join(root, "5", "params")


def data_files(root):
    folder = os.path.join(params_dir(root), "ocdbt.process_0", "d")
    return sorted((os.path.join(folder, f) for f in os.listdir(folder)), key=os.path.getsize, reverse=True)


def assert_fails(args, code, message):
    result = run(*args)
    assert result.exit_code == code, (result.exit_code, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert message in lines[0] and "hint:" in lines[0] and "Traceback" not in result.stderr
    assert result.stdout == ""


def damage(kind, root):
    """Damages a copy of the checkpoint; returns the arguments and the expected failure."""
    params = params_dir(root)
    meta = os.path.join(params, "_METADATA")
    if kind == "missing _METADATA":
        os.remove(meta)
        return ["table", root], 3, "no _METADATA"
    if kind == "_METADATA not JSON":
        open(meta, "w").write("this is not json")
        return ["table", root], 3, "_METADATA"
    if kind == "_METADATA truncated":
        text = open(meta).read()
        open(meta, "w").write(text[: len(text) // 2])
        return ["count", root], 3, "_METADATA"
    if kind == "_METADATA of the wrong structure":
        open(meta, "w").write(json.dumps({"tree_metadata": {"('a',)": {"key_metadata": 7}}}))
        return ["mask", root], 3, "unexpected structure"
    if kind == "_METADATA without a tree":
        open(meta, "w").write(json.dumps(["tree_metadata"]))
        return ["info", root], 3, "no tree_metadata"
    if kind == "missing manifest.ocdbt":
        os.remove(os.path.join(params, "manifest.ocdbt"))
        return ["table", root], 3, "manifest.ocdbt is missing"
    raise AssertionError(kind)


@pytest.mark.parametrize(
    "kind",
    [
        "missing _METADATA",
        "_METADATA not JSON",
        "_METADATA truncated",
        "_METADATA of the wrong structure",
        "_METADATA without a tree",
        "missing manifest.ocdbt",
    ],
)
def test_damaged_metadata(ckpt, kind):
    args, code, message = damage(kind, ckpt)
    before = tree_snapshot(ckpt)
    assert_fails(args, code, message)
    assert run("verify", ckpt).exit_code == 3
    assert tree_snapshot(ckpt) == before


def test_bad_paths_and_selections(ckpt, tmp_path):
    (tmp_path / "file.txt").write_text("x")
    (tmp_path / "empty").mkdir()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.md").write_text("# not a checkpoint")
    (tmp_path / "other" / "sub").mkdir()
    runs = tmp_path / "runs"  # a folder of run folders: the error points at the checkpoints
    (runs / "wandb").mkdir(parents=True)
    shutil.copytree(ckpt, runs / "run_1" / "checkpoints")
    shutil.copytree(ckpt, runs / "run_2")
    no_finished = tmp_path / "nofinished"
    shutil.copytree(
        os.path.join(ckpt, "6.orbax-checkpoint-tmp-99"), no_finished / "6.orbax-checkpoint-tmp-99"
    )
    before = tree_snapshot(ckpt)
    cases = [
        (["table", tmp_path / "missing"], 3, "does not exist"),
        (["table", tmp_path / "file.txt"], 3, "is a file"),
        (["table", tmp_path / "empty"], 3, "is not a checkpoint"),
        (["count", tmp_path / "other"], 3, "is not a checkpoint"),
        (["count", runs], 3, "found checkpoints under run_1/checkpoints/, run_2/"),
        (["norms", no_finished], 3, "no finished step, only 1 unfinished: 6.orbax-checkpoint-tmp-99"),
        (["table", ckpt, "--step", "7"], 3, "no finished step 7"),
        (["table", ckpt, "--item", "ema"], 3, "no item 'ema'"),
        (["verify", ckpt, "--item", "ema"], 3, "no item 'ema'"),
        (["table", os.path.join(ckpt, "6.orbax-checkpoint-tmp-99")], 3, "unfinished step"),
        (["mask", ckpt, "--include", "(unclosed"], 2, "invalid include regex"),
        (["mask", ckpt, "--include", "a", "--exclude", "b"], 2, "together"),
        (["table", ckpt, "--wd-include", "a", "--wd-exclude", "b"], 2, "together"),
        (["norms", ckpt, "--mesh", "data:2"], 2, "malformed --mesh"),
        (["norms", ckpt, "--mesh", "data=2,data=2"], 2, "names an axis twice"),
        (["norms", ckpt, "--mesh", "data=1024"], 2, "needs 1024 devices"),
        (["norms", ckpt, "--mesh", "data=2"], 2, "divides no dimension"),
        (["norms", ckpt, "--engine", "host", "--mesh", "data=1"], 2, "with the host engine"),
        (["stats", ckpt, "--memory-budget", "-5"], 2, "malformed size"),
        (["stats", ckpt, "--memory-budget", "0"], 2, "too small"),
        (["stats", ckpt, "--engine", "gpu"], 2, "'gpu' is not one of"),
        (["stats", ckpt, "--bogus"], 2, "No such option: --bogus"),
        (["stats", ckpt, "--timeout", "0"], 2, "greater than or equal to 1"),
    ]
    for args, code, message in cases:
        assert_fails(args, code, message)
    assert tree_snapshot(ckpt) == before


def test_damaged_sharding_file_is_a_warning_and_a_verify_failure(ckpt):
    sharding = os.path.join(params_dir(ckpt), "_sharding")
    for content in ("{not json", None):
        if content is None:
            os.remove(sharding)
        else:
            open(sharding, "w").write(content)
        result = run("table", ckpt, "--format", "json")
        assert result.exit_code == 0
        assert all(p["sharding"] is None for p in json.loads(result.stdout)["params"])
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and "_sharding" in lines[0] and "warning" in lines[0]
        assert run("norms", ckpt, "-q").exit_code == 0
        verified = run("verify", ckpt, "--format", "json")
        assert verified.exit_code == 3
        assert any("_sharding" in p["problem"] for p in json.loads(verified.stdout)["problems"])


def test_sharding_entry_for_an_unknown_array_is_found_by_verify(ckpt):
    sharding = os.path.join(params_dir(ckpt), "_sharding")
    entries = json.load(open(sharding))
    entries[base64.urlsafe_b64encode(b"ghost.weight").decode()] = json.dumps(
        {"sharding_type": "SingleDeviceSharding"}
    )
    json.dump(entries, open(sharding, "w"))
    assert run("table", ckpt).exit_code == 0
    verified = run("verify", ckpt, "--format", "json")
    assert verified.exit_code == 3
    problems = json.loads(verified.stdout)["problems"]
    assert [p["path"] for p in problems] == ["ghost.weight"]


@pytest.mark.parametrize("kind", ["missing", "truncated", "corrupted"])
def test_damaged_data_file(ckpt, kind):
    target = data_files(ckpt)[0]
    if kind == "missing":
        os.remove(target)
    elif kind == "truncated":
        os.truncate(target, os.path.getsize(target) // 3)
    else:
        data = bytearray(open(target, "rb").read())
        for i in range(64, len(data), 61):
            data[i] ^= 0x5A
        open(target, "wb").write(bytes(data))
    before = tree_snapshot(ckpt)
    assert run("table", ckpt).exit_code == 0  # metadata still reads: only the data is damaged
    for command in ("norms", "stats"):
        assert_fails([command, ckpt], 3, "cannot read array")
    verified = run("verify", ckpt, "--format", "json")
    assert verified.exit_code == 3
    doc = json.loads(verified.stdout)
    assert not doc["ok"] and doc["problems"]
    assert {p["path"] for p in doc["problems"]} <= {"dense.kernel", "dense.bias", "embed"}
    assert all(p["item"] == "params" and "data file" in p["problem"] for p in doc["problems"])
    assert tree_snapshot(ckpt) == before


def test_verify_passes_a_sound_checkpoint(ckpt, legacy_ckpt, manager_ckpt):
    for path in (ckpt, legacy_ckpt[0], manager_ckpt.path):
        result = run("verify", path, "--format", "json", "--memory-budget", "16KiB")
        assert result.exit_code == 0, result.stdout
        doc = json.loads(result.stdout)
        assert doc["ok"] and doc["problems"] == [] and doc["arrays"] > 0 and doc["bytes_read"] > 0
    assert "OK" in run("verify", ckpt).stdout


def _without_permission_override():
    """In the child, before exec: drop root's power to ignore file permissions (a no-op for others).

    prctl(PR_CAPBSET_DROP) takes CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH out of the bounding
    set, so the exec'd process runs as root but is refused what the mode bits refuse.
    """
    if os.geteuid() != 0:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    for capability in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
        if libc.prctl(24, capability, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP) failed")


def test_no_read_permission(ckpt):
    os.chmod(ckpt, 0o000)
    try:
        result = subprocess.run(
            [sys.executable, "-m", "paramscope", "table", ckpt],
            capture_output=True,
            text=True,
            preexec_fn=_without_permission_override,
            timeout=120,
        )
    finally:
        os.chmod(ckpt, 0o755)
    assert result.returncode == 3, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "permission denied" in lines[0]


def test_read_only_copy_beside_a_step_being_written(ckpt):
    """Every command on a read-only checkpoint while a save is writing its next step."""
    tmp_step = os.path.join(ckpt, "6.orbax-checkpoint-tmp-99")
    for dirpath, _, filenames in os.walk(ckpt):
        if dirpath.startswith(tmp_step):
            continue
        for name in filenames:
            os.chmod(os.path.join(dirpath, name), 0o444)
        os.chmod(dirpath, 0o555)
    stop = threading.Event()

    def writer():
        n = 0
        while not stop.is_set():
            with open(os.path.join(tmp_step, "params", f"part{n % 5}"), "ab") as f:
                f.write(os.urandom(4096))
            n += 1
            time.sleep(0.005)

    thread = threading.Thread(target=writer)
    before = {k: v for k, v in tree_snapshot(ckpt).items() if not k.startswith("6.")}
    thread.start()
    try:
        for args in (
            ["info"],
            ["table", "--norms"],
            ["count"],
            ["norms", "--per-param"],
            ["stats"],
            ["verify"],
            ["mask", "--exclude", "bias"],
        ):
            result = run(args[0], ckpt, *args[1:], "--format", "json")
            assert result.exit_code == 0, (args, result.stderr)
    finally:
        stop.set()
        thread.join()
        for dirpath, _, _ in os.walk(ckpt):
            os.chmod(dirpath, 0o755)
    after = {k: v for k, v in tree_snapshot(ckpt).items() if not k.startswith("6.")}
    assert after == before
    assert os.path.isdir(tmp_step) and os.listdir(os.path.join(tmp_step, "params"))


# ----------------------------------------------------------------------------------------------
# Fuzzing

TARGETS = ["5/params/_METADATA", "5/params/_sharding", "5/_CHECKPOINT_METADATA", "5/config/metadata"]
COMMANDS = [
    ["info"],
    ["table"],
    ["count", "--depth", "2"],
    ["mask", "--exclude", "bias"],
    ["norms", "-q"],
    ["stats", "-q"],
    ["verify"],
    ["table", "--item", "params", "--stats"],
]

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10, 10**6) | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)


def _edit_json(data, draw_path, replacement):
    """Replaces the value at a random path of a JSON document."""
    node = data
    for step in draw_path:
        children = (
            list(node.items())
            if isinstance(node, dict)
            else list(enumerate(node))
            if isinstance(node, list)
            else []
        )
        if not children:
            break
        key, child = children[step % len(children)]
        if not isinstance(child, (dict, list)) or step % 3 == 0:
            node[key] = replacement
            return data
        node = child
    return replacement if node is data else data


@st.composite
def mutations(draw):
    target = draw(st.sampled_from(TARGETS))
    kind = draw(st.sampled_from(["truncate", "random bytes", "json edit", "delete"]))
    return (
        target,
        kind,
        draw(st.integers(0, 10**6)),
        draw(st.binary(max_size=64)),
        draw(st.lists(st.integers(0, 50), max_size=6)),
        draw(json_values),
        draw(st.sampled_from(COMMANDS)),
    )


@settings(max_examples=150, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(mutations())
def test_fuzzed_metadata_never_crashes(tiny_root, tmp_path_factory, mutation):
    root = str(tmp_path_factory.mktemp("fuzz") / "run")
    shutil.copytree(tiny_root, root)
    damage_and_run(root, *mutation, codes=(0, 1, 2, 3))


def damage_and_run(root, target, kind, position, noise, path, replacement, command, codes):
    """Damages one file of the checkpoint at ``root`` as a fuzzer drew it, runs a command on it:
    a report or one error line, one of ``codes``, never a traceback. Removes ``root``."""
    file = os.path.join(root, target)
    content = open(file, "rb").read()
    if kind == "truncate":
        content = content[: position % max(len(content), 1)]
    elif kind == "random bytes":
        at = position % max(len(content), 1)
        content = content[:at] + noise + content[at + len(noise) :]
    elif kind == "json edit":
        content = json.dumps(_edit_json(json.loads(content), path, replacement)).encode()
    if kind == "delete":
        os.remove(file)
    else:
        open(file, "wb").write(content)
    result = run(command[0], root, *command[1:])
    assert result.exit_code in codes, (result.exit_code, result.stderr)
    assert "Traceback" not in result.stderr
    if result.exit_code:
        assert result.stderr.strip().splitlines()[-1].startswith("paramscope: error:")
    shutil.rmtree(root)


# ----------------------------------------------------------------------------------------------
# Interrupt


def test_ctrl_c_exits_130_promptly(tmp_path):
    path = str(tmp_path / "ckpt")
    rng = np.random.default_rng(1)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(path, {f"w{i}": rng.standard_normal((256, 1024)).astype(np.float32) for i in range(16)})
    checkpointer.wait_until_finished()
    process = subprocess.Popen(
        [sys.executable, "-m", "paramscope", "norms", path, "--memory-budget", "2KiB"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(2.0)
    assert process.poll() is None, "finished before it could be interrupted"
    sent = time.monotonic()
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=30)
    assert time.monotonic() - sent < 5
    assert process.returncode == 130
    assert stderr.strip().splitlines() == ["paramscope: error: interrupted"]
