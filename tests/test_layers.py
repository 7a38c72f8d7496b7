"""Scanned stacks one row per layer (--unstack, layers), on checkpoints written by Orbax."""

import json
import math

import numpy as np
import orbax.checkpoint as ocp
import pytest
from test_cli import run, run_json


def f64(x):
    return math.sqrt(float(np.sum(np.asarray(x, np.float64) ** 2)))


@pytest.fixture(scope="module")
def maxtext_like(tmp_path_factory):
    """A MaxText-style step: scanned layers on axis 1, scan_layers in the step's custom metadata;
    layer 2 of the stack scaled by 1.5."""
    rng = np.random.default_rng(4)
    layers = {
        "mlp": {
            "wi_0": {"kernel": rng.standard_normal((8, 4, 16)).astype(np.float32)},
            "wo": {"kernel": rng.standard_normal((16, 4, 8)).astype(np.float32)},
        },
        "pre_norm": {"scale": rng.standard_normal((8, 4)).astype(np.float32)},
    }
    for leaf in (layers["mlp"]["wi_0"]["kernel"], layers["mlp"]["wo"]["kernel"]):
        leaf[:, 2] *= 1.5
    tree = {"decoder": {"layers": layers}, "token_embedder": {"embedding": rng.standard_normal((32, 8))}}
    tree = json.loads(json.dumps(tree, default=lambda x: x.tolist()))  # plain lists -> arrays below
    tree = _arrays(tree)
    root = str(tmp_path_factory.mktemp("maxtext") / "checkpoints")
    with ocp.CheckpointManager(root) as manager:
        manager.save(
            3,
            args=ocp.args.Composite(items=ocp.args.StandardSave(tree)),
            custom_metadata={"scan_layers": True},
        )
        manager.wait_until_finished()
    return root, tree


def _arrays(node):
    if isinstance(node, dict):
        return {k: _arrays(v) for k, v in node.items()}
    return np.asarray(node, np.float32)


@pytest.fixture(scope="module")
def ambiguous(tmp_path_factory):
    """nn.scan with variable_axes 1 (a bias of 6 over 6 layers is (6, 6)): the heuristic must ask."""
    rng = np.random.default_rng(5)
    tree = {
        "blocks": {"w": rng.standard_normal((10, 6)).astype(np.float32), "b": rng.standard_normal((6, 6))},
        "head": rng.standard_normal(3),
    }
    path = str(tmp_path_factory.mktemp("ambiguous") / "params")
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(path, tree)
    checkpointer.wait_until_finished()
    return path, tree


def test_maxtext_layers_come_from_the_step_metadata(maxtext_like):
    root, tree = maxtext_like
    doc = run_json("norms", root, "--unstack", "--per-param", "--memory-budget", "2KiB")
    norms = {p["path"]: p["norm"] for p in doc["params"]}
    wi = tree["decoder"]["layers"]["mlp"]["wi_0"]["kernel"]
    scale = tree["decoder"]["layers"]["pre_norm"]["scale"]
    for j in range(4):
        assert norms[f"decoder.layers.{j}.mlp.wi_0.kernel"] == pytest.approx(f64(wi[:, j, :]), rel=1e-12)
        assert norms[f"decoder.layers.{j}.pre_norm.scale"] == pytest.approx(f64(scale[:, j]), rel=1e-12)
    assert norms["token_embedder.embedding"] == pytest.approx(f64(tree["token_embedder"]["embedding"]))
    rows = run_json("table", root, "--unstack")["params"]
    row = next(r for r in rows if r["path"] == "decoder.layers.3.mlp.wo.kernel")
    assert row["shape"] == [16, 8] and row["count"] == 128 and row["stacked"] == "axis 1, metadata"
    count = run_json("count", root, "--unstack", "--depth", "3")
    assert {g["path"] for g in count["groups"]} >= {f"decoder.layers.{j}" for j in range(4)}


def test_stats_per_layer_and_filter_on_layer_names(maxtext_like):
    root, tree = maxtext_like
    wo = tree["decoder"]["layers"]["mlp"]["wo"]["kernel"]
    doc = run_json("stats", root, "--unstack", "--filter", r"layers\.1\.mlp\.wo")
    (row,) = doc["params"]
    layer = wo[:, 1, :].astype(np.float64)
    assert row["mean"] == pytest.approx(layer.mean(), rel=1e-12) and row["std"] == pytest.approx(layer.std())
    assert doc["global_norm"] == pytest.approx(f64(layer), rel=1e-12)  # of what is shown


