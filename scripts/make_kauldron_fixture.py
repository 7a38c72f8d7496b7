"""Write tests/data/kauldron: Kauldron's own trainer and checkpointer, 2 training steps.

``kd.train.Trainer(...).train()`` on 4 simulated CPU devices with a tiny linen model
(Dense ``hidden`` 3->4 float32, BatchNorm ``norm``, Dense ``head`` 4->2 with bfloat16
params), an ``InMemoryPipeline`` of 16 random examples (batch 4), an L2 loss, ``optax.adam``,
``kd.sharding.FSDPSharding(min_size_to_shard_mb=0)`` for params and
``kd.ckpts.Checkpointer(save_interval_steps=1)``; ``num_train_steps=2``. Kauldron saves at the
top of each loop iteration, BEFORE that step's update, for ``i`` in 0..2: folders ``ckpt_0``
(the initial state), ``ckpt_1`` and ``ckpt_2`` under ``<workdir>/checkpoints``. Run it in a
throwaway environment, never in the project's own (kauldron 1.4.4 needs Python >= 3.11):

    python3 -m venv /tmp/env-uv && /tmp/env-uv/bin/pip install uv
    /tmp/env-uv/bin/uv venv -p python3.12 /tmp/env-kauldron
    /tmp/env-uv/bin/uv pip install --python /tmp/env-kauldron/bin/python kauldron==1.4.4
    /tmp/env-kauldron/bin/python scripts/make_kauldron_fixture.py tests/data/kauldron

(resolved: kauldron 1.4.4, jax/jaxlib 0.12.0.1, flax 0.12.12, orbax-checkpoint 0.12.8,
tensorstore 0.1.86, optax 0.2.8, numpy 2.5.5, tensorflow-cpu 2.21.0). Besides the checkpoints
it writes ``expected.json``: for every leaf of the train state Kauldron hands to its
checkpointer (recorded by wrapping ``kd.ckpts.Checkpointer.save``, which then saves as usual)
its dotted path, shape, dtype and float64 norm computed with numpy, per step. The script
restores every step with Kauldron (``Checkpointer.restore`` of a ``CheckpointState``, as the
train loop does) and compares bit for bit.
"""

import importlib.metadata
import json
import os
import shutil
import sys

os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from kauldron import kd  # noqa: E402
from kauldron.train import checkpoint_state  # noqa: E402


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


class Tiny(nn.Module):
    x: kd.kontext.Key = "batch.x"
    is_training = kd.nn.train_property()

    @nn.compact
    def __call__(self, x):
        h = nn.Dense(4, name="hidden")(x)
        h = nn.BatchNorm(use_running_average=not self.is_training, name="norm")(h)
        return nn.Dense(2, param_dtype=jnp.bfloat16, dtype=jnp.float32, name="head")(nn.relu(h))


def main(out):
    workdir = "/tmp/kauldron-fixture-work"
    shutil.rmtree(workdir, ignore_errors=True)
    os.makedirs(out, exist_ok=True)
    rng = np.random.default_rng(0)
    data = {
        "x": rng.standard_normal((16, 3)).astype(np.float32),
        "y": rng.standard_normal((16, 2)).astype(np.float32),
    }
    saved = {}
    original = kd.ckpts.Checkpointer.save

    def recording_save(self, state, *, step, **kwargs):
        with jax.transfer_guard("allow"):  # the train loop disallows implicit transfers
            saved[int(step)] = jax.tree_util.tree_map(np.array, state.train_state)
        return original(self, state, step=step, **kwargs)

    kd.ckpts.Checkpointer.save = recording_save
    trainer = kd.train.Trainer(
        seed=0,
        workdir=workdir,
        train_ds=kd.data.InMemoryPipeline(loader=lambda: data, batch_size=4, shuffle=False),
        model=Tiny(),
        num_train_steps=2,
        log_metrics_every=1,
        log_summaries_every=1,
        train_losses={"l2": kd.losses.L2(preds="preds", targets="batch.y")},
        optimizer=optax.adam(1e-2),
        sharding=kd.sharding.ShardingStrategy(params=kd.sharding.FSDPSharding(min_size_to_shard_mb=0)),
        checkpointer=kd.ckpts.Checkpointer(save_interval_steps=1),
    )
    final_state, _ = trainer.train()
    kd.ckpts.Checkpointer.save = original
    assert sorted(saved) == [0, 1, 2], sorted(saved)
    # Each checkpoint is taken before that iteration's update, and the loop runs for i in
    # 0..num_train_steps: 3 updates, the last of which no checkpoint holds.
    assert [int(tree.step) for _, tree in sorted(saved.items())] == [0, 1, 2]
    print("final state step:", int(final_state.step), "(not saved)")

    versions = {
        name: importlib.metadata.version(name)
        for name in ("kauldron", "jax", "jaxlib", "flax", "orbax-checkpoint", "tensorstore", "optax", "numpy")
    }
    expected = {
        "versions": versions,
        "devices": len(jax.devices()),
        "steps": {str(step): {"default": describe(tree)} for step, tree in sorted(saved.items())},
    }

    # Restore every step with Kauldron's own checkpointer, into the trainer's state structure.
    ckpt = trainer.checkpointer
    for step, tree in saved.items():
        target = checkpoint_state.CheckpointState(
            jax.tree_util.tree_map(jnp.zeros_like, final_state),
            trainer._chrono,  # noqa: SLF001
            iter(trainer.train_ds),
        )
        restored = ckpt.restore(target, step=step, donate=False).train_state
        flat = jax.tree_util.tree_flatten_with_path(restored)[0]
        want = jax.tree_util.tree_flatten_with_path(tree)[0]
        assert [dotted(p) for p, _ in flat] == [dotted(p) for p, _ in want]
        for (path, a), (_, b) in zip(flat, want):
            a = np.asarray(a)
            assert a.dtype == b.dtype and a.shape == b.shape, (dotted(path), a.dtype, b.dtype)
            np.testing.assert_array_equal(a, b, err_msg=dotted(path))
        print("step", step, "restored bit-identical:", len(flat), "arrays")
    shardings = {
        dotted(p): str(getattr(leaf, "sharding", None))
        for p, leaf in jax.tree_util.tree_flatten_with_path(final_state.params)[0]
    }
    print("final params shardings:", json.dumps(shardings, indent=1))

    ckpt_dir = os.path.join(out, "checkpoints")
    shutil.rmtree(ckpt_dir, ignore_errors=True)
    shutil.copytree(os.path.join(workdir, "checkpoints"), ckpt_dir)
    print("workdir:", sorted(os.listdir(workdir)), "checkpoints:", sorted(os.listdir(ckpt_dir)))
    with open(os.path.join(out, "expected.json"), "w") as f:
        json.dump(expected, f, indent=1, sort_keys=True)
    print("wrote", out, versions)


if __name__ == "__main__":
    main(sys.argv[1])
