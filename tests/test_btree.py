"""An OCDBT item's b-tree read whole: the same keys and values as key-by-key reads, whatever the
tree's height; arrays staged from it read as TensorStore reads them in place; never stale."""

import json
import shutil

import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorstore as ts
from test_cli import run, run_json

from paramscope import open_checkpoint
from paramscope.io import btree, checkpoint, storage


def _spec(path) -> str:
    base = storage.Tree(str(path)).spec()
    return json.dumps({"driver": "ocdbt", "base": base}, sort_keys=True)


@pytest.mark.parametrize("node_bytes,height", [(100_000_000, 0), (2_000, 1), (600, 3)], ids=str)
def test_every_key_and_inline_value_as_key_by_key_reads_give_them(tmp_path, node_bytes, height):
    path = tmp_path / "db"
    config = {"max_decoded_node_bytes": node_bytes, "max_inline_value_bytes": 100}
    kv = ts.KvStore.open({"driver": "ocdbt", "base": f"file://{path}/", "config": config}).result()
    with ts.Transaction() as txn:
        for i in range(300):  # keys sharing long prefixes, values inline and outside the tree
            kv.with_transaction(txn)[f"layer_{i // 50:02d}.w{i:04d}/0"] = bytes([i % 256]) * (40 + i % 3 * 60)
    tree = btree.read(_spec(path))
    assert tree is not None
    manifest = ts.ocdbt.dump(ts.KvStore.open(f"file://{path}/").result()).result()
    assert max(manifest["versions"], key=lambda v: v["generation_number"])["root_height"] == height
    assert tree.keys == sorted(k.decode() for k in kv.list().result())
    inline = 0
    for key in tree.keys:
        expected = kv.read(key).result().value
        if tree.values[key] is btree.OUTSIDE:
            assert len(expected) > 100
        else:
            assert tree.values[key] == expected
            inline += 1
    assert 0 < inline < len(tree.keys)
    assert tree.under("layer_01.w0050") == ["layer_01.w0050/0"]


def test_small_arrays_staged_from_the_tree_read_as_in_place(tmp_path):
    rng = np.random.default_rng(3)
    values = {
        f"w{i:03d}": rng.standard_normal((i + 1, 3)).astype(np.float32) for i in range(80)
    }  # no two alike
    values["big"] = rng.standard_normal((300, 300)).astype(np.float32)  # chunks outside the tree
    path = tmp_path / "ckpt"
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(str(path), values)
    checkpointer.wait_until_finished()
    params = {p.path: p for p in open_checkpoint(str(path)).params}
    tree = btree.loaded(params["big"].stored.store)
    assert tree is not None  # read with the metadata of the 81 arrays
    handles = checkpoint.open_arrays([p.stored for p in params.values()])
    for name, handle in zip(params, handles):
        assert np.array_equal(handle.read().result(), values[name])
    assert "big" not in tree.staged and len(tree.staged) == 80


def test_a_checkpoint_rewritten_in_place_is_read_again(tmp_path):
    """One process (the library in a notebook, a training loop): the same path, new contents."""
    path = str(tmp_path / "ckpt")
    checkpointer = ocp.StandardCheckpointer()
    norms = []
    for scale in (1.0, 3.0):
        tree = {f"w{i:03d}": np.full((4, 4), scale * (i + 1), np.float32) for i in range(70)}
        checkpointer.save(path, tree, force=True)
        checkpointer.wait_until_finished()
        doc = run_json("norms", path, "--per-param")
        norms.append({p["path"]: p["norm"] for p in doc["params"]})
        assert norms[-1]["w000"] == pytest.approx(4 * scale, rel=1e-12)
    assert all(norms[1][k] == pytest.approx(3 * norms[0][k], rel=1e-12) for k in norms[0])


@pytest.mark.parametrize("zarr3", [False, True], ids=["zarr", "zarr3"])
def test_single_chunk_arrays_of_one_metadata_are_read_as_one_stack(tmp_path, zarr3):
    """70 arrays of one shape and dtype (and two others): one open and one read for the 70, the
    same values as reading each in place; a sliced handle reads that slice."""
    rng = np.random.default_rng(4)
    values = {f"w{i:02d}": rng.standard_normal((6, 5)).astype(np.float32) for i in range(70)}
    values |= {"odd": rng.standard_normal(7).astype(np.float32), "ints": np.arange(12, dtype=np.int32)}
    path = tmp_path / "ckpt"
    checkpointer = ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_ocdbt=True, use_zarr3=zarr3))
    checkpointer.save(str(path), values)
    params = {p.path: p for p in open_checkpoint(str(path)).params}
    opens = []
    real_open = ts.open
    ts.open = lambda *a, **k: opens.append(1) or real_open(*a, **k)
    try:
        handles = checkpoint.open_arrays([p.stored for p in params.values()])
    finally:
        ts.open = real_open
    assert len(opens) == 3  # the stack of 70, and the two others alone
    for name, handle in zip(params, handles):
        assert np.array_equal(handle.read().result(), values[name]), name
    assert np.array_equal(handles[3][1:3, ::2].read().result(), values["w01"][1:3, ::2])
    assert run_json("norms", path, "--per-param")["params"][0]["norm"] == pytest.approx(
        float(np.sqrt(np.sum(values["ints"].astype(np.float64) ** 2))), rel=1e-12
    )


