"""Checkpoints written by real trainers' own save paths, read from the command line.

Each fixture under tests/data/<name>/ was written by scripts/make_<name>_fixture.py in a
throwaway environment with the framework installed from PyPI; its expected.json holds, per
array, the dotted path, shape, dtype and float64 norm of the framework's in-memory values
(LAYOUT.md says how). The tests only read them.
"""

import csv
import io
import json
import math
import os

import pytest
from test_cli import run, run_json

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")


def expected(name):
    with open(os.path.join(DATA, name, "expected.json")) as f:
        return json.load(f)


def assert_reads(path, wanted, *options):
    """table, count and norms --per-param of one checkpoint against expected.json entries."""
    table = run_json("table", path, *options)
    assert {p["path"]: (p["shape"], p["dtype"]) for p in table["params"]} == {
        k: (v["shape"], v["dtype"]) for k, v in wanted.items()
    }
    count = run_json("count", path, *options)
    assert count["total"]["count"] == sum(math.prod(v["shape"]) for v in wanted.values())
    by_dtype = {}
    for v in wanted.values():
        by_dtype[v["dtype"]] = by_dtype.get(v["dtype"], 0) + math.prod(v["shape"])
    assert {k: v["count"] for k, v in count["by_dtype"].items()} == by_dtype
    # typed PRNG keys (NNX rng state) are named, and left out of the numbers
    keys = {p["path"] for p in table["params"] if "random_key" in p}
    numbers = {k: v for k, v in wanted.items() if k not in keys}
    assert all(k.endswith(".key") for k in keys)
    norms = run_json("norms", path, "--per-param", *options)
    assert {p["path"]: p["norm"] for p in norms["params"]} == {
        k: pytest.approx(v["norm"], rel=1e-6) for k, v in numbers.items()
    }
    assert norms["global_norm"] == pytest.approx(
        math.sqrt(sum(v["norm"] ** 2 for v in numbers.values())), rel=1e-6
    )
    return table


# MaxText ------------------------------------------------------------------------------------

MAXTEXT = expected("maxtext")


def maxtext_path(run_name):
    return os.path.join(DATA, "maxtext", run_name, "checkpoints")


@pytest.mark.parametrize("step", ["0", "1"])
@pytest.mark.parametrize("run_name", ["scan", "unscanned"])
def test_maxtext_table_count_norms(run_name, step):
    want = MAXTEXT["runs"][run_name]["steps"][step]
    table = assert_reads(maxtext_path(run_name), want["items"], "--step", step)
    assert table["item"] == "items" and table["step"] == int(step)


def test_maxtext_latest_step_and_layer_names():
    info = run_json("info", maxtext_path("scan"))
    assert info["step"] == 1 and [i["name"] for i in info["items"]] == ["items"]
    scanned = {p["path"] for p in run_json("table", maxtext_path("scan"))["params"]}
    unscanned = {p["path"] for p in run_json("table", maxtext_path("unscanned"))["params"]}
    assert "params.params.decoder.layers.mlp.wi_0.kernel" in scanned
    assert {
        "params.params.decoder.layers_0.mlp.wi_0.kernel",
        "params.params.decoder.layers_1.mlp.wi_0.kernel",
    } <= (unscanned)


def unstacked(name, index, stored_shape, axis):
    parts = name.split(".")
    at = parts.index("layers") + 1
    return ".".join([*parts[:at], str(index), *parts[at:]]), [
        n for i, n in enumerate(stored_shape) if i != axis
    ]


def maxtext_layer_rows(prefix):
    """(path, shape, norm) of every layer of every stacked array whose path starts with prefix."""
    want = MAXTEXT["runs"]["scan"]["steps"]["1"]
    rows = {}
    for name, entry in want["layers"].items():
        if not name.startswith(prefix):
            continue
        for index, norm in enumerate(entry["norms"]):
            path, shape = unstacked(name, index, want["items"][name]["shape"], entry["axis"])
            rows[path] = (shape, norm)
    return rows


@pytest.mark.parametrize("prefix", ["params.", "opt_state."])
def test_maxtext_unstack_params_and_moments(prefix):
    """scan_layers=true: the layer axis is param_scan_axis (1), from the step's custom metadata."""
    rows = maxtext_layer_rows(prefix)
    assert len({p.split(".layers.")[0] for p in rows}) == (1 if prefix == "params." else 2)
    assert len(rows) == 2 * 9 * (1 if prefix == "params." else 2)  # 2 layers, 9 arrays per layer
    flt = "^" + prefix.replace(".", r"\.")
    table = run_json("table", maxtext_path("scan"), "--unstack", "--filter", flt)
    got = {p["path"]: p for p in table["params"] if ".layers." in p["path"]}
    assert {k: v["shape"] for k, v in got.items()} == {k: shape for k, (shape, _) in rows.items()}
    assert {v["stacked"] for v in got.values()} == {"axis 1, metadata"}
    norms = run_json("norms", maxtext_path("scan"), "--unstack", "--per-param", "--filter", flt)
    assert {p["path"]: p["norm"] for p in norms["params"] if ".layers." in p["path"]} == {
        k: pytest.approx(norm, rel=1e-6) for k, (_, norm) in rows.items()
    }


