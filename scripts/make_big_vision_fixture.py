"""Write tests/data/big_vision: ``.npz`` checkpoints as big_vision's ``utils.save_checkpoint``
writes them.

big_vision (google-research/big_vision, ``big_vision/utils.py``) flattens the checkpoint pytree
into ``{"params/embedding/kernel": array, ...}`` (dict keys sorted, joined by ``/``; list
entries by index) and writes ``np.savez`` (or, with ``compressed=True``,
``np.savez_compressed``) of it to a buffer, then to ``<path>-TEMPORARY``, renamed to ``<path>``.
This script does the same with its own few lines (big_vision itself is not on PyPI), for a tiny
ViT-like checkpoint: float32 params, bfloat16 params (stored by numpy as the 2-byte void
``<V2``, which big_vision's ``recover_dtype`` reads back as bfloat16), an optimizer state and an
int step.

- ``checkpoint.npz``: ``np.savez`` (members ``ZIP_STORED``);
- ``checkpoint_compressed.npz``: ``np.savez_compressed`` (members deflated).

Run it in a throwaway environment, never in the project's own:

    python3 -m venv /tmp/bvenv
    /tmp/bvenv/bin/pip install "jax[cpu]" numpy ml_dtypes
    /tmp/bvenv/bin/python scripts/make_big_vision_fixture.py tests/data/big_vision

Besides the files it writes ``expected.json``: for every array its dotted path (``/`` read as
``.``), shape, dtype name and float64 norm computed from the in-memory values; each file is read
back with ``np.load(allow_pickle=False)`` plus ``recover_dtype`` and compared bit for bit.
"""

import importlib.metadata
import io
import json
import os
import sys
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

WIDTH, MLP, PATCH, CLASSES, DEPTH = 32, 64, 4, 10, 2


def traverse_with_names(tree, prefix=""):
    """(name, leaf) pairs as big_vision's ``tree_flatten_with_names`` names them."""
    if isinstance(tree, Mapping):
        for key in sorted(tree):
            yield from traverse_with_names(tree[key], f"{prefix}{key}/")
    elif isinstance(tree, (list, tuple)):
        for index, value in enumerate(tree):
            yield from traverse_with_names(value, f"{prefix}{index}/")
    else:
        yield prefix.rstrip("/"), tree


def save_checkpoint(checkpoint, path, compressed=False):
    """big_vision's save: savez of the flattened tree into a buffer, then a rename into place."""
    names_and_vals = list(traverse_with_names(checkpoint))
    buffer = io.BytesIO()
    save = np.savez_compressed if compressed else np.savez
    save(buffer, **{k: np.asarray(v) for k, v in names_and_vals})
    with open(path + "-TEMPORARY", "wb") as f:
        f.write(buffer.getvalue())
    os.replace(path + "-TEMPORARY", path)


def recover_dtype(a):
    """How big_vision reads the file back: a 2-byte void is bfloat16."""
    if a.dtype.type is np.void:
        assert a.itemsize == 2
        return a.view(jnp.bfloat16)
    return a


def make_checkpoint():
    keys = iter(jax.random.split(jax.random.key(0), 64))

    def normal(shape, dtype=jnp.float32, scale=0.1):
        return (jax.random.normal(next(keys), shape) * scale).astype(dtype)

    blocks = {}
    for i in range(DEPTH):
        blocks[f"encoderblock_{i}"] = {
            "LayerNorm_0": {"scale": 1 + normal((WIDTH,)), "bias": normal((WIDTH,))},
            "MultiHeadDotProductAttention_0": {
                name: {"kernel": normal((WIDTH, 2, WIDTH // 2)), "bias": normal((2, WIDTH // 2))}
                for name in ("query", "key", "value")
            },
            "MlpBlock_0": {
                "Dense_0": {
                    "kernel": normal((WIDTH, MLP), jnp.bfloat16),
                    "bias": normal((MLP,), jnp.bfloat16),
                },
                "Dense_1": {
                    "kernel": normal((MLP, WIDTH), jnp.bfloat16),
                    "bias": normal((WIDTH,), jnp.bfloat16),
                },
            },
        }
    params = {
        "embedding": {"kernel": normal((PATCH, PATCH, 3, WIDTH)), "bias": normal((WIDTH,))},
        "cls": normal((1, 1, WIDTH)),
        "Transformer": {**blocks, "encoder_norm": {"scale": 1 + normal((WIDTH,)), "bias": normal((WIDTH,))}},
        "head": {"kernel": normal((WIDTH, CLASSES)), "bias": jnp.zeros((CLASSES,))},
    }
    opt = {
        "mu": jax.tree.map(lambda p: normal(p.shape, jnp.float32, 0.01), params["head"]),
        "count": jnp.int32(42),
    }
    return {"params": params, "opt": [opt], "step": np.int64(42)}


def main(out: str) -> None:
    os.makedirs(out, exist_ok=True)
    checkpoint = make_checkpoint()
    save_checkpoint(checkpoint, os.path.join(out, "checkpoint.npz"))
    save_checkpoint(checkpoint, os.path.join(out, "checkpoint_compressed.npz"), compressed=True)

    arrays = {}
    for name, value in traverse_with_names(checkpoint):
        value = np.asarray(value)
        arrays[name.replace("/", ".")] = {
            "shape": list(value.shape),
            "dtype": value.dtype.name,
            "stored_dtype": np.lib.format.dtype_to_descr(value.dtype),
            "norm": float(np.sqrt(np.sum(value.astype(np.float64) ** 2))),
        }
    for file in ("checkpoint.npz", "checkpoint_compressed.npz"):
        with np.load(os.path.join(out, file), allow_pickle=False) as loaded:
            back = {k: recover_dtype(loaded[k]) for k in loaded.files}
        for name, value in traverse_with_names(checkpoint):
            value = np.asarray(value)
            assert back[name].dtype == value.dtype and back[name].tobytes() == value.tobytes(), name

    versions = {p: importlib.metadata.version(p) for p in ("jax", "numpy", "ml_dtypes")}
    doc = {"versions": versions, "arrays": arrays}
    with open(os.path.join(out, "expected.json"), "w") as f:
        json.dump(doc, f, indent=1, sort_keys=True)
        f.write("\n")
    print(json.dumps(versions), len(arrays), "arrays")


if __name__ == "__main__":
    main(sys.argv[1])
