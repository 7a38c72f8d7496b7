"""Session fixtures: real Orbax checkpoints written on a real mesh of 8 simulated CPU devices.

Each writer returns the checkpoint's path and the host (numpy) values it saved, keyed by the
dotted path paramscope is expected to show, so tests compare against float64 numpy.
"""

import os

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import json  # noqa: E402
import shutil  # noqa: E402
from dataclasses import dataclass  # noqa: E402

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import orbax.checkpoint as ocp  # noqa: E402
import pytest  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from paramscope.names import dotted_path  # noqa: E402

LEGACY_DIR = os.path.join(os.path.dirname(__file__), "data", "orbax_0_6_1")


@dataclass
class Written:
    path: str
    values: dict  # dotted path -> numpy array (as saved)
    specs: dict  # dotted path -> per-dimension partition entries, None when replicated


def make_mesh():
    return jax.make_mesh((2, 4), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)


class Block(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.Dense(
            32,
            kernel_init=nn.with_partitioning(nn.initializers.lecun_normal(), ("data", "model")),
            bias_init=nn.with_partitioning(nn.initializers.normal(0.5), ("model",)),
        )(x)
        h = nn.Dense(16, kernel_init=nn.with_partitioning(nn.initializers.lecun_normal(), ("model", "data")))(
            h
        )
        return nn.LayerNorm(param_dtype=jnp.bfloat16)(x + h)


class ScanBlock(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        return Block()(x), None


class Model(nn.Module):
    """Embedding, a scanned stack of 3 blocks (stacked params), and a head."""

    @nn.compact
    def __call__(self, tokens):
        x = nn.Embed(
            64, 16, embedding_init=nn.with_partitioning(nn.initializers.normal(1.0), ("model", "data"))
        )(tokens)
        stack = nn.scan(
            ScanBlock,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            length=3,
            metadata_params={nn.PARTITION_NAME: None},
        )
        x, _ = stack(name="layers")(x, None)
        return nn.Dense(
            8,
            use_bias=False,
            name="head",
            kernel_init=nn.with_partitioning(nn.initializers.lecun_normal(), (None, "model")),
        )(x)


def init_params(mesh):
    variables = Model().init(jax.random.key(0), jnp.zeros((4, 2), jnp.int32))

    def place(x):
        if isinstance(x, nn.Partitioned):
            return x.replace_boxed(jax.device_put(x.value, NamedSharding(mesh, P(*x.names))))
        return jax.device_put(x, NamedSharding(mesh, P()))

    return jax.tree.map(place, variables["params"], is_leaf=lambda x: isinstance(x, nn.Partitioned))


def host_values(tree, prefix=""):
    """dotted path -> numpy value, boxes unboxed."""
    flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: isinstance(x, nn.Partitioned))[0]
    out = {}
    for path, leaf in flat:
        value = leaf.value if isinstance(leaf, nn.Partitioned) else leaf
        if value is None:
            continue
        out[(prefix + "." if prefix else "") + dotted_path(path)] = np.asarray(value)
    return out


def host_specs(tree, prefix=""):
    flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: isinstance(x, nn.Partitioned))[0]
    out = {}
    for path, leaf in flat:
        value = leaf.value if isinstance(leaf, nn.Partitioned) else leaf
        spec = None
        sharding = getattr(value, "sharding", None)
        if isinstance(sharding, NamedSharding):
            entries = list(sharding.spec) + [None] * (np.ndim(value) - len(sharding.spec))
            spec = tuple(entries) if any(e is not None for e in entries) else None
        out[(prefix + "." if prefix else "") + dotted_path(path)] = spec
    return out


