"""Write tests/data/hf_flax: Hugging Face Flax model folders written by transformers itself.

Tiny configs (hidden 32, 2 layers, vocabulary 64), each saved with
``FlaxPreTrainedModel.save_pretrained``:

- ``bert/``: ``FlaxBertModel``: ``config.json`` and one ``flax_model.msgpack``;
- ``gpt2_sharded/``: ``FlaxGPT2LMHeadModel`` with ``max_shard_size="20KB"``: shards
  ``flax_model-0000i-of-0000n.msgpack`` and ``flax_model.msgpack.index.json``;
- ``bert_both/``: the BERT model saved as msgpack, and again with ``safe_serialization=True``
  (``model.safetensors``) into the same folder, as Hub repositories often hold both.

Run it in a throwaway environment, never in the project's own:

    python3 -m venv /tmp/hfenv
    /tmp/hfenv/bin/pip install "transformers==4.46.*" flax "jax[cpu]"
    /tmp/hfenv/bin/python scripts/make_hf_flax_fixture.py tests/data/hf_flax

Besides the folders it writes ``expected.json``: per folder, for every parameter its dotted
path (the flax module path), shape, dtype name and float64 norm computed from the in-memory
params; the index's ``weight_map``. Each folder is read back with ``from_pretrained`` and
compared bit for bit.
"""

import importlib.metadata
import json
import os
import shutil
import sys
import tempfile

import numpy as np
from flax.traverse_util import flatten_dict
from transformers import BertConfig, FlaxBertModel, FlaxGPT2LMHeadModel, GPT2Config


def describe(params):
    return {
        ".".join(keys): {
            "shape": list(np.shape(value)),
            "dtype": np.asarray(value).dtype.name,
            "norm": float(np.sqrt(np.sum(np.asarray(value, dtype=np.float64) ** 2))),
        }
        for keys, value in flatten_dict(params).items()
    }


def same(a, b):
    a, b = flatten_dict(a), flatten_dict(b)
    assert a.keys() == b.keys()
    for key in a:
        assert np.asarray(a[key]).tobytes() == np.asarray(b[key]).tobytes(), key


def main(out: str) -> None:
    os.makedirs(out, exist_ok=True)
    bert = FlaxBertModel(
        BertConfig(
            vocab_size=64,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=32,
        ),
        seed=0,
    )
    gpt2 = FlaxGPT2LMHeadModel(
        GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=2, n_positions=32), seed=1
    )
    folders = {"bert": os.path.join(out, "bert"), "gpt2_sharded": os.path.join(out, "gpt2_sharded")}
    for path in (*folders.values(), os.path.join(out, "bert_both")):
        shutil.rmtree(path, ignore_errors=True)
    bert.save_pretrained(folders["bert"])
    gpt2.save_pretrained(folders["gpt2_sharded"], max_shard_size="20KB")
    both = os.path.join(out, "bert_both")
    bert.save_pretrained(both)
    with tempfile.TemporaryDirectory() as tmp:
        bert.save_pretrained(tmp, safe_serialization=True)
        shutil.copy(os.path.join(tmp, "model.safetensors"), both)

    same(FlaxBertModel.from_pretrained(folders["bert"]).params, bert.params)
    same(FlaxBertModel.from_pretrained(both).params, bert.params)
    same(FlaxGPT2LMHeadModel.from_pretrained(folders["gpt2_sharded"]).params, gpt2.params)

    with open(os.path.join(folders["gpt2_sharded"], "flax_model.msgpack.index.json")) as f:
        index = json.load(f)
    versions = {p: importlib.metadata.version(p) for p in ("transformers", "flax", "jax", "jaxlib", "numpy")}
    doc = {
        "versions": versions,
        "folders": {
            "bert": {"params": describe(bert.params), "architectures": ["BertModel"], "model_type": "bert"},
            "gpt2_sharded": {
                "params": describe(gpt2.params),
                "architectures": ["GPT2LMHeadModel"],
                "model_type": "gpt2",
                "index": index,
                "files": sorted(os.listdir(folders["gpt2_sharded"])),
            },
        },
    }
    with open(os.path.join(out, "expected.json"), "w") as f:
        json.dump(doc, f, indent=1, sort_keys=True)
        f.write("\n")
    print(json.dumps(versions), sorted(os.listdir(folders["gpt2_sharded"])), sorted(os.listdir(both)))


if __name__ == "__main__":
    main(sys.argv[1])
