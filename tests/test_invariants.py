"""Every command agrees with every other, on every checkpoint the tests have.

Each checkpoint under tests/data/ and each session checkpoint of conftest.py is read once per
command (in this process, through the CLI's JSON and CSV; cached for the module), and the
commands' answers are checked against each other: the same arrays, the same totals, the same
norms, digests and values, whatever command and format shows them.
"""

import csv
import io
import json
import math
import os

import pytest
from conftest import f64_norm
from test_cli import run

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")

# every checkpoint under tests/data, as the other tests open it (the latest step, default item)
DATA_CASES = {
    "maxtext-scan": "maxtext/scan/checkpoints",
    "maxtext-unscanned": "maxtext/unscanned/checkpoints",
    "kauldron": "kauldron/checkpoints",
    "gemma-bfloat16": "gemma/bfloat16",
    "gemma-float32": "gemma/float32",
    "keras-orbax": "keras_orbax/checkpoints",
    "orbax-v1-training": "orbax_v1/training",
    "orbax-v1-single": "orbax_v1/single",
    "orbax-v1-strings": "orbax_v1/string_and_value_keys",
    "orbax-0.6.1": "orbax_0_6_1/checkpoints",
    "orbax-0.4-aggregate": "orbax_0_4_aggregate/checkpoints",
    "orbax-0.4-placeholder": "orbax_0_4_placeholder/checkpoints",
    "flax-msgpack": "flax_msgpack/checkpoints",
    "flax-msgpack-gda": "flax_msgpack_gda/checkpoints",
    "safetensors-single": "safetensors/single/model.safetensors",
    "safetensors-sharded": "safetensors/sharded",
    "safetensors-numpy": "safetensors/numpy",
    "easydel-bfloat16": "easydel/bfloat16",
    "easydel-float32": "easydel/float32",
}
SESSION_CASES = ["manager_ckpt", "standard_ckpt", "special_ckpt", "nnx_ckpt"]


class Outputs:
    """The commands' answers about one checkpoint, each asked for once."""

    def __init__(self, path: str, folder: str):
        self.path = path
        self.folder = folder  # outside the checkpoint, for the snapshot
        self.cache: dict[tuple, object] = {}

    def run(self, *args):
        if args not in self.cache:
            self.cache[args] = run(args[0], self.path, *args[1:])
        return self.cache[args]

    def json(self, *args):
        result = self.run(*args, "--format", "json")
        assert result.exit_code == 0, (args, result.stderr)
        return json.loads(result.stdout)

    def csv(self, *args):
        result = self.run(*args, "--format", "csv")
        assert result.exit_code == 0, (args, result.stderr)
        return list(csv.DictReader(io.StringIO(result.stdout.split("\n\n")[0])))

    def numbers(self) -> list[dict]:
        """table's arrays of numbers: typed PRNG keys are left out of every number."""
        return [p for p in self.json("table")["params"] if "random_key" not in p]


_OUTPUTS: dict[str, Outputs] = {}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("invariants")


def outputs_of(request, case: str, folder) -> Outputs:
    if case not in _OUTPUTS:
        if case in DATA_CASES:
            path = os.path.join(DATA, DATA_CASES[case])
        else:
            path = request.getfixturevalue(case.split("[")[0]).path
        os.makedirs(os.path.join(folder, case), exist_ok=True)
        _OUTPUTS[case] = Outputs(path, os.path.join(folder, case))
    return _OUTPUTS[case]


def storage_outputs(request, storage_ckpt, folder) -> Outputs:
    """storage_ckpt is parametrized (one checkpoint per storage format): one cache each."""
    name = f"storage_ckpt[{request.node.callspec.params['storage_ckpt']}]"
    if name not in _OUTPUTS:
        os.makedirs(os.path.join(folder, name), exist_ok=True)
        _OUTPUTS[name] = Outputs(storage_ckpt.path, os.path.join(folder, name))
    return _OUTPUTS[name]


