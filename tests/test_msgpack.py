"""msgpack checkpoints through the command line: flax.training.checkpoints files and roots
(inline, chunked and multi-host ``_gda`` arrays) and Orbax 0.4 items (aggregated and
placeholder leaves), compared with the float64 norms of the committed fixtures and with values
decoded independently by the msgpack library; damaged and hostile files fail in one line."""

import json
import math
import os
import shutil
import struct
import tracemalloc

import msgpack
import numpy as np
import pytest
from conftest import tree_snapshot
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_cli import run, run_json

from paramscope.compute.digest import digest_of
from paramscope.errors import CorruptCheckpoint
from paramscope.io import checkpoint, msgpack_walk
from paramscope.io.records import numpy_dtype

DATA = os.path.join(os.path.dirname(__file__), "data")
FIXTURES = ["flax_msgpack", "flax_msgpack_gda", "orbax_0_4_aggregate", "orbax_0_4_placeholder"]
STORAGE = {
    "flax_msgpack": "msgpack",
    "flax_msgpack_gda": "msgpack+zarr",
    "orbax_0_4_aggregate": "msgpack",
    "orbax_0_4_placeholder": "zarr",
}


def root(name):
    return os.path.join(DATA, name, "checkpoints")


def expected_leaves(name, step):
    """dotted path -> expected leaf (strings, which are not arrays, left out)."""
    with open(os.path.join(DATA, name, "expected.json")) as f:
        doc = json.load(f)
    entry = doc["steps"][str(step)]
    leaves = entry["leaves"] if "leaves" in entry else entry[doc["item"]]
    return {path: leaf for path, leaf in leaves.items() if leaf["dtype"] != "str"}


def step_file(name, step):
    """The msgpack file of a step of a fixture."""
    folder = os.path.join(root(name), f"checkpoint_{step}")
    return os.path.join(folder, "default", "checkpoint") if os.path.isdir(folder) else folder


def decoded(name, step):
    """The arrays of a step's msgpack file, decoded by the msgpack library the way flax restores
    them (an independent reading of the file), by dotted path; placeholders and strings left out."""

    def ext(code, data):
        if code == 2:
            real, imag = msgpack.unpackb(data)
            return np.asarray(complex(real, imag))
        shape, dtype, raw = msgpack.unpackb(data)
        return np.frombuffer(raw, numpy_dtype(dtype)).reshape(shape)

    with open(step_file(name, step), "rb") as f:
        tree = msgpack.unpackb(f.read(), ext_hook=ext)

    out = {}

    def visit(node, prefix):
        items = (
            node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else None
        )
        if isinstance(node, dict) and node.get("__msgpack_chunked_array__"):
            shape = [node["shape"][str(i)] for i in range(len(node["shape"]))]
            pieces = [node["chunks"][str(i)] for i in range(len(node["chunks"]))]
            out[prefix] = np.concatenate(pieces).reshape(shape)
        elif items is not None:
            for key, child in items:
                visit(child, f"{prefix}.{key}" if prefix else str(key))
        elif isinstance(node, (bool, int, float)):
            out[prefix] = np.asarray(node)
        elif isinstance(node, np.ndarray):
            out[prefix] = node

    visit(tree, "")
    return out


@pytest.mark.parametrize("step", [1, 2])
@pytest.mark.parametrize("name", FIXTURES)
def test_structure_and_norms_match_float64(name, step):
    want = expected_leaves(name, step)
    table = run_json("table", root(name), "--step", step)
    assert table["step"] == step
    assert {p["path"]: (p["shape"], p["dtype"]) for p in table["params"]} == {
        path: (leaf["shape"], leaf["dtype"]) for path, leaf in want.items()
    }
    assert run_json("count", root(name), "--step", step)["total"]["count"] == sum(
        math.prod(leaf["shape"]) for leaf in want.values()
    )
    # A memory budget smaller than the chunked arrays: their reads cross the pieces' seams.
    norms = run_json("norms", root(name), "--step", step, "--per-param", "--memory-budget", "1500")
    got = {p["path"]: p["norm"] for p in norms["params"]}
    assert set(got) == set(want)
    for path, leaf in want.items():
        assert got[path] == pytest.approx(leaf["norm"], rel=1e-6, abs=1e-30), path
    assert norms["global_norm"] == pytest.approx(
        math.sqrt(sum(w["norm"] ** 2 for w in want.values())), rel=1e-6
    )