def test_layers_ranks_the_scaled_layer_first(maxtext_like):
    root, tree = maxtext_like
    doc = run_json("layers", root, "--sort", "norm")
    first = doc["layers"][0]
    assert (first["stack"], first["layer"]) == ("decoder.layers", 2)
    layers = tree["decoder"]["layers"]
    arrays = [layers["mlp"]["wi_0"]["kernel"], layers["mlp"]["wo"]["kernel"]]
    expected = math.sqrt(sum(f64(a[:, 2]) ** 2 for a in arrays) + f64(layers["pre_norm"]["scale"][:, 2]) ** 2)
    assert first["norm"] == pytest.approx(expected, rel=1e-12)
    assert set(first["norms"]) == {"mlp.wi_0.kernel", "mlp.wo.kernel", "pre_norm.scale"}
    assert "decoder.layers" in run("layers", root).stdout


def test_the_heuristic_never_guesses_silently(ambiguous, manager_ckpt):
    path, tree = ambiguous
    result = run("table", path, "--unstack", "-f", "json")
    assert "blocks.b (6, 6) has 6 layers on axes [0, 1]" in result.stderr and "--layer-axis" in result.stderr
    rows = {p["path"]: p for p in json.loads(result.stdout)["params"]}
    assert "blocks.b" in rows and "blocks.0.w" in rows  # w is settled (one axis of size 6), b is left whole
    doc = run_json("norms", path, "--unstack", "--layer-axis", r"blocks\.b=1", "--per-param")
    norms = {p["path"]: p["norm"] for p in doc["params"]}
    assert norms["blocks.4.b"] == pytest.approx(f64(tree["blocks"]["b"][:, 4]), rel=1e-12)
    assert norms["blocks.4.w"] == pytest.approx(f64(tree["blocks"]["w"][:, 4]), rel=1e-12)
    assert run("table", path, "--layer-axis", "blocks=7").exit_code == 2
    values = manager_ckpt.values[200]["params"]  # nn.scan, axis 0, found by the heuristic
    doc = run_json("norms", manager_ckpt.path, "--unstack", "--per-param", "--engine", "mesh")
    norms = {p["path"]: p["norm"] for p in doc["params"]}
    kernel = values["layers.Block_0.Dense_0.kernel"]
    assert norms["layers.2.Block_0.Dense_0.kernel"] == pytest.approx(f64(kernel[2]), rel=1e-12)


def test_snapshot_and_check_per_layer(maxtext_like, tmp_path):
    root, tree = maxtext_like
    baseline = tmp_path / "layers.json"
    assert run("snapshot", root, "--unstack", "-o", baseline, "-q").exit_code == 0
    document = json.loads(baseline.read_text())
    rows = {p["path"]: p for p in document["params"]}
    wo = tree["decoder"]["layers"]["mlp"]["wo"]["kernel"]
    assert rows["decoder.layers.2.mlp.wo.kernel"]["stats"]["norm"] == pytest.approx(f64(wo[:, 2]), rel=1e-12)
    assert document["total"]["count"] == sum(v.size for v in _leaves(tree))
    assert run("check", root, "--unstack", "-b", baseline).exit_code == 0
    rows["decoder.layers.2.mlp.wo.kernel"]["stats"]["norm"] *= 1.01  # as if layer 2 had moved
    rows["decoder.layers.2.mlp.wo.kernel"].pop("digest", None)
    baseline.write_text(json.dumps(document))
    result = run("check", root, "--unstack", "-b", baseline, "-f", "json")
    assert result.exit_code == 1
    assert {(v["path"], v["metric"]) for v in json.loads(result.stdout)["violations"]} == {
        ("decoder.layers.2.mlp.wo.kernel", "norm")
    }


def _leaves(node):
    if isinstance(node, dict):
        for value in node.values():
            yield from _leaves(value)
    else:
        yield node


