"""TensorStore trees: EasyDeL checkpoints (``tests/data/easydel``) and plain zarr folders written
here with TensorStore, through the command line, against float64 numpy."""

import json
import math
import os
import shutil
from importlib.resources import files

import jsonschema
import numpy as np
import pytest
import tensorstore as ts
from conftest import f64_norm, tree_snapshot
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_cli import run, run_json
from test_robustness import damage_and_run, json_values

from paramscope.io import checkpoint, tstree
from paramscope.io.storage import Tree

EASYDEL = os.path.join(os.path.dirname(__file__), "data", "easydel")
VARIANTS = ["float32", "bfloat16"]
# A file no parser survives: a pickle opcode, invalid UTF-8, invalid JSON.
POISON = b"\x80\x04\x95\xff\xfe{not json\x00" + bytes(range(256))


@pytest.fixture(scope="session")
def expected():
    with open(os.path.join(EASYDEL, "expected.json")) as f:
        return {name: v["params"] for name, v in json.load(f)["variants"].items()}


@pytest.fixture(scope="session")
def stored_values():
    """Each variant's arrays read with TensorStore directly from the folders expected.json names."""
    with open(os.path.join(EASYDEL, "expected.json")) as f:
        variants = json.load(f)["variants"]
    values = {}
    for variant, doc in variants.items():
        values[variant] = {
            name: ts.open(
                {
                    "driver": "zarr",
                    "kvstore": {"driver": "file", "path": os.path.join(EASYDEL, variant, p["stored_path"])},
                },
                read=True,
            )
            .result()
            .read()
            .result()
            for name, p in doc["params"].items()
        }
    return values