@pytest.mark.parametrize("name", ["flax_msgpack", "orbax_0_4_aggregate"])
def test_values_bit_for_bit(name):
    """Every inline array, chunked or not, and every scalar, as the msgpack library decodes it."""
    for step in (1, 2):
        digests = {
            p["path"]: p["digest"]
            for p in run_json("stats", root(name), "--step", step, "--digest")["params"]
        }
        values = decoded(name, step)
        assert set(values) == set(digests)
        for path, value in values.items():
            assert digests[path] == digest_of(value), path


def test_placeholder_arrays_equal_the_aggregated_ones():
    """The two Orbax 0.4 fixtures hold the same values, one inline, one in zarr folders."""
    for step in (1, 2):
        a, b = (run_json("stats", root(n), "--step", step, "--digest") for n in FIXTURES[2:])
        assert [(p["path"], p["digest"]) for p in a["params"]] == [
            (p["path"], p["digest"]) for p in b["params"]
        ]


def test_info_steps_items_and_storage():
    for name in FIXTURES:
        info = run_json("info", root(name))
        assert info["layout"] == "root" and info["step"] == 2
        assert [(s["step"], s["finished"]) for s in info["steps"]] == [(1, True), (2, True)]
        (item,) = info["items"]
        assert item["kind"] == "msgpack" and item["storage"] == STORAGE[name]
        assert item["arrays"] == len(expected_leaves(name, 2))
        folder = os.path.join(root(name), "checkpoint_2")
        files = [folder] if os.path.isfile(folder) else []
        for top in (folder, folder + "_gda"):
            files += [os.path.join(d, f) for d, _, names in os.walk(top) for f in names]
        assert item["bytes_on_disk"] == sum(os.path.getsize(f) for f in files)


def test_single_files_step_and_item_folders():
    flax_file = os.path.join(root("flax_msgpack"), "checkpoint_1")
    single = run_json("table", flax_file)
    assert single["step"] is None and single["item"] == "checkpoint"
    assert single["params"] == run_json("table", root("flax_msgpack"), "--step", "1")["params"]
    gda_file = os.path.join(root("flax_msgpack_gda"), "checkpoint_1")
    assert (
        run_json("norms", gda_file)["global_norm"]
        == run_json("norms", root("flax_msgpack_gda"), "--step", "1")["global_norm"]
    )
    info = run_json("info", gda_file)
    assert info["layout"] == "item" and info["items"][0]["storage"] == "msgpack+zarr"
    orbax_step = os.path.join(root("orbax_0_4_aggregate"), "checkpoint_1")
    for path in (orbax_step, os.path.join(orbax_step, "default")):
        assert (
            run_json("table", path)["params"]
            == run_json("table", root("orbax_0_4_aggregate"), "--step", "1")["params"]
        )
    for args, message in (
        (["table", flax_file, "--step", "1"], "is a single file"),
        (["table", root("flax_msgpack"), "--step", "7"], "no finished step 7"),
    ):
        result = run(*args)
        assert result.exit_code == 3 and message in result.stderr and "hint: " in result.stderr


