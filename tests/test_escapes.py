"""Nothing from a checkpoint reaches the terminal raw (names with control characters are shown
escaped), paramscope writes only where the user points and never into the checkpoint it reads,
and every way out keeps its documented exit code and one line on stderr."""

import os
import select
import shutil
import subprocess
import sys
import warnings

import numpy as np
import orbax.checkpoint as ocp
import pytest
from test_cli import run
from test_safetensors import write

from paramscope.errors import printable, redacted

EVIL = "x\x1b]0;PWNED\x07\x1b[2J\x1b[31mevil\x9b\u202e"
SHOWN = "x\\x1b]0;PWNED\\x07\\x1b[2J\\x1b[31mevil\\x9b\\u202e"
RAW = [b"\x1b]0;PWNED", b"\x07", b"\x1b[2J", b"\x1b[31m", "\x9b".encode(), "\u202e".encode()]


def test_printable_escapes_controls_and_keeps_text():
    assert printable(EVIL) == SHOWN
    assert printable("Gewichte.kernel·ü 層") == "Gewichte.kernel·ü 層"
    assert printable("a\tb\nc\x7f") == "a\\x09b\\x0ac\\x7f"
    assert printable("a\nb", keep="\n") == "a\nb"


@pytest.fixture(scope="module")
def evil(tmp_path_factory):
    """A manager root of two steps whose array named EVIL holds a NaN, a second item folder
    named after EVIL, and a safetensors file with the same name."""
    folder = tmp_path_factory.mktemp("evil")
    root = str(folder / "run")
    value = np.ones((4, 3), np.float32)
    value[0, 0] = np.nan
    manager = ocp.CheckpointManager(root)
    for step in (1, 2):
        tree = {EVIL: value * step, "ok": np.zeros(3, np.float32)}
        manager.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(tree)))
    manager.wait_until_finished()
    manager.close()
    shutil.copytree(os.path.join(root, "2", "params"), os.path.join(root, "2", "item" + EVIL))
    single = write(folder / "st" / "model.safetensors", {EVIL: value, "ok": np.zeros(3, np.float32)})
    return root, single


def on_terminal(*args, env=None, timeout=180):
    """stdout and stderr of the command line run on a real pseudo-terminal, as the bytes the
    terminal receives."""
    master, slave = os.openpty()
    environ = {k: v for k, v in os.environ.items() if k != "NO_COLOR"}
    environ.update({"COLUMNS": "200", "TERM": "xterm", **(env or {})})
    process = subprocess.Popen(
        [sys.executable, "-m", "paramscope", *map(str, args)],
        stdin=subprocess.DEVNULL,
        stdout=slave,
        stderr=slave,
        env=environ,
    )
    os.close(slave)
    received = []
    try:
        while True:
            ready, _, _ = select.select([master], [], [], timeout)
            if not ready:  # a harness bound, not a timing assertion
                process.kill()
                raise AssertionError(f"paramscope {args} did not finish")
            try:
                data = os.read(master, 1 << 16)
            except OSError:  # the command closed the terminal
                break
            if not data:
                break
            received.append(data)
    finally:
        os.close(master)
    process.wait(timeout=timeout)
    return process.returncode, b"".join(received)


def test_names_reach_a_terminal_escaped(evil):
    root, single = evil
    commands = [
        ("table", single),
        ("stats", single),
        ("stats", single, "-f", "csv"),
        ("norms", single, "-f", "json"),  # the NaN warning on stderr
        ("norms", single, "-f", "markdown"),
        ("info", root),
        ("verify", root),
        ("diff", os.path.join(root, "1"), os.path.join(root, "2")),
        ("table", root, "--item", "missing"),  # the item folder in the hint
    ]
    for command in commands:
        code, shown = on_terminal(*command)
        assert code in (0, 1, 3), (command, shown)
        for raw in RAW:
            assert raw not in shown, (command, raw, shown)
        assert b"x\\x1b]0;PWNED" in shown, (command, shown)
        assert b"Traceback" not in shown