def write_manager(root, steps=(100, 200)):
    """A CheckpointManager root as xLSTM-JAX's trainer writes one (step_prefix 'checkpoint').

    Items: params (linen boxes, scanned layers, bf16 LayerNorm), opt_state (optax AdamW), step
    (an array item), metadata (JSON); plus an unfinished step folder beside the finished ones.
    """
    mesh = make_mesh()
    params = init_params(mesh)
    optimizer = optax.adamw(1e-3)
    opt_state = optimizer.init(params)
    manager = ocp.CheckpointManager(root, options=ocp.CheckpointManagerOptions(step_prefix="checkpoint"))
    values = {}
    for step in steps:
        grads = jax.tree.map(lambda p: 0.1 * jnp.ones_like(p), params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        manager.save(
            step,
            args=ocp.args.Composite(
                params=ocp.args.StandardSave(params),
                opt_state=ocp.args.StandardSave(opt_state),
                step=ocp.args.ArraySave(jnp.asarray(step, jnp.int32)),
                metadata=ocp.args.JsonSave({"model": "Model", "step": step}),
            ),
        )
        manager.wait_until_finished()
        values[step] = {"params": host_values(params), "opt_state": host_values(opt_state)}
    manager.close()
    specs = host_specs(params)
    # An unfinished save, as Orbax leaves it: a tmp-suffixed folder whose step metadata has no
    # commit timestamp and whose items lack _METADATA.
    last = os.path.join(root, f"checkpoint_{steps[-1]}")
    tmp = os.path.join(root, f"checkpoint_{steps[-1] + 100}.orbax-checkpoint-tmp-1700000000")
    shutil.copytree(last, tmp)
    with open(os.path.join(tmp, "_CHECKPOINT_METADATA")) as f:
        meta = json.load(f)
    meta["commit_timestamp_nsecs"] = None
    with open(os.path.join(tmp, "_CHECKPOINT_METADATA"), "w") as f:
        json.dump(meta, f)
    for item in ("params", "opt_state"):
        os.remove(os.path.join(tmp, item, "_METADATA"))
    for marker in ("commit_success.txt",):
        if os.path.exists(os.path.join(tmp, marker)):
            os.remove(os.path.join(tmp, marker))
    return Written(root, values, specs)


def special_tree(mesh):
    """Leaves of every dtype users meet, one with a NaN and one with an Inf."""
    rng = np.random.default_rng(7)
    tree = {
        "bf16": rng.standard_normal((64, 32)).astype(jnp.bfloat16),
        "fp16": (rng.standard_normal((16, 8)) * 100).astype(np.float16),
        "int8": rng.integers(-128, 127, size=(33,), dtype=np.int8),
        "f32": {
            "with_nan": rng.standard_normal((8, 8)).astype(np.float32),
            "with_inf": rng.standard_normal((4,)).astype(np.float32),
        },
        "scalar": np.float32(3.0),
        # numpy leaves with values float32 cannot hold
        "f64": np.array([1e100, -3e100, 1.0]),
        "i64": np.array([2**40, -(2**35), 7], dtype=np.int64),
    }
    tree["f32"]["with_nan"][2, 3] = np.nan
    tree["f32"]["with_inf"][1] = np.inf
    placed = {
        "bf16": jax.device_put(tree["bf16"], NamedSharding(mesh, P("model", "data"))),
        "fp16": jax.device_put(tree["fp16"], NamedSharding(mesh, P("data"))),
        "int8": jax.device_put(tree["int8"], NamedSharding(mesh, P())),
        "f32": {k: jax.device_put(v, NamedSharding(mesh, P())) for k, v in tree["f32"].items()},
        "scalar": tree["scalar"],
        "f64": tree["f64"],
        "i64": tree["i64"],
    }
    return placed, tree


@pytest.fixture(scope="session")
def manager_ckpt(tmp_path_factory):
    return write_manager(str(tmp_path_factory.mktemp("manager") / "checkpoints"))


@pytest.fixture(scope="session")
def standard_ckpt(tmp_path_factory):
    """A whole train state saved by StandardCheckpointer as one item."""
    mesh = make_mesh()
    params = init_params(mesh)
    opt_state = optax.adam(1e-3).init(params)
    state = {"step": 7, "params": params, "opt_state": opt_state}
    path = str(tmp_path_factory.mktemp("standard") / "state")
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(path, state)
    checkpointer.wait_until_finished()
    return Written(path, host_values(state), host_specs(state))


@pytest.fixture(scope="session")
def special_ckpt(tmp_path_factory):
    mesh = make_mesh()
    placed, tree = special_tree(mesh)
    path = str(tmp_path_factory.mktemp("special") / "item")
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(path, placed)
    checkpointer.wait_until_finished()
    return Written(path, host_values(tree), host_specs(placed))


@pytest.fixture(scope="session", params=["zarr2-plain", "zarr3-ocdbt", "zarr3-plain"])
def storage_ckpt(request, tmp_path_factory):
    """The same params in the other storage formats (plain zarr folders, zarr3)."""
    use_zarr3 = request.param.startswith("zarr3")
    use_ocdbt = request.param.endswith("ocdbt")
    params = init_params(make_mesh())
    path = str(tmp_path_factory.mktemp(request.param) / "params")
    checkpointer = ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_ocdbt=use_ocdbt, use_zarr3=use_zarr3))
    checkpointer.save(path, args=ocp.args.PyTreeSave(params))
    return Written(path, host_values(params), host_specs(params))


@pytest.fixture(scope="session")
def nnx_ckpt(tmp_path_factory):
    """nnx.state of a model and of its optimizer, saved as two items by a manager."""

    class MLP(nnx.Module):
        def __init__(self, rngs):
            self.up = nnx.Linear(8, 32, rngs=rngs)
            self.down = nnx.Linear(32, 8, rngs=rngs)

    model = MLP(nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.adamw(1e-2), wrt=nnx.Param)
    root = str(tmp_path_factory.mktemp("nnx") / "run")
    manager = ocp.CheckpointManager(root)
    model_state, opt_state = nnx.state(model), nnx.state(optimizer)
    manager.save(
        1,
        args=ocp.args.Composite(
            model=ocp.args.StandardSave(model_state), optimizer=ocp.args.StandardSave(opt_state)
        ),
    )
    manager.wait_until_finished()
    manager.close()
    values = {**host_values(model_state, "model"), **host_values(opt_state, "optimizer")}
    return Written(root, values, {})


@pytest.fixture(scope="session")
def legacy_ckpt():
    with open(os.path.join(LEGACY_DIR, "expected.json")) as f:
        return os.path.join(LEGACY_DIR, "checkpoints"), json.load(f)


def tree_snapshot(root):
    """Every file under root with its bytes and mtime, to prove nothing was touched."""
    snapshot = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            stat = os.lstat(full)
            content = None
            if os.path.isfile(full):
                with open(full, "rb") as f:
                    content = f.read()
            snapshot[os.path.relpath(full, root)] = (stat.st_mtime_ns, content)
    return snapshot


def f64_norm(value):
    return float(np.sqrt(np.sum(np.asarray(value).astype(np.float64) ** 2)))