@pytest.mark.parametrize("name", FIXTURES)
def test_verify_diff_snapshot_check(name, tmp_path):
    before = tree_snapshot(os.path.dirname(root(name)))
    for step in ("1", "2"):
        doc = run_json("verify", root(name), "--step", step, "--memory-budget", "1KiB")
        assert doc["ok"] and doc["arrays"] == len(expected_leaves(name, step)) and doc["bytes_read"] > 0
    diff = run_json("diff", root(name), "--step-a", "1")
    one, two = expected_leaves(name, 1), expected_leaves(name, 2)
    for row in diff["params"]:
        if row["status"] == "identical":
            assert one[row["path"]]["norm"] == two[row["path"]]["norm"]
    assert {r["path"] for r in diff["params"]} == set(two)
    assert diff["summary"]["changed"] > 0 and diff["summary"]["added"] == diff["summary"]["removed"] == 0
    baseline = str(tmp_path / "baseline.json")
    assert run("snapshot", root(name), "--step", "1", "-o", baseline, "-q").exit_code == 0
    assert run_json("check", root(name), "--step", "1", "--baseline", baseline)["passed"]
    failed = run("check", root(name), "--baseline", baseline, "--format", "json")
    assert failed.exit_code == 1 and not json.loads(failed.stdout)["passed"]
    assert tree_snapshot(os.path.dirname(root(name))) == before


def copy_of(name, tmp_path):
    target = str(tmp_path / name)
    shutil.copytree(root(name), target)
    return target


