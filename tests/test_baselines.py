"""Baselines are never trusted blindly: check agrees with snapshot, bad baselines are refused."""

import json
import os

import orbax.checkpoint as ocp
import pytest
from flax import nnx
from test_cli import run, run_json

DATA = os.path.join(os.path.dirname(__file__), "data")
FIXTURES = ["manager_ckpt", "standard_ckpt", "special_ckpt", "nnx_ckpt"]


def data_checkpoints():
    """Every checkpoint under tests/data: a folder's ``checkpoints/``, else each of its variants."""
    found = []
    for name in sorted(os.listdir(DATA)):
        folder = os.path.join(DATA, name)
        if not os.path.isdir(folder):
            continue
        if os.path.isdir(os.path.join(folder, "checkpoints")):
            found.append(os.path.join(name, "checkpoints"))
            continue
        for variant in sorted(os.listdir(folder)):
            inner = os.path.join(folder, variant)
            if os.path.isdir(os.path.join(inner, "checkpoints")):
                found.append(os.path.join(name, variant, "checkpoints"))
            elif os.path.isdir(inner):
                found.append(os.path.join(name, variant))
    return found


def snapshot_then_check(path, tmp_path, *extra):
    baseline = tmp_path / "baseline.json"
    made = run("snapshot", path, "-o", baseline, *extra)
    assert made.exit_code == 0, made.stderr
    checked = run("check", path, "-b", baseline, "-f", "json", *extra)
    assert checked.exit_code == 0, (checked.stdout, checked.stderr)
    assert json.loads(checked.stdout)["violations"] == []
    return json.loads(baseline.read_text())


@pytest.mark.parametrize("name", data_checkpoints())
def test_check_passes_against_a_snapshot_of_the_same_data_checkpoint(name, tmp_path):
    snapshot_then_check(os.path.join(DATA, name), tmp_path)


@pytest.mark.parametrize("fixture", FIXTURES)
def test_check_passes_against_a_snapshot_of_the_same_fixture(fixture, request, tmp_path):
    snapshot_then_check(request.getfixturevalue(fixture).path, tmp_path)


def test_check_passes_against_a_snapshot_of_every_storage_format(storage_ckpt, tmp_path):
    snapshot_then_check(storage_ckpt.path, tmp_path)


def test_typed_prng_keys_are_structure_in_snapshot_and_check_alike(tmp_path):
    """MaxText's train state holds its Rngs: recorded by path, shape, dtype, never by numbers."""
    root = os.path.join(DATA, "maxtext", "scan", "checkpoints")
    document = snapshot_then_check(root, tmp_path)
    keys = [row for row in document["params"] if row.get("random_key")]
    assert len(keys) == 6 and all("stats" not in row and "digest" not in row for row in keys)
    assert document["total"]["count"] == sum(row["count"] for row in document["params"])
    for command, extra in (("norms", ["--per-param"]), ("stats", []), ("table", ["--stats"])):
        other = tmp_path / f"{command}.json"  # documents of numbers list no keys: none is "new"
        other.write_text(run(command, root, "-f", "json", "-q", *extra).stdout)
        assert run("check", root, "-b", other, "-q").exit_code == 0, command
    # a key where the baseline has a weight is a change of structure
    row = keys[0]
    del row["random_key"]
    changed = tmp_path / "changed.json"
    changed.write_text(json.dumps(document))
    result = run("check", root, "-b", changed, "-f", "json", "--only", "structure")
    assert result.exit_code == 1
    assert [(v["path"], v["metric"]) for v in json.loads(result.stdout)["violations"]] == [
        (row["path"], "random_key")
    ]


def test_an_nnx_model_with_dropout_rngs(tmp_path):
    class Model(nnx.Module):
        def __init__(self, rngs):
            self.dense = nnx.Linear(4, 4, rngs=rngs)
            self.dropout = nnx.Dropout(0.1, rngs=rngs)

    path = str(tmp_path / "model")
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(path, nnx.state(Model(nnx.Rngs(params=0, dropout=1))))
    checkpointer.wait_until_finished()
    document = snapshot_then_check(path, tmp_path)
    assert any(row.get("random_key") for row in document["params"])


@pytest.fixture(scope="module")
def snapshot_file(manager_ckpt, tmp_path_factory):
    path = tmp_path_factory.mktemp("baselines") / "step100.json"
    assert run("snapshot", manager_ckpt.path, "--step", "100", "-o", path, "-q").exit_code == 0
    return path


def _edited(snapshot_file, tmp_path, change) -> str:
    document = json.loads(snapshot_file.read_text())
    change(document)
    path = tmp_path / "edited.json"
    path.write_text(json.dumps(document))  # Infinity and NaN as Python's json writes them
    return str(path)


def _set_stat(name, value):
    def change(document):
        document["params"][0]["stats"][name] = value

    return change


