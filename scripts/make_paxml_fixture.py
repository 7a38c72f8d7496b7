"""Write tests/data/paxml: a Paxml run's checkpoints, in the layout Paxml 1.4 writes, with Orbax.

paxml and praxis 1.4 do not install on Python 3.11 (their pinned lingvo and tensorflow have no
wheels), so this script reproduces, with plain Orbax, what Paxml's own save path does (read from
its source: ``paxml/checkpoint_paths.py``, ``checkpoint_managers.py``, ``checkpoint_metadata.py``,
``checkpoint_version.py``, ``checkpoints.py``):

- ``OrbaxCheckpointManager`` is an Orbax ``CheckpointManager`` whose options are set to
  ``step_prefix='checkpoint'`` and ``step_format_fixed_length=8``: step folders are
  ``checkpoint_00000100`` (``checkpoint_name``: ``f'checkpoint_{step:08d}'``);
- each step holds the items ``state`` (the ``TrainState``: a flax struct with the fields
  ``step``, ``mdl_vars``, ``opt_states`` and ``extra_state``, saved by ``PaxCheckpointHandler``,
  a ``PyTreeCheckpointHandler``) and ``metadata`` (``JsonCheckpointHandler``);
- checkpoint version 1.2 (``tensorstore_use_ocdbt=True``, the default of Paxml's
  ``CheckpointManager`` since 1.2): ``state`` is an OCDBT item with ``_METADATA``; ``metadata``
  is ``{"version": 1.2, "train_state_metadata": ...}``, the tree of ``mdl_vars`` whose leaves
  are ``{"_array_metadata_tag": true, "is_optax_masked_node": false, "unpadded_shape": [...],
  "dtype": "float32"}``;
- version 1.1 (``tensorstore_use_ocdbt=False``): ``PaxCheckpointHandler`` flattens the state and
  names each array by its dotted prefix name (``mdl_vars.params.lm.final_ln.scale``), one zarr
  folder per array, and writes no ``_METADATA`` (``_write_metadata_file`` is a no-op there).

Run it with the versions the project is tested with:

    python scripts/make_paxml_fixture.py tests/data/paxml

It writes ``expected.json``: per run and step every array's dotted path, shape, dtype and float64
norm of the values in memory, the metadata item, and the versions.
"""

import importlib.metadata
import json
import os
import shutil
import sys

import numpy as np
import orbax.checkpoint as ocp


def train_state(step: int, rng: np.random.Generator) -> dict:
    """A small Pax language model's TrainState as Orbax stores a flax struct: by field name."""

    def f32(*shape):
        return (rng.standard_normal(shape) * 0.02 * (1 + step / 100)).astype(np.float32)

    layer = {
        "ff_layer": {
            "ffn_layer1": {"linear": {"w": f32(2, 8, 16)}, "bias": {"b": f32(2, 16)}},
            "ffn_layer2": {"linear": {"w": f32(2, 16, 8)}, "bias": {"b": f32(2, 8)}},
            "layer_norm": {"scale": np.ones((2, 8), np.float32), "bias": np.zeros((2, 8), np.float32)},
        },
        "self_attention": {
            "combined_qkv": {"w": f32(2, 3, 8, 2, 4)},
            "post": {"w": f32(2, 8, 2, 4)},
        },
    }
    params = {
        "lm": {
            "embedding_lookup": {"emb_var": f32(32, 8)},
            "transformer": {"repeat": {"sub": {"x_layers_0": layer}}},
            "final_ln": {"scale": np.ones((8,), np.float32), "bias": np.zeros((8,), np.float32)},
        }
    }

    def like(value):
        if isinstance(value, dict):
            return {k: like(v) for k, v in value.items()}
        return (np.abs(value) * 0.1).astype(np.float32)

    return {
        "step": np.array(step, np.int64),
        "mdl_vars": {"params": params},
        "opt_states": [
            {"no_prefix": {"count": np.array(step, np.int32), "m": like(params), "v": like(params)}}
        ],
    }


def flatten(tree, prefix=""):
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from flatten(v, f"{prefix}{k}.")
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            yield from flatten(v, f"{prefix}{i}.")
    else:
        yield prefix[:-1], tree


def array_metadata(tree):
    if isinstance(tree, dict):
        return {k: array_metadata(v) for k, v in tree.items()}
    return {
        "_array_metadata_tag": True,
        "is_optax_masked_node": False,
        "unpadded_shape": list(tree.shape),
        "dtype": str(tree.dtype),
    }


def describe(state):
    return {
        path: {
            "shape": list(value.shape),
            "dtype": value.dtype.name,
            "norm": float(np.sqrt(np.sum(np.asarray(value, np.float64) ** 2))),
        }
        for path, value in flatten(state)
    }


def main(out):
    out = os.path.abspath(out)
    os.makedirs(out, exist_ok=True)
    expected = {"runs": {}}
    for run, version, ocdbt in (("v1_2", 1.2, True), ("v1_1", 1.1, False)):
        root = os.path.join(out, run, "checkpoints")
        shutil.rmtree(os.path.join(out, run), ignore_errors=True)
        rng = np.random.default_rng(0)
        options = ocp.CheckpointManagerOptions(step_prefix="checkpoint", step_format_fixed_length=8)
        handlers = {
            "state": ocp.PyTreeCheckpointHandler(use_ocdbt=ocdbt),
            "metadata": ocp.JsonCheckpointHandler(),
        }
        steps = {}
        with ocp.CheckpointManager(root, options=options, item_handlers=handlers) as manager:
            for step in (100, 200):
                state = train_state(step, rng)
                if ocdbt:
                    saved = state
                    metadata = {"version": version, "train_state_metadata": array_metadata(state["mdl_vars"])}
                else:
                    # PaxCheckpointHandler saves the flattened state under its dotted prefix names
                    saved = dict(flatten(state))
                    metadata = {"version": version}
                manager.save(
                    step,
                    args=ocp.args.Composite(
                        state=ocp.args.PyTreeSave(saved), metadata=ocp.args.JsonSave(metadata)
                    ),
                )
                manager.wait_until_finished()
                step_dir = os.path.join(root, f"checkpoint_{step:08d}")
                assert os.path.isdir(os.path.join(step_dir, "state")), os.listdir(step_dir)
                if not ocdbt:
                    # Pax's handler writes no tree metadata for non-OCDBT checkpoints
                    os.remove(os.path.join(step_dir, "state", "_METADATA"))
                else:
                    args = ocp.args.Composite(state=ocp.args.PyTreeRestore(), metadata=ocp.args.JsonRestore())
                    restored = manager.restore(step, args=args)
                    got = dict(flatten(dict(restored["state"])))
                    assert set(got) == set(dict(flatten(state)))
                    for path, value in flatten(state):
                        np.testing.assert_array_equal(np.asarray(got[path]), value, err_msg=path)
                    assert restored["metadata"] == metadata
                steps[str(step)] = {"leaves": describe(state), "metadata": metadata}
        expected["runs"][run] = {"version": version, "ocdbt": ocdbt, "steps": steps}
    expected["versions"] = {
        name: importlib.metadata.version(name) for name in ("orbax-checkpoint", "jax", "tensorstore", "numpy")
    }
    with open(os.path.join(out, "expected.json"), "w") as f:
        json.dump(expected, f, indent=1, sort_keys=True)
    print("wrote", out, expected["versions"])


if __name__ == "__main__":
    main(sys.argv[1])
