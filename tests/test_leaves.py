"""Trees as they really come: string leaves, keys named ``value``, keys with dots, Keras' items.

Read from committed fixtures written by the real writers (tests/data/*/LAYOUT.md) and from
checkpoints Orbax writes here.
"""

import json
import os

import numpy as np
import orbax.checkpoint as ocp
import pytest
from test_cli import run, run_json

DATA = os.path.join(os.path.dirname(__file__), "data")
V1 = os.path.join(DATA, "orbax_v1")
KERAS = os.path.join(DATA, "keras_orbax")


def _expected(folder):
    with open(os.path.join(folder, "expected.json")) as f:
        return json.load(f)


def test_a_real_key_named_value_is_kept_and_a_box_is_unboxed():
    """``{'mlp': {'value': w}}`` stays ``mlp.value``; a flax Partitioned box is ``dense.kernel``;
    the string leaf is a value, not an array; norms match the float64 reference."""
    expected = _expected(V1)["string_and_value_keys"]["leaves"]
    path = os.path.join(V1, "string_and_value_keys")
    table = run_json("table", path)
    arrays = {p["path"]: p for p in table["params"]}
    assert set(arrays) == {k for k, v in expected.items() if v["dtype"] != "str"}
    for name, param in arrays.items():
        assert param["shape"] == expected[name]["shape"]
    assert table["values"] == [
        {"path": "name", "type": "str", "value": "tiny-mlp"},
        {"path": "step", "type": "int", "value": 7},  # a Python int: a 0-d array, and its value
    ]
    norms = run_json("norms", path, "--per-param")
    for entry in norms["params"]:
        assert entry["norm"] == pytest.approx(expected[entry["path"]]["norm"], rel=1e-6)
    verify = run("verify", path)
    assert verify.exit_code == 0, verify.stdout + verify.stderr


def test_string_leaves_are_values_in_every_command():
    """The 0.12 v1 single checkpoint has a string leaf in _strings.json: no command calls the
    checkpoint incomplete, and the table shows the string as a value."""
    path = os.path.join(V1, "single")
    for command in ("table", "count", "norms", "stats", "verify", "info"):
        result = run(command, path)
        assert result.exit_code == 0, (command, result.stderr)
    table = run("table", path)
    assert "values (strings;" in table.stdout and "tiny-linen" in table.stdout


def test_keras_orbax_steps_read_the_arrays_item_without_a_prefix():
    """Keras 3's OrbaxCheckpoint step: `pytree` (arrays) and `model_config` (one string, no
    OCDBT database). Every command works; paths are the model's; --item picks either item."""
    expected = _expected(KERAS)
    root = os.path.join(KERAS, "checkpoints")
    for step, items in expected["steps"].items():
        leaves = items["pytree"]
        table = run_json("table", root, "--step", step)
        assert {p["path"]: p["shape"] for p in table["params"]} == {k: v["shape"] for k, v in leaves.items()}
        norms = run_json("norms", root, "--step", step, "--per-param")
        for entry in norms["params"]:
            assert entry["norm"] == pytest.approx(leaves[entry["path"]]["norm"], rel=1e-6)
    assert (
        "no arrays: the item holds only the values below"
        in run("table", root, "--item", "model_config").stdout
    )
    config = run_json("table", root, "--item", "model_config")
    assert config["params"] == [] and config["values"][0]["path"] == "config"
    assert json.loads(config["values"][0]["value"])["class_name"] == "Sequential"
    for command in ("info", "verify", "stats", "count"):
        result = run(command, root)
        assert result.exit_code == 0, (command, result.stderr)


@pytest.fixture(scope="module")
def dotted(tmp_path_factory):
    """``{'a.b': x, 'a': {'b': y}}`` of one shape, saved by Orbax: it stores one array for both."""
    path = tmp_path_factory.mktemp("dotted") / "ckpt"
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    ckptr = ocp.PyTreeCheckpointer()
    ckptr.save(path, {"a.b": x, "a": {"b": x * 2}, "c": {"value": x + 1}})
    return str(path)


def test_two_keys_that_print_alike_stay_two_rows_and_are_reported(dotted):
    table = run("table", dotted, "--format", "json")
    assert table.exit_code == 0
    paths = [p["path"] for p in json.loads(table.stdout)["params"]]
    assert sorted(paths) == sorted(['"a.b"', "a.b", "c.value"])
    assert "stored as one array 'a.b'" in table.stderr  # warned about everywhere
    only = run_json("table", dotted, "--filter", r'^"a\.b"$')
    assert [p["path"] for p in only["params"]] == ['"a.b"']
    verify = run("verify", dotted)
    assert verify.exit_code == 3  # damage
    assert "stored as one array" in verify.stdout + verify.stderr


@pytest.fixture(scope="module")
def flax_root(tmp_path_factory):
    """``flax.training.checkpoints.save_checkpoint`` (Orbax underneath): checkpoint_<N> folders
    that are items themselves."""
    from flax.training import checkpoints

    root = tmp_path_factory.mktemp("flax") / "run"
    values = {}
    for step in (1, 2):
        tree = {"params": {"w": np.full((3, 4), step, np.float32), "b": np.arange(4, dtype=np.float32)}}
        checkpoints.save_checkpoint(str(root), tree, step=step, keep=3)
        values[step] = tree
    return str(root), values


