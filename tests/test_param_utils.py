"""The library half: xLSTM-JAX's parameter utilities, exact in every dtype, in and out of shard_map."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import f64_norm, host_values, init_params, make_mesh
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.sharding import PartitionSpec as P

import paramscope
from paramscope import param_utils
from paramscope.param_utils import (
    get_grad_norms,
    get_num_params,
    get_param_mask_fn,
    get_param_norms,
    get_sharded_global_norm,
    get_sharded_norm_logits,
    is_partitioned,
    tabulate_params,
)


@pytest.fixture(scope="module")
def mesh():
    return make_mesh()


@pytest.fixture(scope="module")
def params(mesh):
    return init_params(mesh)


def test_public_names_match_the_original_module():
    for name in (
        "is_partitioned",
        "get_num_params",
        "tabulate_params",
        "get_grad_norms",
        "get_param_norms",
        "get_sharded_norm_logits",
        "get_sharded_global_norm",
        "get_param_mask_fn",
    ):
        assert getattr(paramscope, name) is getattr(param_utils, name)
        assert name in paramscope.__all__


def test_is_partitioned():
    value = jnp.ones((2, 2))
    assert is_partitioned(nn.Partitioned(value, names=("a", None)))
    assert is_partitioned(nn.LogicallyPartitioned(value, names=("embed", "mlp")))
    assert not is_partitioned(value)
    assert not is_partitioned({"value": value})
    tree = {"w": nn.Partitioned(value, names=("a", None)), "b": value}
    leaves = jax.tree_util.tree_leaves(tree, is_leaf=is_partitioned)
    assert sum(map(is_partitioned, leaves)) == 1 and len(leaves) == 2


def test_get_num_params_counts_boxes_and_skips_sizeless_leaves(params):
    expected = sum(v.size for v in host_values(params).values())
    assert get_num_params(params) == expected
    assert get_num_params({"p": params, "name": "model", "nothing": None}) == expected
    assert get_num_params({}) == 0


def _sharded_specs(params):
    return jax.tree.map(lambda x: P(*x.names) if is_partitioned(x) else P(), params, is_leaf=is_partitioned)


def test_norms_inside_and_outside_shard_map_agree_with_float64(params, mesh):
    reference = host_values(params)
    ref_global = np.sqrt(sum(f64_norm(v) ** 2 for v in reference.values()))

    outside_global, outside_leaves = jax.jit(get_sharded_global_norm)(params)

    def inside(p):
        return get_sharded_global_norm(p)

    specs = _sharded_specs(params)
    leaf_specs = jax.tree.map(lambda x: P(), params, is_leaf=is_partitioned)
    inside_global, inside_leaves = jax.jit(
        jax.shard_map(inside, mesh=mesh, in_specs=(specs,), out_specs=(P(), leaf_specs), check_vma=False)
    )(params)

    assert float(outside_global) == pytest.approx(ref_global, rel=1e-6)
    assert float(inside_global) == pytest.approx(ref_global, rel=1e-6)
    for path, leaf in param_utils._leaves_with_paths(outside_leaves):
        assert float(leaf) == pytest.approx(f64_norm(reference[path]), rel=1e-6), path
    for path, leaf in param_utils._leaves_with_paths(inside_leaves):
        assert float(leaf) == pytest.approx(f64_norm(reference[path]), rel=1e-6), path


def test_norm_logits_of_a_box_inside_shard_map_is_the_full_squared_norm(mesh):
    value = jnp.arange(64.0).reshape(8, 8)
    box = nn.Partitioned(
        jax.device_put(value, jax.sharding.NamedSharding(mesh, P("data", "model"))), names=("data", "model")
    )
    expected = float(np.sum(np.arange(64.0) ** 2))
    assert float(get_sharded_norm_logits(box)) == expected  # outside: the plain sum, no unbound axis
    inside = jax.shard_map(get_sharded_norm_logits, mesh=mesh, in_specs=(P("data", "model"),), out_specs=P())
    assert float(jax.jit(inside)(box)) == expected


def test_bf16_tree_of_33m_parameters_is_exact_where_the_original_formula_is_not():
    rng = np.random.default_rng(0)
    leaves = {
        f"layer_{i:04d}": jnp.asarray(
            rng.standard_normal(33_000, dtype=np.float32) * 0.065, dtype=jnp.bfloat16
        )
        for i in range(1000)
    }
    reference = float(np.sqrt(sum(np.sum(np.asarray(v, np.float64) ** 2) for v in leaves.values())))

    def original(tree):  # the formula of the original: square and sum in the leaf's dtype
        per_leaf = jax.tree.map(lambda x: (x**2).sum(), tree)
        return jnp.sqrt(jax.tree_util.tree_reduce(jnp.add, per_leaf))

    naive = float(jax.jit(original)(leaves))
    assert abs(naive - reference) / reference > 0.2  # the original loses about a third
    assert abs(float(optax.global_norm(leaves)) - reference) / reference > 0.2
    norm, _ = jax.jit(get_sharded_global_norm)(leaves)
    assert abs(float(norm) - reference) / reference < 1e-6
    assert norm.dtype == jnp.float32


def test_grad_and_param_norm_dicts(params):
    reference = host_values(params)
    grads = jax.jit(get_grad_norms, static_argnums=1)(params, True)
    norms = get_param_norms(params, return_per_param=True)
    assert set(grads) == {"grad_norm"} | {f"grad_norm_{p}" for p in reference}
    assert set(norms) == {"param_norm"} | {f"param_norm_{p}" for p in reference}
    for path, value in reference.items():
        assert float(grads[f"grad_norm_{path}"]) == pytest.approx(f64_norm(value), rel=1e-6)
        assert float(norms[f"param_norm_{path}"]) == pytest.approx(f64_norm(value), rel=1e-6)
    assert set(get_param_norms(params)) == {"param_norm"}
    assert float(get_param_norms(params)["param_norm"]) == pytest.approx(float(grads["grad_norm"]), rel=1e-6)


def _mask_by_path(mask):
    return {
        path: (leaf.value if is_partitioned(leaf) else leaf)
        for path, leaf in param_utils._leaves_with_paths(mask)
    }


def test_mask_semantics(params):
    paths = set(host_values(params))
    excluded = _mask_by_path(get_param_mask_fn(exclude=["bias$", "LayerNorm"])(params))
    assert set(excluded) == paths
    assert excluded == {p: not (p.endswith("bias") or "LayerNorm" in p) for p in paths}
    included = _mask_by_path(get_param_mask_fn(exclude=None, include=["kernel$"])(params))
    assert included == {p: p.endswith("kernel") for p in paths}  # boxed kernels match kernel$
    assert all(_mask_by_path(get_param_mask_fn(None)(params)).values())
    with pytest.raises(ValueError, match="Only one of exclude or include"):
        get_param_mask_fn(exclude=["a"], include=["b"])
    with pytest.raises(ValueError, match=re.escape("'[unclosed'")):
        get_param_mask_fn(exclude=["[unclosed"])


def test_mask_plugs_into_optax_adamw_with_boxed_params(params):
    mask_fn = get_param_mask_fn(exclude=["bias$", "scale$", "LayerNorm"])
    optimizer = optax.adamw(learning_rate=0.1, weight_decay=0.5, mask=mask_fn)
    state = optimizer.init(params)
    zero_grads = jax.tree.map(jnp.zeros_like, params)
    updates, _ = jax.jit(optimizer.update)(zero_grads, state, params)
    decided = _mask_by_path(mask_fn(params))
    before, after = host_values(params), host_values(updates)
    for path, decayed in decided.items():
        update = after[path].astype(np.float64)
        if decayed:  # with zero gradients, the update is the decay alone: -lr * wd * p
            np.testing.assert_allclose(update, -0.05 * before[path].astype(np.float64), rtol=1e-5, atol=1e-7)
        else:
            assert np.all(update == 0), path


def test_tabulate_params_lists_every_path_total_and_decay_column(params):
    class State:
        def __init__(self, params):
            self.params = params

    text = tabulate_params(State(params), show_weight_decay=True, weight_decay_exclude=["bias$"])
    total = get_num_params(params)
    assert text.splitlines()[0] == f"Total number of global parameters: {total:_}"
    assert "Weight Decay" in text
    for path, value in host_values(params).items():
        line = next(line for line in text.splitlines() if line.split() and line.split()[0] == path)
        assert f"{value.size:_}" in line
        assert str(value.dtype) in line
        assert line.rstrip().endswith("False" if path.endswith("bias") else "True")
    assert "P('model', 'data')" in text and "replicated" in text
    assert "Weight Decay" not in tabulate_params(params)


@st.composite
def trees(draw):
    shapes = draw(st.lists(st.lists(st.integers(1, 6), min_size=0, max_size=3), min_size=1, max_size=6))
    dtype = draw(st.sampled_from([jnp.float32, jnp.bfloat16, jnp.float16]))
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    tree = {}
    for i, shape in enumerate(shapes):
        value = jnp.asarray(rng.standard_normal(shape).astype(np.float32), dtype=dtype)
        tree[f"p{i}"] = nn.Partitioned(value, names=(None,) * len(shape)) if i % 2 else value
    return tree


@settings(max_examples=40, deadline=None, derandomize=True)
@given(trees())
def test_global_norm_is_root_of_summed_squared_leaf_norms_and_counts_add_up(tree):
    norm, per_leaf = get_sharded_global_norm(tree)
    leaf_norms = np.array([float(v) for v in jax.tree_util.tree_leaves(per_leaf)], dtype=np.float64)
    assert np.all(leaf_norms >= 0)
    assert float(norm) == pytest.approx(np.sqrt(np.sum(leaf_norms**2)), rel=1e-6, abs=1e-12)
    sizes = [
        np.size(leaf.value if is_partitioned(leaf) else leaf)
        for leaf in jax.tree_util.tree_leaves(tree, is_leaf=is_partitioned)
    ]
    assert get_num_params(tree) == sum(sizes)
    reference = np.sqrt(sum(np.sum(np.asarray(v, np.float64) ** 2) for v in host_values(tree).values()))
    assert float(norm) == pytest.approx(reference, rel=1e-6, abs=1e-12)