def test_maxtext_layers_command_on_params():
    want = MAXTEXT["runs"]["scan"]["steps"]["1"]["layers"]
    doc = run_json("layers", maxtext_path("scan"), "--filter", "^params")
    assert [(r["stack"], r["layer"]) for r in doc["layers"]] == [
        ("params.params.decoder.layers", 0),
        ("params.params.decoder.layers", 1),
    ]
    for row in doc["layers"]:
        expected_norms = {
            name.removeprefix("params.params.decoder.layers."): entry["norms"][row["layer"]]
            for name, entry in want.items()
            if name.startswith("params.")
        }
        assert row["norms"] == pytest.approx(expected_norms, rel=1e-6)
        assert row["norm"] == pytest.approx(math.sqrt(sum(n**2 for n in expected_norms.values())), rel=1e-6)


def test_maxtext_unstack_rng_state():
    rows = maxtext_layer_rows("nnx_aux.")
    table = run_json("table", maxtext_path("scan"), "--unstack", "--filter", r"^nnx_aux\..*\.layers\.")
    assert {p["path"]: p["shape"] for p in table["params"]} == {k: shape for k, (shape, _) in rows.items()}
    keys = {p["path"] for p in table["params"] if "random_key" in p}  # each layer's rng keys
    assert keys and all(k.endswith(".key") for k in keys)
    norms = run_json(
        "norms", maxtext_path("scan"), "--unstack", "--per-param", "--filter", r"^nnx_aux\..*\.layers\."
    )
    assert {p["path"]: p["norm"] for p in norms["params"]} == {
        k: pytest.approx(norm, rel=1e-6) for k, (_, norm) in rows.items() if k not in keys
    }


def test_maxtext_layers_command_counts_two_layers_per_stack():
    doc = run_json("layers", maxtext_path("scan"))
    stacks = {}
    for row in doc["layers"]:
        stacks.setdefault(row["stack"], []).append(row["layer"])
    assert stacks == {
        "nnx_aux.model.decoder.layers": [0, 1],
        "opt_state.0.mu.params.decoder.layers": [0, 1],
        "opt_state.0.nu.params.decoder.layers": [0, 1],
        "params.params.decoder.layers": [0, 1],
    }
    # the rng key data under nnx_aux is left out of the numbers, per layer as a whole
    whole = run_json("norms", maxtext_path("scan"))["global_norm"]
    assert run_json("norms", maxtext_path("scan"), "--unstack")["global_norm"] == pytest.approx(
        whole, rel=1e-12
    )
    assert max(row["norm"] for row in doc["layers"]) < whole


def test_maxtext_layers_command_on_the_whole_state():
    """Every stack's rows hold its own arrays' numbers, with the rng keys (left out) in none."""
    want = MAXTEXT["runs"]["scan"]["steps"]["1"]["layers"]
    expected_rows = {}
    for name, entry in want.items():
        if name.endswith(".key"):
            continue
        stack, kind = name.split(".layers.")
        for layer, norm in enumerate(entry["norms"]):
            expected_rows.setdefault((stack + ".layers", layer), {})[kind] = norm
    doc = run_json("layers", maxtext_path("scan"))
    assert {(r["stack"], r["layer"]): r["norms"] for r in doc["layers"]} == {
        k: pytest.approx(v, rel=1e-6) for k, v in expected_rows.items()
    }
    result = run("layers", maxtext_path("scan"), "--format", "csv")
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert not any(column.endswith(".key") for column in rows[0])
    for row in rows:
        norms = expected_rows[(row["stack"], int(row["layer"]))]
        assert {k: float(v) for k, v in row.items() if k in norms} == pytest.approx(norms, rel=1e-6)
        assert all(
            v == ""
            for k, v in row.items()
            if k not in norms and k not in ("stack", "layer", "norm", "nonfinite")
        )


# Kauldron -----------------------------------------------------------------------------------

KAULDRON = expected("kauldron")
KAULDRON_PATH = os.path.join(DATA, "kauldron", "checkpoints")