def one_line_error(result, code, *words):
    assert result.exit_code == code, (result.exit_code, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert "hint:" in lines[0] and all(w in lines[0] for w in words), lines[0]


# ----------------------------------------------------------------------------------------------
# EasyDeL


@pytest.mark.parametrize("variant", VARIANTS)
def test_table_lists_the_nnx_names_shapes_and_dtypes(variant, expected):
    doc = run_json("table", os.path.join(EASYDEL, variant))
    rows = {p["path"]: p for p in doc["params"]}
    assert set(rows) == set(expected[variant])
    for name, want in expected[variant].items():
        assert rows[name]["shape"] == want["shape"] and rows[name]["dtype"] == want["dtype"], name
        assert rows[name]["count"] == math.prod(want["shape"])
    assert doc["item"] == variant and doc["step"] is None


@pytest.mark.parametrize("variant", VARIANTS)
def test_norms_match_float64(variant, expected, stored_values):
    doc = run_json("norms", os.path.join(EASYDEL, variant), "--per-param")
    norms = {p["path"]: p["norm"] for p in doc["params"]}
    assert norms == {name: pytest.approx(p["norm"], rel=1e-6) for name, p in expected[variant].items()}
    # the reference is what the files hold
    assert {n: f64_norm(v) for n, v in stored_values[variant].items()} == pytest.approx(
        {n: p["norm"] for n, p in expected[variant].items()}, rel=1e-12
    )
    total = math.sqrt(sum(p["norm"] ** 2 for p in expected[variant].values()))
    assert doc["global_norm"] == pytest.approx(total, rel=1e-6) and doc["nonfinite"] == 0


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_command_reads_it(variant, expected):
    path = os.path.join(EASYDEL, variant)
    count = run_json("count", path)
    assert count["total"]["count"] == sum(math.prod(p["shape"]) for p in expected[variant].values())
    stats = run_json("stats", path, "--digest")
    assert {p["path"] for p in stats["params"]} == set(expected[variant])
    assert len(stats["digest"]) == 64 and all(len(p["digest"]) == 64 for p in stats["params"])
    assert run_json("table", path, "--digest")["digest"] == stats["digest"]
    verify = run_json("verify", path)
    assert verify["ok"] and verify["arrays"] == len(expected[variant]) and verify["problems"] == []


def test_info_shows_the_model_and_save_metadata():
    doc = run_json("info", os.path.join(EASYDEL, "float32"))
    (item,) = doc["items"]
    assert doc["layout"] == "item" and item["kind"] == "tensorstore" and item["storage"] == "zarr"
    assert item["arrays"] == 21 and item["count"] == 6736
    meta = item["metadata"]
    assert meta["architectures"] == ["LlamaForCausalLM"] and meta["model_type"] == "llama"
    assert meta["version"] == "0.0.99.12" and meta["timestamp"].startswith("2026-")
    assert "vocab_size" not in meta  # only the chosen config fields
    schema = json.loads(files("paramscope").joinpath("output", "schemas", "info.json").read_text())
    assert not list(jsonschema.Draft202012Validator(schema).iter_errors(doc))
    text = run("info", os.path.join(EASYDEL, "float32")).stdout
    assert (
        "tensorstore" in text and 'architectures=["LlamaForCausalLM"]' in text and "model_type=llama" in text
    )


def test_diff_across_variants(expected):
    doc = run_json("diff", os.path.join(EASYDEL, "float32"), os.path.join(EASYDEL, "bfloat16"))
    assert doc["summary"]["changed"] == len(expected["float32"]) and doc["summary"]["added"] == 0
    rows = {p["path"]: p for p in doc["params"]}
    assert rows["lm_head.kernel"]["changes"] == ["dtype float32 -> bfloat16"]
    same = run_json("diff", os.path.join(EASYDEL, "float32"), os.path.join(EASYDEL, "float32"))
    assert same["summary"]["identical"] == len(expected["float32"])


@pytest.fixture
def easydel_copy(tmp_path):
    path = str(tmp_path / "float32")
    shutil.copytree(os.path.join(EASYDEL, "float32"), path)
    return path


def test_model_structure_is_never_read(easydel_copy):
    """``model_structure.json`` holds a pickle: replaced by poison, nothing changes."""
    pristine = os.path.join(EASYDEL, "float32")
    with open(os.path.join(easydel_copy, "model_structure.json"), "wb") as f:
        f.write(POISON)
    before = tree_snapshot(easydel_copy)
    for command in ("info", "table", "count", "norms", "stats", "verify"):
        local, original = run_json(command, easydel_copy), run_json(command, pristine)
        assert local["items"] == [os.path.basename(easydel_copy)] or command == "info"
        for doc in (local, original):
            doc.pop("checkpoint")
            for item in doc.get("items", []):
                if isinstance(item, dict):
                    item.pop("bytes_on_disk")
        assert local == original, command
    assert tree_snapshot(easydel_copy) == before


def _shift_shape(path):
    index_file = os.path.join(path, "tensorstore_index.json")
    with open(index_file) as f:
        index = json.load(f)
    index["prefixes"]["model"][0]["shape"] = [17, 64]
    with open(index_file, "w") as f:
        json.dump(index, f)


def test_a_missing_array_folder_fails_in_one_line(easydel_copy):
    shutil.rmtree(os.path.join(easydel_copy, "model", "lm_head", "kernel"))
    one_line_error(run("norms", easydel_copy), 3, "lm_head.kernel", "not stored")
    result = run("verify", easydel_copy, "--format", "json")
    assert result.exit_code == 3 and "Traceback" not in result.stderr
    (problem,) = json.loads(result.stdout)["problems"]
    assert "lm_head.kernel" in problem["problem"]


@pytest.mark.parametrize("damage", ["truncated", "not an object", "bad path"])
def test_a_damaged_index_fails_in_one_line(easydel_copy, damage):
    index_file = os.path.join(easydel_copy, "tensorstore_index.json")
    text = open(index_file).read()
    content = {
        "truncated": text[: len(text) // 2],
        "not an object": "[1, 2]",
        "bad path": text.replace('"model/lm_head/kernel"', '"../../etc/kernel"'),
    }[damage]
    with open(index_file, "w") as f:
        f.write(content)
    for command in ("info", "table", "norms"):
        one_line_error(run(command, easydel_copy), 3, "tensorstore_index.json")
    result = run("verify", easydel_copy)
    assert result.exit_code == 3 and "tensorstore_index.json" in result.stdout


def test_verify_finds_where_index_and_arrays_disagree(easydel_copy):
    _shift_shape(easydel_copy)
    with open(os.path.join(easydel_copy, "tensorstore_index.json")) as f:
        index = json.load(f)
    index["prefixes"]["model"][1]["dtype"] = "float16"
    with open(os.path.join(easydel_copy, "tensorstore_index.json"), "w") as f:
        json.dump(index, f)
    shutil.copytree(
        os.path.join(easydel_copy, "model", "lm_head", "kernel"), os.path.join(easydel_copy, "model", "stray")
    )
    assert run("table", easydel_copy).exit_code == 0  # the stored arrays still read
    result = run("verify", easydel_copy, "--format", "json")
    assert result.exit_code == 3 and result.stderr.count("\n") == 1
    problems = {(p["path"], p["problem"]) for p in json.loads(result.stdout)["problems"]}
    assert problems == {
        ("lm_head.kernel", "tensorstore_index.json says shape [17, 64], the stored array has [16, 64]"),
        (
            "model.embed_tokens.embedding",
            "tensorstore_index.json says dtype float16, the stored array has float32",
        ),
        ("model/stray", "stored, but not listed in tensorstore_index.json"),
    }


def test_several_prefixes_name_the_prefix(easydel_copy):
    index_file = os.path.join(easydel_copy, "tensorstore_index.json")
    with open(index_file) as f:
        index = json.load(f)
    entries = index["prefixes"]["model"]
    index["prefixes"] = {"model": entries[1:], "head": entries[:1]}
    with open(index_file, "w") as f:
        json.dump(index, f)
    paths = [p["path"] for p in run_json("table", easydel_copy)["params"]]
    assert paths[0] == "head.model.lm_head.kernel" and "model.model.norm.kernel" in paths


def test_parent_folder_names_the_checkpoints_below(tmp_path):
    for variant in VARIANTS:
        shutil.copytree(os.path.join(EASYDEL, variant), tmp_path / "runs" / variant)
    one_line_error(run("table", tmp_path / "runs"), 3, "not a checkpoint", "bfloat16/, float32/")
    one_line_error(run("table", tmp_path / "runs" / "float32", "--step", "5"), 3, "--step 5")
    # the array folders alone are a plain zarr tree, named by their folders
    doc = run_json("table", tmp_path / "runs" / "float32" / "model")
    assert "lm_head.kernel" in [p["path"] for p in doc["params"]]


# ----------------------------------------------------------------------------------------------
# Plain zarr trees


def write_array(path, value, driver="zarr", chunks=None):
    spec = {"driver": driver, "kvstore": {"driver": "file", "path": str(path)}}
    chunk_layout = ts.ChunkLayout(chunk_shape=chunks) if chunks else None
    store = ts.open(
        spec, create=True, dtype=ts.dtype(value.dtype.name), shape=value.shape, chunk_layout=chunk_layout
    ).result()
    store.write(value).result()


@pytest.fixture(scope="session")
def plain_tree(tmp_path_factory):
    """Arrays written by ``ts.open`` in nested folders: zarr2 and zarr3, several dtypes and
    chunkings, a zarr3 group with its own zarr.json, an empty group, and unrelated files."""
    import ml_dtypes

    root = tmp_path_factory.mktemp("plain") / "ckpt"
    rng = np.random.default_rng(3)
    values = {
        "model.embed": rng.standard_normal((64, 16)).astype(np.float32),
        "model.layers.0.kernel": rng.standard_normal((16, 32)).astype(ml_dtypes.bfloat16),
        "model.layers.1.kernel": rng.standard_normal((16, 32)).astype(np.float16),
        "model.scale": np.float32(2.5) * np.ones((), np.float32),
        "opt_state.count": np.arange(5, dtype=np.int32),
        "opt_state.mu.embed": (rng.standard_normal((64, 16)) * 1e-3).astype(np.float32),
    }
    drivers = {"model.layers.1.kernel": "zarr3", "opt_state.mu.embed": "zarr3"}
    for name, value in values.items():
        chunks = [8] * value.ndim if value.ndim == 2 else None
        write_array(root.joinpath(*name.split(".")), value, drivers.get(name, "zarr"), chunks)
    (root / "zarr.json").write_text(json.dumps({"zarr_format": 3, "node_type": "group"}))
    (root / "opt_state" / "zarr.json").write_text(json.dumps({"zarr_format": 3, "node_type": "group"}))
    (root / "empty_group").mkdir()
    (root / "empty_group" / "zarr.json").write_text(json.dumps({"zarr_format": 3, "node_type": "group"}))
    (root / "empty_group" / "README.md").write_text("a group with no arrays yet")
    (root / "model" / ".zgroup").write_text(json.dumps({"zarr_format": 2}))
    (root / "metadata.json").write_text(json.dumps({"step": 3}))
    return str(root), values


def test_plain_zarr_tree(plain_tree):
    path, values = plain_tree
    table = run_json("table", path)
    rows = {p["path"]: p for p in table["params"]}
    assert set(rows) == set(values)
    for name, value in values.items():
        assert rows[name]["shape"] == list(value.shape) and rows[name]["dtype"] == value.dtype.name
    norms = run_json("norms", path, "--per-param", "--memory-budget", "1KiB")
    assert {p["path"]: p["norm"] for p in norms["params"]} == {
        name: pytest.approx(f64_norm(value), rel=1e-6) for name, value in values.items()
    }
    assert run_json("verify", path)["ok"]
    info = run_json("info", path)
    assert info["layout"] == "step" and info["step"] == 3  # Levanter's metadata.json at its top
    item = info["items"][0]
    assert item["kind"] == "tensorstore" and item["storage"] == "zarr" and item["metadata"] == {"step": 3}
    subtree = run_json("table", os.path.join(path, "opt_state", "mu", "embed"))
    assert [p["path"] for p in subtree["params"]] == ["embed"]


def test_same_weights_same_digest_whatever_the_layout(tmp_path, stored_values):
    """The EasyDeL arrays, rewritten as a zarr3 tree with other chunks: the same digest."""
    for name, value in stored_values["bfloat16"].items():
        write_array(tmp_path.joinpath(*name.split(".")), value, "zarr3", [4] * value.ndim)
    rewritten = run_json("stats", tmp_path, "--digest")
    original = run_json("stats", os.path.join(EASYDEL, "bfloat16"), "--digest")
    assert rewritten["digest"] == original["digest"]
    assert run_json("info", tmp_path)["items"][0]["storage"] == "zarr3"


def test_other_formats_folders_are_not_claimed(tmp_path):
    for name, content in {
        "hf/model.safetensors": b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ",
        "hf/config.json": b"{}",
        "flax/checkpoint_10": b"\x81\xa6params\x80",
        "orbax/params/_METADATA": b"{}",
        "orbax/params/a/.zarray": b"{}",
    }.items():
        os.makedirs(tmp_path / os.path.dirname(name), exist_ok=True)
        (tmp_path / name).write_bytes(content)
    for folder in ("hf", "flax", "orbax", "orbax/params"):
        assert tstree.locate(Tree(str(tmp_path / folder))) is None, folder
    assert checkpoint.formats()[-1] is tstree


# ----------------------------------------------------------------------------------------------
# Fuzzing: damaged metadata files give a report or one line, never a traceback

FUZZED = [
    "tensorstore_index.json",
    "checkpoint_metadata.json",
    "config.json",
    "model/lm_head/kernel/.zarray",
    "model/model/norm/kernel/.zarray",
]


@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(
    st.sampled_from(FUZZED),
    st.sampled_from(["truncate", "random bytes", "json edit"]),
    st.integers(0, 10**6),
    st.binary(max_size=32),
    st.lists(st.integers(0, 50), max_size=6),
    json_values,
    st.sampled_from([["info"], ["table"], ["norms", "-q"], ["verify"]]),
)
def test_fuzzed_metadata_never_crashes(
    tmp_path_factory, target, kind, position, noise, path, replacement, command
):
    root = str(tmp_path_factory.mktemp("fuzz") / "float32")
    shutil.copytree(os.path.join(EASYDEL, "float32"), root)
    damage_and_run(root, target, kind, position, noise, path, replacement, command, codes=(0, 1, 3))
