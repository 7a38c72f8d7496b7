"""Write tests/data/orbax_v1: checkpoints of the Orbax v1 API (and one v0 StandardCheckpointer).

Three checkpoints, written with the versions paramscope is tested with (constraints.txt):

- ``single/``: ``ocp.v1.save(path, tree)`` of a small linen tree (``params`` with a bf16
  LayerNorm, a Python int ``step``, a string ``config.name``) with custom metadata;
- ``training/``: an ``ocp.v1.training.Checkpointer`` root with steps 1 and 2 of an NNX model
  and its ``nnx.Optimizer`` (adamw) state, ``{"model": nnx.state(model), "optimizer":
  nnx.state(optimizer)}``, saved with ``metrics`` and ``custom_metadata``;
- ``string_and_value_keys/``: ``ocp.PyTreeCheckpointer().save(path, tree)`` (v0 API; the
  ``StandardCheckpointer`` of 0.12.8 refuses string leaves) of a tree with a dict key literally
  named ``value`` (``{"mlp": {"value": w}}``), a flax ``nn.Partitioned`` box (stored as
  ``dense.kernel.value``), a string leaf and a Python int.

Run it in a throwaway environment, never in the project's own:

    python3 -m venv /tmp/env-uv && /tmp/env-uv/bin/pip install uv
    /tmp/env-uv/bin/uv venv -p python3.11 /tmp/env-orbaxv1
    /tmp/env-uv/bin/uv pip install --python /tmp/env-orbaxv1/bin/python \
        -c /work/wt-fixtures/constraints.txt jax jaxlib flax orbax-checkpoint
    /tmp/env-orbaxv1/bin/python scripts/make_orbax_v1_fixture.py tests/data/orbax_v1

(resolved: jax/jaxlib 0.10.2, flax 0.12.8, orbax-checkpoint 0.12.8, tensorstore 0.1.86,
numpy 2.4.6, ml_dtypes 0.6.0, optax 0.2.8). Besides the checkpoints it writes
``expected.json``: for every leaf its dotted name as the training code names it (dict keys
joined by ".", the ``value`` of flax/NNX boxes dropped, a dict key named ``value`` kept), the
dotted path as stored (``stored_path``), shape, dtype and float64 norm computed with numpy
from the values before they were saved (and ``value`` for scalars and strings). The script
loads every checkpoint back with orbax and checks the values.
"""

import importlib.metadata
import json
import os
import shutil
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx


def is_box(x):
    return isinstance(x, nn.Partitioned | nnx.Variable)


