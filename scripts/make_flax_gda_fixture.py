"""Write tests/data/flax_msgpack_gda: flax multi-host msgpack checkpoints (``_gda`` folders).

``flax.training.checkpoints.save_checkpoint_multiprocess`` (Orbax disabled) writes the pytree
as one msgpack file ``checkpoint_<step>`` in which every array that no single host holds whole
is the string ``//GDAPlaceholder:<a/b/c>`` (its flattened keys joined by ``/``), and writes
those arrays with jax's array serialization (``GlobalAsyncCheckpointManager``: TensorStore zarr
arrays) into the folder ``checkpoint_<step>_gda/<a/b/c>/``.

Synthetic in one respect: a real multi-host save needs several processes whose arrays are not
fully addressable. This script runs in one process and makes flax treat every jax.Array of 2 or
more dimensions as such (``checkpoints._is_multiprocess_array`` is replaced by that test);
everything else, the placeholders, the ``_gda`` folder and the zarr arrays in it, is written by
flax's and jax's own code. It runs in the project's environment:

    .venv/bin/python scripts/make_flax_gda_fixture.py tests/data/flax_msgpack_gda

Besides the checkpoints it writes ``expected.json``: for every leaf of each step's state dict
its dotted path, shape, dtype, float64 norm (computed with numpy from the values before they
were saved; ``value`` for scalars and strings) and whether it went to the ``_gda`` folder. The
script restores each step with flax (same replaced test, a target and a
``GlobalAsyncCheckpointManager``) and checks every value bit for bit.
"""

import importlib.metadata
import json
import os
import shutil
import sys
import warnings

import flax
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from flax.training import checkpoints
from jax.experimental.array_serialization.serialization import GlobalAsyncCheckpointManager


def multihost(value) -> bool:
    return isinstance(value, jax.Array) and value.ndim >= 2


def make_state(step: int):
    rng = np.random.default_rng(step)
    return {
        "params": {
            "Dense_0": {
                "kernel": jnp.asarray(rng.standard_normal((8, 4)), jnp.float32),
                "bias": jnp.asarray(rng.standard_normal(4), jnp.float32),
            },
            "Embed_0": {"embedding": jnp.asarray(rng.standard_normal((16, 8)), jnp.bfloat16)},
        },
        "opt_state": {"count": jnp.asarray(step, jnp.int32)},
        "batch": rng.integers(0, 16, (2, 3)).astype(np.int32),  # numpy: stays in the file
        "step": step,
        "config": {"name": "tiny-gda"},
    }


def describe(name, leaf):
    entry = {"python_type": type(leaf).__name__, "gda": multihost(leaf)}
    if isinstance(leaf, str):
        entry.update(shape=[], dtype="str", value=leaf)
        return entry
    arr = np.asarray(leaf)
    entry.update(
        shape=list(arr.shape), dtype=arr.dtype.name, norm=float(np.sqrt(np.sum(arr.astype(np.float64) ** 2)))
    )
    if isinstance(leaf, int):
        entry["value"] = leaf
    return entry


def main(out):
    flax.config.update("flax_use_orbax_checkpointing", False)
    checkpoints._is_multiprocess_array = multihost
    warnings.simplefilter("ignore", DeprecationWarning)
    ckpt_dir = os.path.abspath(os.path.join(out, "checkpoints"))
    shutil.rmtree(ckpt_dir, ignore_errors=True)
    os.makedirs(ckpt_dir)
    manager = GlobalAsyncCheckpointManager()
    versions = {name: importlib.metadata.version(name) for name in ("flax", "jax", "msgpack", "tensorstore")}
    expected = {"versions": versions, "steps": {}}
    saved = {}
    for step in (1, 2):
        state = make_state(step)
        path = checkpoints.save_checkpoint_multiprocess(
            ckpt_dir, state, step=step, keep=2, gda_manager=manager
        )
        manager.wait_until_finished()
        assert os.path.isfile(path) and os.path.isdir(path + "_gda"), path
        flat = {".".join(k): v for k, v in traverse_util.flatten_dict(state).items()}
        saved[step] = flat
        leaves = {name: describe(name, leaf) for name, leaf in flat.items()}
        expected["steps"][str(step)] = {"file": os.path.basename(path), "leaves": leaves}

    for step, flat in saved.items():
        restored = checkpoints.restore_checkpoint(
            ckpt_dir, target=make_state(0), step=step, gda_manager=manager
        )
        got = {".".join(k): v for k, v in traverse_util.flatten_dict(restored).items()}
        assert sorted(got) == sorted(flat)
        for name, value in flat.items():
            if isinstance(value, (str, int)):
                assert got[name] == value, name
            else:
                a, b = np.asarray(got[name]), np.asarray(value)
                assert a.dtype == b.dtype and a.shape == b.shape, name
                np.testing.assert_array_equal(a, b, err_msg=name)
        print("step", step, "restored:", len(flat), "leaves")
    with open(os.path.join(out, "expected.json"), "w") as f:
        json.dump(expected, f, indent=1, sort_keys=True)
    print("wrote", out, "with flax", flax.__version__)


if __name__ == "__main__":
    main(sys.argv[1])
