"""CI gates: diff two checkpoints, pin a baseline, check against it; JSON Schemas of every command."""

import json
import math
import os
from importlib.resources import files

import jax
import jax.numpy as jnp
import jsonschema
import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import f64_norm, make_mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from test_cli import run, run_json


def base_values():
    rng = np.random.default_rng(11)
    return {
        "embed": rng.standard_normal((64, 16)).astype(np.float32),
        "dense": {
            "kernel": rng.standard_normal((16, 32)).astype(np.float32),
            "bias": np.zeros(32, np.float32),
        },
        "norm": {"scale": np.ones(16, jnp.bfloat16)},
    }


SPECS = {"embed": P("model", "data"), "dense.kernel": P("data", "model")}


def save(path, values, specs=SPECS):
    mesh = make_mesh()

    def place(key_path, value):
        name = ".".join(k.key for k in key_path)
        return jax.device_put(value, NamedSharding(mesh, specs.get(name, P())))

    placed = jax.tree_util.tree_map_with_path(place, values)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(path, placed)
    checkpointer.wait_until_finished()
    return path


@pytest.fixture(scope="module")
def variants(tmp_path_factory):
    root = tmp_path_factory.mktemp("gates")
    values = base_values()
    paths = {"base": save(str(root / "base"), values), "same": save(str(root / "same"), base_values())}
    scaled = base_values()
    scaled["dense"]["kernel"] = (scaled["dense"]["kernel"] * np.float32(1.001)).astype(np.float32)
    paths["scaled"] = save(str(root / "scaled"), scaled)
    added = base_values()
    added["head"] = np.ones((16, 4), np.float32)
    paths["added"] = save(str(root / "added"), added)
    removed = base_values()
    del removed["norm"]
    paths["removed"] = save(str(root / "removed"), removed)
    reshaped = base_values()
    reshaped["embed"] = reshaped["embed"].reshape(32, 32)
    paths["reshaped"] = save(str(root / "reshaped"), reshaped)
    recast = base_values()
    recast["dense"]["kernel"] = recast["dense"]["kernel"].astype(jnp.bfloat16)
    paths["recast"] = save(str(root / "recast"), recast)
    baseline = str(root / "baseline.json")
    result = run("snapshot", paths["base"], "-o", baseline)
    assert result.exit_code == 0, result.stderr
    return paths, baseline, {"base": values, "scaled": scaled}


def statuses(doc):
    return {p["path"]: p["status"] for p in doc["params"]}


def test_identical_checkpoints_pass(variants):
    paths, baseline, _ = variants
    doc = run_json("diff", paths["base"], paths["same"])
    assert set(statuses(doc).values()) == {"identical"}
    assert doc["summary"] == {"identical": 4, "close": 0, "changed": 0, "added": 0, "removed": 0}
    assert all(p["identical"] and p["diff_norm"] == 0 for p in doc["params"])
    assert run("diff", paths["base"], paths["same"], "--fail-on-change").exit_code == 0
    result = run("check", paths["same"], "--baseline", baseline, "--format", "json")
    assert result.exit_code == 0, result.stdout
    doc = json.loads(result.stdout)
    assert doc["passed"] and doc["compared"] == ["structure", "counts", "norms", "stats", "digests"]


def test_one_scaled_parameter_fails_check_and_shows_in_diff(variants):
    paths, baseline, values = variants
    result = run("check", paths["scaled"], "--baseline", baseline, "--format", "json")
    assert result.exit_code == 1
    doc = json.loads(result.stdout)
    named = {v["path"] for v in doc["violations"]}
    assert not doc["passed"] and named == {"dense.kernel", "(global)"}  # the parameter, and the global norm
    assert {"norm", "std", "max_abs"} <= {v["metric"] for v in doc["violations"]}
    norm = next(v for v in doc["violations"] if v["metric"] == "norm")
    assert norm["rel_diff"] == pytest.approx(1e-3, rel=1e-3)
    message = f"paramscope: error: {len(doc['violations'])} regression(s) against {baseline}"
    assert result.stderr.strip().splitlines() == [f"{message} (hint: see the report on stdout)"]
    diff = run("diff", paths["base"], paths["scaled"], "--format", "json", "--fail-on-change")
    assert diff.exit_code == 1
    doc = json.loads(diff.stdout)
    assert statuses(doc) == {
        "embed": "identical",
        "dense.bias": "identical",
        "dense.kernel": "changed",
        "norm.scale": "identical",
    }
    row = next(p for p in doc["params"] if p["path"] == "dense.kernel")
    a, b = (
        values["base"]["dense"]["kernel"].astype(np.float64),
        values["scaled"]["dense"]["kernel"].astype(np.float64),
    )
    assert row["norm_a"] == pytest.approx(f64_norm(a), rel=1e-12)
    assert row["norm_b"] == pytest.approx(f64_norm(b), rel=1e-12)
    assert row["diff_norm"] == pytest.approx(f64_norm(a - b), rel=1e-9)
    assert row["rel_diff"] == pytest.approx(f64_norm(a - b) / f64_norm(a), rel=1e-9)
    assert row["cosine"] == pytest.approx(np.sum(a * b) / (f64_norm(a) * f64_norm(b)), rel=1e-12)
    assert row["max_abs_diff"] == pytest.approx(np.max(np.abs(a - b)), rel=1e-12)
    assert row["beyond_tolerance"] == np.count_nonzero(a != b) and not row["identical"]
    assert "1 changed" in run("diff", paths["base"], paths["scaled"]).stdout


