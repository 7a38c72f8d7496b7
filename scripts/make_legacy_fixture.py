"""Write the small legacy checkpoint under tests/data/ with an old orbax-checkpoint.

The checkpoint has the layout of NX-AI/xlstm-jax's trainer (a CheckpointManager with
``step_prefix="checkpoint"`` and the items step, params, rng, metadata, opt_state) and is
written by orbax-checkpoint 0.6.1 on 8 simulated CPU devices. Run it in a throwaway
environment, never in the project's own:

    python3 -m venv /tmp/legacy-env
    /tmp/legacy-env/bin/pip install "orbax-checkpoint==0.6.1" "jax[cpu]==0.4.30" \
        "flax==0.8.5" "optax==0.2.3" "numpy<2"
    /tmp/legacy-env/bin/python scripts/make_legacy_fixture.py tests/data/orbax_0_6_1

Besides the checkpoint it writes ``expected.json``: every array's dotted path, shape, dtype
and float64 norm, computed with numpy from the values before they were saved.
"""

import json
import os
import shutil
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import orbax.checkpoint as ocp  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402


class Block(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Dense(
            32,
            kernel_init=nn.with_partitioning(nn.initializers.lecun_normal(), ("fsdp", "tp")),
            bias_init=nn.with_partitioning(nn.initializers.normal(0.1), ("tp",)),
        )(x)
        x = nn.LayerNorm(dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)(x)
        return nn.Dense(16, kernel_init=nn.with_partitioning(nn.initializers.lecun_normal(), ("tp", "fsdp")))(
            x
        )


class Model(nn.Module):
    @nn.compact
    def __call__(self, tokens):
        x = nn.Embed(
            128, 16, embedding_init=nn.with_partitioning(nn.initializers.normal(1.0), ("tp", "fsdp"))
        )(tokens)
        x = Block(name="block_0")(x)
        return Block(name="block_1")(x)


def dotted(path):
    keys = []
    for key in path:
        for attr in ("key", "idx", "name"):
            if hasattr(key, attr):
                keys.append(str(getattr(key, attr)))
                break
    if keys and keys[-1] == "value":
        keys = keys[:-1]
    return ".".join(keys)


def main(out):
    if os.path.exists(out):
        shutil.rmtree(out)
    mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("fsdp", "tp"))
    model = Model()
    variables = model.init(jax.random.PRNGKey(0), jnp.zeros((2, 4), jnp.int32))

    def place(x):
        if isinstance(x, nn.Partitioned):
            return x.replace_boxed(jax.device_put(x.value, NamedSharding(mesh, P(*x.names))))
        return jax.device_put(x, NamedSharding(mesh, P()))

    params = jax.tree_util.tree_map(
        place, variables["params"], is_leaf=lambda x: isinstance(x, nn.Partitioned)
    )
    opt_state = optax.adam(1e-3).init(params)
    grads = jax.tree_util.tree_map(lambda p: jnp.full_like(p, 0.01), params)
    updates, opt_state = optax.adam(1e-3).update(grads, opt_state, params)

    manager = ocp.CheckpointManager(
        os.path.join(out, "checkpoints"),
        item_names=("step", "params", "rng", "metadata", "opt_state"),
        item_handlers={
            "step": ocp.ArrayCheckpointHandler(),
            "params": ocp.StandardCheckpointHandler(),
            "rng": ocp.ArrayCheckpointHandler(),
            "metadata": ocp.JsonCheckpointHandler(),
            "opt_state": ocp.StandardCheckpointHandler(),
        },
        options=ocp.CheckpointManagerOptions(step_prefix="checkpoint", create=True),
    )
    expected = {"orbax_checkpoint": ocp.__version__, "jax": jax.__version__, "steps": {}}
    for step in (100, 200):
        scale = 1.5 if step == 200 else 1.0
        params = jax.tree_util.tree_map(lambda p, scale=scale: p * scale, params)
        manager.save(
            step,
            args=ocp.args.Composite(
                step=ocp.args.ArraySave(jnp.asarray(step)),
                params=ocp.args.StandardSave(params),
                rng=ocp.args.ArraySave(jax.random.PRNGKey(step)),
                metadata=ocp.args.JsonSave({"model": {"name": "tiny", "layers": 2}, "step": step}),
                opt_state=ocp.args.StandardSave(opt_state),
            ),
        )
        manager.wait_until_finished()
        items = {}
        for item, tree in (("params", params), ("opt_state", opt_state)):
            leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
            items[item] = {
                dotted(path): {
                    "shape": list(np.shape(leaf)),
                    "dtype": str(np.asarray(leaf).dtype),
                    "norm": float(np.sqrt(np.sum(np.asarray(leaf).astype(np.float64) ** 2))),
                }
                for path, leaf in leaves
            }
        expected["steps"][str(step)] = items
    manager.close()
    with open(os.path.join(out, "expected.json"), "w") as f:
        json.dump(expected, f, indent=1, sort_keys=True)


if __name__ == "__main__":
    main(sys.argv[1])
