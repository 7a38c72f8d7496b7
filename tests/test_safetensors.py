"""safetensors checkpoints: the committed files written by safetensors itself (one file, a sharded
set with its index, the numpy API), read by every command against their float64 norms; files
written here byte by byte for what safetensors would never write (damaged headers, holes,
duplicates); and a fuzz of the header reader."""

import contextlib
import json
import math
import os
import shutil
import struct

import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_cli import run, run_json
from test_gates import _validator

from paramscope import compute_norms, open_checkpoint
from paramscope.io import checkpoint, storage
from paramscope.io.inventory import checkpoint_info

DATA = os.path.join(os.path.dirname(__file__), "data", "safetensors")
with open(os.path.join(DATA, "expected.json")) as _f:
    EXPECTED = json.load(_f)["variants"]

# each way of pointing at a committed variant: (path, variant)
PATHS = {
    "single file": (os.path.join(DATA, "single", "model.safetensors"), "single"),
    "sharded folder": (os.path.join(DATA, "sharded"), "sharded"),
    "index file": (os.path.join(DATA, "sharded", "model.safetensors.index.json"), "sharded"),
    "numpy file": (os.path.join(DATA, "numpy", "model.safetensors"), "numpy"),
    "numpy folder": (os.path.join(DATA, "numpy"), "numpy"),
}

CODES = {
    "bool": "BOOL",
    "uint8": "U8",
    "int8": "I8",
    "int64": "I64",
    "float16": "F16",
    "bfloat16": "BF16",
    "float32": "F32",
    "float8_e4m3fn": "F8_E4M3",
    "complex64": "C64",
}


def encode(header: dict, data: bytes = b"", length: int | None = None) -> bytes:
    """A file as safetensors lays one out: length, header (padded to 8 bytes), data buffer."""
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


def write(path, tensors: dict, metadata: dict | None = None) -> str:
    """Writes numpy arrays the way safetensors does (C order, little-endian, packed in order)."""
    header, blobs, at = {}, [], 0
    if metadata is not None:
        header["__metadata__"] = metadata
    for name, value in tensors.items():
        value = np.asarray(value)
        blob = value.astype(value.dtype.newbyteorder("<")).tobytes()
        header[name] = {
            "dtype": CODES[value.dtype.name],
            "shape": list(value.shape),
            "data_offsets": [at, at + len(blob)],
        }
        blobs.append(blob)
        at += len(blob)
    os.makedirs(os.path.dirname(str(path)), exist_ok=True)
    with open(path, "wb") as f:
        f.write(encode(header, b"".join(blobs)))
    return str(path)


def f64_norm(value) -> float:
    value = np.asarray(value)
    if value.dtype.kind == "c":
        value = np.abs(value)
    return float(np.sqrt(np.sum(value.astype(np.float64) ** 2)))


@contextlib.contextmanager
def ranged_reads():
    """Records every byte range read from a file (headers and array data) as (key, start, stop)."""
    seen = []
    original = storage.read_range

    def recording(spec, key, start, stop):
        seen.append((key, start, stop))
        return original(spec, key, start, stop)

    storage.read_range, checkpoint.read_range = recording, recording
    try:
        yield seen
    finally:
        storage.read_range, checkpoint.read_range = original, original