def same_float(a, b, rel=1e-12):
    """Equal to ``rel``; None (JSON's NaN or Inf) only with None."""
    if a is None or b is None:
        return a is None and b is None
    return a == pytest.approx(b, rel=rel, abs=1e-300)


# ----------------------------------------------------------------------------------------------
# The invariants


def table_total_is_count_total(out: Outputs):
    table, count = out.json("table"), out.json("count")
    assert table["total"] == count["total"]
    assert table["total"] == {
        "count": sum(p["count"] for p in table["params"]),
        "bytes": sum(p["bytes"] for p in table["params"]),
    }
    assert {"count": sum(g["count"] for g in count["by_dtype"].values())} == {
        "count": count["total"]["count"]
    }


def norms_cover_the_arrays_of_numbers(out: Outputs):
    numbers = out.numbers()
    norms = out.json("norms", "--per-param")
    assert [p["path"] for p in norms["params"]] == [p["path"] for p in numbers]
    assert {p["path"]: p["count"] for p in norms["params"]} == {p["path"]: p["count"] for p in numbers}
    assert norms["count"] == sum(p["count"] for p in numbers)
    stats = out.json("stats")
    assert [p["path"] for p in stats["params"]] == [p["path"] for p in numbers]
    assert stats["count"] == norms["count"]


def global_norm_is_the_sum_of_squares(out: Outputs):
    norms = out.json("norms", "--per-param")
    per_param = [p["norm"] for p in norms["params"]]
    if any(n is None for n in per_param):  # a NaN or Inf anywhere: the global norm is one too
        assert norms["global_norm"] is None and norms["nonfinite"] > 0
    else:
        assert same_float(norms["global_norm"] ** 2, math.fsum(n * n for n in per_param))
    assert out.json("norms")["global_norm"] == norms["global_norm"]
    stats = out.json("stats")
    assert same_float(stats["global_norm"], norms["global_norm"])
    assert stats["nonfinite"] == norms["nonfinite"] == sum(p["nonfinite"] for p in norms["params"])
    for a, b in zip(stats["params"], norms["params"]):
        assert same_float(a["norm"], b["norm"]), a["path"]
        assert a["nan"] + a["inf"] == b["nonfinite"], a["path"]


def layers_agree_with_unstacked_norms(out: Outputs):
    layers = out.json("layers")["layers"]
    if not layers:
        return
    unstacked = {p["path"]: p["norm"] for p in out.json("norms", "--unstack", "--per-param")["params"]}
    shown = set()
    for row in layers:
        squares = []
        for kind, norm in row["norms"].items():
            path = f"{row['stack']}.{row['layer']}.{kind}"
            assert path in unstacked, path
            assert same_float(None if norm is None else norm**2, unstacked[path] and unstacked[path] ** 2), (
                path
            )
            shown.add(path)
            squares.append(norm * norm if norm is not None else math.nan)
        if not any(math.isnan(s) for s in squares):
            assert same_float(row["norm"] ** 2, math.fsum(squares))
    prefixes = {f"{row['stack']}.{row['layer']}." for row in layers}
    assert {p for p in unstacked if any(p.startswith(s) for s in prefixes)} == shown


def snapshot_then_check_passes(out: Outputs):
    baseline = os.path.join(out.folder, "baseline.json")
    if not os.path.exists(baseline):
        snap = out.run("snapshot", "-o", baseline)
        assert snap.exit_code == 0, snap.stderr
    check = out.run("check", "--baseline", baseline)
    assert check.exit_code == 0, check.stdout + check.stderr


def diff_with_itself_is_identical(out: Outputs):
    """Every array compared, bit for bit; typed PRNG keys by their bits alone, without norms."""
    doc = run_diff(out)
    table = out.json("table")["params"]
    assert sorted(p["path"] for p in doc["params"]) == sorted(p["path"] for p in table)
    assert {p["status"] for p in doc["params"]} == {"identical"}
    assert all(p["digest_a"] == p["digest_b"] for p in doc["params"])
    keys = {p["path"] for p in table if "random_key" in p}
    norms = {p["path"]: p["norm"] for p in out.json("norms", "--per-param")["params"]}
    for row in doc["params"]:
        if row["path"] in keys:
            assert "norm_a" not in row and "cosine" not in row, row["path"]
        else:
            assert same_float(row["norm_a"], norms[row["path"]]) and row["diff_norm"] == 0.0, row["path"]


