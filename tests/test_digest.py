"""Content digests: independent of how an array is cut, stored, read and combined."""

import json

import ml_dtypes
import numpy as np
import pytest
from blake3 import blake3
from hypothesis import given, settings
from hypothesis import strategies as st

from paramscope.compute import digest as D


def reference_digest(x: np.ndarray) -> str:
    """The manual's reference implementation (docs/commands/snapshot-check.md), verbatim."""
    data = np.ascontiguousarray(x).astype(x.dtype.newbyteorder("<")).tobytes()
    leaves = b"".join(blake3(data[i : i + 2**20]).digest() for i in range(0, len(data), 2**20))
    header = json.dumps({"dtype": x.dtype.name, "shape": list(x.shape)}, separators=(",", ":"))
    return blake3(b"paramscope-digest/1\n" + header.encode() + b"\n" + leaves).hexdigest()


@pytest.mark.parametrize(
    "x",
    [
        np.arange(12, dtype=np.float32).reshape(3, 4),
        np.zeros((0, 8), np.float32),
        np.float32(3.5),
        np.arange(700_001, dtype=np.float32),  # crosses block boundaries, a short last block
        np.arange(300_000, dtype=np.float64).astype(">f8"),  # big-endian: the same logical content
        np.ones((5, 7), ml_dtypes.bfloat16),
        np.array([True, False, True]),
        (np.arange(6) + 1j).astype(np.complex64),
        np.arange(-8, 8, dtype=ml_dtypes.int4),
    ],
    ids=lambda x: f"{x.dtype.name}{list(np.shape(x))}",
)
def test_digest_matches_the_reference(x):
    x = np.asarray(x)
    assert D.digest_of(x) == reference_digest(x)


def test_digest_depends_on_content_dtype_and_shape():
    x = np.arange(12, dtype=np.float32)
    flipped = x.copy()
    flipped.view(np.uint32)[5] ^= 1  # one low mantissa bit
    assert D.digest_of(x) != D.digest_of(flipped)
    assert D.digest_of(x) != D.digest_of(x.reshape(3, 4))
    assert D.digest_of(x) != D.digest_of(x.view(np.int32))
    assert D.digest_of(np.arange(600_000, dtype=np.float32).astype(">f4")) == D.digest_of(
        np.arange(600_000, dtype=np.float32)
    )


@settings(max_examples=40, deadline=None)
@given(
    size=st.integers(0, 3 * D.BLOCK_BYTES // 4 + 5),
    cuts=st.lists(st.floats(0, 1), max_size=6),
    order=st.randoms(use_true_random=False),
    states=st.integers(1, 3),
)
def test_pieces_in_any_order_and_any_number_of_states_give_one_digest(size, cuts, order, states):
    x = (np.arange(size, dtype=np.uint32) * 2654435761).astype(np.uint32)
    data = D.logical_bytes(x)
    bounds = sorted({0, len(data), *(int(c * len(data)) for c in cuts)})
    pieces = list(zip(bounds, bounds[1:]))
    order.shuffle(pieces)
    parts = [D.DigestState("uint32", x.shape, 4) for _ in range(states)]
    for k, (a, b) in enumerate(pieces):
        parts[k % states].feed(a, data[a:b])
    whole = parts[0]
    for other in parts[1:]:
        whole.merge_bytes(other.to_bytes())  # as it crosses processes
    assert whole.hexdigest() == D.digest_of(x)


def test_boxes_of_a_sharded_array_give_the_same_digest():
    x = np.random.default_rng(0).standard_normal((64, 48, 3)).astype(np.float32)
    flat = x.reshape(-1).view(np.uint8)
    state = D.DigestState("float32", x.shape, 4)
    for i in range(0, 64, 16):
        for j in range(0, 48, 12):  # shards along two dimensions: boxes, not slabs
            box = (slice(i, i + 16), slice(j, j + 12), slice(0, 3))
            values = np.ascontiguousarray(x[box]).reshape(-1)
            for offset, local, length in D.box_runs(x.shape, box):
                state.feed(offset * 4, values[local : local + length].view(np.uint8))
    assert state.hexdigest() == D.digest_of(x)
    assert bytes(flat) == x.tobytes()


def test_an_incomplete_state_refuses_to_give_a_digest():
    state = D.DigestState("float32", (1000,), 4)
    state.feed(0, np.zeros(10, np.float32).view(np.uint8))
    with pytest.raises(ValueError, match="unseen"):
        state.hexdigest()


def test_the_digest_of_a_set_is_over_sorted_paths():
    a, b = D.digest_of(np.zeros(3)), D.digest_of(np.ones(3))
    assert D.combined([("x", a), ("y", b)]) == D.combined([("y", b), ("x", a)])
    assert D.combined([("x", a), ("y", b)]) != D.combined([("x", b), ("y", a)])


# ----------------------------------------------------------------------------------------------
# On checkpoints: the same weights, however saved, have the same digests


def cli_digests(*args):
    from test_cli import run_json

    doc = run_json("table", *args, "--digest")
    return {p["path"]: p["digest"] for p in doc["params"]}, doc["digest"]


@pytest.fixture(scope="module")
def resaved(tmp_path_factory):
    """init_params again, every leaf on one device (one chunk per array), zarr2 with OCDBT."""
    import jax
    import orbax.checkpoint as ocp
    from conftest import init_params, make_mesh

    params = init_params(make_mesh())
    single = jax.tree.map(lambda x: jax.device_put(x, jax.devices()[0]), params)
    path = str(tmp_path_factory.mktemp("single") / "params")
    checkpointer = ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_ocdbt=True, use_zarr3=False))
    checkpointer.save(path, args=ocp.args.PyTreeSave(single))
    return path, params