def test_one_damaged_chunk_of_a_stack_fails_that_array_alone():
    from paramscope.io.zarr import _Stack, _StackMember

    meta = {"shape": [5, 4], "chunks": [1, 4], "dtype": "<f4", "compressor": {"id": "zstd", "level": 1}}
    meta |= {"fill_value": None, "filters": None, "order": "C", "zarr_format": 2}
    store = ts.open(
        {"driver": "zarr", "kvstore": {"driver": "memory"}, "metadata": meta}, create=True
    ).result()
    store.write(np.arange(20, dtype=np.float32).reshape(5, 4)).result()
    store.kvstore.write("3.0", b"not zstd").result()
    stack = _Stack(store)
    members = [_StackMember(stack, k) for k in range(5)]
    reads = [m.read() for m in members]
    assert np.array_equal(reads[0].result(), np.arange(4, dtype=np.float32))
    with pytest.raises(Exception, match="(?i)zstd|decod"):
        reads[3].result()
    assert np.array_equal(reads[4].result(), np.arange(16, 20, dtype=np.float32))


def _flip(path, offset: int, length: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        data = bytearray(f.read(length))
        f.seek(offset)
        f.write(bytes(b ^ 0x5A for b in data))


def _place(location: str, root) -> tuple[str, int, int]:
    """``value:<base>:<file>:<offset>:<length>`` or ``btreenode::<file>:<offset>:<length>``."""
    head, offset, length = location.rsplit(":", 2)
    _, base, relative = head.split(":", 2) if head.count(":") >= 2 else (None, "", head.split(":", 1)[1])
    return str(root / (base + relative)), int(offset), int(length)


def test_damage_under_many_arrays_is_named_as_before(tmp_path):
    """80 arrays (70 inline and stacked, 10 in the data file): a damaged chunk is named by verify
    and spares the rest; a damaged b-tree node is one line and exit 3, as key by key."""
    from test_robustness import assert_fails

    rng = np.random.default_rng(6)
    values = {f"w{i:02d}": rng.standard_normal((4, 4)).astype(np.float32) for i in range(70)}
    values |= {f"big{i}": rng.standard_normal((64, 64)).astype(np.float32) for i in range(10)}
    path = tmp_path / "ckpt"
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(str(path), values)
    checkpointer.wait_until_finished()
    node_damaged = tmp_path / "node_damaged"  # a copy damaged before anything reads it
    shutil.copytree(path, node_damaged)
    base = ts.KvStore.open(f"file://{path}/").result()
    manifest = ts.ocdbt.dump(base).result()
    root = max(manifest["versions"], key=lambda v: v["generation_number"])["root"]
    entries = {bytes(e["key"]).decode(): e for e in ts.ocdbt.dump(base, root["location"]).result()["entries"]}
    chunk = next(
        e["indirect_value"] for k, e in entries.items() if k.startswith("big3/") and "indirect_value" in e
    )
    _flip(*_place(chunk, path))
    assert run_json("table", path)["params"]  # the b-tree is sound
    verified = run("verify", str(path), "--format", "json")
    assert verified.exit_code == 3
    assert [p["path"] for p in json.loads(verified.stdout)["problems"]] == ["big3"]
    _flip(*_place(root["location"], node_damaged))  # the b-tree node itself
    assert_fails(["table", str(node_damaged)], 3, "cannot read")
    assert run("verify", str(node_damaged)).exit_code == 3


def test_metadata_stored_outside_the_tree_is_read_by_key(tmp_path):
    """70 arrays whose zarr metadata (and chunks) the b-tree does not hold inline."""
    from paramscope.io import zarr

    base = f"file://{tmp_path}/db/"
    config = {"max_inline_value_bytes": 0}
    kv = ts.KvStore.open({"driver": "ocdbt", "base": base, "config": config}).result()
    values = {f"w{i:02d}": np.full((3, 2), i, np.float32) for i in range(70)}
    for name, value in values.items():
        spec = {"driver": "zarr", "metadata": {"compressor": None}}
        store = ts.open(spec, kvstore=kv / f"{name}/", create=True, dtype=value.dtype, shape=value.shape)
        store.result().write(value).result()
    spec = json.loads(_spec(tmp_path / "db"))
    arrays = zarr.zarr_arrays(spec, [((name,), name, "jax.Array") for name in values])
    assert btree.loaded(arrays[0].store) is not None
    assert all(v is btree.OUTSIDE for v in btree.loaded(arrays[0].store).values.values())
    assert [a.shape for a in arrays] == [(3, 2)] * 70
    for value, handle in zip(values.values(), checkpoint.open_arrays(arrays)):
        assert np.array_equal(handle.read().result(), value)
