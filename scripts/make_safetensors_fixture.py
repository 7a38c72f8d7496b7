"""Write tests/data/safetensors: safetensors files written by the safetensors package itself.

Three variants of one tiny Llama-like state dict (HF-style dotted names such as
``model.layers.0.mlp.up_proj.weight``; float32, bfloat16 and float8_e4m3fn tensors, FP8
weights with a float32 ``weight_scale`` as in HF's FP8 checkpoints):

- ``single/model.safetensors``: ``safetensors.torch.save_file(tensors, path, metadata=...)``
  with a ``__metadata__`` of string pairs;
- ``sharded/``: ``huggingface_hub.save_torch_state_dict(state_dict, dir, max_shard_size=...)``,
  the function transformers-style code uses, which writes ``model-00001-of-00002.safetensors``,
  ``model-00002-of-00002.safetensors`` with ``safetensors.torch.save_file`` and
  ``model.safetensors.index.json``;
- ``numpy/model.safetensors``: ``safetensors.numpy.save_file`` (float32, float16, int64, bool;
  the numpy API of safetensors 0.8.0 has no bfloat16 or float8).

Run it in a throwaway environment, never in the project's own (torch 2.13.0 comes from the
machine's local wheel):

    python3 -m venv /tmp/env-safetensors
    /tmp/env-safetensors/bin/pip install "torch==2.13.0" "safetensors==0.8.0" \
        "huggingface_hub==2.4.0" "numpy==2.4.6" "ml_dtypes==0.6.0"
    /tmp/env-safetensors/bin/python scripts/make_safetensors_fixture.py tests/data/safetensors

Besides the files it writes ``expected.json``: per variant, for every tensor its name, shape,
dtype name (numpy/ml_dtypes spelling and the safetensors header code) and float64 norm,
computed from the values before they were saved; the float64 norm is computed twice (torch,
and ml_dtypes over the raw bytes) and must agree. The script reads every file back with
safetensors (and the index with huggingface_hub's loader) and checks the values.
"""

import importlib.metadata
import json
import os
import shutil
import sys

import huggingface_hub
import ml_dtypes
import numpy as np
import safetensors.numpy
import safetensors.torch
import torch
from safetensors import safe_open

HIDDEN, INTER, VOCAB = 16, 32, 48

NP_DTYPES = {
    torch.float32: (np.float32, "float32", "F32"),
    torch.bfloat16: (ml_dtypes.bfloat16, "bfloat16", "BF16"),
    torch.float8_e4m3fn: (ml_dtypes.float8_e4m3fn, "float8_e4m3fn", "F8_E4M3"),
}


def fp8(shape, gen):
    """A float8_e4m3fn weight and its float32 per-tensor scale, as FP8 checkpoints store them."""
    w = torch.randn(shape, generator=gen)
    scale = w.abs().max() / 448.0
    return (w / scale).to(torch.float8_e4m3fn), scale.reshape(()).to(torch.float32)


def make_state_dict():
    gen = torch.Generator().manual_seed(0)
    sd = {
        "model.embed_tokens.weight": torch.randn(VOCAB, HIDDEN, generator=gen).to(torch.bfloat16),
        "model.layers.0.input_layernorm.weight": 1 + 0.1 * torch.randn(HIDDEN, generator=gen),
        "model.layers.0.self_attn.q_proj.weight": torch.randn(HIDDEN, HIDDEN, generator=gen).to(
            torch.bfloat16
        ),
        "model.layers.0.self_attn.o_proj.weight": torch.randn(HIDDEN, HIDDEN, generator=gen).to(
            torch.bfloat16
        ),
        "model.layers.0.post_attention_layernorm.weight": 1 + 0.1 * torch.randn(HIDDEN, generator=gen),
    }
    for name, shape in (("up_proj", (INTER, HIDDEN)), ("down_proj", (HIDDEN, INTER))):
        w, s = fp8(shape, gen)
        sd[f"model.layers.0.mlp.{name}.weight"] = w
        sd[f"model.layers.0.mlp.{name}.weight_scale"] = s
    sd["model.norm.weight"] = 1 + 0.1 * torch.randn(HIDDEN, generator=gen)
    sd["lm_head.weight"] = torch.randn(VOCAB, HIDDEN, generator=gen).to(torch.bfloat16)
    return sd


def describe_torch(t):
    np_dtype, name, code = NP_DTYPES[t.dtype]
    norm = float(torch.linalg.vector_norm(t.to(torch.float64).reshape(-1)))
    # The same norm from the raw bytes through ml_dtypes, as a reader without torch sees them.
    raw = t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    arr = np.frombuffer(raw, dtype=np_dtype).astype(np.float64)
    norm_np = float(np.sqrt(np.sum(arr**2)))
    assert abs(norm - norm_np) <= 1e-12 * max(1.0, norm), (norm, norm_np)
    return {"shape": list(t.shape), "dtype": name, "safetensors_dtype": code, "norm": norm_np}


