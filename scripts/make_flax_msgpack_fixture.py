"""Write tests/data/flax_msgpack: legacy flax msgpack checkpoints (Orbax disabled).

``flax.training.checkpoints.save_checkpoint`` with ``flax_use_orbax_checkpointing`` off
writes one msgpack file ``checkpoint_<step>`` per step into one folder (steps 1 and 2,
``keep=2``). The target follows flax's checkpointing guide of 2023: ``{"model": TrainState,
"config": {...}, "data": (batch,)}`` (a tiny Embed + Dense + bf16 LayerNorm, optax adam);
tuples are stored as ``{"0": ...}``. To get a ``__msgpack_chunked_array__`` leaf from a
small array, the script lowers ``flax.serialization.MAX_CHUNK_SIZE`` (2**30 bytes in flax)
to 1024 bytes: the 64x8 float32 embedding (and its adam mu/nu, 2048 bytes each) is then
split into 2 flat chunks of 256 elements. Run it in a throwaway environment, never in the
project's own (the same one as scripts/make_orbax_0_4_fixture.py):

    python3 -m venv /tmp/env-uv && /tmp/env-uv/bin/pip install uv
    /tmp/env-uv/bin/uv venv -p python3.11 /tmp/env-orbax04
    /tmp/env-uv/bin/uv pip install --python /tmp/env-orbax04/bin/python \
        "orbax-checkpoint==0.4.8" "jax[cpu]==0.4.23" "jaxlib==0.4.23" "flax==0.7.5" \
        "numpy<2" "scipy<1.13" "tensorstore==0.1.51" "ml_dtypes==0.3.2" "chex==0.1.85" \
        "optax==0.1.7"
    /tmp/env-orbax04/bin/python scripts/make_flax_msgpack_fixture.py tests/data/flax_msgpack

(resolved: numpy 1.26.4, msgpack 1.2.4). Besides the checkpoints it writes ``expected.json``:
for every leaf of the stored state dict its dotted path, shape, dtype and float64 norm
computed with numpy from the values before they were saved (and ``value`` for scalars and
strings), plus the names of the chunked leaves. The script restores each step with flax
(with and without a target) and checks it against those values.
"""

import glob
import importlib.metadata
import json
import os
import sys
import warnings

import flax
import flax.linen as nn
import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import checkpoints, train_state

CHUNK_BYTES = 1024


class Model(nn.Module):
    @nn.compact
    def __call__(self, tokens):
        x = nn.Embed(64, 8)(tokens)
        x = nn.Dense(4)(x)
        return nn.LayerNorm(dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)(x)


def flat_state_dict(tree, prefix=""):
    """Leaves of a flax state dict (nested dicts) by dotted path; empty dicts are skipped."""
    out = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flat_state_dict(value, path + "."))
        else:
            out[path] = value
    return out


def describe(leaf):
    entry = {"python_type": type(leaf).__name__}
    if isinstance(leaf, str):
        entry.update(shape=[], dtype="str", value=leaf)
        return entry
    arr = np.asarray(leaf)
    entry.update(
        shape=list(arr.shape),
        dtype=arr.dtype.name,
        norm=float(np.sqrt(np.sum(arr.astype(np.float64) ** 2))),
    )
    if isinstance(leaf, (int, float)):
        entry["value"] = leaf
    return entry


def make_state():
    model = Model()
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((2, 3), jnp.int32))["params"]
    return train_state.TrainState.create(apply_fn=model.apply, params=params, tx=optax.adam(1e-2))


def train_step(state, tokens, y):
    def loss_fn(params):
        pred = state.apply_fn({"params": params}, tokens)
        return jnp.mean((pred.astype(jnp.float32) - y) ** 2)

    return state.apply_gradients(grads=jax.grad(loss_fn)(state.params))


def assert_same(restored, saved):
    assert sorted(restored) == sorted(saved), sorted(set(restored) ^ set(saved))
    for name, b in saved.items():
        a = restored[name]
        if isinstance(b, (str, int, float)):
            assert a == b and type(a) is type(b), (name, a, b)
            continue
        a, b = np.asarray(a), np.asarray(b)
        assert a.dtype == b.dtype and a.shape == b.shape, (name, a.dtype, b.dtype, a.shape)
        np.testing.assert_array_equal(a, b, err_msg=name)


def main(out):
    flax.config.update("flax_use_orbax_checkpointing", False)
    flax.serialization.MAX_CHUNK_SIZE = CHUNK_BYTES
    warnings.simplefilter("ignore", DeprecationWarning)
    ckpt_dir = os.path.abspath(os.path.join(out, "checkpoints"))
    for old in glob.glob(os.path.join(ckpt_dir, "checkpoint_*")):
        os.remove(old)
    os.makedirs(ckpt_dir, exist_ok=True)

    state = make_state()
    tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 3), 0, 64)
    y = jax.random.normal(jax.random.PRNGKey(2), (2, 3, 4))
    versions = {
        name: importlib.metadata.version(name)
        for name in ("flax", "jax", "jaxlib", "numpy", "msgpack", "optax")
    }
    expected = {
        "versions": versions,
        "max_chunk_size_bytes": CHUNK_BYTES,
        "steps": {},
    }
    saved = {}
    for _ in range(2):
        state = train_step(state, tokens, y)
        ckpt = {
            "model": state,
            "config": {"name": "tiny-embed", "learning_rate": 0.01},
            "data": (np.asarray(tokens),),
        }
        path = checkpoints.save_checkpoint(ckpt_dir, ckpt, step=state.step, keep=2)
        assert os.path.isfile(path), path
        flat = flat_state_dict(flax.serialization.to_state_dict(ckpt))
        # The stored names are the ones jax's key paths give the training code.
        key_paths = {
            ".".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", None)))) for k in p)
            for p, _ in jax.tree_util.tree_flatten_with_path(ckpt)[0]
        }
        assert key_paths == set(flat), set(flat) ^ key_paths
        saved[state.step] = flat
        leaves = {name: describe(leaf) for name, leaf in flat.items()}
        chunked = sorted(
            name
            for name, leaf in flat.items()
            if isinstance(leaf, jax.Array | np.ndarray) and leaf.nbytes > CHUNK_BYTES
        )
        for name in chunked:
            leaves[name]["msgpack_chunked"] = True
        expected["steps"][str(state.step)] = {"file": os.path.basename(path), "leaves": leaves}

    # Read back with the library that wrote it.
    names = sorted(os.listdir(ckpt_dir))
    assert names == ["checkpoint_1", "checkpoint_2"], names
    for step, flat in saved.items():
        raw = checkpoints.restore_checkpoint(ckpt_dir, target=None, step=step)
        assert_same(flat_state_dict(raw), flat)
        target = {
            "model": make_state(),
            "config": {"name": "", "learning_rate": 0.0},
            "data": (np.zeros((2, 3), np.int32),),
        }
        restored = checkpoints.restore_checkpoint(ckpt_dir, target=target, step=step)
        assert isinstance(restored["data"], tuple) and restored["model"].step == step
        assert_same(flat_state_dict(flax.serialization.to_state_dict(restored)), flat)
        print("step", step, "restored:", len(flat), "leaves")
    with open(os.path.join(out, "expected.json"), "w") as f:
        json.dump(expected, f, indent=1, sort_keys=True)
    print("wrote", out, "with flax", flax.__version__)


if __name__ == "__main__":
    main(sys.argv[1])
