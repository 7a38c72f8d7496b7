"""Reading real Orbax checkpoints of every layout: structure from metadata, norms on the mesh."""

import math
import os

import numpy as np
import pytest
from conftest import f64_norm

from paramscope import compute_norms, open_checkpoint
from paramscope.errors import CheckpointNotFound, ItemNotFound, NotACheckpoint, StepNotFound, UsageError
from paramscope.io.inventory import checkpoint_info, count_params, filter_params, weight_decay_mask
from paramscope.parallel.mesh import parse_mesh


def assert_structure(inventory, values, specs=None):
    found = {p.path: p for p in inventory.params}
    assert set(found) == set(values)
    for path, value in values.items():
        param = found[path]
        assert param.shape == value.shape, path
        assert param.dtype == str(value.dtype), path
        assert param.count == value.size
        assert param.nbytes == value.nbytes
        if specs:
            assert param.sharding == specs[path], path


def assert_norms(result, values, rel=1e-6):
    assert {r.param.path for r in result.params} == set(values)
    for entry in result.params:
        expected = f64_norm(values[entry.param.path])
        assert entry.norm == pytest.approx(expected, rel=rel, abs=1e-30), entry.param.path
    expected_global = math.sqrt(sum(f64_norm(v) ** 2 for v in values.values()))
    assert result.global_norm == pytest.approx(expected_global, rel=rel)


def test_manager_root_reads_latest_finished_step_and_skips_unfinished(manager_ckpt):
    inventory = open_checkpoint(manager_ckpt.path)
    assert inventory.step == 200
    assert inventory.items == ["params"]
    assert_structure(inventory, manager_ckpt.values[200]["params"], manager_ckpt.specs)
    assert inventory.saved_mesh == (("data", 2), ("model", 4))
    scanned = next(p for p in inventory.params if p.path == "layers.Block_0.Dense_0.kernel")
    assert scanned.shape == (3, 16, 32) and scanned.sharding == (None, "data", "model")


def test_manager_step_item_and_step_folder(manager_ckpt):
    old = open_checkpoint(manager_ckpt.path, step=100)
    assert old.step == 100
    assert_structure(old, manager_ckpt.values[100]["params"])
    opt = open_checkpoint(manager_ckpt.path, item="opt_state")
    assert_structure(opt, manager_ckpt.values[200]["opt_state"])
    assert "0.mu.layers.Block_0.Dense_0.kernel" in {p.path for p in opt.params}
    step_item = open_checkpoint(manager_ckpt.path, item="step")
    assert [(p.path, p.shape, p.dtype) for p in step_item.params] == [("step", (), "int32")]
    step_folder = open_checkpoint(os.path.join(manager_ckpt.path, "checkpoint_100"))
    assert step_folder.step == 100 and step_folder.items == ["params"]
    item_folder = open_checkpoint(os.path.join(manager_ckpt.path, "checkpoint_100", "opt_state"))
    assert_structure(item_folder, manager_ckpt.values[100]["opt_state"])


def test_manager_errors(manager_ckpt, tmp_path):
    with pytest.raises(StepNotFound, match="no finished step 300"):
        open_checkpoint(manager_ckpt.path, step=300)  # exists, but unfinished
    with pytest.raises(ItemNotFound) as err:
        open_checkpoint(manager_ckpt.path, item="ema")
    assert "opt_state" in err.value.hint and "params" in err.value.hint
    nothing = open_checkpoint(manager_ckpt.path, subtree="nothing")
    assert nothing.params == [] and "'nothing' matches no parameter" in nothing.warnings[-1]
    tmp_step = next(e for e in os.listdir(manager_ckpt.path) if "tmp" in e)
    with pytest.raises(StepNotFound, match="unfinished"):
        open_checkpoint(os.path.join(manager_ckpt.path, tmp_step))
    with pytest.raises(CheckpointNotFound):
        open_checkpoint(tmp_path / "missing")
    with pytest.raises(NotACheckpoint):
        open_checkpoint(tmp_path)
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotACheckpoint):
        open_checkpoint(tmp_path / "file")
    only_tmp = tmp_path / "root"
    # folders are seen through the files they hold (as in a bucket): an unfinished save has some
    (only_tmp / "5.orbax-checkpoint-tmp-1").mkdir(parents=True)
    (only_tmp / "5.orbax-checkpoint-tmp-1" / "_CHECKPOINT_METADATA").write_text(
        '{"commit_timestamp_nsecs": null}'
    )
    with pytest.raises(StepNotFound, match="no finished step"):
        open_checkpoint(only_tmp)


