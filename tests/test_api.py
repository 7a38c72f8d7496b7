"""The Python API gives what the command line prints: ``Result.to_dict()`` is the ``--format json``
document, ``to_pandas()`` the CSV's rows, on checkpoints of several kinds."""

import csv
import io
import json
import os

import pytest
from test_cli import run

import paramscope as ps
from paramscope.errors import CheckpointNotFound, ParamscopeError

DATA = os.path.join(os.path.dirname(__file__), "data")

# (fixture or data folder, options shared by the CLI and ps.open)
CASES = {
    "manager": ("manager_ckpt", {}),
    "special": ("special_ckpt", {}),
    "nnx": ("nnx_ckpt", {}),  # typed PRNG keys: listed by table, left out of the numbers
    "maxtext": (os.path.join(DATA, "maxtext", "scan", "checkpoints"), {"subtree": "params.params"}),
    "safetensors": (os.path.join(DATA, "safetensors", "single", "model.safetensors"), {}),
}


def _path(case, request):
    source, options = CASES[case]
    if os.path.isabs(source):
        return source, options
    value = request.getfixturevalue(source)
    return getattr(value, "path", value), options


def _cli_options(options):
    flags = []
    for key, value in options.items():
        flags += [f"--{key}", str(value)]
    return flags


def _cli_json(*args):
    result = run(*args, "--format", "json")
    assert result.exit_code in (0, 1, 3), result.stderr
    return json.loads(result.stdout)


def _same(api: dict, cli: dict):
    """Equal but for where the checkpoint was named (the CLI shows the path as typed)."""
    for doc in (api, cli):
        doc.pop("checkpoint", None)
    assert api == cli


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_view_is_the_documents_the_command_line_prints(case, request):
    path, options = _path(case, request)
    if not os.path.exists(path):
        pytest.fail(f"fixture {path} is missing")
    ck = ps.open(path, **options)
    flags = _cli_options(options)
    _same(ck.table().to_dict(), _cli_json("table", path, *flags))
    _same(ck.table(norms=True).to_dict(), _cli_json("table", path, "--norms", *flags))
    _same(ck.count(depth=2).to_dict(), _cli_json("count", path, "--depth", "2", *flags))
    _same(ck.norms(per_param=True).to_dict(), _cli_json("norms", path, "--per-param", *flags))
    stats = ck.stats(memory_budget="1MiB")  # the command line's units
    _same(stats.to_dict(), _cli_json("stats", path, *flags))
    _same(ck.mask(exclude=["bias"]).to_dict(), _cli_json("mask", path, "--exclude", "bias", *flags))
    if not options:
        _same(ck.verify().to_dict(), _cli_json("verify", path))
    # the rows are the CSV's
    frame = stats.to_pandas()
    text = run("stats", path, *flags, "--format", "csv").stdout
    rows = list(csv.reader(io.StringIO(text)))
    assert list(frame.columns) == rows[0]
    assert [str(p) for p in frame["path"]] == [r[0] for r in rows[1:]]
    # and a notebook shows every parameter
    html = ck.table()._repr_html_()
    assert all(p.path.replace("&", "&amp;").replace("<", "&lt;") in html for p in ck.params)


def test_library_errors_carry_their_hint(tmp_path, manager_ckpt):
    # the CLI prints message and hint on one line; a notebook or a traceback shows the same
    with pytest.raises(CheckpointNotFound) as caught:
        ps.open(str(tmp_path / "nope"))
    assert str(caught.value) == f"{caught.value.message} (hint: check the path)"
    assert caught.value.message.endswith("nope does not exist")
    result = run("table", str(tmp_path / "nope"))
    assert result.stderr.count("hint") == 1 and result.stderr.count("\n") == 1
    with pytest.raises(ParamscopeError) as caught:
        ps.open(manager_ckpt.path, step=7)
    assert str(caught.value).endswith(f"(hint: {caught.value.hint})") and caught.value.hint


def test_the_api_takes_the_command_lines_names_and_units(manager_ckpt):
    ck = ps.open(manager_ckpt.path, step=100, filter="kernel")
    assert ck.step == 100 and ck.params and all("kernel" in p.path for p in ck.params)
    by_int = ck.norms(per_param=True, memory_budget=1 << 20).to_dict()
    by_text = ck.norms(per_param=True, memory_budget="1MiB").to_dict()
    assert by_int == by_text
    with pytest.raises(ParamscopeError, match="malformed size"):
        ck.norms(memory_budget="lots")
    with pytest.raises(ParamscopeError, match="no table"):
        ck.count().to_pandas("nope")
    assert ck.count().to_pandas("dtypes").columns.tolist() == ["dtype", "count", "bytes"]
    assert "paramscope.Checkpoint(" in repr(ck) and "step=100" in repr(ck)
    assert "(global)" in str(ck.norms())


def test_snapshot_check_and_history_are_the_commands_documents(manager_ckpt, tmp_path):
    path = manager_ckpt.path
    ck = ps.open(path, step=100)
    baseline = tmp_path / "b.json"
    written = run("snapshot", path, "--step", "100", "-o", baseline)
    assert written.exit_code == 0, written.stderr
    recorded = json.loads(baseline.read_text())
    document = ck.snapshot(memory_budget="1MiB")
    assert json.loads(json.dumps(document)) == recorded
    passed = ck.check(baseline)
    assert passed.value == [] and passed.to_dict()["passed"] is True
    _same(passed.to_dict(), _cli_json("check", path, "--step", "100", "-b", baseline))
    latest = ps.open(path).check(baseline, only=["norms"])  # step 200 against step 100's numbers
    assert latest.value and latest.to_dict()["passed"] is False
    assert latest.notes == [
        f"baseline is of step 100, checkpoint step 200 ({baseline}): values training changed differ from it"
    ]
    _same(latest.to_dict(), _cli_json("check", path, "-b", baseline, "--only", "norms"))
    run_history = ps.history(path, cache=False, depth=1)
    _same(run_history.to_dict(), _cli_json("history", path, "--no-cache", "--depth", "1"))
    assert [r.step for r in run_history.value.result.steps] == [100, 200]