def describe_np(a):
    codes = {"float32": "F32", "float16": "F16", "int64": "I64", "bool": "BOOL"}
    return {
        "shape": list(a.shape),
        "dtype": a.dtype.name,
        "safetensors_dtype": codes[a.dtype.name],
        "norm": float(np.sqrt(np.sum(a.astype(np.float64) ** 2))),
    }


def header(path):
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        return n, json.loads(f.read(n))


def same_torch(a, b, name):
    assert a.dtype == b.dtype and a.shape == b.shape, (name, a.dtype, b.dtype)
    assert torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)), name


def main(out):
    for sub in ("single", "sharded", "numpy"):
        shutil.rmtree(os.path.join(out, sub), ignore_errors=True)
        os.makedirs(os.path.join(out, sub))
    sd = make_state_dict()
    versions = {
        name: importlib.metadata.version(name)
        for name in ("safetensors", "torch", "huggingface_hub", "numpy", "ml_dtypes")
    }
    expected = {"versions": versions, "variants": {}}

    # 1. One file with __metadata__.
    single = os.path.join(out, "single", "model.safetensors")
    metadata = {"format": "pt", "model_type": "tiny-llama", "step": "100"}
    safetensors.torch.save_file(sd, single, metadata=metadata)
    expected["variants"]["single"] = {
        "files": ["model.safetensors"],
        "metadata": metadata,
        "tensors": {name: describe_torch(t) for name, t in sd.items()},
    }

    # 2. A sharded set with its index, written by huggingface_hub (2 shards).
    sharded = os.path.join(out, "sharded")
    # huggingface_hub fills shards greedily in key order: a limit of max(prefix, rest) bytes
    # at the most even split gives exactly 2 shards.
    sizes = [t.numel() * t.element_size() for t in sd.values()]
    limit = min(max(sum(sizes[:k]), sum(sizes[k:])) for k in range(1, len(sizes)))
    huggingface_hub.save_torch_state_dict(
        sd, sharded, max_shard_size=limit, metadata={"model_type": "tiny-llama"}
    )
    files = sorted(os.listdir(sharded))
    assert files == [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "model.safetensors.index.json",
    ], files
    with open(os.path.join(sharded, "model.safetensors.index.json")) as f:
        index = json.load(f)
    expected["variants"]["sharded"] = {
        "files": files,
        "weight_map": index["weight_map"],
        "index_metadata": index["metadata"],
        "tensors": {name: describe_torch(t) for name, t in sd.items()},
    }

    # 3. The numpy API (no bf16/fp8 there).
    rng = np.random.default_rng(0)
    np_tensors = {
        "encoder.layer.0.attention.self.query.weight": rng.standard_normal((8, 8)).astype(np.float32),
        "encoder.layer.0.attention.self.query.bias": rng.standard_normal(8).astype(np.float16),
        "embeddings.position_ids": np.arange(12, dtype=np.int64).reshape(1, 12),
        "encoder.layer.0.attention.mask": rng.standard_normal((4, 4)) > 0,
    }
    np_path = os.path.join(out, "numpy", "model.safetensors")
    safetensors.numpy.save_file(np_tensors, np_path, metadata={"format": "np"})
    expected["variants"]["numpy"] = {
        "files": ["model.safetensors"],
        "metadata": {"format": "np"},
        "tensors": {name: describe_np(a) for name, a in np_tensors.items()},
    }

    # Read back with the libraries that wrote them.
    with safe_open(single, framework="pt") as f:
        assert f.metadata() == metadata, f.metadata()
        assert sorted(f.keys()) == sorted(sd)
        for name in f.keys():
            same_torch(f.get_tensor(name), sd[name], name)
    loaded = {}
    for shard in sorted(set(index["weight_map"].values())):
        with safe_open(os.path.join(sharded, shard), framework="pt") as f:
            assert f.metadata() == {"format": "pt"}, f.metadata()
            for name in f.keys():
                assert index["weight_map"][name] == shard
                loaded[name] = f.get_tensor(name)
    assert sorted(loaded) == sorted(sd)
    for name, t in loaded.items():
        same_torch(t, sd[name], name)
    model_dict = huggingface_hub.load_state_dict_from_file(
        os.path.join(sharded, "model-00001-of-00002.safetensors")
    )
    assert set(model_dict) <= set(sd)
    back = safetensors.numpy.load_file(np_path)
    for name, a in np_tensors.items():
        assert back[name].dtype == a.dtype
        np.testing.assert_array_equal(back[name], a)
    for sub, name in (("single", "model.safetensors"), ("numpy", "model.safetensors")):
        n, head = header(os.path.join(out, sub, name))
        print(sub, "header bytes", n, "metadata", head.get("__metadata__"))

    with open(os.path.join(out, "expected.json"), "w") as f:
        json.dump(expected, f, indent=1, sort_keys=True)
    print("wrote", out, versions)


if __name__ == "__main__":
    main(sys.argv[1])