def test_info_lists_steps_items_and_json(manager_ckpt):
    info = checkpoint_info(manager_ckpt.path)
    assert info.layout == "root" and info.step == 200
    assert [(s.step, s.finished) for s in info.steps] == [(100, True), (200, True), (300, False)]
    kinds = {i.name: i.kind for i in info.items}
    assert kinds == {"params": "pytree", "opt_state": "pytree", "step": "array", "metadata": "json"}
    metadata = next(i for i in info.items if i.name == "metadata")
    assert metadata.content == {"model": "Model", "step": 200}
    params = next(i for i in info.items if i.name == "params")
    assert params.storage == "ocdbt" and params.arrays == len(manager_ckpt.values[200]["params"])
    assert params.count == sum(v.size for v in manager_ckpt.values[200]["params"].values())
    assert params.bytes_on_disk > 0


def test_standard_checkpointer_train_state_and_subtree(standard_ckpt):
    whole = open_checkpoint(standard_ckpt.path)
    assert_structure(whole, standard_ckpt.values, standard_ckpt.specs)
    assert "step" in {p.path for p in whole.params}
    params = open_checkpoint(standard_ckpt.path, subtree="params")
    expected = {k[len("params.") :]: v for k, v in standard_ckpt.values.items() if k.startswith("params.")}
    assert_structure(params, expected)


def test_storage_formats(storage_ckpt):
    inventory = open_checkpoint(storage_ckpt.path)
    assert_structure(inventory, storage_ckpt.values, storage_ckpt.specs)
    for engine in ("host", "mesh"):
        result = compute_norms(inventory.params, saved_mesh=inventory.saved_mesh, engine=engine)
        assert_norms(result, storage_ckpt.values)


def test_nnx_model_and_optimizer_items_are_unboxed(nnx_ckpt):
    inventory = open_checkpoint(nnx_ckpt.path)
    assert sorted(inventory.items) == ["model", "optimizer"]
    assert_structure(inventory, nnx_ckpt.values)
    assert not any(p.path.endswith(".value") for p in inventory.params)
    assert "model.up.kernel" in {p.path for p in inventory.params}
    assert_norms(compute_norms(inventory.params), nnx_ckpt.values)


def test_legacy_orbax_checkpoint(legacy_ckpt):
    path, expected = legacy_ckpt
    assert expected["orbax_checkpoint"].startswith("0.6.")
    for step in (100, 200):
        for item in ("params", "opt_state"):
            inventory = open_checkpoint(path, step=step, item=item)
            wanted = expected["steps"][str(step)][item]
            assert {p.path: (list(p.shape), p.dtype) for p in inventory.params} == {
                k: (v["shape"], v["dtype"]) for k, v in wanted.items()
            }
            result = compute_norms(inventory.params, saved_mesh=inventory.saved_mesh, engine="mesh")
            for entry in result.params:
                assert entry.norm == pytest.approx(wanted[entry.param.path]["norm"], rel=1e-6)
    assert open_checkpoint(path).step == 200
    sharded = {p.path: p.sharding for p in open_checkpoint(path).params}
    assert sharded["Embed_0.embedding"] == ("tp", "fsdp")
    assert sharded["block_0.Dense_1.bias"] is None