def test_tolerances_and_ignore(variants):
    paths, baseline, _ = variants
    numbers = ["--only", "structure", "--only", "counts", "--only", "norms", "--only", "stats"]
    assert run("check", paths["scaled"], "--baseline", baseline, "--rtol", "2e-3", *numbers).exit_code == 0
    exact = run("check", paths["scaled"], "--baseline", baseline, "--rtol", "2e-3", "-f", "json")
    assert exact.exit_code == 1  # a tolerance is for numbers: digests are exact
    assert [(v["path"], v["metric"]) for v in json.loads(exact.stdout)["violations"]] == [
        ("dense.kernel", "digest")
    ]
    assert run("check", paths["scaled"], "--baseline", baseline, "--ignore", "kernel$").exit_code == 0
    assert (
        run(
            "check", paths["scaled"], "--baseline", baseline, "--only", "structure", "--only", "counts"
        ).exit_code
        == 0
    )
    doc = run_json("diff", paths["base"], paths["scaled"], "--rtol", "2e-3")
    assert statuses(doc)["dense.kernel"] == "close" and doc["summary"]["close"] == 1
    assert run("diff", paths["base"], paths["scaled"], "--rtol", "2e-3", "--fail-on-change").exit_code == 0
    assert run("diff", paths["base"], paths["scaled"], "--atol", "1e-2", "--fail-on-change").exit_code == 0


def test_structural_changes(variants):
    paths, baseline, _ = variants
    doc = run_json("diff", paths["base"], paths["added"])
    assert statuses(doc)["head"] == "added" and doc["summary"]["added"] == 1
    doc = run_json("diff", paths["base"], paths["removed"])
    assert statuses(doc)["norm.scale"] == "removed"
    doc = run_json("diff", paths["base"], paths["reshaped"])
    row = next(p for p in doc["params"] if p["path"] == "embed")
    assert row["status"] == "changed" and row["changes"][0].startswith("shape (64, 16) -> (32, 32)")
    assert "norm_a" not in row  # values of different shapes are not compared
    doc = run_json("diff", paths["base"], paths["recast"], "--structure-only")
    row = next(p for p in doc["params"] if p["path"] == "dense.kernel")
    assert row["status"] == "changed" and "dtype float32 -> bfloat16" in row["changes"]
    assert not doc["values_compared"]

    def violations(name, *extra):
        result = run("check", paths[name], "--baseline", baseline, "--format", "json", *extra)
        return result.exit_code, {(v["path"], v["metric"]) for v in json.loads(result.stdout)["violations"]}

    totals = {("(total)", "count"), ("(global)", "norm")}
    assert violations("added") == (1, {("head", "new"), *totals})
    assert violations("added", "--allow-new") == (0, set())
    assert violations("removed") == (1, {("norm.scale", "missing"), *totals})
    assert violations("removed", "--allow-missing") == (0, set())
    code, found = violations("reshaped", "--only", "structure")
    assert code == 1 and found == {("embed", "shape")}
    code, found = violations("recast", "--only", "structure")
    assert code == 1 and found == {("dense.kernel", "dtype")}