BAD_FIELDS = {
    "infinite norm": (_set_stat("norm", float("inf")), '"norm" of', "is inf"),
    "norm as a string": (_set_stat("norm", "80"), '"norm" of', 'is "80"'),
    "norm overflowing a float": (_set_stat("norm", 10**400), '"norm" of', "not a finite number"),
    "NaN count": (_set_stat("nan", 0.5), '"nan" of', "not a count"),
    "digest as a number": (
        lambda d: d["params"][0].__setitem__("digest", 5),
        '"digest" of',
        "is 5, not a digest",
    ),
    "shape of strings": (lambda d: d["params"][0].__setitem__("shape", ["a"]), '"shape" of', "not a list"),
    "NaN global norm": (lambda d: d.__setitem__("global_norm", float("nan")), '"global_norm"', "is nan"),
    "digest not hexadecimal": (
        lambda d: d["params"][0].__setitem__("digest", "zz"),
        '"digest" of',
        "not a digest",
    ),
    # two rows of one path: which would be compared is a guess (a bogus copy first, the real one after)
    "a parameter twice": (
        lambda d: d["params"].insert(0, {**d["params"][0], "stats": {"norm": 999.0}}),
        "lists parameter",
        "twice",
    ),
}


@pytest.mark.parametrize("case", BAD_FIELDS)
def test_a_baseline_field_of_the_wrong_kind_is_refused_naming_field_and_parameter(
    case, manager_ckpt, snapshot_file, tmp_path
):
    change, field, problem = BAD_FIELDS[case]
    path = _edited(snapshot_file, tmp_path, change)
    first = json.loads(snapshot_file.read_text())["params"][0]["path"]
    for args in (("check", manager_ckpt.path, "-b", path), ("verify", manager_ckpt.path, "-b", path)):
        result = run(*args)
        lines = result.stderr.strip().splitlines()
        assert result.exit_code == 2, (args, result.stderr)
        assert len(lines) == 1 and field in lines[0] and problem in lines[0], lines
        if field.endswith(" of"):
            assert first in lines[0]
    result = run("diff", manager_ckpt.path, path)
    assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_a_deeply_nested_baseline_is_refused(manager_ckpt, tmp_path):
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000)
    nested = tmp_path / "nested.json"
    nested.write_text('{"schema": "paramscope.snapshot/1", "params": ' + "[" * 100_000 + "]" * 100_000 + "}")
    for path in (deep, nested):
        for args in (("check", manager_ckpt.path, "-b", path), ("verify", manager_ckpt.path, "-b", path)):
            result = run(*args)
            assert result.exit_code == 2 and "nested too deeply" in result.stderr, (args, result.stderr)
        result = run("diff", manager_ckpt.path, path)
        assert result.exit_code == 2 and "nested too deeply" in result.stderr


def test_allow_flags_that_leave_nothing_in_common_fail(snapshot_file, special_ckpt):
    result = run(
        "check", special_ckpt.path, "-b", snapshot_file, "--allow-new", "--allow-missing", "-f", "json"
    )
    assert result.exit_code == 1
    document = json.loads(result.stdout)
    assert not document["passed"]
    assert [v["metric"] for v in document["violations"]] == ["in common"]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "no parameter" in lines[0] and "in common" in lines[0]
    numbers = ("--only", "norms", "--allow-new", "--allow-missing")
    assert run("check", special_ckpt.path, "-b", snapshot_file, *numbers).exit_code == 1


def test_diff_decides_a_baseline_by_content_not_by_name(tmp_path):
    single = os.path.join(DATA, "safetensors", "single")
    index = os.path.join(DATA, "safetensors", "sharded", "model.safetensors.index.json")
    document = run_json("diff", single, index)  # an index is JSON, and a checkpoint
    assert document["values_compared"] and document["summary"]["changed"] == 0
    assert document["summary"]["identical"] == len(document["params"]) > 0
    baseline = tmp_path / "single.snapshot"  # a baseline under any name
    assert run("snapshot", single, "-o", baseline, "-q").exit_code == 0
    document = run_json("diff", index, baseline)
    assert not document["values_compared"] and document["b"]["checkpoint"] == str(baseline)
    assert document["summary"]["identical"] == len(document["params"])


def test_a_baseline_of_another_step_is_named(manager_ckpt, snapshot_file):
    note = (
        f"paramscope: note: baseline is of step 100, checkpoint step 200 ({snapshot_file}): "
        "values training changed differ from it"
    )
    checked = run("check", manager_ckpt.path, "-b", snapshot_file)
    assert checked.exit_code == 1 and checked.stderr.splitlines()[0] == note
    assert checked.stderr.splitlines()[-1].endswith("the baseline is of step 100, not 200)")
    verified = run("verify", manager_ckpt.path, "-b", snapshot_file)
    assert verified.exit_code == 3 and verified.stderr.splitlines()[0] == note
    assert verified.stderr.splitlines()[-1].endswith("the baseline is of step 100, not 200)")
    problems = json.loads(run("verify", manager_ckpt.path, "-b", snapshot_file, "-f", "json").stdout)
    for problem in problems["problems"]:  # each content problem says the steps differ
        assert problem["problem"].endswith("(baseline is of step 100, checkpoint step 200)"), problem
    same = run("check", manager_ckpt.path, "--step", "100", "-b", snapshot_file)
    assert same.exit_code == 0 and "baseline is of step" not in same.stderr
    assert (
        "baseline is of step"
        not in run("verify", manager_ckpt.path, "--step", "100", "-b", snapshot_file).stderr
    )