@pytest.mark.parametrize("step", ["0", "1", "2"])
def test_kauldron_table_count_norms(step):
    want = KAULDRON["steps"][step]["default"]
    table = assert_reads(KAULDRON_PATH, want, "--step", step)
    assert table["item"] == "default" and table["step"] == int(step)
    assert {p["path"] for p in table["params"] if p["dtype"] == "bfloat16"} == {
        "params.head.kernel",
        "params.head.bias",
        "opt_state.0.mu.head.kernel",
        "opt_state.0.mu.head.bias",
        "opt_state.0.nu.head.kernel",
        "opt_state.0.nu.head.bias",
    }


def test_kauldron_root_items_and_sharding():
    info = run_json("info", KAULDRON_PATH)
    assert info["step"] == 2 and [(s["step"], s["name"]) for s in info["steps"]] == [
        (0, "ckpt_0"),
        (1, "ckpt_1"),
        (2, "ckpt_2"),
    ]
    kinds = {i["name"]: i["kind"] for i in info["items"]}
    assert kinds["default"] == "pytree" and kinds["timer"] == "json"
    table = run_json("table", KAULDRON_PATH, "--subtree", "params")
    assert {p["path"]: p["sharding"] for p in table["params"]} == {
        "hidden.kernel": [None, "devices"],
        "hidden.bias": ["devices"],
        "norm.scale": ["devices"],
        "norm.bias": ["devices"],
        "head.kernel": ["devices", None],
        "head.bias": None,
    }


# Gemma library ------------------------------------------------------------------------------

GEMMA = expected("gemma")


@pytest.mark.parametrize("variant", ["bfloat16", "float32"])
def test_gemma_save_params(variant):
    want = GEMMA["checkpoints"][variant]
    assert {v["dtype"] for v in want.values()} == {variant}
    table = assert_reads(os.path.join(DATA, "gemma", variant), want)
    assert {"layer_0.attn.kv_einsum.w", "layer_1.mlp.gating_einsum", "embedder.input_embedding"} <= {
        p["path"] for p in table["params"]
    }


def test_maxtext_unscanned_has_no_stacks():
    path = maxtext_path("unscanned")
    assert run_json("layers", path)["layers"] == []
    whole = {p["path"]: p["shape"] for p in run_json("table", path)["params"]}
    assert {p["path"]: p["shape"] for p in run_json("table", path, "--unstack")["params"]} == whole


# Levanter -----------------------------------------------------------------------------------

LEVANTER = expected("levanter")
LEVANTER_RUN = os.path.join(DATA, "levanter", "run")


@pytest.mark.parametrize("step", ["2", "4"])
def test_levanter_steps_read_exactly(step):
    want = LEVANTER["steps"][step]["leaves"]
    table = assert_reads(LEVANTER_RUN, want, "--step", step)
    assert table["step"] == int(step) and table["item"] == f"step-{step}"
    # a step folder on its own reads the same
    assert_reads(os.path.join(LEVANTER_RUN, f"step-{step}"), want)


def test_levanter_root_is_a_run_never_one_merged_tree():
    table = run_json("table", LEVANTER_RUN)
    paths = [p["path"] for p in table["params"]]
    assert table["step"] == 4 and len(paths) == len(LEVANTER["steps"]["4"]["leaves"])
    assert not any(p.startswith("step-") for p in paths)
    layers = [p for p in paths if p.startswith("model.layers.") and p.endswith(".weight")]
    assert layers == [f"model.layers.{i}.weight" for i in range(11)]  # numeric order


def test_levanter_info_lists_steps_with_their_timestamps():
    info = run_json("info", LEVANTER_RUN)
    assert info["layout"] == "root" and info["step"] == 4
    steps = {s["step"]: s for s in info["steps"]}
    assert {k: s["finished"] for k, s in steps.items()} == {2: True, 4: True, 6: False}
    for number in ("2", "4"):
        saved = LEVANTER["steps"][number]["metadata"]
        assert steps[int(number)]["saved"] == saved["timestamp"]
    assert "saved" not in steps[6]  # its metadata.json was never written
    (item,) = info["items"]
    assert item["kind"] == "tensorstore" and item["metadata"] == LEVANTER["steps"]["4"]["metadata"]
    step_info = run_json("info", LEVANTER_RUN, "--step", "2")
    assert step_info["step"] == 2 and step_info["items"][0]["name"] == "step-2"