def assert_fails(args, message):
    result = run(*args)
    assert result.exit_code == 3, (result.exit_code, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "hint:" in lines[0], result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""


def verify_problems(path):
    result = run("verify", path, "--format", "json")
    assert result.exit_code == 3, result.stderr
    return [(p["path"], p["problem"]) for p in json.loads(result.stdout)["problems"]]


def test_verify_finds_what_does_not_match(tmp_path):
    placeholder = copy_of("orbax_0_4_placeholder", tmp_path)
    item = os.path.join(placeholder, "checkpoint_2", "default")
    shutil.copytree(os.path.join(item, "model.step"), os.path.join(item, "model.extra"))
    assert verify_problems(placeholder) == [
        ("model.extra", "stored, but no placeholder in checkpoint names it")
    ]
    shutil.rmtree(os.path.join(item, "model.params.Dense_0.kernel"))
    assert_fails(["table", placeholder], "'model.params.Dense_0.kernel'")
    (problem,) = verify_problems(placeholder)
    assert "model.params.Dense_0.kernel" in problem[1]

    aggregate = copy_of("orbax_0_4_aggregate", tmp_path)
    meta_path = os.path.join(aggregate, "checkpoint_2", "default", "_METADATA")
    with open(meta_path) as f:
        meta = json.load(f)
    entry = next(iter(meta["tree_metadata"].values()))
    ghost = {**entry, "key_metadata": [{"key": "ghost", "key_type": 2}]}
    meta["tree_metadata"]["('ghost',)"] = ghost
    with open(meta_path, "w") as f:
        json.dump(meta, f)
    assert verify_problems(aggregate) == [("ghost", "listed in _METADATA, but not in checkpoint")]

    gda = copy_of("flax_msgpack_gda", tmp_path)
    extra = os.path.join(gda, "checkpoint_2_gda", "params", "Embed_1", "embedding")
    shutil.copytree(os.path.join(gda, "checkpoint_2_gda", "params", "Embed_0", "embedding"), extra)
    assert verify_problems(gda) == [
        (
            "params/Embed_1/embedding",
            "stored in checkpoint_2_gda/, but no placeholder in checkpoint_2 names it",
        )
    ]
    shutil.rmtree(os.path.join(gda, "checkpoint_2_gda", "params", "Dense_0"))
    assert_fails(["norms", gda], "checkpoint_2_gda/params/Dense_0/kernel")
    assert run("norms", gda, "--step", "1").exit_code == 0


def test_unfinished_and_stray_files_of_a_flax_root(tmp_path):
    gda = copy_of("flax_msgpack_gda", tmp_path)
    # a save interrupted between renaming its arrays' folder and its file
    shutil.copytree(os.path.join(gda, "checkpoint_2_gda"), os.path.join(gda, "checkpoint_3_gda"))
    shutil.copy(os.path.join(gda, "checkpoint_2"), os.path.join(gda, "checkpoint_tmp"))
    with open(os.path.join(gda, "notes.txt"), "w") as f:
        f.write("not a checkpoint")
    info = run_json("info", gda)
    assert [(s["step"], s["finished"]) for s in info["steps"]] == [(1, True), (2, True), (3, False)]
    assert info["step"] == 2
    assert_fails(["table", gda, "--step", "3"], "no finished step 3")


def test_other_files_and_folders_are_not_claimed(tmp_path):
    text = tmp_path / "checkpoint_5"
    text.write_text("step 5 notes")
    assert_fails(["table", text], "is a file, not a checkpoint")
    assert_fails(["table", tmp_path], "is not a checkpoint")
    (tmp_path / "checkpoint_5").write_bytes(struct.pack("<Q", 0x80) + b"{}" + b" " * 126)  # safetensors-like
    assert_fails(["table", tmp_path / "checkpoint_5"], "is a file, not a checkpoint")
    tensorflow = tmp_path / "tf"
    tensorflow.mkdir()
    (tensorflow / "checkpoint").write_text('model_checkpoint_path: "ckpt-1"\n')
    (tensorflow / "ckpt-1.index").write_bytes(b"\x00" * 16)
    assert_fails(["table", tensorflow], "is not a msgpack checkpoint (it holds no map or list)")


def test_flax_saving_through_orbax_0_4(tmp_path):
    """flax.training.checkpoints with Orbax 0.4 as its backend saves each step's item as the
    folder ``checkpoint_<step>`` itself, with no step metadata or commit marker (assembled here
    from the 0.4 fixture's item folders)."""
    run_root = tmp_path / "run"
    for step in (1, 2):
        shutil.copytree(
            os.path.join(root("orbax_0_4_aggregate"), f"checkpoint_{step}", "default"),
            run_root / f"checkpoint_{step}",
        )
    info = run_json("info", run_root)
    assert [(s["step"], s["finished"]) for s in info["steps"]] == [(1, True), (2, True)]
    for step in (1, 2):
        norms = run_json("norms", run_root, "--step", step, "--per-param")
        want = expected_leaves("orbax_0_4_aggregate", step)
        assert {p["path"]: p["norm"] for p in norms["params"]} == pytest.approx(
            {k: v["norm"] for k, v in want.items()}
        )


def test_orbax_0_4_placeholders_in_an_ocdbt_database(tmp_path):
    """Orbax 0.4 with OCDBT keeps the placeholders' arrays in the item's database. Synthetic: the
    item as today's Orbax writes it, and beside it the ``checkpoint`` file a 0.4 writer adds."""
    import orbax.checkpoint as ocp

    values = {"dense": {"kernel": np.arange(12, dtype=np.float32).reshape(3, 4)}, "scale": np.float32(2)}
    path = tmp_path / "item"
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(str(path), values)
    checkpointer.wait_until_finished()
    tree = {"dense": {"kernel": "PLACEHOLDER://dense.kernel"}, "scale": "PLACEHOLDER://scale"}
    (path / "checkpoint").write_bytes(msgpack.packb(tree))
    assert run_json("info", path)["items"][0]["storage"] == "ocdbt"
    norms = {p["path"]: p["norm"] for p in run_json("norms", path, "--per-param")["params"]}
    assert norms == pytest.approx({"dense.kernel": float(np.linalg.norm(np.arange(12))), "scale": 2.0})
    assert run("verify", path).exit_code == 0
    del tree["scale"]
    (path / "checkpoint").write_bytes(msgpack.packb(tree))
    assert verify_problems(path) == [
        ("scale", "listed in _METADATA, but not in checkpoint"),
        ("scale", "stored, but no placeholder in checkpoint names it"),
    ]


def test_python_scalars_and_rare_leaves(tmp_path):
    """Every leaf flax's writer emits, written by flax.serialization itself."""
    from flax import serialization

    state = {
        "ints": {"small": 3, "negative": -7, "big": 2**64 - 1},
        "float": 0.25,
        "flag": True,
        "complex": 1.5 - 2.0j,
        "np_scalar": np.float16(1.5),
        "array": np.arange(6, dtype=np.uint8).reshape(2, 3),
        "empty": {},
        "none": None,
        "text": "not an array",
        "raw": b"bytes are not arrays",
        "list": [np.ones(2, np.float32), 4],
        "params": {"Dense_0": {"kernel": {"value": np.ones((2, 3), np.float32)}}},  # nn.Partitioned
        "mlp": {"value": np.ones(1, np.int8)},  # a real key named value: kept
    }
    path = tmp_path / "checkpoint_9"
    path.write_bytes(serialization.msgpack_serialize(state))
    table = {p["path"]: (p["shape"], p["dtype"]) for p in run_json("table", path)["params"]}
    assert table == {
        "ints.small": ([], "int64"),
        "ints.negative": ([], "int64"),
        "ints.big": ([], "uint64"),
        "float": ([], "float64"),
        "flag": ([], "bool"),
        "complex": ([], "complex128"),
        "np_scalar": ([], "float16"),
        "array": ([2, 3], "uint8"),
        "list.0": ([2], "float32"),
        "list.1": ([], "int64"),
        "params.Dense_0.kernel": ([2, 3], "float32"),
        "mlp.value": ([1], "int8"),
    }
    location = checkpoint.locate(str(path))
    arrays = {a.path: a for a in checkpoint.read_arrays(location.items[0])}
    for name, want in (
        ("ints.big", 2**64 - 1),
        ("complex", 1.5 - 2.0j),
        ("flag", True),
        ("ints.negative", -7),
    ):
        value = checkpoint.open_array(arrays[name])[()].read().result()
        assert value == want and value.dtype.name == arrays[name].dtype, name
    assert run("verify", path).exit_code == 0


# ----------------------------------------------------------------------------------------------
# Damaged and hostile files

FLAX_FILE = step_file("flax_msgpack", 2)


def _fixture_bytes():
    with open(FLAX_FILE, "rb") as f:
        return f.read()


def _hostile(kind: str) -> bytes:
    data = _fixture_bytes()
    if kind == "truncated":
        return data[: len(data) // 2]
    if kind == "str of 2**32 bytes":
        return b"\x81\xa1k\xdb\xff\xff\xff\xff" + b"x" * 16
    if kind == "map of 2**32 entries":
        return b"\x81\xa1k\xdf\xff\xff\xff\xff" + b"\x00" * 16
    if kind == "ext of 2**32 bytes":
        return b"\x81\xa1k\xc9\xff\xff\xff\xff\x01" + b"\x00" * 16
    if kind == "nested 100,000 deep":
        return b"\x81\xa1k" + b"\x91" * 100_000 + b"\x00"
    if kind == "unknown extension":
        return b"\x81\xa1k\xd4\x07\x00"
    if kind == "wrong data size":
        payload = msgpack.packb([[2, 2], "float32", b"\x00" * 12])
        return b"\x81\xa1k" + msgpack.packb(msgpack.ExtType(1, payload))
    if kind.startswith("dtype "):
        payload = msgpack.packb([[1], kind.split()[1], b"\x00" * 8])
        return b"\x81\xa1k" + msgpack.packb(msgpack.ExtType(1, payload))
    if kind == "trailing bytes":
        return data + b"\x00"
    if kind == "escaping placeholder":
        return msgpack.packb({"k": "//GDAPlaceholder:../../etc"})
    raise AssertionError(kind)


HOSTILE = {
    "truncated": "runs past the end of the file",
    "str of 2**32 bytes": "a str of 4,294,967,295 bytes at byte 3 runs past the end",
    "map of 2**32 entries": "a map of 4,294,967,295 entries at byte 3 runs past the end",
    "ext of 2**32 bytes": "an ext of 4,294,967,295 bytes at byte 3 runs past the end",
    "nested 100,000 deep": "nesting deeper than 128",
    "unknown extension": "unknown msgpack extension type 7",
    "wrong data size": "is not 16 bytes",
    "dtype object": "unknown dtype 'object'",
    "dtype V8": "unknown dtype 'V8'",
    "dtype <M8[s]": "unknown dtype '<M8[s]'",
    "trailing bytes": "the document ends at byte 7,460, the file at byte 7,461",
    "escaping placeholder": "naming no array",
}


@pytest.mark.parametrize("kind", list(HOSTILE))
def test_damaged_and_hostile_files_fail_in_one_line(tmp_path, kind):
    folder = tmp_path / "run"
    folder.mkdir()
    shutil.copy(step_file("flax_msgpack", 1), folder / "checkpoint_1")
    (folder / "checkpoint_2").write_bytes(_hostile(kind))
    before = tree_snapshot(str(folder))
    tracemalloc.start()
    try:
        assert_fails(["table", folder], HOSTILE[kind])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 << 20  # nothing the file declares is allocated
    assert run("table", folder, "--step", "1").exit_code == 0
    assert tree_snapshot(str(folder)) == before


def test_leaves_are_bounded(monkeypatch):
    monkeypatch.setattr(msgpack_walk, "MAX_LEAVES", 1000)
    assert len(_walk(msgpack.packb(list(range(1000))))) == 1000
    with pytest.raises(msgpack_walk.Malformed, match="more than 1,000 leaves"):
        _walk(msgpack.packb(list(range(1001))))


def _walk(data: bytes):
    return msgpack_walk.walk(lambda lo, hi: data[lo:hi], len(data), ("PLACEHOLDER://", "//GDAPlaceholder:"))


@st.composite
def damaged_documents(draw):
    data = _fixture_bytes()
    kind = draw(st.sampled_from(["random", "truncate", "overwrite", "insert"]))
    if kind == "random":
        return draw(st.binary(max_size=512))
    at = draw(st.integers(0, len(data)))
    if kind == "truncate":
        return data[:at]
    noise = draw(st.binary(min_size=1, max_size=16))
    if kind == "overwrite":
        return data[:at] + noise + data[at + len(noise) :]
    return data[:at] + noise + data[at:]


@settings(max_examples=300, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(damaged_documents())
def test_fuzzed_documents_are_read_or_refused(data):
    """Random bytes and damaged copies of a real file: leaves, or the walker's one error, in
    memory bounded by the file's size whatever lengths it declares."""
    tracemalloc.start()
    try:
        leaves = _walk(data)
    except msgpack_walk.Malformed:
        leaves = None
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert peak < (64 << 10) + 300 * len(data)  # records of leaves, at most one per byte
    for leaf in leaves or ():
        for start, size in leaf.segments:
            assert 0 <= start and start + size <= len(data)


@settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(damaged_documents(), st.sampled_from([["table"], ["norms", "-q"], ["verify"], ["info"]]))
def test_fuzzed_files_through_the_command_line(tmp_path_factory, data, command):
    folder = tmp_path_factory.mktemp("fuzz")
    (folder / "checkpoint_3").write_bytes(data)
    result = run(command[0], folder / "checkpoint_3", *command[1:])
    assert result.exit_code in (0, 3), result.stderr
    assert "Traceback" not in result.stderr
    if result.exit_code:
        assert result.stderr.strip().splitlines()[-1].startswith("paramscope: error:")


def test_reading_the_structure_never_reads_array_data(tmp_path):
    """A file larger than one read: only windows around the headers are read, not the data."""
    big = {f"layer_{i}": np.full((1024, 256), i, np.float32) for i in range(24)}  # 24 MiB
    from flax import serialization

    path = tmp_path / "checkpoint_1"
    path.write_bytes(serialization.msgpack_serialize(big))
    size = os.path.getsize(path)
    assert size > msgpack_walk.WHOLE_FILE
    requested = []
    with open(path, "rb") as f:

        def read(lo, hi):
            requested.append(hi - lo)
            f.seek(lo)
            return f.read(hi - lo)

        leaves = msgpack_walk.walk(read, size)
    assert len(leaves) == 24 and sum(requested) < 4 * len(leaves) * msgpack_walk.WINDOW
    location = checkpoint.locate(str(tmp_path))
    os.truncate(path, size - 1)
    with pytest.raises(CorruptCheckpoint, match="runs past the end of the file"):
        checkpoint.read_arrays(location.items[0])
