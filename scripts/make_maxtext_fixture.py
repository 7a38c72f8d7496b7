"""Write tests/data/maxtext: MaxText's own pre-training entry point, checkpointing every step.

Two runs of ``python -m maxtext.trainers.pre_train.train`` (here ``train.main(argv)`` in a
child process per run) with MaxText's decoupled test config (``configs/decoupled_base_test.yml``,
no Google Cloud), on 4 simulated CPU devices (``ici_fsdp_parallelism=-1``: an FSDP mesh of 4),
synthetic data, a tiny llama2-style decoder (emb 8, 2 heads of 4, 1 KV head, MLP 16, 2 layers,
vocab 32, sequence 8), adamw, 2 steps, ``checkpoint_period=1``, synchronous saves: ``scan/``
with ``scan_layers=true`` and ``unscanned/`` with ``scan_layers=false``. MaxText saves through
an Orbax v1 ``ocp.training.Checkpointer`` into ``<base_output_directory>/<run_name>/
checkpoints/<step>/items``. Run it in a throwaway environment, never in the project's own
(maxtext 0.2.5 needs Python 3.12; its dependencies are listed only under extras, so they come
from the decoupled requirements file the wheel ships):

    python3 -m venv /tmp/env-uv && /tmp/env-uv/bin/pip install uv
    /tmp/env-uv/bin/uv venv -p python3.12 /tmp/env-maxtext
    /tmp/env-uv/bin/uv pip install --python /tmp/env-maxtext/bin/python maxtext==0.2.5
    /tmp/env-uv/bin/uv pip install --python /tmp/env-maxtext/bin/python -r \
        /tmp/env-maxtext/lib/python3.12/site-packages/dependencies/requirements/generated_requirements/decoupled-requirements.txt
    /tmp/env-maxtext/bin/python scripts/make_maxtext_fixture.py tests/data/maxtext

(resolved: maxtext 0.2.5, jax/jaxlib 0.12.0.1, flax 0.12.12, orbax-checkpoint 0.12.8,
tensorstore 0.1.86, optax 0.2.8, numpy 2.5.5). Besides the checkpoints it writes
``expected.json``: for every leaf of the ``items`` checkpointable, the exact tree MaxText hands
to ``Checkpointer.save_checkpointables`` (recorded by wrapping that method, which then saves as
usual), its dotted path, shape, dtype and float64 norm computed with numpy, per run and step.
The script loads every step back with ``ocp.v1.load_checkpointables`` and checks the values
are bit-identical.
"""

import importlib.metadata
import json
import os
import shutil
import subprocess
import sys

RUNS = {"scan": "true", "unscanned": "false"}
SIZES = [
    "base_emb_dim=8",
    "base_num_query_heads=2",
    "base_num_kv_heads=1",
    "head_dim=4",
    "base_mlp_dim=16",
    "base_num_decoder_layers=2",
    "vocab_size=32",
    "max_target_length=8",
    "per_device_batch_size=1",
]


def dotted(path):
    keys = []
    for key in path:
        for attr in ("key", "idx", "name"):
            if hasattr(key, attr):
                keys.append(str(getattr(key, attr)))
                break
    return ".".join(keys)


def describe(tree):
    import jax
    import numpy as np

    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        arr = np.asarray(leaf)
        out[dotted(path)] = {
            "shape": list(arr.shape),
            "dtype": arr.dtype.name,
            "norm": float(np.sqrt(np.sum(arr.astype(np.float64) ** 2))),
        }
    return out


def per_layer(tree, scan_axis):
    """Per-layer float64 norms of every stacked array (under a ``layers`` component).

    The layer axis is MaxText's ``param_scan_axis`` for params and optimizer state; the NNX
    rng state (``nnx_aux``) is stacked on axis 0: in memory its keys are typed keys of shape
    ``(layers,)``, stored as key_data ``(layers, 4)``.
    """
    import jax
    import numpy as np

    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        name = dotted(path)
        if "layers" not in name.split("."):
            continue
        axis = 0 if name.startswith("nnx_aux.") else scan_axis
        arr = np.moveaxis(np.asarray(leaf).astype(np.float64), axis, 0)
        out[name] = {"axis": axis, "norms": [float(np.sqrt(np.sum(layer**2))) for layer in arr]}
    return out