def test_levanter_unfinished_step_is_refused(tmp_path):
    from test_cli import run

    result = run("norms", LEVANTER_RUN, "--step", "6")
    assert result.exit_code == 3 and "no finished step 6" in result.stderr and "2, 4" in result.stderr
    only_unfinished = tmp_path / "run"
    only_unfinished.mkdir()
    os.symlink(os.path.join(LEVANTER_RUN, "step-6"), only_unfinished / "step-6")
    result = run("norms", only_unfinished)
    assert result.exit_code == 3 and "no finished step" in result.stderr and "metadata.json" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert run_json("info", only_unfinished)["steps"] == [{"step": 6, "name": "step-6", "finished": False}]


def test_levanter_diff_and_history_across_steps():
    diff = run_json("diff", LEVANTER_RUN, LEVANTER_RUN, "--step-a", "2", "--step-b", "4")
    rows = {r["path"]: r for r in diff["params"]}
    assert set(rows) == set(LEVANTER["steps"]["4"]["leaves"])
    assert rows["model.head.weight"]["status"] == "changed"
    history = run_json("history", LEVANTER_RUN, "--no-cache")
    assert history["steps"] == [2, 4]
    for number in ("2", "4"):
        want = LEVANTER["steps"][number]["leaves"]
        got = {
            r["path"]: r["value"]
            for r in history["series"]
            if r["step"] == int(number) and r["metric"] == "norm"
        }
        assert got == {k: pytest.approx(v["norm"], rel=1e-6) for k, v in want.items()}


def test_step_folders_beside_other_arrays_are_refused(tmp_path):
    from test_cli import run

    os.symlink(os.path.join(LEVANTER_RUN, "step-2"), tmp_path / "step-2")
    os.symlink(os.path.join(LEVANTER_RUN, "step-4", "model"), tmp_path / "model")
    result = run("norms", tmp_path)
    assert result.exit_code == 3 and "step-2" in result.stderr and "model" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


# penzai -------------------------------------------------------------------------------------

PENZAI = expected("penzai")


def test_penzai_params_read_exactly_in_numeric_order():
    path = os.path.join(DATA, "penzai", "params")
    want = PENZAI["leaves"]
    table = assert_reads(path, want)
    order = [f"{i}.value.data_array" for i in range(22)]
    assert [p["path"] for p in table["params"]] == order
    assert [p["path"] for p in run_json("norms", path, "--per-param")["params"]] == order
    assert [p["path"] for p in run_json("stats", path)["params"]] == order
    assert [g["path"] for g in run_json("count", path, "--depth", "1")["groups"]] == [
        str(i) for i in range(22)
    ]
    assert [p["path"] for p in run_json("diff", path, path, "--all")["params"]] == order


# Items that are not arrays ------------------------------------------------------------------

ITEMS = expected("manager_items")
ITEMS_RUN = os.path.join(DATA, "manager_items", "run")


@pytest.mark.parametrize("step", ["1", "2"])
def test_info_lists_every_item_with_its_kind(step):
    info = run_json("info", ITEMS_RUN, "--step", step)
    want = ITEMS["steps"][step]
    assert {i["name"]: i["kind"] for i in info["items"]} == want["kinds"]
    items = {i["name"]: i for i in info["items"]}
    for name, content in want["json"].items():
        assert items[name]["content"] == content
    assert items["grain_iter"]["content"] == want["iterator"]
    assert "grain" in items["grain_iter"]["handler"].lower()
    assert_reads(ITEMS_RUN, want["leaves"], "--step", step)


def test_item_that_holds_no_arrays_says_what_it_is():
    from test_cli import run

    result = run("norms", ITEMS_RUN, "--item", "grain_iter")
    assert (
        result.exit_code == 3 and "dataset iterator" in result.stderr and "last_seen_indices" in result.stderr
    )
    result = run("table", ITEMS_RUN, "--item", "data_iter")
    assert result.exit_code == 3 and "JSON item" in result.stderr and '"position": 6' in result.stderr
    # the line break and the terminal escape in its content are escaped: one line, no escape
    assert len(result.stderr.strip().splitlines()) == 1 and "\x1b" not in result.stderr
    assert "\\u001b" in result.stderr
    info = run("info", ITEMS_RUN)
    assert info.exit_code == 0 and "\x1b[31m" not in info.stdout and "dataset iterator" in info.stdout


def test_verify_checks_iterator_items(tmp_path):
    from test_cli import run

    assert run_json("verify", ITEMS_RUN)["ok"]
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(ITEMS_RUN, copy)
    (copy / "2" / "grain_iter" / "process_0-of-1.json").write_text('{"version": 2,')
    result = run("verify", copy, "--format", "json")
    report = json.loads(result.stdout)
    assert result.exit_code != 0 and not report["ok"]
    assert any("process_0-of-1.json" in str(p) for p in report["problems"])