def test_five_ways_of_saving_one_tree_give_one_set_of_digests(storage_ckpt, standard_ckpt, resaved):
    import paramscope

    path, params = resaved
    expected = paramscope.digest(params)  # the library, on the in-memory (boxed, sharded) tree
    assert expected == {p: reference_digest(v) for p, v in storage_ckpt.values.items()}
    assert cli_digests(storage_ckpt.path)[0] == expected  # zarr2 plain / zarr3 OCDBT / zarr3 plain
    assert cli_digests(path)[0] == expected  # zarr2 OCDBT, one chunk per array, no mesh
    assert cli_digests(standard_ckpt.path, "--subtree", "params")[0] == expected  # inside a train state
    assert cli_digests(storage_ckpt.path)[1] == D.combined(expected.items())


def test_digests_do_not_depend_on_budget_engine_or_mesh(manager_ckpt):
    from paramscope import open_checkpoint
    from paramscope.compute.engines import scan

    inv = open_checkpoint(manager_ckpt.path)
    expected = {p: reference_digest(v) for p, v in manager_ckpt.values[200]["params"].items()}
    runs = [
        dict(engine="host", memory_budget=1 << 20),
        dict(engine="host", memory_budget=1 << 30),
        dict(engine="host", memory_budget=4 << 10),  # slabs smaller than a block, across chunks
        dict(engine="mesh", memory_budget=1 << 20),
        dict(engine="mesh", memory_budget=1 << 30, mesh_axes=(("data", 2), ("model", 2))),
    ]
    for options in runs:
        result = scan(inv.params, digest=True, **options)
        assert {r.param.path: r.digest for r in result.params} == expected, options


def _save(path, tree):
    import orbax.checkpoint as ocp

    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(path, tree)
    checkpointer.wait_until_finished()


@pytest.fixture(scope="module")
def flipped(tmp_path_factory):
    """A tree, and the same tree with the lowest bit of one element flipped, both saved."""
    from test_cli import run

    rng = np.random.default_rng(3)
    tree = {"a": {"w": rng.standard_normal((64, 32)).astype(np.float32)}, "b": rng.standard_normal(7)}
    other = {"a": {"w": tree["a"]["w"].copy()}, "b": tree["b"].copy()}
    other["a"]["w"].view(np.uint32)[17, 5] ^= 1
    root = tmp_path_factory.mktemp("flip")
    _save(str(root / "original"), tree)
    _save(str(root / "flipped"), other)
    baseline = str(root / "baseline.json")
    assert run("snapshot", root / "original", "-o", baseline, "-q").exit_code == 0
    return str(root / "original"), str(root / "flipped"), baseline