def run_one(name, scan, work, record):
    """One MaxText training run in this process; writes what it saved to ``record`` (JSON)."""
    os.environ["DECOUPLE_GCLOUD"] = "TRUE"
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    import jax
    import maxtext
    import numpy as np
    from maxtext.trainers.pre_train import train
    from orbax.checkpoint import v1 as ocp

    def host(leaf):
        # MaxText keeps the NNX rng keys as typed PRNG keys; Orbax stores their key_data.
        if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            typed_keys.add(f"{leaf.dtype} {leaf.shape} -> key_data {jax.random.key_data(leaf).shape}")
            return np.array(jax.random.key_data(leaf))
        return np.array(leaf)

    typed_keys = set()
    saved = {}
    original = ocp.training.Checkpointer.save_checkpointables

    def recording_save(self, step, checkpointables, *args, **kwargs):
        tree = jax.tree_util.tree_map(host, checkpointables["items"])
        saved[int(step)] = {
            "checkpointables": sorted(checkpointables),
            "custom_metadata": kwargs.get("custom_metadata"),
            "items": tree,
        }
        return original(self, step, checkpointables, *args, **kwargs)

    ocp.training.Checkpointer.save_checkpointables = recording_save
    config = os.path.join(os.path.dirname(maxtext.__file__), "configs", "decoupled_base_test.yml")
    argv = [
        "train",
        config,
        f"run_name={name}",
        f"base_output_directory={work}",
        "hardware=cpu",
        "skip_jax_distributed_system=true",
        "dataset_type=synthetic",
        "steps=2",
        "enable_checkpointing=true",
        "checkpoint_period=1",
        "async_checkpointing=false",
        f"scan_layers={scan}",
        *SIZES,
    ]
    print("argv:", " ".join(argv[1:]))
    configs = []
    initialize = train.initialize

    def recording_initialize(argv):
        config, recorder = initialize(argv)
        configs.append(config)
        return config, recorder

    train.initialize = recording_initialize
    train.main(argv)
    scan_axis = configs[0].param_scan_axis
    ckpt_dir = os.path.join(work, name, "checkpoints")
    for step, entry in saved.items():
        loaded = ocp.load_checkpointables(os.path.join(ckpt_dir, str(step)))
        assert sorted(loaded) == entry["checkpointables"], sorted(loaded)
        flat = jax.tree_util.tree_flatten_with_path(loaded["items"])[0]
        want = jax.tree_util.tree_flatten_with_path(entry["items"])[0]
        assert [dotted(p) for p, _ in flat] == [dotted(p) for p, _ in want]
        for (path, a), (_, b) in zip(flat, want):
            a = host(a)
            assert a.dtype == b.dtype and a.shape == b.shape, (dotted(path), a.dtype, b.dtype)
            np.testing.assert_array_equal(a, b, err_msg=dotted(path))
        print(name, "step", step, "read back bit-identical:", len(flat), "arrays")
    out = {
        "devices": len(jax.devices()),
        "typed_prng_keys": sorted(typed_keys),
        "param_scan_axis": scan_axis,
        "steps": {
            str(step): {
                "checkpointables": entry["checkpointables"],
                "custom_metadata": entry["custom_metadata"],
                "items": describe(entry["items"]),
                **({"layers": per_layer(entry["items"], scan_axis)} if scan == "true" else {}),
            }
            for step, entry in sorted(saved.items())
        },
    }
    with open(record, "w") as f:
        json.dump(out, f)


def main(out):
    work = "/tmp/maxtext-fixture-work"
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    os.makedirs(out, exist_ok=True)
    versions = {
        name: importlib.metadata.version(name)
        for name in ("maxtext", "jax", "jaxlib", "flax", "orbax-checkpoint", "tensorstore", "optax", "numpy")
    }
    expected = {"versions": versions, "runs": {}}
    for name, scan in RUNS.items():
        record = os.path.join(work, f"{name}.json")
        subprocess.run([sys.executable, __file__, "--run", name, scan, work, record], check=True)
        with open(record) as f:
            run = json.load(f)
        ckpt_dir = os.path.join(out, name, "checkpoints")
        shutil.rmtree(ckpt_dir, ignore_errors=True)
        shutil.copytree(os.path.join(work, name, "checkpoints"), ckpt_dir)
        steps = sorted(os.listdir(ckpt_dir))
        assert steps == sorted(run["steps"]), (steps, list(run["steps"]))
        expected["runs"][name] = {"scan_layers": scan == "true", **run}
    with open(os.path.join(out, "expected.json"), "w") as f:
        json.dump(expected, f, indent=1, sort_keys=True)
    print("wrote", out, versions)


if __name__ == "__main__":
    if sys.argv[1] == "--run":
        run_one(*sys.argv[2:6])
    else:
        main(sys.argv[1])
