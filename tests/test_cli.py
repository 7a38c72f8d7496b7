"""The command line, through typer's CliRunner and as a real process, on real checkpoints."""

import csv
import glob
import io
import json
import math
import os
import re
import shutil
import stat
import subprocess
import sys
from dataclasses import dataclass

import pytest
from conftest import f64_norm, tree_snapshot
from typer.testing import CliRunner

from paramscope.cli.app import run as run_cli
from paramscope.output import reports as R

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMANDS = ["info", "table", "count", "norms", "stats", "mask", "verify"]


@dataclass
class Result:
    exit_code: int
    stdout: str
    stderr: str


def run(*args, env=None):
    """The command line in this process, the way ``main`` runs it (usage errors included)."""
    with CliRunner().isolation(env=env) as (out, err, _):
        code = run_cli([str(a) for a in args])
        sys.stdout.flush()
        sys.stderr.flush()
        return Result(code, out.getvalue().decode(), err.getvalue().decode())


def run_json(*args):
    result = run(*args, "--format", "json")
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("fmt", ["table", "json", "csv", "markdown"])
def test_every_command_renders_every_format(manager_ckpt, command, fmt):
    result = run(command, manager_ckpt.path, "--format", fmt)
    assert result.exit_code == 0, result.stderr
    out = result.stdout
    paths = manager_ckpt.values[200]["params"]
    if fmt == "json":
        assert json.loads(out)["schema"] == R.schema(command)
    elif fmt == "csv":
        rows = list(csv.reader(io.StringIO(out.split("\n\n")[0])))
        assert len(rows) >= (1 if command == "verify" else 2) and len({len(r) for r in rows}) == 1
    elif fmt == "markdown" and command != "verify":  # verify of a sound checkpoint: a sentence
        assert re.search(r"^\|.*\|$", out, re.M) and "|---" in out
    if command in ("table", "mask") and fmt != "json":
        for path in paths:
            assert path in out


def test_table_json(manager_ckpt):
    doc = run_json("table", manager_ckpt.path)
    values, specs = manager_ckpt.values[200]["params"], manager_ckpt.specs
    assert doc["step"] == 200 and doc["item"] == "params" and doc["checkpoint"] == manager_ckpt.path
    by_path = {p["path"]: p for p in doc["params"]}
    assert set(by_path) == set(values)
    for path, value in values.items():
        row = by_path[path]
        assert row["shape"] == list(value.shape) and row["dtype"] == str(value.dtype)
        assert row["count"] == value.size and row["bytes"] == value.nbytes
        expected = (
            [None] * value.ndim  # replicated: no dimension split
            if specs[path] is None
            else [list(e) if isinstance(e, tuple) else e for e in specs[path]]
        )
        assert row["sharding"] == expected
        assert "norm" not in row and "weight_decay" not in row
    assert doc["total"] == {
        "count": sum(v.size for v in values.values()),
        "bytes": sum(v.nbytes for v in values.values()),
    }
    assert [p["path"] for p in doc["params"]] == sorted(by_path)


def test_table_norms_sort_filter_and_weight_decay(manager_ckpt):
    values = manager_ckpt.values[200]["params"]
    doc = run_json(
        "table",
        manager_ckpt.path,
        "--norms",
        "--sort",
        "norm",
        "--wd-exclude",
        "bias$",
        "--wd-exclude",
        "LayerNorm",
    )
    norms = [p["norm"] for p in doc["params"]]
    assert norms == sorted(norms, reverse=True)
    for row in doc["params"]:
        assert row["norm"] == pytest.approx(f64_norm(values[row["path"]]), rel=1e-6)
        assert row["weight_decay"] == (not (row["path"].endswith("bias") or "LayerNorm" in row["path"]))
    doc = run_json("table", manager_ckpt.path, "--filter", "kernel$", "--sort", "count")
    assert {p["path"] for p in doc["params"]} == {p for p in values if p.endswith("kernel")}
    counts = [p["count"] for p in doc["params"]]
    assert counts == sorted(counts, reverse=True)
    assert doc["total"]["count"] == sum(counts)