def key_name(key):
    for attr in ("key", "idx", "name"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    raise TypeError(key)


def describe(tree):
    """Every leaf by the name the training code uses; boxes are leaves here."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_box)[0]:
        name = ".".join(key_name(k) for k in path)
        entry = {"stored_path": name, "python_type": type(leaf).__name__}
        if is_box(leaf):
            entry["box"] = f"{type(leaf).__module__}.{type(leaf).__name__}"
            entry["stored_path"] = name + ".value"
            leaf = leaf.value if isinstance(leaf, nn.Partitioned) else leaf.get_value()
        if isinstance(leaf, str):
            entry.update(shape=[], dtype="str", value=leaf)
        else:
            arr = np.asarray(leaf)
            entry.update(
                shape=list(arr.shape),
                dtype=arr.dtype.name,
                norm=float(np.sqrt(np.sum(arr.astype(np.float64) ** 2))),
            )
            if isinstance(leaf, int | float):
                entry["value"] = leaf
        out[name] = entry
    return out


def assert_same(restored, saved, where):
    a_leaves = jax.tree_util.tree_flatten_with_path(restored)[0]
    b_leaves = jax.tree_util.tree_flatten_with_path(saved)[0]
    a_names = [jax.tree_util.keystr(p) for p, _ in a_leaves]
    b_names = [jax.tree_util.keystr(p) for p, _ in b_leaves]
    assert a_names == b_names, (where, a_names, b_names)
    for (path, a), (_, b) in zip(a_leaves, b_leaves):
        name = where + jax.tree_util.keystr(path)
        if isinstance(b, str | int | float):
            assert a == b, (name, a, b)
            continue
        a, b = np.asarray(a), np.asarray(b)
        assert a.dtype == b.dtype and a.shape == b.shape, (name, a.dtype, b.dtype)
        np.testing.assert_array_equal(a, b, err_msg=name)


class LinenMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Dense(4)(x)
        return nn.LayerNorm(dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)(x)


class NnxMLP(nnx.Module):
    def __init__(self, rngs):
        self.linear = nnx.Linear(3, 4, rngs=rngs)
        self.norm = nnx.LayerNorm(4, param_dtype=jnp.bfloat16, rngs=rngs)
        self.head = nnx.Linear(4, 2, rngs=rngs)

    def __call__(self, x):
        return self.head(self.norm(self.linear(x)).astype(jnp.float32))


def write_single(path):
    params = LinenMLP().init(jax.random.PRNGKey(0), jnp.ones((1, 3)))["params"]
    tree = {"params": params, "step": 10, "config": {"name": "tiny-linen"}}
    ocp.v1.save(path, tree, custom_metadata={"note": "ocp.v1.save of a linen tree"})
    restored = ocp.v1.load(path)
    assert_same(restored, tree, "single")
    return {"checkpointable": "state", "leaves": describe(tree)}


def write_training(root):
    model = NnxMLP(nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.adamw(1e-2), wrt=nnx.Param)
    x = jax.random.normal(jax.random.PRNGKey(1), (8, 3))
    y = jax.random.normal(jax.random.PRNGKey(2), (8, 2))

    def loss_fn(m):
        return jnp.mean((m(x) - y) ** 2)

    steps = {}
    with ocp.v1.training.Checkpointer(root) as ckptr:
        for step in (1, 2):
            loss, grads = nnx.value_and_grad(loss_fn)(model)
            optimizer.update(model, grads)
            state = {"model": nnx.state(model), "optimizer": nnx.state(optimizer)}
            metrics = {"loss": float(loss)}
            saved = ckptr.save(step, state, metrics=metrics, custom_metadata={"epoch": step})
            assert saved, step
            ckptr.wait()
            # A copy: the model's variables change in place at the next update.
            copy = jax.tree_util.tree_map(np.array, state)
            steps[str(step)] = {
                "checkpointable": "state",
                "metrics": metrics,
                "leaves": describe(state),
                "_copy": copy,
            }
        assert [c.step for c in ckptr.checkpoints] == [1, 2], ckptr.checkpoints
        for step, info in steps.items():
            copy = info.pop("_copy")
            abstract = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), copy)
            restored = ckptr.load(int(step), abstract)  # NNX Variables come back as boxes
            assert_same(restored, copy, f"training/{step}")
            raw = ckptr.load(int(step))  # without a target: plain dicts with "value" keys
            assert set(raw["model"]["head"]["kernel"]) == {"value"}, raw["model"]["head"]
            meta = ckptr.metadata(int(step))
            print("training step", step, "metrics", meta.metrics, "custom", meta.custom_metadata)
    return steps


def write_string_and_value_keys(path):
    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.standard_normal((4, 3)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((3, 2)), jnp.float32)
    tree = {
        "mlp": {"value": w},
        "dense": {"kernel": nn.Partitioned(k, names=(None, "tp"))},
        "name": "tiny-mlp",
        "step": 7,
    }
    # StandardCheckpointer refuses str leaves ("Unsupported type: <class 'str'>"), so the v0
    # PyTreeCheckpointer (the handler StandardCheckpointer builds on) writes this tree.
    ckptr = ocp.PyTreeCheckpointer()
    ckptr.save(path, tree)  # synchronous
    restored = ckptr.restore(path)
    plain = {"mlp": {"value": w}, "dense": {"kernel": {"value": k}}, "name": "tiny-mlp", "step": 7}
    assert_same(restored, plain, "string_and_value_keys")
    return {"checkpointable": None, "leaves": describe(tree)}


def main(out):
    for sub in ("single", "training", "string_and_value_keys"):
        shutil.rmtree(os.path.join(out, sub), ignore_errors=True)
        shutil.rmtree(os.path.join(out, sub + ".orbax-checkpoint-tmp"), ignore_errors=True)
    os.makedirs(out, exist_ok=True)
    out = os.path.abspath(out)
    versions = {
        name: importlib.metadata.version(name)
        for name in ("orbax-checkpoint", "jax", "jaxlib", "flax", "tensorstore", "numpy", "optax")
    }
    expected = {
        "versions": versions,
        "single": write_single(os.path.join(out, "single")),
        "training": {"steps": write_training(os.path.join(out, "training"))},
        "string_and_value_keys": write_string_and_value_keys(os.path.join(out, "string_and_value_keys")),
    }
    with open(os.path.join(out, "expected.json"), "w") as f:
        json.dump(expected, f, indent=1, sort_keys=True)
    print("wrote", out, versions)


if __name__ == "__main__":
    main(sys.argv[1])