def run_diff(out: Outputs):
    result = out.run("diff", out.path, "--all", "--format", "json")
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


def digests_agree(out: Outputs):
    table, stats = out.json("table", "--digest"), out.json("stats", "--digest")
    digests = {p["path"]: p["digest"] for p in stats["params"]}
    assert {p["path"]: p.get("digest") for p in table["params"] if p.get("digest")} == digests
    assert table["digest"] == stats["digest"]
    diff = {p["path"]: p["digest_a"] for p in run_diff(out)["params"]}
    assert {k: v for k, v in diff.items() if k in digests} == digests


def csv_cell(value, key: str) -> str:
    """What CSV should hold for a JSON value: machine values, every digit."""
    if value is None:
        return ""
    if key == "shape":
        return "x".join(map(str, value))
    if key == "sharding":
        if all(e is None for e in value):
            return "replicated"
        entries = (repr(tuple(e)) if isinstance(e, list) else repr(e) for e in value)
        return "P(" + ", ".join(entries) + ")"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    return str(value)


def csv_and_json_agree(out: Outputs):
    for command in (("table",), ("table", "--digest"), ("stats",), ("stats", "--digest")):
        rows = out.json(*command)["params"]
        table = out.csv(*command)
        assert [r["path"] for r in table] == [r["path"] for r in rows], command
        known = {key for row in rows for key in row} | {"sharding"}
        assert set(table[0] if table else ()) <= known, command
        for row, line in zip(rows, table):
            for key, text in line.items():
                if row.get(key) is None and text in ("nan", "inf", "-inf"):
                    # JSON has no NaN or Inf (null); CSV keeps the float, which the counts confirm
                    assert not math.isfinite(float(text)) and row_is_nonfinite(out, row["path"]), key
                    continue
                assert text == csv_cell(row.get(key), key), (command, row["path"], key, text, row.get(key))


def every_format_carries_the_same_fields(out: Outputs):
    """CSV's columns are the JSON keys, with the JSON's values; the API's ``.to_dict()`` is the
    JSON the command line prints."""
    import paramscope as ps

    norms, norms_csv = out.json("norms", "--per-param"), out.csv("norms", "--per-param")
    assert [r["path"] for r in norms_csv] == [p["path"] for p in norms["params"]] + ["(global)"]
    overall = norms_csv[-1]
    assert overall["arrays"] == str(norms["arrays"]) == str(len(norms["params"]))
    assert overall["count"] == str(norms["count"]) and isinstance(norms["bytes_read"], int)
    assert norms["bytes_read"] == sum(norms["bytes_read_by_process"])
    for row, line in zip(norms["params"], norms_csv):
        assert set(line) - {"arrays"} <= set(row) | {"digest"}
        for key, text in line.items():
            if key == "arrays" or (row.get(key) is None and text in ("nan", "inf", "-inf")):
                continue  # JSON has no NaN or Inf (null); CSV keeps the float
            assert text == csv_cell(row.get(key), key), (row["path"], key, text)
    count = out.json("count")
    groups = out.csv("count")
    assert [g["arrays"] for g in groups] == [str(g["arrays"]) for g in count["groups"]]
    assert sum(g["arrays"] for g in count["groups"]) == len(out.json("table")["params"])
    mask = out.json("mask")
    assert mask["decayed"]["arrays"] + mask["not_decayed"]["arrays"] == len(mask["params"])
    diff = run_diff(out)["params"]
    diff_csv = out.csv("diff", out.path, "--all")
    assert set(diff_csv[0]) <= {key for row in diff for key in row} if diff_csv else not diff
    for row, line in zip(diff, diff_csv):
        assert line["path_a"] == (row["path_a"] or "") and line["changes"] == "; ".join(row["changes"])
    checkpoint = ps.open(out.path)
    assert checkpoint.table().to_dict() == out.json("table")
    assert checkpoint.count().to_dict() == out.json("count")