def test_subtree_step_and_item_options(manager_ckpt, standard_ckpt):
    doc = run_json("table", standard_ckpt.path, "--subtree", "params")
    expected = {k[len("params.") :] for k in standard_ckpt.values if k.startswith("params.")}
    assert {p["path"] for p in doc["params"]} == expected and doc["subtree"] == "params"
    doc = run_json("count", manager_ckpt.path, "--step", "100", "--item", "opt_state")
    assert doc["step"] == 100 and doc["item"] == "opt_state"
    assert doc["total"]["count"] == sum(v.size for v in manager_ckpt.values[100]["opt_state"].values())


def test_count_json(manager_ckpt):
    values = manager_ckpt.values[200]["params"]
    doc = run_json("count", manager_ckpt.path, "--depth", "2")
    assert doc["total"]["count"] == sum(v.size for v in values.values())
    assert sum(g["count"] for g in doc["groups"]) == doc["total"]["count"]
    assert sum(d["count"] for d in doc["by_dtype"].values()) == doc["total"]["count"]
    assert {g["path"] for g in doc["groups"]} == {".".join(p.split(".")[:2]) for p in values}
    assert doc["by_dtype"]["bfloat16"]["bytes"] == sum(
        v.nbytes for v in values.values() if v.dtype.name == "bfloat16"
    )
    assert run_json("count", manager_ckpt.path, "--depth", "0")["groups"][0]["path"] == ""


def test_norms_json_and_table(manager_ckpt):
    values = manager_ckpt.values[200]["params"]
    expected = math.sqrt(sum(f64_norm(v) ** 2 for v in values.values()))
    doc = run_json("norms", manager_ckpt.path)
    assert doc["global_norm"] == pytest.approx(expected, rel=1e-6)
    assert doc["nonfinite"] == 0 and "params" not in doc
    assert doc["engine"] == "host" and doc["mesh"] is None  # no accelerator here: numpy on the host
    mesh_doc = run_json("norms", manager_ckpt.path, "--engine", "mesh")
    assert mesh_doc["mesh"] == {"data": 2, "model": 4} and mesh_doc["engine"] == "mesh"
    assert mesh_doc["global_norm"] == pytest.approx(expected, rel=1e-6)
    doc = run_json("norms", manager_ckpt.path, "--per-param", "--mesh", "data=2,model=2")
    assert doc["mesh"] == {"data": 2, "model": 2}
    assert {p["path"]: pytest.approx(f64_norm(values[p["path"]]), rel=1e-6) for p in doc["params"]} == {
        p["path"]: p["norm"] for p in doc["params"]
    }
    text = run("norms", manager_ckpt.path, "--per-param").stdout
    assert f"{expected:.6g}" in text and "Embed_0.embedding" in text


def test_norms_nonfinite(special_ckpt):
    result = run("norms", special_ckpt.path, "--per-param", "--format", "json")
    assert result.exit_code == 0
    doc = json.loads(result.stdout)  # strict JSON: NaN/Inf become null
    assert doc["nonfinite"] == 2 and doc["global_norm"] is None
    rows = {p["path"]: p for p in doc["params"]}
    assert rows["f32.with_nan"] == {**rows["f32.with_nan"], "norm": None, "nonfinite": 1}
    assert rows["bf16"]["norm"] == pytest.approx(f64_norm(special_ckpt.values["bf16"]), rel=1e-6)
    assert "f32.with_nan" in result.stderr and "NaN/Inf" in result.stderr
    failed = run("norms", special_ckpt.path, "--fail-on-nonfinite")
    assert failed.exit_code == 1
    assert run("norms", special_ckpt.path, "--fail-on-nonfinite", "--filter", "bf16|fp16|int8").exit_code == 0


def test_mask_json_and_warnings(manager_ckpt):
    values = manager_ckpt.values[200]["params"]
    result = run(
        "mask", manager_ckpt.path, "--include", "kernel$", "--include", "nomatch", "--format", "json"
    )
    assert result.exit_code == 0
    doc = json.loads(result.stdout)
    kernels = [p for p in values if p.endswith("kernel")]
    assert {p["path"]: p["weight_decay"] for p in doc["params"]} == {p: p in kernels for p in values}
    assert doc["decayed"] == {"count": sum(values[p].size for p in kernels), "arrays": len(kernels)}
    assert doc["not_decayed"]["arrays"] == len(values) - len(kernels)
    assert doc["unmatched_patterns"] == ["nomatch"] and doc["include"] == ["kernel$", "nomatch"]
    assert doc["exclude"] is None
    assert result.stderr == "paramscope: warning: pattern 'nomatch' matches no parameter\n"
    assert "nomatch" not in run("mask", manager_ckpt.path, "--include", "nomatch", "-q").stderr