def test_one_flipped_bit_changes_exactly_that_digest_and_fails_the_gates(flipped):
    from test_cli import run, run_json

    original, changed, baseline = flipped
    a, b = cli_digests(original)[0], cli_digests(changed)[0]
    assert [p for p in a if a[p] != b[p]] == ["a.w"]
    assert run("check", original, "-b", baseline).exit_code == 0
    result = run("check", changed, "-b", baseline, "-f", "json")
    assert result.exit_code == 1
    violations = json.loads(result.stdout)["violations"]
    assert [(v["path"], v["metric"]) for v in violations] == [("a.w", "digest")]  # the norm moved < rtol
    assert run("verify", changed).exit_code == 0  # nothing is damaged: it decodes
    result = run("verify", changed, "--baseline", baseline)
    assert result.exit_code == 3 and "a.w" in result.stdout and "differs from the baseline" in result.stdout
    assert run("verify", original, "--baseline", baseline).exit_code == 0
    doc = run_json("diff", changed, baseline)  # against the snapshot, the original not at hand
    assert {p["path"]: p["status"] for p in doc["params"]} == {"a.w": "changed", "b": "identical"}
    doc = run_json("diff", original, changed, "--digest-only")
    assert doc["summary"]["changed"] == 1 and doc["summary"]["identical"] == 1
    read_together = run_json("diff", original, changed, "--all")  # values read anyway: digests too
    by_path = {p["path"]: p for p in read_together["params"]}
    assert by_path["a.w"]["digest_a"] == a["a.w"] and by_path["a.w"]["digest_b"] == b["a.w"]
    assert by_path["b"]["identical"] and by_path["b"]["digest_a"] == by_path["b"]["digest_b"] == a["b"]


def test_bytes_overwritten_inside_a_data_file_are_caught_by_the_baseline(flipped, tmp_path):
    import os
    import shutil

    from test_cli import run

    original, _, baseline = flipped
    copy = str(tmp_path / "damaged")
    shutil.copytree(original, copy)
    files = [
        os.path.join(d, f)
        for d, _, fs in os.walk(copy)
        for f in fs
        if os.sep + "d" + os.sep in os.path.join(d, f)
    ]
    largest = max(files, key=os.path.getsize)
    with open(largest, "r+b") as f:  # 64 bytes in the middle of the largest data file
        f.seek(os.path.getsize(largest) // 2)
        f.write(np.random.default_rng(9).bytes(64))
    checked = run("verify", copy, "--baseline", baseline)
    assert checked.exit_code == 3 and "a.w" in checked.stdout  # damaged, by decode error or digest
    gated = run("check", copy, "-b", baseline)
    assert gated.exit_code in (1, 3) and "a.w" in gated.stdout + gated.stderr


def test_the_readme_reference_implementation_gives_the_same_digests():
    import os
    import re

    root = os.path.dirname(os.path.dirname(__file__))
    page = open(os.path.join(root, "docs", "commands", "snapshot-check.md")).read()
    code = re.search(r"```python\n(# reference digest of one array\n.*?)```", page, re.S).group(1)
    namespace = {}
    exec(code, namespace)
    for x in (np.arange(700_001, dtype=np.float32), np.ones((3, 5), ml_dtypes.bfloat16), np.zeros((0, 8))):
        assert namespace["digest"](x) == D.digest_of(x) == reference_digest(x)


@pytest.mark.parametrize("shape", [(16, 8), (0, 8), (), (512, 512), (600, 512)], ids=str)
def test_a_whole_array_fed_as_one_box_matches_the_reference(shape):
    x = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    state = D.DigestState("float32", x.shape, 4)
    D.feed_box(state, x.shape, tuple(slice(0, d) for d in x.shape), x)
    assert state.hexdigest() == reference_digest(x)