def header_names_are_column_names(out: Outputs):
    """--columns and --sort take a column's header as a table shows it, in any case."""
    from paramscope.output.fields import FIELDS

    stats = out.csv("stats")
    if not stats:
        return
    keys = [k for k in stats[0] if k in FIELDS]
    by_header = out.csv("stats", "--columns", ",".join(FIELDS[k].header.upper() for k in keys))
    assert [{k: row[k] for k in keys} for row in stats] == by_header
    by_key = [p["path"] for p in out.json("stats", "--sort", "max_abs")["params"]]
    assert [p["path"] for p in out.json("stats", "--sort", "Max |X|")["params"]] == by_key


def sharding_is_null_only_where_not_stored(out: Outputs):
    """One structure: a list per dimension (all null: replicated) where the checkpoint stores
    shardings, null where its format stores none; the table writes them P(...), replicated, -."""
    table = out.json("table")["params"]
    text = out.run("table").stdout
    for row in table:
        spec = row["sharding"]
        assert spec is None or len(spec) == len(row["shape"]), row["path"]
    lines: dict[str, str] = {}
    for line in text.splitlines():  # the arrays' rows come before the values section
        if line.strip():
            lines.setdefault(line.split()[0], line)
    for row in table:
        line = lines.get(row["path"])
        if line is None:
            continue
        if row["sharding"] is None:
            assert line.rstrip().endswith(" -"), line
        elif all(e is None for e in row["sharding"]):
            assert line.rstrip().endswith(" replicated"), line
        else:
            assert " P(" in line, line


def row_is_nonfinite(out: Outputs, path: str) -> bool:
    return any(p["path"] == path and p["nan"] + p["inf"] > 0 for p in out.json("stats")["params"])


INVARIANTS = [
    table_total_is_count_total,
    norms_cover_the_arrays_of_numbers,
    global_norm_is_the_sum_of_squares,
    layers_agree_with_unstacked_norms,
    snapshot_then_check_passes,
    diff_with_itself_is_identical,
    digests_agree,
    csv_and_json_agree,
    every_format_carries_the_same_fields,
    header_names_are_column_names,
    sharding_is_null_only_where_not_stored,
]


def cases():
    for case in [*DATA_CASES, *SESSION_CASES]:
        for invariant in INVARIANTS:
            yield pytest.param(case, invariant, id=f"{case}-{invariant.__name__}")


@pytest.mark.parametrize(("case", "invariant"), cases())
def test_commands_agree(request, folder, case, invariant):
    invariant(outputs_of(request, case, folder))


@pytest.mark.parametrize("invariant", INVARIANTS, ids=[i.__name__ for i in INVARIANTS])
def test_commands_agree_on_every_storage(storage_ckpt, folder, invariant, request):
    invariant(storage_outputs(request, storage_ckpt, folder))


def assert_float64_of_written(out: Outputs, written):
    """The norms against float64 numpy of the values the checkpoint was written from."""
    norms = out.json("norms", "--per-param")
    shown = {p["path"]: p["norm"] for p in norms["params"]}
    assert set(shown) <= set(written.values)
    squares = []
    for path, norm in shown.items():
        expected = f64_norm(written.values[path])
        squares.append(expected**2)
        if math.isfinite(expected):
            assert norm == pytest.approx(expected, rel=1e-12), path
        else:
            assert norm is None, path
    if all(math.isfinite(s) for s in squares):
        assert norms["global_norm"] == pytest.approx(math.sqrt(math.fsum(squares)), rel=1e-12)


@pytest.mark.parametrize("case", ["standard_ckpt", "special_ckpt", "nnx_ckpt"])
def test_norms_are_float64_of_what_was_written(request, folder, case):
    assert_float64_of_written(outputs_of(request, case, folder), request.getfixturevalue(case))


def test_storage_norms_are_float64_of_what_was_written(storage_ckpt, folder, request):
    assert_float64_of_written(storage_outputs(request, storage_ckpt, folder), storage_ckpt)