def test_info_json(manager_ckpt):
    doc = run_json("info", manager_ckpt.path)
    assert doc["layout"] == "root" and doc["step"] == 200
    assert [(s["step"], s["finished"]) for s in doc["steps"]] == [(100, True), (200, True), (300, False)]
    items = {i["name"]: i for i in doc["items"]}
    assert items["metadata"]["content"] == {"model": "Model", "step": 200}
    assert items["params"]["storage"] == "ocdbt" and items["step"]["kind"] == "array"
    text = run("info", manager_ckpt.path).stdout
    assert "unfinished" in text and "checkpoint_300.orbax-checkpoint-tmp" in text


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["table", "{missing}"], 3, "does not exist"),
        (["count", "{root}", "--step", "999"], 3, "no finished step 999"),
        (["count", "{root}", "--item", "ema"], 3, "no item 'ema'"),
        (["table", "{root}", "--item", "metadata"], 3, "is a JSON item"),
        (["mask", "{root}", "--include", "a", "--exclude", "b"], 2, "together"),
        (["mask", "{root}", "--exclude", "[bad"], 2, "invalid exclude regex"),
        (["table", "{root}", "--filter", "(bad"], 2, "invalid --filter regex"),
        (["norms", "{root}", "--mesh", "data=two"], 2, "malformed --mesh"),
        (["norms", "{root}", "--mesh", "data=64"], 2, "needs 64 devices"),
    ],
)
def test_errors_are_one_line_with_exit_code(manager_ckpt, tmp_path, args, code, message):
    args = [a.format(root=manager_ckpt.path, missing=tmp_path / "missing") for a in args]
    result = run(*args)
    assert result.exit_code == code
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "hint:" in lines[0]
    assert "Traceback" not in result.stderr


def test_version_and_help():
    from paramscope import __version__

    assert run("--version").stdout.strip() == f"paramscope {__version__}"
    site = glob.glob(os.path.join(ROOT, "docs", "**", "*.md"), recursive=True)
    pages = [os.path.join(ROOT, "README.md"), *site]
    manual = ""
    for page in pages:
        with open(page) as f:
            manual += f.read()
    assert run("-V").stdout == run("--version").stdout
    listing = run("--help").stdout
    with open(os.path.join(ROOT, "README.md")) as f:
        codes = re.findall(r"^\| (\d+) \| ", f.read(), re.M)
    said = " ".join(listing.split()).split("Exit codes: ", 1)[1].split(".", 1)[0]
    assert "130" in codes and re.findall(r"(\d+) [a-z]", said) == codes  # every documented code
    commands = re.findall(r"^│ ([a-z]+) ", listing, re.M)
    assert set(COMMANDS) < set(commands) and {"diff", "snapshot", "check"} <= set(commands)
    for command in commands:
        result = run(command, "--help")
        assert result.exit_code == 0 and "Examples:" in result.stdout
        assert f"paramscope {command}" in manual


def _process(*args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "paramscope", *map(str, args)],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=300,
    )


@pytest.mark.parametrize(
    ("argv", "env", "expected"),
    [
        (["paramscope", "--help"], {}, "Usage:"),
        # shell completion, as bash asks for it after `paramscope no<TAB>`
        (
            ["paramscope"],
            {"_PARAMSCOPE_COMPLETE": "complete_bash", "COMP_WORDS": "paramscope no", "COMP_CWORD": "1"},
            "norms",
        ),
    ],
)
def test_help_and_completion_do_not_import_jax(argv, env, expected):
    code = (
        f"import sys, runpy\nsys.argv = {argv!r}\n"
        "try:\n    runpy.run_module('paramscope', run_name='__main__')\nexcept SystemExit:\n    pass\n"
        "print('HEAVY', sorted(m for m in ('jax', 'flax', 'orbax', 'tensorstore') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env={**os.environ, **env}
    ).stdout
    assert expected in out and "HEAVY []" in out