@pytest.fixture(scope="module")
def scanned_run(tmp_path_factory):
    """A linen model with nn.scan (layer axis 1, via variable_axes) trained 3 steps with
    chain(clip, adamw), saved by a CheckpointManager as params and opt_state items; layer 1's
    weights scaled down 100x before training, so its updates are the largest next to its weights."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import optax

    class Layer(nn.Module):
        @nn.compact
        def __call__(self, x, _):
            return jnp.tanh(nn.Dense(6)(x)), None

    class Model(nn.Module):
        @nn.compact
        def __call__(self, x):
            stack = nn.scan(Layer, variable_axes={"params": 1}, split_rngs={"params": True}, length=4)
            x, _ = stack(name="layers")(x, None)
            return jnp.sum(x**2)

    model = Model()
    x = jnp.asarray(np.random.default_rng(0).standard_normal((5, 6)), jnp.float32)
    params = model.init(jax.random.key(0), x)["params"]
    params = jax.tree.map(lambda p: p.at[:, 1].multiply(0.01) if p.ndim >= 2 else p, params)
    tx = optax.chain(optax.clip_by_global_norm(100.0), optax.adamw(1e-2))
    state = tx.init(params)
    for _ in range(3):
        grads = jax.grad(lambda p: model.apply({"params": p}, x))(params)
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
    root = str(tmp_path_factory.mktemp("scanned") / "checkpoints")
    with ocp.CheckpointManager(root) as manager:
        manager.save(
            3,
            args=ocp.args.Composite(
                params=ocp.args.StandardSave(params), opt_state=ocp.args.StandardSave(state)
            ),
        )
        manager.wait_until_finished()
    return root, params, state


def test_per_layer_optimizer_state_of_a_real_scanned_run(scanned_run):
    root, params, state = scanned_run
    kernel = np.asarray(params["layers"]["Dense_0"]["kernel"], np.float64)  # (6, 4, 6): layers on axis 1
    adam = state[1][0]
    mu = np.asarray(adam.mu["layers"]["Dense_0"]["kernel"], np.float64)
    nu = np.asarray(adam.nu["layers"]["Dense_0"]["kernel"], np.float64)
    count = int(adam.count)
    doc = run_json("optim", root, "--unstack", "--sort", "ratio")  # 4 is at axis 1, once, in both
    assert doc == run_json("optim", root, "--layer-axis", "layers=1", "--sort", "ratio")
    rows = {p["path"]: p for p in doc["params"]}
    for j in range(4):
        row = rows[f"layers.{j}.Dense_0.kernel"]
        update = (mu[:, j] / (1 - 0.9**count)) / (np.sqrt(nu[:, j] / (1 - 0.999**count)) + 1e-8)
        assert row["norm"] == pytest.approx(f64(kernel[:, j]), rel=1e-9)
        assert row["mu_norm"] == pytest.approx(f64(mu[:, j]), rel=1e-9)
        assert row["update_norm"] == pytest.approx(f64(update), rel=1e-9)
    assert doc["params"][0]["path"] in ("layers.1.Dense_0.kernel", "layers.1.Dense_0.bias")  # scaled down
    norms = run_json("norms", root, "--layer-axis", "layers=1", "--per-param")
    by_path = {p["path"]: p["norm"] for p in norms["params"]}
    bias = np.asarray(params["layers"]["Dense_0"]["bias"], np.float64)  # (6, 4)
    assert by_path["layers.2.Dense_0.bias"] == pytest.approx(f64(bias[:, 2]), rel=1e-9)
    assert "axis 1, option" in run("table", root, "--layer-axis", "layers=1").stdout


def test_diff_and_history_per_layer(manager_ckpt):
    before = manager_ckpt.values[100]["params"]["layers.Block_0.Dense_0.kernel"].astype(np.float64)
    after = manager_ckpt.values[200]["params"]["layers.Block_0.Dense_0.kernel"].astype(np.float64)
    doc = run_json("diff", manager_ckpt.path, "--step-a", "100", "--unstack", "--filter", "Dense_0.kernel")
    rows = {p["path"]: p for p in doc["params"]}
    for j in range(3):
        row = rows[f"layers.{j}.Block_0.Dense_0.kernel"]
        assert row["diff_norm"] == pytest.approx(f64(after[j] - before[j]), rel=1e-9)
        assert row["norm_a"] == pytest.approx(f64(before[j]), rel=1e-12)
    history = run_json("history", manager_ckpt.path, "--unstack", "--no-cache", "--filter", "Dense_0.kernel")
    values = {(r["step"], r["path"], r["metric"]): r["value"] for r in history["series"]}
    for j in range(3):
        change = f64(after[j] - before[j]) / f64(before[j])
        assert values[(200, f"layers.{j}.Block_0.Dense_0.kernel", "change")] == pytest.approx(
            change, rel=1e-9
        )


def test_history_heatmap_of_layers(manager_ckpt, tmp_path):
    from paramscope.compute.history import history, layer_rows
    from paramscope.compute.layers import find_stacks, unstack
    from paramscope.io import orbax
    from paramscope.io.inventory import open_checkpoint
    from paramscope.output.plot import plot_layer_heatmap

    def open_step(step):
        inv = open_checkpoint(manager_ckpt.path, step=step)
        stacks, _ = find_stacks(inv.params)
        return inv, [v.info for v in unstack(inv.params, stacks)]

    steps = [100, 200]
    result = history(steps, lambda s: orbax.commit_timestamp(orbax.locate(manager_ckpt.path, s)), open_step)
    layers = [p for p in open_step(200)[1] if p.layer is not None]
    drawn = plot_layer_heatmap(layer_rows(result, layers), steps, str(tmp_path / "heat.png"))
    for k, step in enumerate(steps):
        values = manager_ckpt.values[step]["params"]
        stacked = [v for path, v in values.items() if path.startswith("layers.")]
        for j in range(3):
            expected = math.sqrt(sum(f64(v[j]) ** 2 for v in stacked))
            assert drawn["layers"][j][k] == pytest.approx(expected, rel=1e-9)
    result = run(
        "history", manager_ckpt.path, "--unstack", "--no-cache", "--plot", tmp_path / "cli.png", "-q"
    )
    assert result.exit_code == 0 and (tmp_path / "cli.png").read_bytes().startswith(b"\x89PNG")


def test_nnx_vmapped_stack_with_its_optimizer_item(tmp_path):
    import jax.numpy as jnp
    import optax
    from flax import nnx

    class Block(nnx.Module):
        def __init__(self, rngs):
            self.linear = nnx.Linear(6, 5, rngs=rngs)

    @nnx.split_rngs(splits=3)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def create(rngs):
        return Block(rngs)

    class Model(nnx.Module):
        def __init__(self, rngs):
            self.layers = create(rngs)

    model = Model(nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.adamw(1e-2), wrt=nnx.Param)
    x = jnp.ones((2, 6))
    for _ in range(2):
        grads = nnx.grad(lambda m: jnp.sum(jnp.einsum("bi,lio->lbo", x, m.layers.linear.kernel.value) ** 2))(
            model
        )
        optimizer.update(model, grads)
    root = str(tmp_path / "run")
    with ocp.CheckpointManager(root) as manager:
        items = {"model": nnx.state(model), "optimizer": nnx.state(optimizer)}
        manager.save(2, args=ocp.args.Composite(**{k: ocp.args.StandardSave(v) for k, v in items.items()}))
        manager.wait_until_finished()
    kernel = np.asarray(model.layers.linear.kernel.value, np.float64)  # (3, 6, 5): layers on axis 0
    mu = np.asarray(optimizer.opt_state[0].mu["layers"]["linear"]["kernel"].value, np.float64)
    doc = run_json("optim", root, "--unstack")
    rows = {p["path"]: p for p in doc["params"]}
    for j in range(3):
        row = rows[f"layers.{j}.linear.kernel"]
        assert row["norm"] == pytest.approx(f64(kernel[j]), rel=1e-9)
        assert row["mu_norm"] == pytest.approx(f64(mu[j]), rel=1e-9)
    assert rows["layers.0.linear.bias"]["ratio"] is None  # zero bias, zero update: no ratio


def test_a_layers_mesh_axis_in_the_saved_sharding_decides(tmp_path):
    import jax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = jax.make_mesh((2, 4), ("stage", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    rng = np.random.default_rng(8)
    w = rng.standard_normal((8, 4, 8)).astype(np.float32)  # 4 layers on axis 1, pipelined over "stage"
    tree = {"decoder": {"stack": {"w": jax.device_put(w, NamedSharding(mesh, P(None, "stage", "model")))}}}
    path = str(tmp_path / "pipelined")
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(path, tree)
    checkpointer.wait_until_finished()
    rows = {p["path"]: p for p in run_json("norms", path, "--unstack", "--per-param")["params"]}
    assert rows["decoder.stack.3.w"]["norm"] == pytest.approx(f64(w[:, 3]), rel=1e-9)
    assert "axis 1, sharding" in run("table", path, "--unstack").stdout
