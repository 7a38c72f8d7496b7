"""An OCDBT item's b-tree read whole: the same keys and values as key-by-key reads, whatever the
tree's height; arrays staged from it read as TensorStore reads them in place; never stale."""

import json

import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorstore as ts
from test_cli import run_json

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
    values = {f"w{i:03d}": rng.standard_normal((i % 7 + 1, 5)).astype(np.float32) for i in range(80)}
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