def test_metadata_commands_do_not_import_jax(manager_ckpt):
    for command in ("info", "table", "count", "mask"):
        code = (
            "import sys, runpy\n"
            f"sys.argv = ['paramscope', {command!r}, {manager_ckpt.path!r}, '--format', 'json']\n"
            "try:\n    runpy.run_module('paramscope', run_name='__main__')\nexcept SystemExit:\n    pass\n"
            "print('JAX', 'jax' in sys.modules, file=sys.stderr)"
        )
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        assert "JAX False" in result.stderr, command


def test_process_stdout_is_pure_json_and_stderr_quiet(manager_ckpt):
    result = _process("norms", manager_ckpt.path, "--per-param", "--format", "json")
    assert result.returncode == 0
    assert json.loads(result.stdout)["schema"] == "paramscope.norms/2"
    assert result.stderr == ""
    failed = _process("table", manager_ckpt.path, "--step", "999")
    assert failed.returncode == 3 and failed.stdout == "" and len(failed.stderr.strip().splitlines()) == 1
    debug = _process("table", manager_ckpt.path, "--step", "999", env={"PARAMSCOPE_DEBUG": "1"})
    assert debug.returncode != 0 and "Traceback" in debug.stderr


def test_commands_never_touch_the_checkpoint(manager_ckpt, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(manager_ckpt.path, root)
    # A planted pickle and a planted handler module: reading must neither unpickle nor import.
    marker = tmp_path / "executed"
    module_dir = tmp_path / "modules"
    module_dir.mkdir()
    (module_dir / "planted_handler_module.py").write_text(f"open({str(marker)!r}, 'w').write('imported')\n")
    step = root / "checkpoint_200"
    meta = json.loads((step / "_CHECKPOINT_METADATA").read_text())
    meta["item_handlers"] = {k: "planted_handler_module.Handler" for k in ("params", "opt_state")}
    (step / "_CHECKPOINT_METADATA").write_text(json.dumps(meta))
    import pickle

    class Planted:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (step / "trainer_state.pkl").write_bytes(pickle.dumps(Planted()))
    (root / "extra.pkl").write_bytes(pickle.dumps(Planted()))
    sys.path.insert(0, str(module_dir))
    try:
        for mode in ("writable", "read-only"):
            if mode == "read-only":
                for dirpath, dirnames, filenames in os.walk(root):
                    for name in dirnames + filenames:
                        full = os.path.join(dirpath, name)
                        os.chmod(full, os.stat(full).st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
                os.chmod(root, os.stat(root).st_mode & ~stat.S_IWUSR)
            before = tree_snapshot(root)
            for args in (
                ["info"],
                ["table", "--norms"],
                ["count"],
                ["norms", "--per-param"],
                ["mask", "--include", "k"],
                ["table", "--step", "100", "--item", "opt_state"],
                ["norms", "--item", "step"],
            ):
                result = run(args[0], root, *args[1:], "--format", "json")
                assert result.exit_code == 0, (args, result.stderr)
            assert tree_snapshot(root) == before
            assert any("orbax-checkpoint-tmp" in name for name in os.listdir(root))
            assert not marker.exists()
            assert "planted_handler_module" not in sys.modules
    finally:
        sys.path.remove(str(module_dir))
        for dirpath, _, _ in os.walk(root):
            os.chmod(dirpath, 0o755)


def test_legacy_checkpoint_from_the_command_line(legacy_ckpt):
    path, expected = legacy_ckpt
    doc = run_json("norms", path, "--per-param")
    wanted = expected["steps"]["200"]["params"]
    assert {p["path"]: pytest.approx(wanted[p["path"]]["norm"], rel=1e-6) for p in doc["params"]} == {
        p["path"]: p["norm"] for p in doc["params"]
    }
    info = run_json("info", path)
    assert {i["name"]: i["kind"] for i in info["items"]} == {
        "params": "pytree",
        "opt_state": "pytree",
        "step": "array",
        "rng": "array",
        "metadata": "json",
    }
