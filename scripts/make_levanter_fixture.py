"""Write tests/data/levanter: a run saved by Levanter's own ``Checkpointer``.

A tiny haliax model (an embedding, eleven ``hax.nn.Linear`` layers in a list, so that the paths
``model.layers.0`` ... ``model.layers.10`` test numeric order, and a bf16 head) trained a few
steps with optax adam; ``levanter.checkpoint.Checkpointer.on_step`` saves steps 2, 4 and 6 as
``run/step-<N>/`` (``model/`` and ``training_state/`` zarr trees, ``metadata.json`` written last,
``worker-0.cert``). Afterwards ``run/step-6/metadata.json`` is deleted: the step then looks as a
save interrupted before its last write does (Levanter writes metadata.json once every array is
stored, and only folders with one are checkpoints to its ``discover_latest_checkpoint``).

Levanter 1.1 pins old jax (its haliax needs ``jax.random.KeyArray``), so it runs in its own
environment, never the project's:

    python3.11 -m venv /tmp/venv_lev
    /tmp/venv_lev/bin/pip install "jax==0.4.13" "jaxlib==0.4.13" "numpy==1.25.2" \
        "ml_dtypes==0.2.0" "tensorstore==0.1.45" "equinox==0.10.11" "jaxtyping==0.2.20" \
        "haliax==1.2" "optax==0.1.7" "chex==0.1.82" "fsspec==2023.3.0" "pyarrow<15" ...
    /tmp/venv_lev/bin/pip install --no-deps "levanter==1.1"   # and the modules it imports
    /tmp/venv_lev/bin/python scripts/make_levanter_fixture.py tests/data/levanter

It writes ``expected.json``: per step, every array by the dotted name paramscope shows (Levanter's
own ``leaf_key_paths``, with the tree's top folder, ``model`` or ``training_state``, first), its
shape, dtype and float64 norm of the values in memory before the save; and the versions.
"""

import importlib.metadata
import json
import os
import shutil
import sys
import types

import equinox as eqx
import haliax as hax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from levanter.checkpoint import Checkpointer, CheckpointInterval, load_checkpoint
from levanter.utils.jax_utils import leaf_key_paths

Embed, Hidden, Out = hax.Axis("embed", 6), hax.Axis("hidden", 6), hax.Axis("out", 3)


class Tiny(eqx.Module):
    embed: hax.NamedArray
    layers: list
    head: hax.nn.Linear

    @staticmethod
    def init(key):
        keys = jax.random.split(key, 13)
        embed = hax.random.normal(keys[0], (Embed,)) * 0.5
        layers = [
            hax.nn.Linear.init(In=Embed if i % 2 == 0 else Hidden, Out=Hidden if i % 2 == 0 else Embed, key=k)
            for i, k in enumerate(keys[1:12])
        ]
        head = hax.nn.Linear.init(In=Hidden, Out=Out, key=keys[12])
        head = eqx.tree_at(lambda h: h.weight, head, head.weight.astype(jnp.bfloat16))
        return Tiny(embed, layers, head)

    def __call__(self, x):
        x = x + self.embed
        for layer in self.layers:
            x = hax.tanh(layer(x))
        return self.head(x.astype(jnp.bfloat16)).astype(jnp.float32)


def named(tree):
    """(dotted name, numpy value) of every array leaf, as Levanter names its folders."""
    is_leaf = lambda x: isinstance(x, hax.NamedArray)  # noqa: E731
    paths = jax.tree_util.tree_leaves(leaf_key_paths(tree, is_leaf=is_leaf), is_leaf=lambda x: x is None)
    leaves = jax.tree_util.tree_leaves(tree, is_leaf=is_leaf)
    assert len(paths) == len(leaves)
    out = {}
    for path, leaf in zip(paths, leaves):
        if leaf is None:
            continue
        value = np.asarray(leaf.array if isinstance(leaf, hax.NamedArray) else leaf)
        out[path] = value
    return out


def describe(tree):
    return {
        name: {
            "shape": list(value.shape),
            "dtype": value.dtype.name,
            "norm": float(np.sqrt(np.sum(value.astype(np.float64) ** 2))),
        }
        for name, value in named(tree).items()
    }


def main(out):
    out = os.path.abspath(out)
    root = os.path.join(out, "run")
    shutil.rmtree(root, ignore_errors=True)
    os.makedirs(out, exist_ok=True)
    model = Tiny.init(jax.random.PRNGKey(0))
    opt = optax.adam(1e-2)
    opt_state = opt.init(eqx.filter(model, eqx.is_array))
    x = hax.random.normal(jax.random.PRNGKey(1), (Embed,))
    key = jax.random.PRNGKey(2)

    def loss_fn(m):
        return hax.sum(m(x) ** 2).scalar()

    checkpointer = Checkpointer(root, save_interval=None, step_policies=[CheckpointInterval(every=2)])
    steps = {}
    for step in range(1, 7):
        grads = eqx.filter_grad(loss_fn)(model)
        updates, opt_state = opt.update(grads, opt_state, eqx.filter(model, eqx.is_array))
        model = eqx.apply_updates(model, updates)
        key, _ = jax.random.split(key)
        info = types.SimpleNamespace(step=step, model=model, opt_state=opt_state, next_key=key)
        checkpointer.on_step(info)
        if step % 2 == 0:
            saved = {"model": model, "training_state": (opt_state, key)}
            leaves = {}
            for top, tree in saved.items():
                leaves.update({f"{top}.{k}": v for k, v in describe(tree).items()})
            steps[str(step)] = {"folder": f"step-{step}", "leaves": leaves}
            restored = load_checkpoint(
                model, (opt_state, key), os.path.join(root, f"step-{step}"), discover_latest=False
            )
            got_model, _, got_step = restored
            assert got_step == step, (got_step, step)
            for name, value in named(got_model).items():
                np.testing.assert_array_equal(value, named(model)[name], err_msg=name)
            with open(os.path.join(root, f"step-{step}", "metadata.json")) as f:
                steps[str(step)]["metadata"] = json.load(f)
    # step 6 as a save interrupted before its last write
    os.remove(os.path.join(root, "step-6", "metadata.json"))
    steps["6"]["finished"] = False
    versions = {
        name: importlib.metadata.version(name)
        for name in ("levanter", "haliax", "equinox", "jax", "jaxlib", "tensorstore", "numpy", "optax")
    }
    with open(os.path.join(out, "expected.json"), "w") as f:
        json.dump({"versions": versions, "steps": steps}, f, indent=1, sort_keys=True)
    print("wrote", out, versions)


if __name__ == "__main__":
    main(sys.argv[1])
