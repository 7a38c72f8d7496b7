"""The optimizer beside each parameter, on states written by real optax training loops."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from test_cli import run, run_json


def f64(x):
    return math.sqrt(float(np.sum(np.asarray(x, np.float64) ** 2)))


def adamw():
    return optax.adamw(1.0, weight_decay=0.0)  # lr 1, no decay: the update is Adam's own


WRAPPERS = {
    "chain": lambda: optax.chain(optax.clip_by_global_norm(10.0), adamw()),
    "inject": lambda: optax.inject_hyperparams(optax.adamw)(learning_rate=1.0, weight_decay=0.0),
    "multisteps": lambda: optax.MultiSteps(adamw(), every_k_schedule=2),
    "multi_transform": lambda: optax.multi_transform(
        {"train": adamw(), "frozen": optax.set_to_zero()},
        {"dense": {"kernel": "train", "bias": "train"}, "embed": "frozen"},
    ),
}


@pytest.fixture(scope="module", params=list(WRAPPERS))
def trained(request, tmp_path_factory):
    """A few steps of a real optax loop; the state saved as one train-state item. Returns the path,
    the params, the state, and the norm of the last update Adam applied to each parameter."""
    rng = np.random.default_rng(1)
    params = {
        "dense": {"kernel": jnp.asarray(rng.standard_normal((8, 4)), jnp.float32), "bias": jnp.zeros(4)},
        "embed": jnp.asarray(rng.standard_normal((16, 8)), jnp.float32),
    }
    params["dense"]["kernel"] = params["dense"]["kernel"].at[0].multiply(50.0)  # one row far larger
    tx = WRAPPERS[request.param]()
    state = tx.init(params)
    last = {}
    for step in range(4):
        grads = jax.tree.map(lambda p, s=step: jnp.sin(p * (s + 1)) + 0.1 * (s + 1), params)
        updates, state = tx.update(grads, state, params)
        flat = {
            jax.tree_util.keystr(k, simple=True, separator="."): v
            for k, v in jax.tree_util.tree_leaves_with_path(updates)
        }
        for path, value in flat.items():
            if np.any(np.asarray(value)):
                last[path] = f64(value)
        params = optax.apply_updates(params, updates)
    path = str(tmp_path_factory.mktemp(request.param) / "state")
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(path, {"params": params, "opt_state": state})
    checkpointer.wait_until_finished()
    return request.param, path, params, state, last


def test_moments_and_update_match_optax(trained):
    wrapper, path, params, state, last = trained
    doc = run_json("optim", path)
    rows = {p["path"]: p for p in doc["params"]}
    assert set(rows) == ({"dense.kernel", "dense.bias"} if wrapper == "multi_transform" else set(last))
    leaves = {
        jax.tree_util.keystr(k, simple=True, separator="."): v
        for k, v in jax.tree_util.tree_leaves_with_path(state)
    }
    for name, row in rows.items():
        mu = next(v for k, v in leaves.items() if k.endswith(f"mu.{name}"))
        nu = next(v for k, v in leaves.items() if k.endswith(f"nu.{name}"))
        assert row["mu_norm"] == pytest.approx(f64(mu), rel=1e-9)
        assert row["sqrt_nu_norm"] == pytest.approx(
            math.sqrt(float(np.sum(np.asarray(nu, np.float64)))), rel=1e-9
        )
        assert row["max_sqrt_nu"] == pytest.approx(math.sqrt(float(np.max(nu))), rel=1e-6)
        param = params["dense"][name.split(".")[1]] if name.startswith("dense") else params["embed"]
        assert row["norm"] == pytest.approx(f64(param), rel=1e-9)
        mu_key = next(k for k in leaves if k.endswith(f"mu.{name}"))
        count = int(leaves[mu_key[: -len(f"mu.{name}")] + "count"])
        mu_hat = np.asarray(mu, np.float64) / (1 - 0.9**count)
        nu_hat = np.asarray(nu, np.float64) / (1 - 0.999**count)
        update = f64(mu_hat / (np.sqrt(nu_hat) + 1e-8))  # float64 reference from the stored state
        assert row["step_count"] == count and row["update_norm"] == pytest.approx(update, rel=1e-9)
        assert row["update_norm"] == pytest.approx(last[name], rel=1e-4)  # what optax applied (float32)
        assert row["ratio"] == pytest.approx(update / f64(param), rel=1e-9)
    if wrapper == "multi_transform":
        assert doc["stateless"] == ["embed"]
    if wrapper == "inject":
        assert any("hyperparams" in leaf for leaf in doc["unmatched"])  # listed, never dropped


def test_the_largest_update_ratio_ranks_first_and_lr_scales_it(trained):
    wrapper, path, _, _, last = trained
    doc = run_json("optim", path, "--sort", "ratio", "--lr", "0.5")
    ratios = [p["ratio"] for p in doc["params"]]
    assert ratios == sorted(ratios, reverse=True)
    plain = {p["path"]: p["ratio"] for p in run_json("optim", path)["params"]}
    assert {p["path"]: p["ratio"] for p in doc["params"]} == pytest.approx(
        {k: 0.5 * v for k, v in plain.items()}
    )
    text = run("optim", path).stdout
    assert "update/param" in text and "dense.kernel" in text


def test_two_items_and_names_that_do_not_split(manager_ckpt, tmp_path):
    doc = run_json("optim", manager_ckpt.path)  # params and opt_state items of a manager step
    values = manager_ckpt.values[200]["params"]
    assert {p["path"] for p in doc["params"]} == set(values)
    assert all(p["norm"] == pytest.approx(f64(values[p["path"]]), rel=1e-9) for p in doc["params"])
    lone = tmp_path / "lone"
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(str(lone), {"w": np.ones(3, np.float32)})
    checkpointer.wait_until_finished()
    result = run("optim", lone)
    assert result.exit_code == 3 and "--params-item" in result.stderr


def test_a_train_state_saved_under_a_key_is_split_below_it(tmp_path):
    rng = np.random.default_rng(2)
    params = {
        "dense": {"kernel": rng.standard_normal((8, 4)).astype(np.float32), "bias": np.ones(4, np.float32)}
    }
    tx = optax.adam(1.0)
    state = tx.init(params)
    _, state = tx.update(jax.tree.map(lambda p: p * 0.5 + 0.1, params), state, params)
    checkpointer = ocp.StandardCheckpointer()
    for name, tree in {
        "top": {"params": params, "opt_state": state},
        "nested": {"model": {"step": np.int32(1), "params": params, "opt_state": state}},
    }.items():
        checkpointer.save(str(tmp_path / name), tree)
        checkpointer.wait_until_finished()
    top, nested = run_json("optim", tmp_path / "top"), run_json("optim", tmp_path / "nested")
    assert nested["params"] == top["params"]
    rows = {p["path"]: p for p in nested["params"]}
    assert set(rows) == {"dense.kernel", "dense.bias"}
    assert rows["dense.kernel"]["mu_norm"] == pytest.approx(f64(state[0].mu["dense"]["kernel"]), rel=1e-9)


def test_keras_flat_optimizer_names_align_and_give_keras_update():
    """Keras 3 (the committed OrbaxCheckpoint fixture): `optimizer_variables.adam.<path with
    underscores>_momentum/_velocity` beside `trainable_variables.<path>`, the step in `iteration`;
    checked against the arrays as Orbax restores them and Keras' Adam update in float64."""
    import os

    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "keras_orbax", "checkpoints")
    tree = ocp.PyTreeCheckpointer().restore(os.path.join(root, "1", "pytree"))
    adam, weights = tree["optimizer_variables"]["adam"], tree["trainable_variables"]["tiny"]
    doc = run_json("optim", root)
    assert (
        doc["convention"] == "keras"
        and doc["eps"] == 1e-7
        and doc["unmatched"] == ["optimizer_variables.adam.learning_rate"]
    )
    rows = {p["path"]: p for p in doc["params"]}
    assert set(rows) == {f"tiny.{layer}.{var}" for layer in ("hidden", "head") for var in ("kernel", "bias")}
    t = int(adam["iteration"])
    for path, row in rows.items():
        _, layer, var = path.split(".")
        m = np.asarray(adam[f"tiny_{layer}_{var}_momentum"], np.float64)
        v = np.asarray(adam[f"tiny_{layer}_{var}_velocity"], np.float64)
        update = m / (1 - 0.9**t) * math.sqrt(1 - 0.999**t) / (np.sqrt(v) + 1e-7)
        assert row["step_count"] == t
        assert row["norm"] == pytest.approx(f64(weights[layer][var]), rel=1e-9)
        assert row["mu_norm"] == pytest.approx(f64(m), rel=1e-9)
        assert row["sqrt_nu_norm"] == pytest.approx(math.sqrt(float(np.sum(v))), rel=1e-9)
        assert row["update_norm"] == pytest.approx(f64(update), rel=1e-9)


def test_a_flat_name_two_parameters_share_aligns_neither():
    from paramscope.compute.optim import _flat_names

    names = _flat_names(dict.fromkeys(["a_b.c", "a.b_c", "dense.kernel", 'x."y.z"']))
    assert names == {"dense_kernel": "dense.kernel", "x_y.z": 'x."y.z"'}