@pytest.mark.parametrize("suffix", [".safetensors", ".npz"])
def test_a_format_without_shardings_is_a_lossless_copy(variants, tmp_path, suffix):
    # safetensors and npz store no sharding: nothing to compare A's with, so no change
    paths, _, _ = variants
    copy = str(tmp_path / f"params{suffix}")
    assert run("export", paths["base"], copy).exit_code == 0
    for extra in ([], ["--digest-only"]):
        result = run("diff", paths["base"], copy, "--fail-on-change", "--format", "json", *extra)
        assert result.exit_code == 0, (extra, result.stdout)
        doc = json.loads(result.stdout)
        assert set(statuses(doc).values()) == {"identical"}
        assert all(not p.get("changes") for p in doc["params"])
    # a change of sharding between two checkpoints that both store it still counts
    resharded = str(tmp_path / "resharded")
    save(resharded, base_values(), {**SPECS, "embed": P("data", "model")})
    row = next(p for p in run_json("diff", paths["base"], resharded)["params"] if p["path"] == "embed")
    assert row["status"] == "changed"
    assert row["changes"] == ["sharding P('model', 'data') -> P('data', 'model')"]


def test_diff_between_two_steps_of_a_manager_run(manager_ckpt):
    doc = run_json("diff", manager_ckpt.path, manager_ckpt.path, "--step-a", "100", "--step-b", "200")
    assert doc["a"]["step"] == 100 and doc["b"]["step"] == 200
    old, new = manager_ckpt.values[100]["params"], manager_ckpt.values[200]["params"]
    for row in doc["params"]:
        a, b = old[row["path"]].astype(np.float64), new[row["path"]].astype(np.float64)
        assert row["diff_norm"] == pytest.approx(f64_norm(a - b), rel=1e-9, abs=1e-12)
        assert row["status"] == ("identical" if np.array_equal(a, b) else "changed")
    assert doc["summary"]["changed"] > 0


def test_baselines_from_other_commands(variants, tmp_path):
    paths, _, _ = variants
    for command, extra in (("norms", ["--per-param"]), ("table", ["--stats"]), ("stats", [])):
        baseline = tmp_path / f"{command}.json"
        baseline.write_text(run(command, paths["base"], "--format", "json", *extra).stdout)
        assert run("check", paths["same"], "--baseline", baseline).exit_code == 0, command
        failed = run("check", paths["scaled"], "--baseline", baseline, "--format", "json")
        assert failed.exit_code == 1, command
        assert {v["path"] for v in json.loads(failed.stdout)["violations"]} - {"(global)"} == {"dense.kernel"}
    structure_only = tmp_path / "table.json"
    structure_only.write_text(run("table", paths["base"], "--format", "json").stdout)
    doc = run_json("check", paths["scaled"], "--baseline", structure_only)  # holds no numbers: passes
    assert doc["compared"] == ["structure", "counts"] and doc["passed"]


def test_bad_baselines(variants, tmp_path):
    paths, baseline, _ = variants
    cases = {
        "missing.json": (None, "does not exist"),
        "garbage.json": ("{not json", "not readable JSON"),
        "foreign.json": ('{"hello": 1}', "not a paramscope baseline"),
        "future.json": (json.dumps({"schema": "paramscope.snapshot/9", "params": []}), "does not read"),
        "mangled.json": (
            json.dumps({"schema": "paramscope.snapshot/1", "params": [{"no_path": 1}]}),
            "malformed",
        ),
        # a document that compares nothing would pass anything
        "empty.json": ('{"schema": "paramscope.snapshot/2"}', 'has no "params"'),
        "no_norm.json": ('{"schema": "paramscope.norms/2", "count": 1}', 'has no "global_norm"'),
    }
    for name, (content, message) in cases.items():
        path = tmp_path / name
        if content is not None:
            path.write_text(content)
        commands = [("check", paths["base"], "--baseline", path)]
        if name == "empty.json":
            commands += [("verify", paths["base"], "--baseline", path), ("diff", paths["base"], path)]
        for command in commands:
            result = run(*command)
            assert result.exit_code == 2, command  # a bad input file, like a bad option
            lines = result.stderr.strip().splitlines()
            assert len(lines) == 1 and message in lines[0] and "Traceback" not in result.stderr, (
                command,
                lines,
            )
    result = run("check", paths["base"], "--baseline", baseline, "--only", "everything")
    assert result.exit_code == 2 and "unknown --only" in result.stderr
    inside = os.path.join(paths["base"], "baseline.json")
    result = run("snapshot", paths["base"], "-o", inside)
    assert result.exit_code == 2 and not os.path.exists(inside)


