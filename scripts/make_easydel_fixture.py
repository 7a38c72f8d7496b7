"""Write tests/data/easydel: EasyDeL's ``save_pretrained`` of a tiny Llama (its own layout).

``easydel.LlamaForCausalLM`` with the smallest sensible config (vocab 64, hidden 16,
intermediate 32, 2 layers, 2 heads, 1 KV head, head_dim 8; float32 params, ``Rngs(0)``)
saved with ``model.save_pretrained(dir)`` into ``float32/``, and the same model built with
``param_dtype=jnp.bfloat16`` saved into ``bfloat16/``. (``save_pretrained(dir,
float_dtype=jnp.bfloat16)`` of the float32 model still writes float32: eformer applies the
cast only when gathering; the script checks that in a scratch folder and prints what it
found.) EasyDeL 0.3.0 writes its own TensorStore
layout through eformer (one zarr v2 folder per array, ``tensorstore_index.json``), not Orbax.
Run it in a throwaway environment, never in the project's own (easydel 0.3.0 imports
``PIL`` and ``torch`` without declaring them; torch 2.13.0 comes from the local wheel):

    python3 -m venv /tmp/env-uv && /tmp/env-uv/bin/pip install uv
    /tmp/env-uv/bin/uv venv -p python3.11 /tmp/env-easydel
    /tmp/env-uv/bin/uv pip install --python /tmp/env-easydel/bin/python \
        --find-links /opt/wheels "easydel==0.3.0" pillow "torch==2.13.0"
    /tmp/env-easydel/bin/python scripts/make_easydel_fixture.py tests/data/easydel

(resolved: jax/jaxlib 0.9.2, flax 0.12.3, eformer 0.0.99.12, orbax-checkpoint 0.12.8,
tensorstore 0.1.86, numpy 2.3.5, transformers 5.5.4). Besides the checkpoints it writes
``expected.json``: for every parameter its dotted name (the keys of
``nnx.split(model, nnx.Param, ...)[1].to_pure_dict()`` joined by "."), the path EasyDeL
stores it under, shape, dtype and float64 norm computed with numpy from the values saved.
The script loads both folders back with ``LlamaForCausalLM.from_pretrained`` and compares.
"""

import importlib.metadata
import json
import os
import shutil
import sys
import tempfile

import easydel as ed
import flax
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np


def make_config():
    return ed.LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        max_position_embeddings=32,
    )


def make_model(param_dtype):
    return ed.LlamaForCausalLM(
        config=make_config(),
        dtype=jnp.float32,
        param_dtype=param_dtype,
        precision=None,
        rngs=flax.nnx.Rngs(0),
    )


def params_of(model):
    state = flax.nnx.split(model, flax.nnx.Param, ...)[1].to_pure_dict()
    return {
        ".".join(str(getattr(k, "key", getattr(k, "idx", None))) for k in path): np.asarray(leaf)
        for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]
    }


def describe(params):
    return {
        name: {
            "stored_path": "model/" + name.replace(".", "/"),
            "shape": list(arr.shape),
            "dtype": arr.dtype.name,
            "norm": float(np.sqrt(np.sum(arr.astype(np.float64) ** 2))),
        }
        for name, arr in params.items()
    }


def main(out):
    for sub in ("float32", "bfloat16"):
        shutil.rmtree(os.path.join(out, sub), ignore_errors=True)
    os.makedirs(out, exist_ok=True)
    out = os.path.abspath(out)
    model = make_model(jnp.float32)
    params = params_of(model)
    model.save_pretrained(os.path.join(out, "float32"))
    model_bf16 = make_model(jnp.bfloat16)
    bf16 = params_of(model_bf16)
    assert all(arr.dtype == ml_dtypes.bfloat16 for arr in bf16.values())
    model_bf16.save_pretrained(os.path.join(out, "bfloat16"))
    with tempfile.TemporaryDirectory() as scratch:
        model.save_pretrained(scratch, float_dtype=jnp.bfloat16)
        with open(os.path.join(scratch, "model", "lm_head", "kernel", ".zarray")) as f:
            zarr_dtype = json.load(f)["dtype"]
        print("save_pretrained(float_dtype=bfloat16) of float32 params wrote zarr dtype", zarr_dtype)

    versions = {
        name: importlib.metadata.version(name)
        for name in ("easydel", "eformer", "jax", "jaxlib", "flax", "tensorstore", "numpy")
    }
    expected = {
        "versions": versions,
        "variants": {
            "float32": {"save_pretrained": {}, "param_dtype": "float32", "params": describe(params)},
            "bfloat16": {"save_pretrained": {}, "param_dtype": "bfloat16", "params": describe(bf16)},
        },
    }

    # Read back with the library that wrote it.
    for sub, want in (("float32", params), ("bfloat16", bf16)):
        with open(os.path.join(out, sub, "tensorstore_index.json")) as f:
            index = json.load(f)
        stored = {e["path"]: e for e in index["prefixes"]["model"]}
        for info in expected["variants"][sub]["params"].values():
            entry = stored[info["stored_path"]]
            assert entry["shape"] == info["shape"] and entry["dtype"] == info["dtype"], entry
        loaded = ed.LlamaForCausalLM.from_pretrained(
            os.path.join(out, sub),
            dtype=jnp.float32,
            param_dtype=want[next(iter(want))].dtype,
            auto_shard_model=False,
            verbose=False,
        )
        got = params_of(loaded)
        assert sorted(got) == sorted(want), sorted(set(got) ^ set(want))
        for name, arr in want.items():
            assert got[name].dtype == arr.dtype and got[name].shape == arr.shape, name
            np.testing.assert_array_equal(got[name], arr, err_msg=f"{sub}:{name}")
        print(sub, "restored", len(got), "params")

    with open(os.path.join(out, "expected.json"), "w") as f:
        json.dump(expected, f, indent=1, sort_keys=True)
    print("wrote", out, versions)


if __name__ == "__main__":
    main(sys.argv[1])
