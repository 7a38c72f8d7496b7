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
