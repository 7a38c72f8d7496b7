"""Write tests/data/gemma: the Gemma library's ``gm.ckpts.save_params`` of a tiny Gemma 3 model.

A ``gm.nn.Transformer`` with a tiny Gemma-3-style ``gm.nn.config.TransformerConfig`` (vocab
32, embed 8, hidden 16, 2 heads of 4, 1 KV head, 2 layers: one local sliding-window, one
global; QK norm, post-attention and post-FFW norms, transposed gating einsum), its params from
``model.init(jax.random.key(0), tokens)["params"]`` (random: no weights are downloaded), saved
with ``gm.ckpts.save_params(params, dir, wait_until_finished=True)`` twice: as initialized
(Gemma creates its params in bfloat16, the dtype of its released checkpoints) into
``bfloat16/``, and cast to float32 (float32 master weights) into ``float32/``. Run it in a
throwaway environment, never in the project's own (gemma 4.0.1 needs Python >= 3.11;
sentencepiece 0.2.3, which resolves by default, was generated with protobuf 7 while xmanager,
a kauldron dependency, caps protobuf below 7, and importing ``gm.nn.config`` then fails with
``VersionError: Detected incompatible Protobuf Gencode/Runtime versions ... gencode 7.36.1
runtime 6.33.6``; sentencepiece 0.2.1 works):

    python3 -m venv /tmp/env-uv && /tmp/env-uv/bin/pip install uv
    /tmp/env-uv/bin/uv venv -p python3.12 /tmp/env-gemma
    /tmp/env-uv/bin/uv pip install --python /tmp/env-gemma/bin/python gemma==4.0.1 sentencepiece==0.2.1
    /tmp/env-gemma/bin/python scripts/make_gemma_fixture.py tests/data/gemma

(resolved: gemma 4.0.1, kauldron 1.4.4, jax/jaxlib 0.12.0.1, flax 0.12.12, orbax-checkpoint
0.12.8, tensorstore 0.1.86, numpy 2.5.5). Besides the checkpoints it writes ``expected.json``:
for every param its dotted path (the keys of the ``params`` dict joined by "."), shape, dtype
and float64 norm computed with numpy from the tree passed to ``save_params``. The script loads
both folders back with ``gm.ckpts.load_params(dir)`` and compares bit for bit.
"""

import importlib.metadata
import json
import os
import shutil
import sys

os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from gemma import gm  # noqa: E402


def dotted(path):
    keys = []
    for key in path:
        for attr in ("key", "idx", "name"):
            if hasattr(key, attr):
                keys.append(str(getattr(key, attr)))
                break
    return ".".join(keys)


def describe(tree):
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        arr = np.asarray(leaf)
        out[dotted(path)] = {
            "shape": list(arr.shape),
            "dtype": arr.dtype.name,
            "norm": float(np.sqrt(np.sum(arr.astype(np.float64) ** 2))),
        }
    return out


def make_model():
    attention = gm.nn.config.AttentionType
    config = gm.nn.config.TransformerConfig(
        final_logit_softcap=None,
        num_embed=32,
        embed_dim=8,
        hidden_dim=16,
        num_heads=2,
        head_dim=4,
        num_kv_heads=1,
        use_post_attn_norm=True,
        use_post_ffw_norm=True,
        use_qk_norm=True,
        attention_types=(attention.LOCAL_SLIDING, attention.GLOBAL),
        query_pre_attn_norm=gm.nn.config.QueryPreAttentionNormalisation.BY_ONE_OVER_SQRT_HEAD_DIM,
        attn_logits_soft_cap=None,
        sliding_window_size=4,
        transpose_gating_einsum=True,
        local_base_frequency=10_000,
        global_base_frequency=1_000_000,
        vision_encoder=None,
    )
    return gm.nn.Transformer(config=config)


def main(out):
    os.makedirs(out, exist_ok=True)
    model = make_model()
    tokens = jnp.zeros((1, 6), dtype=jnp.int32)
    params = model.init(jax.random.key(0), tokens)["params"]
    # Gemma's modules create their params in bfloat16 (the Transformer's dtype).
    assert {x.dtype for x in jax.tree_util.tree_leaves(params)} == {jnp.dtype(jnp.bfloat16)}
    variants = {
        "bfloat16": params,
        "float32": jax.tree_util.tree_map(lambda x: x.astype(jnp.float32), params),
    }
    versions = {
        name: importlib.metadata.version(name)
        for name in ("gemma", "kauldron", "jax", "jaxlib", "flax", "orbax-checkpoint", "tensorstore", "numpy")
    }
    expected = {"versions": versions, "checkpoints": {}}
    for name, tree in variants.items():
        path = os.path.abspath(os.path.join(out, name))
        shutil.rmtree(path, ignore_errors=True)
        gm.ckpts.save_params(tree, path, wait_until_finished=True)
        expected["checkpoints"][name] = describe(tree)
        loaded = gm.ckpts.load_params(path)
        flat = jax.tree_util.tree_flatten_with_path(loaded)[0]
        want = jax.tree_util.tree_flatten_with_path(tree)[0]
        assert [dotted(p) for p, _ in flat] == [dotted(p) for p, _ in want]
        for (p, a), (_, b) in zip(flat, want):
            a, b = np.asarray(a), np.asarray(b)
            assert a.dtype == b.dtype and a.shape == b.shape, (dotted(p), a.dtype, b.dtype)
            np.testing.assert_array_equal(a, b, err_msg=dotted(p))
        print(name, "loaded back bit-identical:", len(flat), "arrays;", sorted(os.listdir(path)))
    # The model runs on the saved params (a forward pass, as a check that they are complete).
    logits = model.apply({"params": variants["bfloat16"]}, tokens).logits
    print("logits", logits.shape, logits.dtype)
    with open(os.path.join(out, "expected.json"), "w") as f:
        json.dump(expected, f, indent=1, sort_keys=True)
    print("wrote", out, versions)


if __name__ == "__main__":
    main(sys.argv[1])
