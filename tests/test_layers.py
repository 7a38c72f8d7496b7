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
