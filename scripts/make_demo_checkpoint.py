"""Write a small example checkpoint, sharded on 8 simulated CPU devices, for `make demo`.

A CheckpointManager root with two steps; each holds the params of a small flax linen model
(nn.Partitioned boxes sharded over a (data=2, model=4) mesh, one bf16 leaf), its optax AdamW
state and a JSON item. Usage: python scripts/make_demo_checkpoint.py OUT_DIR
"""

import os
import shutil
import sys

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
import orbax.checkpoint as ocp  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402


class Block(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.Dense(
            256, kernel_init=nn.with_partitioning(nn.initializers.lecun_normal(), ("data", "model"))
        )(x)
        h = nn.gelu(h)
        h = nn.Dense(64, kernel_init=nn.with_partitioning(nn.initializers.lecun_normal(), ("model", "data")))(
            h
        )
        return nn.LayerNorm(param_dtype=jnp.bfloat16)(x + h)


class TinyLM(nn.Module):
    @nn.compact
    def __call__(self, tokens):
        x = nn.Embed(
            1024, 64, embedding_init=nn.with_partitioning(nn.initializers.normal(0.02), ("model", None))
        )(tokens)
        for i in range(2):
            x = Block(name=f"block_{i}")(x)
        return nn.Dense(
            1024,
            use_bias=False,
            kernel_init=nn.with_partitioning(nn.initializers.lecun_normal(), (None, "model")),
            name="lm_head",
        )(x)


def main(out: str) -> None:
    if os.path.exists(out):
        shutil.rmtree(out)
    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    variables = TinyLM().init(jax.random.key(0), jnp.zeros((2, 8), jnp.int32))

    def place(x):
        spec = P(*x.names) if isinstance(x, nn.Partitioned) else P()
        value = jax.device_put(x.value if isinstance(x, nn.Partitioned) else x, NamedSharding(mesh, spec))
        return x.replace_boxed(value) if isinstance(x, nn.Partitioned) else value

    params = jax.tree.map(place, variables["params"], is_leaf=lambda x: isinstance(x, nn.Partitioned))
    optimizer = optax.adamw(1e-3)
    opt_state = optimizer.init(params)
    manager = ocp.CheckpointManager(
        os.path.abspath(out), options=ocp.CheckpointManagerOptions(step_prefix="checkpoint")
    )
    for step in (100, 200):
        grads = jax.tree.map(lambda p: 0.01 * jnp.ones_like(p), params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        manager.save(
            step,
            args=ocp.args.Composite(
                params=ocp.args.StandardSave(params),
                opt_state=ocp.args.StandardSave(opt_state),
                metadata=ocp.args.JsonSave({"model": "TinyLM", "mesh": {"data": 2, "model": 4}}),
            ),
        )
    manager.wait_until_finished()
    manager.close()
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "demo_ckpt")