def test_norms_match_float64_on_every_mesh(manager_ckpt):
    inventory = open_checkpoint(manager_ckpt.path)
    values = manager_ckpt.values[200]["params"]
    default = compute_norms(inventory.params, saved_mesh=inventory.saved_mesh, engine="mesh")
    assert default.mesh == (("data", 2), ("model", 4)) and default.engine == "mesh"
    assert_norms(default, values)
    for mesh in ("data=1,model=1", "data=4,model=2", "model=8", "x=2"):
        result = compute_norms(inventory.params, mesh_axes=parse_mesh(mesh))
        assert result.engine == "mesh"
        assert_norms(result, values)
        assert [r.norm for r in result.params] == pytest.approx([r.norm for r in default.params], rel=1e-6)


@pytest.mark.parametrize("engine", ["host", "mesh"])
def test_special_dtypes_and_nonfinite(special_ckpt, engine):
    inventory = open_checkpoint(special_ckpt.path)
    assert_structure(inventory, special_ckpt.values)
    assert {p.path: p.dtype for p in inventory.params} == {
        "bf16": "bfloat16",
        "fp16": "float16",
        "int8": "int8",
        "f32.with_nan": "float32",
        "f32.with_inf": "float32",
        "scalar": "float32",
        "f64": "float64",
        "i64": "int64",
    }
    result = compute_norms(inventory.params, saved_mesh=inventory.saved_mesh, engine=engine)
    by_path = {r.param.path: r for r in result.params}
    finite = {k: v for k, v in special_ckpt.values.items() if np.all(np.isfinite(v.astype(np.float64)))}
    for path, value in finite.items():
        assert by_path[path].norm == pytest.approx(f64_norm(value), rel=1e-6), path
        assert by_path[path].nonfinite == 0
    assert by_path["f32.with_nan"].nonfinite == 1 and math.isnan(by_path["f32.with_nan"].norm)
    assert by_path["f32.with_inf"].nonfinite == 1 and math.isinf(by_path["f32.with_inf"].norm)
    assert result.nonfinite == 2 and math.isnan(result.global_norm)


def test_counts_filter_and_mask(manager_ckpt):
    params = open_checkpoint(manager_ckpt.path).params
    values = manager_ckpt.values[200]["params"]
    counts = count_params(params, depth=2)
    assert counts.total_count == sum(v.size for v in values.values())
    assert counts.total_bytes == sum(v.nbytes for v in values.values())
    assert sum(g[1] for g in counts.groups) == counts.total_count
    assert {g[0] for g in counts.groups} == {".".join(p.split(".")[:2]) for p in values}
    assert counts.by_dtype["bfloat16"][0] == sum(
        v.size for v in values.values() if v.dtype.name == "bfloat16"
    )
    kernels = filter_params(params, "kernel$")
    assert {p.path for p in kernels} == {p for p in values if p.endswith("kernel")}
    with pytest.raises(UsageError):
        filter_params(params, "(")
    mask = weight_decay_mask(params, exclude=["bias$", "LayerNorm", "never_matches"])
    assert mask.unmatched_patterns == ["never_matches"]
    assert {p.path: flag for p, flag in mask.decisions} == {
        p: not (p.endswith("bias") or "LayerNorm" in p) for p in values
    }
    with pytest.raises(UsageError):
        weight_decay_mask(params, include=["a"], exclude=["b"])


def test_logically_partitioned_boxes_are_unboxed(tmp_path):
    import flax.linen as nn
    import jax.numpy as jnp
    import orbax.checkpoint as ocp

    values = {"w": np.arange(32, dtype=np.float32).reshape(4, 8), "b": np.ones(8, np.float32)}
    tree = {
        "dense": {
            "kernel": nn.LogicallyPartitioned(jnp.asarray(values["w"]), names=("embed", "mlp")),
            "bias": nn.Partitioned(jnp.asarray(values["b"]), names=("mlp",)),
        }
    }
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(str(tmp_path / "item"), tree)
    checkpointer.wait_until_finished()
    inventory = open_checkpoint(tmp_path / "item")
    assert {p.path: p.shape for p in inventory.params} == {"dense.kernel": (4, 8), "dense.bias": (8,)}
    norms = {r.param.path: r.norm for r in compute_norms(inventory.params).params}
    assert norms == {
        "dense.kernel": pytest.approx(f64_norm(values["w"])),
        "dense.bias": pytest.approx(f64_norm(values["b"])),
    }
