"""Write tests/data/equinox: Equinox files written by ``eqx.tree_serialise_leaves`` itself.

A tiny model (an ``eqx.nn.MLP`` in float32, a bfloat16 ``eqx.nn.Linear`` and a Python float
and int field) saved two ways:

- ``model.eqx``: ``eqx.tree_serialise_leaves(path, model)``;
- ``with_hyperparameters.eqx``: equinox's documented pattern for hyperparameters, a JSON line
  and then ``tree_serialise_leaves`` into the same open file.

Run it in a throwaway environment, never in the project's own:

    python3 -m venv /tmp/eqxenv
    /tmp/eqxenv/bin/pip install "equinox==0.13.*" "jax[cpu]"
    /tmp/eqxenv/bin/python scripts/make_equinox_fixture.py tests/data/equinox

Besides the files it writes ``expected.json``: for every saved leaf, by its position (the order
of ``jax.tree_util.tree_leaves`` over the leaves equinox saves), its shape, dtype name and
float64 norm computed from the in-memory values; and the hyperparameters. The script reads each
file back with ``eqx.tree_deserialise_leaves`` and compares the values bit for bit.
"""

import importlib.metadata
import json
import os
import sys

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

HYPERPARAMETERS = {"in_size": 4, "width_size": 8, "depth": 2, "out_size": 3, "seed": 0}


class Model(eqx.Module):
    mlp: eqx.nn.MLP
    head: eqx.nn.Linear
    temperature: float
    steps: int


def make(key):
    one, two = jax.random.split(key)
    h = HYPERPARAMETERS
    mlp = eqx.nn.MLP(h["in_size"], h["out_size"], h["width_size"], h["depth"], key=one)
    head = eqx.nn.Linear(h["out_size"], 2, key=two, dtype=jnp.bfloat16)
    return Model(mlp, head, 0.5, 1000)


def saved_leaves(model):
    """The leaves equinox saves (arrays and Python numbers), in its order."""
    return [
        x for x in jax.tree_util.tree_leaves(model) if eqx.is_array(x) or isinstance(x, (bool, int, float))
    ]


def main(out: str) -> None:
    os.makedirs(out, exist_ok=True)
    model = make(jax.random.key(HYPERPARAMETERS["seed"]))
    eqx.tree_serialise_leaves(os.path.join(out, "model.eqx"), model)
    with open(os.path.join(out, "with_hyperparameters.eqx"), "wb") as f:
        f.write((json.dumps(HYPERPARAMETERS) + "\n").encode())
        eqx.tree_serialise_leaves(f, model)

    leaves = {}
    for index, leaf in enumerate(saved_leaves(model)):
        value = np.asarray(leaf)
        leaves[str(index)] = {
            "shape": list(value.shape),
            "dtype": value.dtype.name,
            "norm": float(np.sqrt(np.sum(value.astype(np.float64) ** 2))),
        }

    like = make(jax.random.key(1))
    for name in ("model.eqx", "with_hyperparameters.eqx"):
        with open(os.path.join(out, name), "rb") as f:
            if name != "model.eqx":
                assert json.loads(f.readline()) == HYPERPARAMETERS
            back = eqx.tree_deserialise_leaves(f, like)
        for a, b in zip(saved_leaves(model), saved_leaves(back), strict=True):
            assert (
                np.asarray(a).tobytes() == np.asarray(b).tobytes()
                and np.asarray(a).dtype == np.asarray(b).dtype
            )

    versions = {p: importlib.metadata.version(p) for p in ("equinox", "jax", "jaxlib", "numpy", "ml_dtypes")}
    doc = {"versions": versions, "hyperparameters": HYPERPARAMETERS, "leaves": leaves}
    with open(os.path.join(out, "expected.json"), "w") as f:
        json.dump(doc, f, indent=1, sort_keys=True)
        f.write("\n")
    print(json.dumps(versions), len(leaves), "leaves")


if __name__ == "__main__":
    main(sys.argv[1])