def test_a_plain_terminal_gets_no_escape_sequence_at_all(evil):
    _, single = evil
    code, shown = on_terminal("stats", single, env={"NO_COLOR": "1", "TERM": "dumb"})
    assert code == 0
    assert b"\x1b" not in shown and b"\x07" not in shown
    assert SHOWN.encode() in shown and b"NaN/Inf value(s) in 1 parameter(s)" in shown


def test_redacted_hides_credentials_in_urls():
    assert redacted("endpoint http://user:SECRET@host:9000/x") == "endpoint http://***@host:9000/x"
    assert redacted("s3://bucket/a@b and http://p@ss:w@rd@h/") == "s3://bucket/a@b and http://***@h/"


def test_credentials_in_an_endpoint_are_never_echoed(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "TENSORSTORE_"))}
    env.update(
        HOME=str(tmp_path),
        AWS_EC2_METADATA_DISABLED="true",
        AWS_ACCESS_KEY_ID="key",
        AWS_SECRET_ACCESS_KEY="secret",
        AWS_REGION="us-east-1",
        AWS_ENDPOINT_URL_S3="http://user:SECRET@127.0.0.1:9",
    )
    result = subprocess.run(
        [sys.executable, "-m", "paramscope", "count", "s3://bucket/ckpt"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 3, result.stderr
    assert "SECRET" not in result.stderr and "user:" not in result.stderr
    assert "http://***@127.0.0.1:9" in result.stderr and result.stderr.count("\n") == 1


def test_debugging_prints_the_traceback_and_keeps_the_exit_code(tmp_path):
    missing = tmp_path / "missing"
    quiet = run("table", missing)
    loud = run("table", missing, env={"PARAMSCOPE_DEBUG": "1"})
    assert quiet.exit_code == loud.exit_code == 3
    assert "Traceback" not in quiet.stderr and "Traceback" in loud.stderr
    assert loud.stderr.splitlines()[-1] == quiet.stderr.strip()


def _tree(root):
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, files in os.walk(root) for f in files)


def test_writes_into_the_checkpoint_or_to_urls_are_refused_up_front(evil, tmp_path):
    root, single = evil
    before = _tree(root)
    link = tmp_path / "link"
    os.symlink(os.path.join(root, "2"), link)
    linked_run = tmp_path / "linked_run"
    linked_run.mkdir()
    os.symlink(os.path.join(root, "2"), linked_run / "2")
    refused = [
        ("stats", root, "--plot", os.path.join(root, "2", "params", "x.png")),
        ("stats", root, "--plot", link / "x.png"),  # through a symlink
        ("history", root, "--plot", os.path.join(root, "h.png")),
        ("history", root, "--cache", os.path.join(root, "2")),
        ("history", root, "--cache", link / "cache"),
        ("snapshot", root, "-o", link / "baseline.json"),
        # a run whose step is a link: the step's real folder is the checkpoint's too
        ("snapshot", linked_run, "-o", os.path.join(root, "2", "baseline.json")),
        ("stats", linked_run, "--plot", os.path.join(root, "2", "params", "x.png")),
        ("history", linked_run, "--cache", os.path.join(root, "2", "c")),
        ("stats", single, "--plot", "s3://bucket/p.png"),
        ("history", root, "--plot", "gs://bucket/h.png"),
        ("history", root, "--cache", "s3://bucket/cache"),
        ("snapshot", single, "-o", "s3://bucket/b.json"),
        ("stats", single, "--plot", tmp_path / "missing" / "p.png"),
        ("stats", single, "--plot", tmp_path / "p.txt"),
    ]
    for args in refused:
        result = run(*args)
        assert result.exit_code == 2, (args, result.stderr)
        assert result.stderr.count("\n") == 1 and "hint:" in result.stderr and result.stdout == ""
    assert _tree(root) == before
    assert not os.path.exists("s3:") and not os.path.exists("gs:")
    # refused before the checkpoint is even opened: a missing one would be exit 3
    assert run("stats", tmp_path / "none", "--plot", "s3://bucket/p.png").exit_code == 2
    assert run("history", tmp_path / "none", "--cache", "s3://bucket/c").exit_code == 2


def test_a_read_only_folder_is_refused_before_reading(evil, tmp_path):
    from test_robustness import _without_permission_override

    _, single = evil
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        for args in (
            ["stats", single, "--plot", folder / "p.png"],
            ["snapshot", single, "-o", folder / "b.json"],
        ):
            result = subprocess.run(
                [sys.executable, "-m", "paramscope", *map(str, args)],
                capture_output=True,
                text=True,
                timeout=300,
                preexec_fn=_without_permission_override,
            )
            assert result.returncode == 2, result.stderr
            assert "not writable" in result.stderr and result.stderr.count("\n") == 1
        assert os.listdir(folder) == []
    finally:
        folder.chmod(0o755)


def test_a_plot_and_a_cache_beside_the_checkpoint_are_written(evil, tmp_path):
    root, _ = evil
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = run("history", root, "--plot", tmp_path / "h.png", "--cache", tmp_path / "new" / "cache")
    assert result.exit_code == 0, result.stderr
    assert os.path.getsize(tmp_path / "h.png") and os.listdir(tmp_path / "new" / "cache")
    assert not [w for w in caught if "Glyph" in str(w.message)]  # names drawn escaped


def test_hints_listing_steps_and_items_stay_short(evil, tmp_path):
    root, _ = evil
    many = tmp_path / "many"
    many.mkdir()
    for step in range(1, 301):  # the same finished step, under 300 numbers
        shutil.copytree(os.path.join(root, "1"), many / str(step))
    steps = "finished steps: 1, 2, 3, 4, 5 and 295 more"
    for args, listed in [
        (("table", many, "--step", 9999), steps),
        (("history", many, "--steps", "5000:6000", "--no-cache"), steps),
        (("verify", many, "--item", "nope"), "items: params"),
    ]:
        result = run(*args)
        assert result.exit_code == 3, result.stderr
        assert result.stderr.count("\n") == 1 and listed in result.stderr and len(result.stderr) < 300


def test_damaged_numbers_in_metadata_are_exit_3_or_unknown(evil, tmp_path):
    import json

    import msgpack

    root, _ = evil
    copy = tmp_path / "run"
    shutil.copytree(root, copy, ignore=shutil.ignore_patterns("item*"))
    for step, value in (("1", 1e30), ("2", float("nan"))):
        path = copy / step / "_CHECKPOINT_METADATA"
        meta = json.loads(path.read_text())
        meta["commit_timestamp_nsecs"] = meta["init_timestamp_nsecs"] = value
        path.write_text(json.dumps(meta))
    for step in ("1", "2"):
        result = run("info", copy, "--step", step)
        assert result.exit_code == 0, result.stderr
        assert "started unknown, committed unknown" in result.stdout
    for cache in ("--no-cache", tmp_path / "cache"):
        result = run("history", copy, *(["--no-cache"] if cache == "--no-cache" else ["--cache", cache]))
        assert result.exit_code == 0, result.stderr

    flax = tmp_path / "flax"  # a chunked array whose shape is indexed by "²", which int() refuses
    flax.mkdir()
    piece = msgpack.ExtType(1, msgpack.packb([[12], "float32", bytes(48)]))
    chunked = {"__msgpack_chunked_array__": True, "shape": {"0": 4, "²": 3}, "chunks": {"0": piece}}
    (flax / "checkpoint_1").write_bytes(msgpack.packb({"w": chunked}))
    result = run("table", flax)
    assert result.exit_code == 3 and result.stderr.count("\n") == 1, result.stderr
    assert "unexpected entry 'shape.²'" in result.stderr
