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
import shutil

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
        "head.bias": [None],  # replicated: no dimension split
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


def test_the_folder_above_a_levanter_run_is_refused_never_merged(tmp_path):
    from test_cli import run

    shutil.copytree(LEVANTER_RUN, tmp_path / "run")
    for command in ("table", "norms"):
        result = run(command, tmp_path)
        assert result.exit_code == 3, result.stdout
        assert result.stderr.strip().splitlines() == [
            f"paramscope: error: {tmp_path} is not one checkpoint: found a run under run/ "
            f"(hint: pass it: {tmp_path / 'run'})"
        ]
    assert run_json("table", tmp_path / "run")["step"] == 4


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


# flax NNX with qwix-quantized parameters -----------------------------------------------------

QWIX = expected("qwix")
QWIX_STATE = os.path.join(DATA, "qwix", "state")


def unboxed(leaves):
    """expected.json keeps Orbax's keys; NNX's trailing ``value`` is dropped in what is shown."""
    return {k.removesuffix(".value"): v for k, v in leaves.items()}


def test_qwix_int8_int4_float8_read_exactly():
    want = unboxed(QWIX["leaves"])
    table = assert_reads(QWIX_STATE, want)
    dtypes = {p["path"]: p["dtype"] for p in table["params"]}
    assert {dtypes[f"{layer}.kernel.array.qvalue"] for layer in QWIX["rules"]} == set(QWIX["rules"].values())
    assert {dtypes[f"{layer}.kernel.array.scale"] for layer in QWIX["rules"]} == {"float32"}
    stats = {p["path"]: p for p in run_json("stats", QWIX_STATE)["params"]}
    for path, entry in want.items():
        row = stats[path]
        # quantized values (int4 included) are small integers or float8 values: exact in float64
        assert (row["min"], row["max"]) == (entry["min"], entry["max"]), path
        count = math.prod(entry["shape"])
        assert row["mean"] == pytest.approx(entry["sum"] / count, rel=1e-9, abs=1e-12), path
    int4 = want["int4_proj.kernel.array.qvalue"]
    assert -8 <= int4["min"] < 0 < int4["max"] <= 7
    assert run_json("verify", QWIX_STATE)["ok"]


# Paxml --------------------------------------------------------------------------------------

PAXML = expected("paxml")


def paxml_root(run_name):
    return os.path.join(DATA, "paxml", run_name, "checkpoints")


@pytest.mark.parametrize("step", ["100", "200"])
@pytest.mark.parametrize("run_name", ["v1_2", "v1_1"])
def test_paxml_steps_read_exactly(run_name, step):
    want = PAXML["runs"][run_name]["steps"][step]
    table = assert_reads(paxml_root(run_name), want["leaves"], "--step", step)
    assert table["step"] == int(step) and table["item"] == "state"
    folder = os.path.join(paxml_root(run_name), f"checkpoint_{int(step):08d}")
    assert_reads(folder, want["leaves"])  # the step folder on its own


@pytest.mark.parametrize("run_name", ["v1_2", "v1_1"])
def test_paxml_info_steps_and_history(run_name):
    runs = PAXML["runs"][run_name]
    info = run_json("info", paxml_root(run_name))
    assert info["layout"] == "root" and info["step"] == 200
    assert [(s["step"], s["name"], s["finished"]) for s in info["steps"]] == [
        (100, "checkpoint_00000100", True),
        (200, "checkpoint_00000200", True),
    ]
    items = {i["name"]: i for i in info["items"]}
    assert {k: i["kind"] for k, i in items.items()} == {
        "metadata": "json",
        "state": "pytree" if runs["ocdbt"] else "paxml",
    }
    assert items["metadata"]["content"] == runs["steps"]["200"]["metadata"]
    assert items["state"]["storage"] == ("ocdbt" if runs["ocdbt"] else "zarr")
    history = run_json("history", paxml_root(run_name), "--no-cache")
    assert history["steps"] == [100, 200]
    for step in ("100", "200"):
        want = runs["steps"][step]["leaves"]
        rows = [r for r in history["series"] if r["step"] == int(step) and r["metric"] == "norm"]
        assert {r["path"]: r["value"] for r in rows} == {
            k: pytest.approx(v["norm"], rel=1e-6) for k, v in want.items()
        }
    diff = run_json("diff", paxml_root(run_name), paxml_root(run_name), "--step-a", "100", "--step-b", "200")
    assert {r["path"] for r in diff["params"]} == set(runs["steps"]["200"]["leaves"])


