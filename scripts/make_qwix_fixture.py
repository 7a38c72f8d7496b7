"""Write tests/data/qwix: a flax NNX model quantized by qwix (int8, int4, float8), saved with Orbax.

A small NNX model (an embedding, three ``nnx.Linear`` layers and a ``LayerNorm``) is quantized
for serving with qwix's post-training quantization, ``qwix.quantize_model(model,
qwix.PtqProvider(rules), x)``: one rule per layer, ``weight_qtype`` int8, int4 and
float8_e4m3fn. Each quantized kernel becomes qwix's ``WithAux`` of a ``QArray``: its ``qvalue``
(int8, int4 or float8_e4m3fn, the kernel's shape) and its ``scale`` (float32, one per output
channel). ``nnx.state(model)`` is saved with ``ocp.StandardCheckpointer`` into ``state/`` (an
Orbax item folder: ``_METADATA``, OCDBT, zarr2), as flax's NNX checkpointing guide does.

Run it in a throwaway environment, never in the project's own:

    python3.11 -m venv /tmp/venv_qwix
    /tmp/venv_qwix/bin/pip install qwix flax orbax-checkpoint   # versions: expected.json
    /tmp/venv_qwix/bin/python scripts/make_qwix_fixture.py tests/data/qwix

It writes ``expected.json``: for every stored leaf its dotted path (Orbax's keys of the state,
NNX's ``value`` boxes included), shape, dtype, and the float64 norm, minimum, maximum and sum of
the values in memory; the rule of each layer; and the versions. The script restores the
checkpoint with Orbax and checks the values bit for bit, and that the quantized model's output
is close to the float model's.
"""

import importlib.metadata
import json
import os
import shutil
import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import qwix
from flax import nnx

RULES = {"int8_proj": "int8", "int4_proj": "int4", "fp8_proj": "float8_e4m3fn"}


class Model(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.embed = nnx.Embed(32, 16, rngs=rngs)
        self.int8_proj = nnx.Linear(16, 64, rngs=rngs)
        self.int4_proj = nnx.Linear(64, 64, rngs=rngs)
        self.fp8_proj = nnx.Linear(64, 16, rngs=rngs)
        self.norm = nnx.LayerNorm(16, rngs=rngs)

    def __call__(self, tokens):
        x = self.embed(tokens)
        x = jax.nn.gelu(self.int8_proj(x))
        x = jax.nn.gelu(self.int4_proj(x))
        return self.norm(self.fp8_proj(x))


def keys_of(path) -> str:
    return ".".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


def main(out):
    out = os.path.abspath(out)
    path = os.path.join(out, "state")
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(out, exist_ok=True)
    model = Model(nnx.Rngs(0))
    tokens = jnp.arange(8).reshape(2, 4)
    reference = model(tokens)
    rules = [
        qwix.QuantizationRule(module_path=name, weight_qtype=qtype, act_qtype=None)
        for name, qtype in RULES.items()
    ]
    quantized = qwix.quantize_model(model, qwix.PtqProvider(rules), tokens)
    output = quantized(tokens)
    # int4 weights of a small layer: close, not equal
    assert float(jnp.max(jnp.abs(output - reference))) < 0.5, float(jnp.max(jnp.abs(output - reference)))
    state = nnx.state(quantized)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(path, state)
    checkpointer.wait_until_finished()

    leaves = {}
    flat = jax.tree_util.tree_flatten_with_path(state)[0]
    for key_path, leaf in flat:
        value = np.asarray(leaf)
        leaves[keys_of(key_path)] = {
            "shape": list(value.shape),
            "dtype": value.dtype.name,
            "norm": float(np.sqrt(np.sum(value.astype(np.float64) ** 2))),
            "min": float(value.astype(np.float64).min()),
            "max": float(value.astype(np.float64).max()),
            "sum": float(value.astype(np.float64).sum()),
        }
    restored = checkpointer.restore(path, jax.tree.map(ocp.utils.to_shape_dtype_struct, state))
    for (key_path, a), (_, b) in zip(jax.tree_util.tree_flatten_with_path(restored)[0], flat):
        a, b = np.asarray(a), np.asarray(b)
        assert a.dtype == b.dtype, (keys_of(key_path), a.dtype, b.dtype)
        np.testing.assert_array_equal(a.view(np.uint8), b.view(np.uint8), err_msg=keys_of(key_path))
    versions = {
        name: importlib.metadata.version(name)
        for name in ("qwix", "flax", "orbax-checkpoint", "jax", "jaxlib", "tensorstore", "numpy", "ml_dtypes")
    }
    with open(os.path.join(out, "expected.json"), "w") as f:
        json.dump({"versions": versions, "rules": RULES, "leaves": leaves}, f, indent=1, sort_keys=True)
    print("wrote", out, versions)
    for name, entry in sorted(leaves.items()):
        print(f"  {name}: {entry['dtype']}{entry['shape']}")


if __name__ == "__main__":
    main(sys.argv[1])