def test_layers_is_the_commands_document_and_leaves_the_checkpoints_view_alone():
    path, options = CASES["maxtext"]
    ck = ps.open(path, **options)
    before = [p.path for p in ck.params]
    layers = ck.layers()
    _same(layers.to_dict(), _cli_json("layers", path, *_cli_options(options)))
    assert layers.rows() and [p.path for p in ck.params] == before
    assert ck.inventory.views is None  # norms after layers are still per array


def test_diff_is_the_commands_document(manager_ckpt):
    path = manager_ckpt.path
    steps = ps.diff(path, step_a=100)  # step 100 against the latest
    assert steps.value.differs
    _same(steps.to_dict(), _cli_json("diff", path, "--step-a", "100"))
    same = ps.diff(ps.open(path), path, digest_only=True)
    assert not same.value.differs
    _same(same.to_dict(), _cli_json("diff", path, path, "--digest-only"))
    renamed = ps.diff(path, path, rename=["kernel$=weight"], structure_only=True)
    _same(renamed.to_dict(), _cli_json("diff", path, path, "--rename", "kernel$=weight", "--structure-only"))


def test_check_shows_its_values_at_80_columns_with_digests_shortened(manager_ckpt, tmp_path):
    """Digest rows made the values 64 characters wide, so a narrow table dropped them."""
    baseline = tmp_path / "b.json"
    assert run("snapshot", manager_ckpt.path, "--step", "100", "-o", baseline).exit_code == 0
    result = ps.open(manager_ckpt.path).check(baseline)  # step 200: digests and numbers differ
    digests = [v for v in result.value if v.metric == "digest"]
    assert digests
    text = result.to_text(width=80)
    header = next(line for line in text.splitlines() if line.startswith("path"))
    assert "baseline" in header and "actual" in header, text
    assert f"{digests[0].baseline[:16]}..." in text and digests[0].baseline not in text
    table = text.splitlines()[text.splitlines().index(header) :]
    assert all(len(line) <= 80 for line in table)  # the path folds at dots to make room
    csv_text = run("check", manager_ckpt.path, "-b", baseline, "-f", "csv").stdout
    assert digests[0].baseline in csv_text  # machines get the whole digest


@pytest.fixture(scope="module")
def demo_ckpt(tmp_path_factory):
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = str(tmp_path_factory.mktemp("demo") / "demo_ckpt")
    script = os.path.join(root, "scripts", "make_demo_checkpoint.py")
    subprocess.run([sys.executable, script, path], check=True, capture_output=True)
    return path


def test_every_command_is_a_view_of_the_api(demo_ckpt, tmp_path):
    """Each command's --format json is the API's .to_dict(), on the demo checkpoint."""
    path = demo_ckpt
    ck = ps.open(path)
    baseline = tmp_path / "b.json"
    assert run("snapshot", path, "-o", baseline).exit_code == 0
    views = [
        (ps.info(path), ("info", path)),
        (ck.info(), ("info", path, "--step", str(ck.step))),
        (ck.table(norms=True, wd_exclude=["bias"]), ("table", path, "--norms", "--wd-exclude", "bias")),
        (ck.count(depth=2), ("count", path, "--depth", "2")),
        (ck.mask(include=["kernel"]), ("mask", path, "--include", "kernel")),
        (ck.norms(per_param=True, sort="norm"), ("norms", path, "--per-param", "--sort", "norm")),
        (ck.stats(histogram=ck.params[0].path), ("stats", path, "--hist", ck.params[0].path)),
        (ck.optim(lr=1e-3), ("optim", path, "--lr", "1e-3")),
        (ps.optim(path, sort="ratio"), ("optim", path, "--sort", "ratio")),
        (
            ps.open(path, unstack=True, layer_axis=["kernel=0"]).layers(),
            ("layers", path, "--layer-axis", "kernel=0"),
        ),
        (ck.verify(), ("verify", path)),
        (ps.verify(path, baseline=baseline), ("verify", path, "-b", baseline)),
        (ps.diff(path), ("diff", path)),
        (ps.diff(path, baseline), ("diff", path, baseline)),
        (ps.check(ck, baseline), ("check", path, "-b", baseline)),
        (ps.history(path, cache=False), ("history", path, "--no-cache")),
    ]
    for result, command in views:
        _same(result.to_dict(), _cli_json(*command))
    document = ps.snapshot(ck)
    assert json.loads(json.dumps(document)) == json.loads(baseline.read_text())
    assert ps.diff(path).notes and "the latest two" in ps.diff(path).notes[0]


def test_a_closed_checkpoint_lets_go_of_its_reading_state_and_reads_again(demo_ckpt):
    from paramscope.io.session import SESSION

    with ps.open(demo_ckpt) as ck:
        first = ck.norms(per_param=True).to_dict()
        assert SESSION.stores  # the opened stores are kept while it is open
    assert not SESSION.stores and not SESSION.btrees and not SESSION.templates
    assert ck.norms(per_param=True).to_dict() == first
    ck.close()


def test_a_result_in_a_repl_is_its_table(manager_ckpt):
    """``repr`` (what a REPL echoes) is the command's table, not the dataclass's fields."""
    import paramscope as ps

    result = ps.open(manager_ckpt.path).count()
    text = repr(result)
    assert "Report(" not in text and "Column(" not in text
    assert "group (depth 1)" in text and "total" in text