def test_flax_checkpoint_roots_are_steps_not_items(flax_root):
    root, values = flax_root
    for step in (None, 1):
        args = ("--step", str(step)) if step else ()
        table = run_json("table", root, *args)
        assert table["step"] == (step or 2)
        assert sorted(p["path"] for p in table["params"]) == ["params.b", "params.w"]
        norms = run_json("norms", root, "--per-param", *args)
        want = np.sqrt(12.0) * (step or 2)
        assert next(p["norm"] for p in norms["params"] if p["path"] == "params.w") == pytest.approx(want)
    info = run_json("info", root)
    assert [s["step"] for s in info["steps"]] == [1, 2]
    assert [i["name"] for i in info["items"]] == ["checkpoint_2"]
    diff = run_json("diff", root, "--step-a", "1")
    assert sorted(p["path"] for p in diff["params"] if p["status"] == "changed") == ["params.w"]


def test_info_shows_what_orbax_v1_recorded_of_the_step():
    root = os.path.join(V1, "training")
    info = run_json("info", root)
    meta = info["step_metadata"]
    assert meta["writer"] == "Orbax (v1 API)" and meta["custom_metadata"] == {"epoch": 2}
    assert meta["started"] <= meta["committed"] and meta["committed"].endswith("Z")
    assert 'custom metadata: {"epoch": 2}' in run("info", root).stdout
    assert run_json("info", os.path.join(V1, "string_and_value_keys"))["step_metadata"]["writer"] == "Orbax"


def test_statistics_of_complex_arrays_say_they_are_of_magnitudes(tmp_path):
    z = (np.arange(6) - 2.5 + 1j * np.arange(6)).astype(np.complex64).reshape(2, 3)
    path = tmp_path / "complex"
    ocp.PyTreeCheckpointer().save(path, {"z": z, "w": np.ones(3, np.float32)})
    stats = run_json("stats", path)
    rows = {p["path"]: p for p in stats["params"]}
    assert rows["z"]["of_magnitude"] is True and "of_magnitude" not in rows["w"]
    assert rows["z"]["mean"] == pytest.approx(np.abs(z.astype(np.complex128)).mean(), rel=1e-6)
    assert rows["z"]["norm"] == pytest.approx(np.linalg.norm(z.astype(np.complex128)), rel=1e-6)
    assert (
        "complex arrays (z): mean, std, min, max and zeros are of the magnitudes |z|"
        in run("stats", path).stdout
    )
    assert run_json("table", path, "--stats")["params"][1]["of_magnitude"] is True


@pytest.fixture(scope="module")
def every_leaf(tmp_path_factory):
    """Every kind of leaf Orbax 0.12 stores, saved by Orbax (uint4 and zero-size arrays it
    refuses to write: those come through safetensors and msgpack, tested there)."""
    from typing import NamedTuple

    import jax
    import jax.numpy as jnp
    import ml_dtypes
    import optax
    from flax import struct

    class Pair(NamedTuple):
        a: jax.Array
        b: jax.Array

    @struct.dataclass
    class Node:
        x: jax.Array

    tree = {
        "key": jax.random.key(0),
        "keys": jax.random.split(jax.random.key(1), 3),
        "raw_key": jax.random.PRNGKey(2),
        "f8": jnp.arange(4, dtype=jnp.float8_e4m3fn),
        "f8b": jnp.arange(4, dtype=jnp.float8_e5m2),
        "i4": jnp.arange(-4, 4, dtype=jnp.int4),
        "flag": jnp.array([True, False, True]),
        "c": jnp.array([1 + 2j, 3 - 1j], dtype=jnp.complex64),
        "scalar": jnp.float32(3.5),
        "pyint": 7,
        "pyfloat": 2.5,
        "name": "run-1",
        "none": None,
        "empty_dict": {},
        "empty_list": [],
        "pair": Pair(jnp.ones(2), jnp.zeros(2)),
        "node": Node(jnp.full(3, 2.0)),
        "opt": optax.adam(1e-3).init({"w": jnp.ones(2)}),
        "we ird/κλειδί key": jnp.ones(2),
    }
    path = tmp_path_factory.mktemp("leaves") / "ckpt"
    ocp.PyTreeCheckpointer().save(path, tree)
    flat = {
        "f8": np.arange(4).astype(ml_dtypes.float8_e4m3fn),
        "f8b": np.arange(4).astype(ml_dtypes.float8_e5m2),
        "i4": np.arange(-4, 4),
        "flag": np.array([1, 0, 1]),
        "c": np.array([1 + 2j, 3 - 1j]),
        "scalar": np.array(3.5),
        "pyint": np.array(7),
        "pyfloat": np.array(2.5),
        "raw_key": np.asarray(tree["raw_key"]),
        "pair.a": np.ones(2),
        "pair.b": np.zeros(2),
        "node.x": np.full(3, 2.0),
        "opt.0.count": np.array(0),
        "opt.0.mu.w": np.zeros(2),
        "opt.0.nu.w": np.zeros(2),
        "we ird/κλειδί key": np.ones(2),
    }
    return str(path), flat


