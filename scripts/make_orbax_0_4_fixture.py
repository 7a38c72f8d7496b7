"""Write tests/data/orbax_0_4_aggregate and tests/data/orbax_0_4_placeholder: 2023-style checkpoints.

Both hold a flax ``TrainState`` (tiny MLP, a bf16 LayerNorm, optax adam) plus a small config
dict, saved at steps 1 and 2 by a ``PyTreeCheckpointer`` in a ``CheckpointManager``
(``step_prefix="checkpoint"``, 2 steps). They differ only in how it is saved:

- ``aggregate``: the way flax's documentation of late 2023 did it, ``PyTreeCheckpointer()``
  with ``save_args=flax.training.orbax_utils.save_args_from_target(ckpt)``. Every leaf is then
  aggregated: its value sits inside the msgpack ``checkpoint`` file of the item folder and
  ``_METADATA`` marks it ``skip_deserialize``.
- ``placeholder``: ``PyTreeCheckpointer(use_ocdbt=False)`` with default save args: no leaf is
  aggregated, so each one gets its own zarr (v2) folder named by its dotted keys beside the
  msgpack ``checkpoint`` file, which holds ``PLACEHOLDER://<name>`` strings in their place.

Run it in a throwaway environment, never in the project's own:

    python3 -m venv /tmp/env-uv && /tmp/env-uv/bin/pip install uv
    /tmp/env-uv/bin/uv venv -p python3.11 /tmp/env-orbax04
    /tmp/env-uv/bin/uv pip install --python /tmp/env-orbax04/bin/python \
        "orbax-checkpoint==0.4.8" "jax[cpu]==0.4.23" "jaxlib==0.4.23" "flax==0.7.5" \
        "numpy<2" "scipy<1.13" "tensorstore==0.1.51" "ml_dtypes==0.3.2" "chex==0.1.85" \
        "optax==0.1.7"
    /tmp/env-orbax04/bin/python scripts/make_orbax_0_4_fixture.py tests/data

(resolved: numpy 1.26.4, msgpack 1.2.4). That writes both fixtures, as
``tests/data/orbax_0_4_<kind>``; name a kind after the folder (``... tests/data aggregate``)
to write only that one. Besides the checkpoint each gets ``expected.json``: for every leaf
its dotted path, shape, dtype and float64 norm computed with numpy from the values before
they were saved (and ``value`` for scalars and strings). The script restores each step with
orbax and checks it against those values.
"""

import importlib.metadata
import json
import os
import shutil
import sys

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax.training import orbax_utils, train_state


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Dense(4)(x)
        x = nn.LayerNorm(dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)(x)
        return nn.Dense(2)(x)


def dotted(path):
    keys = []
    for key in path:
        for attr in ("key", "idx", "name"):
            if hasattr(key, attr):
                keys.append(str(getattr(key, attr)))
                break
    if keys and keys[-1] == "value":
        keys = keys[:-1]
    return ".".join(keys)


def describe(tree):
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        entry = {"python_type": type(leaf).__name__}
        if isinstance(leaf, str):
            entry.update(shape=[], dtype="str", value=leaf)
        else:
            arr = np.asarray(leaf)
            entry.update(
                shape=list(arr.shape),
                dtype=arr.dtype.name,
                norm=float(np.sqrt(np.sum(arr.astype(np.float64) ** 2))),
            )
            if isinstance(leaf, (int, float)):
                entry["value"] = leaf
        out[dotted(path)] = entry
    return out


def make_state():
    model = MLP()
    params = model.init(jax.random.PRNGKey(0), jnp.ones((1, 3)))["params"]
    return train_state.TrainState.create(apply_fn=model.apply, params=params, tx=optax.adam(1e-2))


def train_step(state, x, y):
    def loss_fn(params):
        pred = state.apply_fn({"params": params}, x)
        return jnp.mean((pred.astype(jnp.float32) - y) ** 2)

    return state.apply_gradients(grads=jax.grad(loss_fn)(state.params))


def compare(restored, saved):
    for (path, a), b in zip(
        jax.tree_util.tree_flatten_with_path(restored)[0], jax.tree_util.tree_leaves(saved)
    ):
        if isinstance(b, str) or isinstance(b, (int, float)):
            assert a == b, (dotted(path), a, b)
            continue
        a, b = np.asarray(a), np.asarray(b)
        assert a.dtype == b.dtype and a.shape == b.shape, (dotted(path), a.dtype, b.dtype)
        np.testing.assert_array_equal(a, b, err_msg=dotted(path))


# kind -> (PyTreeCheckpointer keyword arguments, save with save_args_from_target?)
KINDS = {
    "aggregate": ({}, True),
    "placeholder": ({"use_ocdbt": False}, False),
}


def write(out, kind):
    checkpointer_kwargs, aggregate = KINDS[kind]
    # Keep LAYOUT.md (written by hand); replace everything the script writes.
    shutil.rmtree(os.path.join(out, "checkpoints"), ignore_errors=True)
    os.makedirs(out, exist_ok=True)
    state = make_state()
    x = jax.random.normal(jax.random.PRNGKey(1), (8, 3))
    y = jax.random.normal(jax.random.PRNGKey(2), (8, 2))
    manager = ocp.CheckpointManager(
        os.path.abspath(os.path.join(out, "checkpoints")),
        ocp.PyTreeCheckpointer(**checkpointer_kwargs),
        options=ocp.CheckpointManagerOptions(max_to_keep=2, step_prefix="checkpoint", create=True),
    )
    versions = {
        name: importlib.metadata.version(name)
        for name in ("orbax-checkpoint", "jax", "jaxlib", "flax", "tensorstore", "numpy", "msgpack")
    }
    expected = {"versions": versions, "item": "default", "steps": {}}
    saved = {}
    for _ in range(2):
        state = train_step(state, x, y)
        ckpt = {"model": state, "config": {"name": "tiny-mlp", "learning_rate": 0.01}}
        if aggregate:
            save_args = orbax_utils.save_args_from_target(ckpt)
            manager.save(state.step, ckpt, save_kwargs={"save_args": save_args})
        else:
            manager.save(state.step, ckpt)
        manager.wait_until_finished()
        saved[state.step] = ckpt
        expected["steps"][str(state.step)] = {"default": describe(ckpt)}

    # Read back with the library that wrote it.
    assert manager.all_steps() == [1, 2], manager.all_steps()
    for step, ckpt in saved.items():
        target = {"model": make_state(), "config": {"name": "", "learning_rate": 0.0}}
        restore_args = orbax_utils.restore_args_from_target(target)
        restored = manager.restore(step, items=target, restore_kwargs={"restore_args": restore_args})
        compare(restored, ckpt)
        raw = manager.restore(step)  # no target: nested dicts as stored
        print("step", step, "restored; untargeted keys:", sorted(raw), sorted(raw["model"]))
    with open(os.path.join(out, "expected.json"), "w") as f:
        json.dump(expected, f, indent=1, sort_keys=True)
    print("wrote", out, "with flax", flax.__version__)


def main(argv):
    if not argv or any(kind not in KINDS for kind in argv[1:]):
        sys.exit(f"usage: make_orbax_0_4_fixture.py DATA_DIR [{'|'.join(KINDS)} ...]")
    for kind in argv[1:] or KINDS:
        write(os.path.join(argv[0], f"orbax_0_4_{kind}"), kind)


if __name__ == "__main__":
    main(sys.argv[1:])