def one_line_failure(args, *words, code=3):
    result = run(*args)
    assert result.exit_code == code, (args, result.exit_code, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert "hint:" in lines[0]
    for word in words:
        assert word in lines[0], (word, lines[0])
    assert result.stdout == ""
    return lines[0]


# ----------------------------------------------------------------------------------------------
# The committed files


@pytest.mark.parametrize("way", list(PATHS))
def test_structure_and_norms_of_the_committed_files(way):
    path, variant = PATHS[way]
    expected = EXPECTED[variant]["tensors"]
    inventory = open_checkpoint(path)
    assert inventory.warnings == []
    assert {p.path: (list(p.shape), p.dtype) for p in inventory.params} == {
        name: (t["shape"], t["dtype"]) for name, t in expected.items()
    }
    result = compute_norms(inventory.params)
    for entry in result.params:
        assert entry.norm == pytest.approx(expected[entry.param.path]["norm"], rel=1e-6), entry.param.path
    assert result.global_norm == pytest.approx(math.sqrt(sum(t["norm"] ** 2 for t in expected.values())))
    doc = run_json("norms", path, "--per-param")
    assert {p["path"]: p["norm"] for p in doc["params"]} == pytest.approx(
        {name: t["norm"] for name, t in expected.items()}, rel=1e-6
    )


def test_info_shows_the_metadata_of_every_file():
    single = run_json("info", PATHS["single file"][0])
    assert single["layout"] == "item" and single["steps"] == []
    (item,) = single["items"]
    assert item["kind"] == "safetensors" and item["storage"] == "safetensors"
    assert item["arrays"] == 11 and item["bytes_on_disk"] == 6424
    assert item["count"] == sum(math.prod(t["shape"]) for t in EXPECTED["single"]["tensors"].values())
    assert item["metadata"] == {"model.safetensors": EXPECTED["single"]["metadata"]}
    sharded = run_json("info", PATHS["sharded folder"][0])["items"][0]
    assert sharded["metadata"] == {
        "model.safetensors.index.json": EXPECTED["sharded"]["index_metadata"],
        "model-00001-of-00002.safetensors": {"format": "pt"},
        "model-00002-of-00002.safetensors": {"format": "pt"},
    }
    assert sharded["bytes_on_disk"] == sum(
        os.path.getsize(os.path.join(DATA, "sharded", f)) for f in EXPECTED["sharded"]["files"]
    )
    validator = _validator("info")
    for doc in (single, run_json("info", PATHS["sharded folder"][0])):
        assert not [e.message for e in validator.iter_errors(doc)]
    text = run("info", PATHS["sharded folder"][0]).stdout
    assert 'metadata of model.safetensors.index.json: {"model_type": "tiny-llama"' in text
    assert 'metadata of model-00001-of-00002.safetensors and 1 other file: {"format": "pt"}' in text
    info = checkpoint_info(PATHS["numpy file"][0])
    assert info.items[0].metadata == {"model.safetensors": {"format": "np"}}


def test_every_data_command_under_a_tiny_memory_budget(tmp_path):
    path = PATHS["sharded folder"][0]
    small = ("--memory-budget", "1KiB")
    for command in ("table", "count", "mask"):
        assert run_json(command, path)["params" if command != "count" else "total"]
    for command in (("norms", "--per-param", "--digest"), ("stats", "--digest")):
        whole, sliced = (
            run_json(*command[:1], path, *command[1:]),
            run_json(*command[:1], path, *command[1:], *small),
        )
        assert whole["params"] == sliced["params"] and whole["global_norm"] == sliced["global_norm"]
        assert all(p["digest"] for p in whole["params"])
    verified = run_json("verify", path, *small)
    assert verified["ok"] and verified["arrays"] == 11
    baseline = tmp_path / "baseline.json"
    assert run("snapshot", path, "-o", baseline, "-q").exit_code == 0
    for other in (PATHS["single file"][0], PATHS["index file"][0]):
        checked = run_json("check", other, "--baseline", baseline, *small)
        assert checked["passed"], checked
    assert run_json("verify", PATHS["single file"][0], "--baseline", baseline)["ok"]
    diff = run_json("diff", PATHS["single file"][0], path, *small)
    assert diff["summary"]["identical"] == 11


def test_reads_stay_within_the_memory_budget(tmp_path):
    """Rows larger than the budget are read in pieces no larger than it."""
    rng = np.random.default_rng(1)
    tensors = {
        "wide": rng.standard_normal((3, 1000)).astype(np.float32),  # a 4,000-byte row
        "deep": rng.standard_normal((2, 2, 600)).astype(np.float32),
        "flat": rng.standard_normal(5000).astype(np.float32),
        "scalar": np.float32(2.5).reshape(()),
    }
    path = write(tmp_path / "big.safetensors", tensors)
    with ranged_reads() as seen:
        doc = run_json("norms", path, "--per-param", "--memory-budget", "1KiB")
    data = [stop - start for _, start, stop in seen if start >= 8 + 8]
    assert data and max(data) <= 1024, max(data)
    assert sum(data) >= sum(v.nbytes for v in tensors.values())
    assert {p["path"]: p["norm"] for p in doc["params"]} == pytest.approx(
        {name: f64_norm(v) for name, v in tensors.items()}, rel=1e-6
    )


def test_dtypes_names_and_shapes_as_stored(tmp_path):
    """Names are kept as written (a trailing ``value`` too); every numpy-held dtype, empty and
    0-d tensors, and complex values read as saved."""
    rng = np.random.default_rng(2)
    tensors = {
        "layer.value": rng.standard_normal((4, 3)).astype(np.float32),
        "layer.kernel.value": rng.standard_normal(5).astype(ml_dtypes.bfloat16),
        "fp8": rng.standard_normal((2, 8)).astype(ml_dtypes.float8_e4m3fn),
        "half": rng.standard_normal(7).astype(np.float16),
        "bytes": rng.integers(0, 255, 9).astype(np.uint8),
        "small": rng.integers(-100, 100, 9).astype(np.int8),
        "ids": np.arange(6, dtype=np.int64).reshape(2, 3),
        "mask": rng.standard_normal(10) > 0,
        "waves": (rng.standard_normal(4) + 1j * rng.standard_normal(4)).astype(np.complex64),
        "empty": np.zeros((0, 4), np.float32),
        "scale": np.float32(0.25).reshape(()),
    }
    path = write(tmp_path / "dtypes.safetensors", tensors)
    params = {p.path: p for p in open_checkpoint(path).params}
    assert set(params) == set(tensors)
    for name, value in tensors.items():
        assert params[name].shape == value.shape and params[name].dtype == value.dtype.name, name
        handle = checkpoint.open_array(params[name].stored)
        assert np.array_equal(handle.read().result(), value), name
    norms = {p["path"]: p["norm"] for p in run_json("norms", path, "--per-param")["params"]}
    assert norms == pytest.approx({name: f64_norm(v) for name, v in tensors.items()}, rel=1e-6)


def test_packed_dtypes_are_left_out_with_a_warning(tmp_path):
    data = np.arange(16, dtype=np.float32)
    header = {
        "w": {"dtype": "F32", "shape": [16], "data_offsets": [0, 64]},
        "nvfp4": {"dtype": "F4", "shape": [4, 8], "data_offsets": [64, 80]},  # two per byte
    }
    path = tmp_path / "packed.safetensors"
    path.write_bytes(encode(header, data.tobytes() + bytes(16)))
    inventory = open_checkpoint(path)
    assert [p.path for p in inventory.params] == ["w"]
    assert inventory.warnings and "'nvfp4' (F4)" in inventory.warnings[0]
    result = run("table", path)
    assert result.exit_code == 0 and "nvfp4" in result.stderr
    odd = tmp_path / "odd.safetensors"  # 3 four-bit values do not fill whole bytes
    odd.write_bytes(encode({"x": {"dtype": "F4", "shape": [3], "data_offsets": [0, 2]}}, bytes(2)))
    one_line_failure(["table", odd], "odd.safetensors", "'x'", "needs")


def test_a_file_is_named_once_in_titles(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write(tmp_path / "model.safetensors", {"w": np.ones((2, 2), np.float32)})
    assert run("table", "model.safetensors").stdout.splitlines()[0] == "model.safetensors  1 array"
    assert run("verify", "model.safetensors").stdout.splitlines()[0] == "model.safetensors"
    diff = run("diff", "model.safetensors", "model.safetensors", "--all").stdout.splitlines()
    assert diff[:2] == ["A model.safetensors", "B model.safetensors"]
    assert run_json("table", "model.safetensors")["item"] == "model.safetensors"  # JSON keeps it


def test_diff_against_an_orbax_checkpoint_with_the_same_names(tmp_path):
    rng = np.random.default_rng(3)
    flat = {
        "model.embed_tokens.weight": rng.standard_normal((32, 8)).astype(ml_dtypes.bfloat16),
        "model.norm.weight": rng.standard_normal(8).astype(np.float32),
        "lm_head.weight": rng.standard_normal((32, 8)).astype(np.float32),
    }
    tree: dict = {}
    for name, value in flat.items():
        node = tree
        *parents, leaf = name.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    orbax_path = str(tmp_path / "orbax")
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(orbax_path, tree)
    checkpointer.wait_until_finished()
    same = write(tmp_path / "same" / "model.safetensors", flat)
    changed = dict(flat, **{"model.norm.weight": flat["model.norm.weight"] * 2})
    other = write(tmp_path / "changed" / "model.safetensors", changed)

    doc = run_json("diff", orbax_path, same, "--memory-budget", "1KiB")
    assert doc["summary"] == {"identical": 3, "close": 0, "changed": 0, "added": 0, "removed": 0}
    doc = run_json("diff", orbax_path, other)
    status = {p["path"]: p["status"] for p in doc["params"]}
    assert status == {
        "model.embed_tokens.weight": "identical",
        "model.norm.weight": "changed",
        "lm_head.weight": "identical",
    }
    orbax_norms = run_json("norms", orbax_path, "--per-param", "--digest")["params"]
    st_norms = run_json("norms", same, "--per-param", "--digest")["params"]
    assert sorted(orbax_norms, key=lambda p: p["path"]) == sorted(st_norms, key=lambda p: p["path"])

    # a baseline of the Orbax checkpoint gates its export: the same weights pass, bit for bit
    baseline = tmp_path / "baseline.json"
    assert run("snapshot", orbax_path, "-o", baseline).exit_code == 0
    assert run("check", same, "--baseline", baseline).exit_code == 0
    failed = run("check", other, "--baseline", baseline)
    assert failed.exit_code == 1 and "model.norm.weight" in failed.stdout


# ----------------------------------------------------------------------------------------------
# Folders and indexes


def test_folder_without_index_merges_its_files(tmp_path):
    a = {"encoder.w": np.ones((2, 2), np.float32)}
    b = {"decoder.w": np.full(3, 2.0, np.float32)}
    write(tmp_path / "run" / "part-a.safetensors", a, {"part": "a"})
    write(tmp_path / "run" / "part-b.safetensors", b)
    (tmp_path / "run" / "config.json").write_text("{}")
    inventory = open_checkpoint(tmp_path / "run")
    assert sorted(p.path for p in inventory.params) == ["decoder.w", "encoder.w"]
    info = run_json("info", tmp_path / "run")["items"][0]
    assert info["metadata"] == {"part-a.safetensors": {"part": "a"}}
    write(tmp_path / "run" / "part-c.safetensors", {"decoder.w": np.zeros(3, np.float32)})
    one_line_failure(["table", tmp_path / "run"], "'decoder.w'", "part-b.safetensors", "part-c.safetensors")


def _sharded_copy(tmp_path) -> str:
    folder = str(tmp_path / "sharded")
    shutil.copytree(PATHS["sharded folder"][0], folder)
    return folder


def test_the_index_decides_which_shard_holds_a_tensor(tmp_path):
    folder = _sharded_copy(tmp_path)
    index_path = os.path.join(folder, "model.safetensors.index.json")
    index = json.load(open(index_path))
    del index["weight_map"]["model.norm.weight"]
    json.dump(index, open(index_path, "w"))
    write(os.path.join(folder, "consolidated.safetensors"), {"x": np.zeros(2, np.float32)})
    inventory = open_checkpoint(folder)
    assert "model.norm.weight" not in {p.path for p in inventory.params} and len(inventory.params) == 10
    assert any("'model.norm.weight'" in w and "not read" in w for w in inventory.warnings)
    assert any("'consolidated.safetensors'" in w for w in inventory.warnings)
    result = run("table", folder)
    assert result.exit_code == 0 and "model.norm.weight" in result.stderr
    result = run("verify", folder, "--format", "json")
    verified = json.loads(result.stdout)
    assert result.exit_code == 3 and verified["arrays"] == 10  # the warnings are verify's problems too
    assert any("model.norm.weight" in p["problem"] for p in verified["problems"])


def test_any_index_name_and_shards_in_a_subfolder(tmp_path):
    folder = tmp_path / "unet"
    (folder / "weights").mkdir(parents=True)
    for name in EXPECTED["sharded"]["files"][:2]:
        shutil.copy(os.path.join(DATA, "sharded", name), folder / "weights" / name)
    index = json.load(open(os.path.join(DATA, "sharded", "model.safetensors.index.json")))
    index["weight_map"] = {k: f"weights/{v}" for k, v in index["weight_map"].items()}
    json.dump(index, open(folder / "diffusion_pytorch_model.safetensors.index.json", "w"))
    expected = {name: t["norm"] for name, t in EXPECTED["sharded"]["tensors"].items()}
    for path in (folder, folder / "diffusion_pytorch_model.safetensors.index.json"):
        doc = run_json("norms", path, "--per-param")
        assert {p["path"]: p["norm"] for p in doc["params"]} == pytest.approx(expected, rel=1e-6)
    metadata = run_json("info", folder)["items"][0]["metadata"]
    assert set(metadata) == {
        "diffusion_pytorch_model.safetensors.index.json",
        "weights/model-00001-of-00002.safetensors",
        "weights/model-00002-of-00002.safetensors",
    }


@pytest.mark.parametrize(
    "damage, words",
    [
        ("missing shard", ["model-00002-of-00002.safetensors", "missing"]),
        ("index not JSON", ["model.safetensors.index.json", "not JSON"]),
        ("index without weight_map", ["no weight_map"]),
        ("shard outside the folder", ["'../elsewhere.safetensors'"]),
        ("tensor not in its shard", ["'model.ghost'", "whose header does not list it"]),
        ("two indexes", ["2 safetensors indexes"]),
    ],
)
def test_bad_indexes(tmp_path, damage, words):
    folder = _sharded_copy(tmp_path)
    index_path = os.path.join(folder, "model.safetensors.index.json")
    index = json.load(open(index_path))
    if damage == "missing shard":
        os.remove(os.path.join(folder, "model-00002-of-00002.safetensors"))
    elif damage == "index not JSON":
        open(index_path, "w").write('{"weight_map": ')
    elif damage == "index without weight_map":
        json.dump({"metadata": {}}, open(index_path, "w"))
    elif damage == "shard outside the folder":
        index["weight_map"]["lm_head.weight"] = "../elsewhere.safetensors"
        json.dump(index, open(index_path, "w"))
    elif damage == "tensor not in its shard":
        index["weight_map"]["model.ghost"] = "model-00001-of-00002.safetensors"
        json.dump(index, open(index_path, "w"))
    elif damage == "two indexes":
        shutil.copy(index_path, os.path.join(folder, "other.safetensors.index.json"))
    targets = [folder] if damage == "two indexes" else [folder, index_path]
    for target in targets:
        one_line_failure(["table", target], *words)


def test_steps_do_not_apply():
    one_line_failure(["table", PATHS["single file"][0], "--step", "3"], "no steps")


# ----------------------------------------------------------------------------------------------
# Damaged headers

GOOD = {
    "__metadata__": {"format": "pt"},
    "a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
    "b": {"dtype": "BF16", "shape": [4], "data_offsets": [24, 32]},
}
GOOD_DATA = np.arange(6, dtype=np.float32).tobytes() + np.ones(4, ml_dtypes.bfloat16).tobytes()


def _edited(name, **entry):
    return {**GOOD, name: {**GOOD[name], **entry}}


BAD_FILES = {
    "shorter than the length": (b"\x10\x00\x00", ["fewer than the 8"]),
    "header longer than the file": (encode(GOOD, GOOD_DATA, length=5000), ["header length is 5,000 bytes"]),
    "absurd header length": (encode(GOOD, GOOD_DATA, length=10**15), ["more than safetensors allows"]),
    "offsets past the buffer": (
        encode(_edited("b", data_offsets=[24, 40], shape=[8]), GOOD_DATA),
        ["'b'", "past"],
    ),
    "overlapping": (encode(_edited("b", data_offsets=[16, 24]), GOOD_DATA), ["'a'", "'b'", "overlap"]),
    "wrong byte count": (encode(_edited("a", shape=[2, 2]), GOOD_DATA), ["'a'", "needs 16 bytes"]),
    "huge shape": (encode(_edited("a", shape=[10**12] * 50), GOOD_DATA), ["'a'", "needs more"]),
    "unknown dtype": (encode(_edited("a", dtype="F7"), GOOD_DATA), ["'a'", "'F7'"]),
    "negative dimension": (encode(_edited("a", shape=[-2, -3]), GOOD_DATA), ["'a'", "non-negative"]),
    "offsets backwards": (encode(_edited("a", data_offsets=[24, 0]), GOOD_DATA), ["'a'", "end before"]),
    "not UTF-8": (struct.pack("<Q", 8) + b"{\xff\xfe}    " + GOOD_DATA, ["not UTF-8"]),
    "not JSON": (struct.pack("<Q", 8) + b"{not js}" + GOOD_DATA, ["not JSON"]),
    "JSON not an object": (struct.pack("<Q", 8) + b"[1, 2]  " + GOOD_DATA, ["a JSON list, not an object"]),
    "nested too deeply": (struct.pack("<Q", 100000) + b"[" * 100000 + GOOD_DATA, ["not JSON"]),
    "a name twice": (
        struct.pack("<Q", 128)
        + b'{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"a":{"dtype":"U8","shape":[1],'
        b'"data_offsets":[1,2]}}'.ljust(128)
        + bytes(2),
        ["'a' twice"],
    ),
    "metadata not strings": (encode({**GOOD, "__metadata__": {"step": 100}}, GOOD_DATA), ["__metadata__"]),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_damaged_headers_are_one_line_and_exit_3(tmp_path, case):
    content, words = BAD_FILES[case]
    path = tmp_path / "model.safetensors"
    path.write_bytes(content)
    with ranged_reads() as seen:
        for command in ("table", "norms"):
            one_line_failure([command, path], "model.safetensors", *words)
    assert all(stop <= len(content) for _, _, stop in seen), seen
    folder = tmp_path / "folder"  # the same through a folder and through a bucket-like index
    folder.mkdir()
    shutil.copy(path, folder / "model.safetensors")
    one_line_failure(["count", folder], "model.safetensors", *words)


def test_holes_and_trailing_bytes_fail_verify_only(tmp_path):
    holed = {
        "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
        "b": {"dtype": "F32", "shape": [2], "data_offsets": [16, 24]},
    }
    path = tmp_path / "holed.safetensors"
    path.write_bytes(encode(holed, np.arange(6, dtype=np.float32).tobytes()))
    norms = {p["path"]: p["norm"] for p in run_json("norms", path, "--per-param")["params"]}
    assert norms == pytest.approx({"a": 1.0, "b": math.hypot(4, 5)})
    result = run("verify", path, "--format", "json")
    assert result.exit_code == 3
    (problem,) = json.loads(result.stdout)["problems"]
    assert "bytes 8-16 of the data buffer belong to no tensor" in problem["problem"]
    trailing = tmp_path / "trailing.safetensors"
    trailing.write_bytes(encode(GOOD, GOOD_DATA + b"polyglot"))
    doc = json.loads(run("verify", trailing, "--format", "json").stdout)
    (problem,) = doc["problems"]
    assert "trailing.safetensors: bytes 32-40 of the data buffer belong to no tensor" in problem["problem"]
    assert run("verify", write(tmp_path / "sound.safetensors", {"x": np.ones(3, np.float32)})).exit_code == 0


# ----------------------------------------------------------------------------------------------
# Fuzz

BASE = open(PATHS["numpy file"][0], "rb").read()
_LENGTH = int.from_bytes(BASE[:8], "little")
BASE_HEADER = json.loads(BASE[8 : 8 + _LENGTH])
BASE_DATA = BASE[8 + _LENGTH :]

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)


@st.composite
def damaged_files(draw):
    kind = draw(st.sampled_from(["length", "header bytes", "truncate", "json edit", "json entry"]))
    if kind == "length":
        length = draw(
            st.integers(0, 2**64 - 1) | st.integers(_LENGTH - 16, _LENGTH + 16).filter(lambda n: n >= 0)
        )
        return struct.pack("<Q", length) + BASE[8:]
    if kind == "header bytes":
        at = draw(st.integers(8, 8 + _LENGTH - 1))
        noise = draw(st.binary(min_size=1, max_size=16))
        return BASE[:at] + noise + BASE[at + len(noise) :]
    if kind == "truncate":
        return BASE[: draw(st.integers(0, len(BASE) - 1))]
    header = json.loads(json.dumps(BASE_HEADER))
    name = draw(st.sampled_from(sorted(header)))
    if kind == "json edit":
        header[name] = draw(json_values)
    else:
        field = draw(st.sampled_from(["dtype", "shape", "data_offsets"]))
        header[name] = {**header[name], field: draw(json_values)}
    return encode(header, BASE_DATA)


@settings(max_examples=120, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(damaged_files())
def test_fuzzed_headers_never_crash_nor_read_past_the_file(tmp_path_factory, content):
    path = tmp_path_factory.mktemp("fuzz") / "model.safetensors"
    path.write_bytes(content)
    with ranged_reads() as seen:
        result = run("norms", path, "--per-param")
    assert result.exit_code in (0, 3), (result.exit_code, result.stderr)
    assert "Traceback" not in result.stderr and "unexpected" not in result.stderr, result.stderr
    if result.exit_code:
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("paramscope: error: "), result.stderr
    assert all(stop <= len(content) for _, _, stop in seen), (len(content), seen)
    os.remove(path)