def test_check_only_names_every_category_in_help_and_docs():
    from paramscope.compute.baseline import CATEGORIES

    docs = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "commands")
    with open(os.path.join(docs, "snapshot-check.md")) as f:
        page = " ".join(f.read().split())
    assert f"`--only {'|'.join(CATEGORIES)}`" in page
    said = " ".join(run("check", "--help").stdout.replace("│", " ").split())
    assert f"Compare only: {', '.join(CATEGORIES)} (repeatable)" in said


def _validator(name):
    schema = json.loads(files("paramscope").joinpath("output", "schemas", f"{name}.json").read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def test_every_json_output_matches_its_shipped_schema(variants, manager_ckpt, special_ckpt):
    paths, baseline, _ = variants
    outputs = {
        "info": [["info", manager_ckpt.path]],
        "table": [
            ["table", manager_ckpt.path, "--stats", "--wd-exclude", "bias"],
            ["table", special_ckpt.path],
        ],
        "count": [["count", manager_ckpt.path, "--depth", "2"]],
        "norms": [
            ["norms", manager_ckpt.path],
            ["norms", special_ckpt.path, "--per-param", "--engine", "mesh"],
        ],
        "stats": [["stats", special_ckpt.path], ["stats", manager_ckpt.path, "--unstack", "--digest"]],
        "layers": [["layers", manager_ckpt.path, "--sort", "norm"]],
        "optim": [["optim", manager_ckpt.path, "--sort", "ratio"]],
        "history": [["history", manager_ckpt.path, "--no-cache", "--stats"]],
        "mask": [["mask", manager_ckpt.path, "--include", "kernel", "--include", "nothing"]],
        "verify": [["verify", manager_ckpt.path]],
        "diff": [
            ["diff", paths["base"], paths["reshaped"]],
            ["diff", paths["base"], paths["added"]],
            ["diff", paths["base"], paths["same"], "--rename", "^embed$=embedding", "--transpose", "kernel$"],
        ],
        "snapshot": [["snapshot", special_ckpt.path]],
        "check": [["check", paths["scaled"], "--baseline", baseline]],
    }
    for name, commands in outputs.items():
        validator = _validator(name)
        for args in commands:
            result = run(*args, *([] if name == "snapshot" else ["--format", "json"]))
            assert result.exit_code in (0, 1), (args, result.stderr)
            document = json.loads(result.stdout)
            errors = [e.message for e in validator.iter_errors(document)]
            assert not errors, (args, errors[:3])
    # and the schemas reject what they should
    assert list(_validator("norms").iter_errors({"schema": "paramscope.norms/1"}))
    assert list(_validator("table").iter_errors({"schema": "paramscope.table/2"}))


def test_snapshot_holds_structure_and_float64_exact_statistics(variants):
    paths, baseline, values = variants
    with open(baseline) as f:
        doc = json.load(f)
    rows = {p["path"]: p for p in doc["params"]}
    kernel = values["base"]["dense"]["kernel"].astype(np.float64)
    assert rows["dense.kernel"]["shape"] == [16, 32] and rows["dense.kernel"]["sharding"] == ["data", "model"]
    assert rows["dense.kernel"]["stats"]["norm"] == pytest.approx(f64_norm(kernel), rel=1e-12)
    assert rows["dense.kernel"]["stats"]["std"] == pytest.approx(kernel.std(), rel=1e-12)
    assert doc["total"]["count"] == sum(p["count"] for p in doc["params"])
    assert math.isclose(doc["global_norm"], math.sqrt(sum(p["stats"]["norm"] ** 2 for p in doc["params"])))


def test_diff_of_a_run_alone_compares_its_two_latest_steps(manager_ckpt):
    alone = run("diff", manager_ckpt.path, "--format", "json")
    assert alone.exit_code == 0, alone.stderr
    doc = json.loads(alone.stdout)
    assert (doc["a"]["step"], doc["b"]["step"]) == (100, 200)
    assert "comparing step 100 with step 200, the latest two" in alone.stderr
    named = run_json("diff", manager_ckpt.path, "--step-a", "100", "--step-b", "200")
    assert doc["params"] == named["params"]
    one_step = run("diff", os.path.join(manager_ckpt.path, "checkpoint_200"))
    assert one_step.exit_code == 2 and "needs a run of two finished steps" in one_step.stderr