def test_every_leaf_is_read_or_named(every_leaf):
    path, flat = every_leaf
    table = run_json("table", path)
    rows = {p["path"]: p for p in table["params"]}
    assert set(rows) == set(flat) | {"key", "keys"}
    assert rows["f8"]["dtype"] == "float8_e4m3fn" and rows["i4"]["dtype"] == "int4"
    assert rows["key"]["random_key"] == rows["keys"]["random_key"] == "threefry2x32"
    assert "random_key" not in rows["raw_key"]  # a raw uint32 key is just numbers
    assert table["values"] == [
        {"path": "name", "type": "str", "value": "run-1"},
        {"path": "pyfloat", "type": "float", "value": 2.5},
        {"path": "pyint", "type": "int", "value": 7},
    ]
    result = run("norms", path, "--per-param", "--format", "json")
    assert result.exit_code == 0 and "typed PRNG keys left out of the numbers: key, keys" in result.stderr
    norms = {p["path"]: p["norm"] for p in json.loads(result.stdout)["params"]}
    assert set(norms) == set(flat)
    for name, value in flat.items():
        want = np.linalg.norm(np.asarray(value, dtype=np.complex128 if name == "c" else np.float64).ravel())
        assert norms[name] == pytest.approx(want, rel=1e-6), name
    for command in ("stats", "verify", "count", "info", "snapshot"):
        result = run(command, path, *(("-o", "/dev/null") if command == "snapshot" else ()))
        assert result.exit_code == 0, (command, result.stderr)


@pytest.mark.parametrize(("case", "step"), [("single", None), ("training", "1"), ("training", "2")])
def test_orbax_v1_checkpoints_against_their_writer(case, step):
    """``ocp.v1.save`` and ``ocp.v1.training.Checkpointer`` (NNX model and optimizer): the paths
    the training code uses, and float64 norms of the values the writer held."""
    want = _expected(V1)[case]
    want = (want["steps"][step] if step else want)["leaves"]
    arrays = {k: v for k, v in want.items() if v["dtype"] != "str"}
    args = (os.path.join(V1, case), *(("--step", step) if step else ()))
    table = run_json("table", *args)
    assert {p["path"]: p["shape"] for p in table["params"]} == {k: v["shape"] for k, v in arrays.items()}
    norms = run_json("norms", *args, "--per-param")
    for entry in norms["params"]:
        assert entry["norm"] == pytest.approx(arrays[entry["path"]]["norm"], rel=1e-6), entry["path"]


def test_a_tree_forty_levels_deep(tmp_path):
    tree = leaf = {}
    for depth in range(40):
        leaf["w"] = np.full(2, depth, np.float32)
        leaf = leaf.setdefault(f"level{depth}", {})
    leaf["w"] = np.full(2, 40, np.float32)
    ocp.PyTreeCheckpointer().save(tmp_path / "deep", tree)
    norms = run_json("norms", tmp_path / "deep", "--per-param")
    assert len(norms["params"]) == 41
    deepest = ".".join(f"level{d}" for d in range(40)) + ".w"
    assert {p["path"]: p["norm"] for p in norms["params"]}[deepest] == pytest.approx(40 * np.sqrt(2))
    count = run_json("count", tmp_path / "deep", "--depth", "35")
    assert count["total"]["count"] == 82


@pytest.mark.parametrize(
    ("fixture", "name"),
    [
        ("flax_msgpack", "tiny-embed"),
        ("orbax_0_4_aggregate", "tiny-mlp"),
        ("orbax_0_4_placeholder", "tiny-mlp"),
    ],
)
def test_strings_of_msgpack_checkpoints_are_values(fixture, name):
    table = run_json("table", os.path.join(DATA, fixture, "checkpoints"))
    assert {"path": "config.name", "type": "str", "value": name} in table["values"]
    assert "config.name" not in {p["path"] for p in table["params"]}


def test_an_aggregate_item_without_its_file_is_never_empty(tmp_path):
    """Orbax 0.4's _METADATA marks aggregated arrays skip_deserialize: without the msgpack file
    that holds them the item is damaged, not a checkpoint of 0 arrays with a norm of 0."""
    import shutil

    root = tmp_path / "run"
    shutil.copytree(os.path.join(DATA, "orbax_0_4_aggregate", "checkpoints"), root)
    os.remove(root / "checkpoint_2" / "default" / "checkpoint")
    for command in ("table", "norms", "verify", "count"):
        result = run(command, root)
        assert result.exit_code == 3 and result.stderr.count("\n") == 1, (command, result.stderr)
        assert "marks 21 arrays as stored in the aggregate file" in result.stdout + result.stderr
    assert run_json("norms", root, "--step", "1")["global_norm"] > 0