def test_paxml_both_versions_read_alike():
    """Version 1.1 names each array by its dotted path; 1.2 stores the same tree: same rows."""
    tables = [run_json("norms", paxml_root(r), "--per-param")["params"] for r in ("v1_2", "v1_1")]
    assert tables[0] == tables[1]


# verify on every family: 0 intact, 3 damaged, nothing in the folder changed ------------------


def _data_files(folder, *parts):
    """The files of array data: OCDBT data files (``d/``), zarr chunks and msgpack files."""
    return [
        os.path.join(dirpath, name)
        for dirpath, _, names in os.walk(os.path.join(folder, *parts))
        for name in names
        if os.path.basename(dirpath) == "d" or name[0].isdigit() or name.endswith(".msgpack")
    ]


# (fixture folder, where data files are cut to half their size, inside the copy)
DAMAGE = {
    "levanter": ("levanter/run", ("step-4", "model")),
    "penzai": ("penzai/params", ()),
    "qwix": ("qwix/state", ()),
    "paxml 1.2": ("paxml/v1_2/checkpoints", ("checkpoint_00000200", "state")),
    "paxml 1.1": ("paxml/v1_1/checkpoints", ("checkpoint_00000200", "state")),
    "hf flax": ("hf_flax/bert", ()),
}


@pytest.mark.parametrize("family", list(DAMAGE))
def test_verify_intact_then_damaged_copies(family, tmp_path):
    from conftest import tree_snapshot

    folder, inside = DAMAGE[family]
    copy = str(tmp_path / "copy")
    shutil.copytree(os.path.join(DATA, folder), copy)
    before = tree_snapshot(copy)
    intact = run("verify", copy, "--format", "json")
    assert intact.exit_code == 0 and json.loads(intact.stdout)["ok"], intact.stdout
    assert tree_snapshot(copy) == before
    # a second copy: within one process TensorStore may keep what it read of the first
    copy = str(tmp_path / "damaged")
    shutil.copytree(os.path.join(DATA, folder), copy)
    for victim in _data_files(copy, *inside):  # an OCDBT folder holds files no longer read
        with open(victim, "r+b") as f:
            f.truncate(os.path.getsize(victim) // 2)
    damaged = tree_snapshot(copy)
    result = run("verify", copy, "--format", "json")
    report = json.loads(result.stdout)
    assert result.exit_code == 3 and not report["ok"] and report["problems"], result.stdout
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert tree_snapshot(copy) == damaged


# verify's note on writers that skip chunks equal to the fill value ---------------------------


def test_verify_notes_items_whose_missing_chunks_read_as_fill_value():
    old = run_json("verify", os.path.join(DATA, "orbax_0_6_1", "checkpoints"))
    assert old["ok"] and len(old["notes"]) == 1
    assert old["notes"][0].startswith("items 'opt_state', 'params', 'rng', 'step': the writer may skip")
    text = run("verify", os.path.join(DATA, "orbax_0_6_1", "checkpoints")).stdout
    assert "note: items 'opt_state', 'params', 'rng', 'step'" in text
    # Orbax 0.7 on stores every chunk (a missing one is damage), and so do these zarr trees
    for path in (QWIX_STATE, os.path.join(DATA, "penzai", "params"), LEVANTER_RUN):
        assert run_json("verify", path)["notes"] == [], path


def test_verify_notes_zarr_arrays_that_lack_chunks(tmp_path):
    import numpy as np
    import tensorstore as ts

    folder = tmp_path / "tree"
    spec = {
        "driver": "zarr",
        "kvstore": {"driver": "file", "path": str(folder / "w")},
        "metadata": {"shape": [4, 4], "chunks": [2, 4], "dtype": "<f4", "fill_value": 0},
        "create": True,
    }
    array = ts.open(spec).result()
    value = np.zeros((4, 4), np.float32)
    value[:2] = 1.5  # the second chunk equals the fill value: TensorStore does not store it
    array.write(value).result()
    assert sorted(os.listdir(folder / "w")) == [".zarray", "0.0"]
    doc = run_json("verify", folder)
    assert doc["ok"] and doc["notes"] == [
        "1 array (w) lacks chunks, which read as the fill value: the writer skips chunks equal to it, "
        "so a lost chunk cannot be told from one never written"
    ]
    norms = run_json("norms", folder, "--per-param")["params"]
    assert norms[0]["norm"] == pytest.approx(float(np.linalg.norm(value.astype(np.float64))), rel=1e-12)
