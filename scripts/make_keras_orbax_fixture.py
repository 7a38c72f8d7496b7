"""Write tests/data/keras_orbax: Keras 3's OrbaxCheckpoint callback (JAX backend), 2 epochs.

A tiny Sequential model (Dense 3->4 relu, Dense 4->2 in bfloat16), compiled with adam and
mse, trained for 2 epochs on random data (2 batches per epoch) with
``keras.callbacks.OrbaxCheckpoint(dir, save_freq="epoch", max_to_keep=2,
save_on_background=False)``: steps ``0`` and ``1`` (the epoch numbers), each with the Orbax
v1 checkpointables ``pytree`` (``model.get_state_tree()``) and ``model_config``. The callback's
default ``max_to_keep=1`` would keep only the last epoch. Run it in a throwaway environment,
never in the project's own:

    python3 -m venv /tmp/env-uv && /tmp/env-uv/bin/pip install uv
    /tmp/env-uv/bin/uv venv -p python3.11 /tmp/env-keras
    /tmp/env-uv/bin/uv pip install --python /tmp/env-keras/bin/python \
        -c /work/wt-fixtures/constraints.txt keras jax jaxlib orbax-checkpoint
    KERAS_BACKEND=jax /tmp/env-keras/bin/python scripts/make_keras_orbax_fixture.py \
        tests/data/keras_orbax

(resolved: keras 3.15.1, jax/jaxlib 0.10.2, orbax-checkpoint 0.12.8, tensorstore 0.1.86,
numpy 2.4.6, ml_dtypes 0.6.0, h5py 3.16.0). Besides the checkpoints it writes
``expected.json``: for every leaf of the ``pytree`` checkpointable its dotted path, shape,
dtype and float64 norm computed with numpy from the state tree at the end of each epoch.
The script loads the checkpoints back with Orbax (``ocp.v1.load_checkpointables``, every
step) and Keras (``model.load_weights(dir)``, the latest step), and reports whether
``keras.saving.load_model(dir)`` restores the weights (with keras 3.15.1 it does not).
"""

import importlib.metadata
import json
import os
import shutil
import sys

os.environ["KERAS_BACKEND"] = "jax"

import jax  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402
import orbax.checkpoint as ocp  # noqa: E402


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
    return keras.Sequential(
        [
            keras.Input((3,)),
            keras.layers.Dense(4, activation="relu", name="hidden"),
            keras.layers.Dense(2, dtype="bfloat16", name="head"),
        ],
        name="tiny",
    )


class Recorder(keras.callbacks.Callback):
    """Copies the state tree the OrbaxCheckpoint callback just saved (it runs first)."""

    def __init__(self):
        super().__init__()
        self.trees = {}

    def on_epoch_end(self, epoch, logs=None):
        tree = self.model.get_state_tree()
        self.trees[epoch] = jax.tree_util.tree_map(np.array, tree)


def main(out):
    ckpt_dir = os.path.abspath(os.path.join(out, "checkpoints"))
    shutil.rmtree(ckpt_dir, ignore_errors=True)
    os.makedirs(out, exist_ok=True)
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((32, 3)).astype(np.float32)
    y = rng.standard_normal((32, 2)).astype(np.float32)
    model = make_model()
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
    checkpoint = keras.callbacks.OrbaxCheckpoint(
        ckpt_dir, save_freq="epoch", max_to_keep=2, save_on_background=False
    )
    recorder = Recorder()
    model.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0, callbacks=[checkpoint, recorder])
    checkpoint.wait_until_finished()

    versions = {
        name: importlib.metadata.version(name)
        for name in ("keras", "jax", "jaxlib", "orbax-checkpoint", "tensorstore", "numpy")
    }
    expected = {
        "versions": versions,
        "checkpointables": ["model_config", "pytree"],
        "steps": {str(epoch): {"pytree": describe(tree)} for epoch, tree in recorder.trees.items()},
    }
    assert sorted(os.listdir(ckpt_dir)) == ["0", "1"], os.listdir(ckpt_dir)

    # Read back with Orbax (each step) and with Keras (the latest step).
    for epoch, tree in recorder.trees.items():
        step_dir = os.path.join(ckpt_dir, str(epoch))
        loaded = ocp.v1.load_checkpointables(step_dir)
        assert sorted(loaded) == ["model_config", "pytree"], sorted(loaded)
        restored = describe(loaded["pytree"])
        assert restored.keys() == expected["steps"][str(epoch)]["pytree"].keys()
        for (pa, a), (_, b) in zip(
            jax.tree_util.tree_flatten_with_path(loaded["pytree"])[0],
            jax.tree_util.tree_flatten_with_path(tree)[0],
        ):
            assert np.asarray(a).dtype == b.dtype, (dotted(pa), np.asarray(a).dtype, b.dtype)
            np.testing.assert_array_equal(np.asarray(a), b, err_msg=dotted(pa))
        print("step", epoch, "model_config keys:", sorted(loaded["model_config"]))
    fresh = make_model()
    fresh.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
    fresh.load_weights(ckpt_dir)  # the latest step
    for a, b in zip(fresh.weights, model.weights):
        assert a.path == b.path, (a.path, b.path)
        np.testing.assert_array_equal(np.asarray(a.value), np.asarray(b.value), err_msg=a.path)
    print("model.load_weights(dir) restored", [w.path for w in fresh.weights])
    # Observed with keras 3.15.1: load_model rebuilds the Sequential with variable paths
    # lacking the model-name prefix ("hidden/kernel", not "tiny/hidden/kernel"), and
    # set_state_tree then leaves the weights at their fresh initial values, without error.
    reloaded = keras.saving.load_model(ckpt_dir)
    same = all(
        np.array_equal(np.asarray(a.value), np.asarray(b.value))
        for a, b in zip(reloaded.weights, model.weights)
    )
    print("keras.saving.load_model(dir) restored the trained weights:", same)
    print("  its paths:", [w.path for w in reloaded.weights])

    with open(os.path.join(out, "expected.json"), "w") as f:
        json.dump(expected, f, indent=1, sort_keys=True)
    print("wrote", out, versions)


if __name__ == "__main__":
    main(sys.argv[1])
