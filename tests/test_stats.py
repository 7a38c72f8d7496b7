"""Streaming statistics: memory budgets, slicing, both engines, all against float64 numpy."""

import json
import math

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import Written, make_mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from test_cli import run

from paramscope import compute_norms, compute_stats, diff_params, open_checkpoint, verify_checkpoint
from paramscope.compute.moments import BLOCK, Accumulator, host_moments
from paramscope.compute.plan import plan_reads
from paramscope.errors import UsageError

MiB = 1 << 20


def reference(value):
    x = np.asarray(value).astype(np.float64).ravel()
    finite = x[np.isfinite(x)]
    return {
        "norm": float(np.sqrt(np.sum(x**2))),
        "mean": float(finite.mean()),
        "std": float(finite.std()),
        "min": float(finite.min()),
        "max": float(finite.max()),
        "max_abs": float(np.abs(finite).max()),
        "zero_fraction": float(np.mean(x == 0)),
        "nan": int(np.isnan(x).sum()),
        "inf": int(np.isinf(x).sum()),
    }


def assert_stats(found, value, rel=1e-6):
    expected = reference(value)
    for name, want in expected.items():
        got = found[name]
        if isinstance(want, float) and math.isnan(want):
            assert math.isnan(got), name
        elif name == "mean":  # near zero, a mean is exact relative to the values' spread
            assert got == pytest.approx(want, rel=rel, abs=rel * expected["std"]), name
        else:
            assert got == pytest.approx(want, rel=rel, abs=1e-12), name


@pytest.fixture(scope="session")
def big_ckpt(tmp_path_factory):
    """Arrays larger than a 1 MiB budget, in shapes that make the reader slice different axes."""
    mesh = make_mesh()
    rng = np.random.default_rng(3)
    values = {
        "matrix": rng.standard_normal((1024, 1024)).astype(np.float32),  # 4 MiB, 8 shards
        "stacked": (1000 + 0.01 * rng.standard_normal((3, 700, 500))).astype(np.float32),  # large mean
        "wide": rng.standard_normal((1, 600_000)).astype(np.float32),  # one row above the budget
        "bf16": rng.standard_normal((2, 300_000)).astype(jax.numpy.bfloat16),
        "sparse": np.where(rng.random(70_000) < 0.3, 0, rng.standard_normal(70_000)).astype(np.float32),
        "nan": rng.standard_normal((513, 257)).astype(np.float32),
        "tiny": np.float32(2.5),
    }
    values["nan"][[3, 400], [5, 7]] = np.nan
    values["nan"][100, 100] = -np.inf
    specs = {
        "matrix": P("data", "model"),
        "stacked": P(None, "data"),
        "wide": P(None, "model"),
        "bf16": P("data"),
    }
    tree = {
        k: jax.device_put(v, NamedSharding(mesh, specs.get(k, P()))) if k != "tiny" else v
        for k, v in values.items()
    }
    path = str(tmp_path_factory.mktemp("big") / "item")
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(path, tree)
    checkpointer.wait_until_finished()
    return Written(path, values, {})


def test_plan_reads_covers_each_array_once_within_the_limit(big_ckpt):
    params = open_checkpoint(big_ckpt.path).params
    groups = plan_reads(params, MiB)
    covered = {i: 0 for i in range(len(params))}
    for group in groups:
        assert sum(r.nbytes for r in group) <= MiB
        for region in group:
            covered[region.param] += math.prod(region.shape)
            param = params[region.param]
            if len(region.shape) < 2 or region.shape[0] == param.shape[0]:
                continue
            band = param.stored.chunks[0] * math.prod(param.shape[1:]) * param.itemsize
            if band <= MiB:
                assert region.index[0].start % param.stored.chunks[0] == 0  # along chunk boundaries
    assert covered == {i: p.count for i, p in enumerate(params)}
    assert len(plan_reads(params, 1 << 30)) == 1


@pytest.mark.parametrize("engine", ["host", "mesh"])
def test_stats_under_any_budget_match_float64(big_ckpt, engine):
    params = open_checkpoint(big_ckpt.path).params
    small = compute_stats(params, engine=engine, memory_budget=MiB)
    large = compute_stats(params, engine=engine, memory_budget=1 << 30)
    for result in (small, large):
        for entry in result.params:
            assert_stats(entry.moments.stats(), big_ckpt.values[entry.param.path])
    if engine == "host":  # fixed blocks and exact sums: bit-identical whatever the budget
        assert [repr(r.moments) for r in small.params] == [repr(r.moments) for r in large.params]
        assert repr(small.global_norm) == repr(large.global_norm)
    else:
        for a, b in zip(small.params, large.params):
            assert a.norm == pytest.approx(b.norm, rel=1e-6, nan_ok=True)


def test_engines_agree(big_ckpt):
    inventory = open_checkpoint(big_ckpt.path)
    host = compute_stats(inventory.params, engine="host", memory_budget=2 * MiB)
    mesh = compute_stats(
        inventory.params, engine="mesh", memory_budget=2 * MiB, saved_mesh=inventory.saved_mesh
    )
    assert mesh.mesh == (("data", 2), ("model", 4)) and host.mesh is None
    for a, b in zip(host.params, mesh.params):
        ours, theirs = a.moments.stats(), b.moments.stats()
        for name, value in ours.items():
            scale = ours["std"] if name == "mean" else 0
            assert theirs[name] == pytest.approx(value, rel=1e-6, abs=1e-6 * scale, nan_ok=True), name
    assert host.global_norm == pytest.approx(mesh.global_norm, rel=1e-6, nan_ok=True)


def test_accumulator_is_independent_of_how_values_are_split():
    rng = np.random.default_rng(0)
    values = (rng.standard_normal(5 * BLOCK + 123) * 3 + 7).astype(np.float32)
    whole = host_moments(values, full=True)
    for cuts in ([1], [BLOCK - 1, BLOCK + 5], [17, 40_000, 200_000, 300_000]):
        accumulator = Accumulator(full=True, span=2 * BLOCK)
        for piece in np.split(values, cuts):
            accumulator.feed(piece)
        assert repr(accumulator.result()) == repr(whole)
    assert_stats(whole.stats(), values)
    empty = host_moments(np.zeros((0, 3), np.float32), full=True)
    assert empty.count == 0 and empty.norm == 0 and math.isnan(empty.mean)


def test_stats_of_every_dtype_with_nan_and_inf(special_ckpt):
    result = run("stats", special_ckpt.path, "--format", "json", "--memory-budget", "4KiB")
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["schema"] == "paramscope.stats/2" and doc["nonfinite"] == 2
    rows = {p["path"]: p for p in doc["params"]}
    assert set(rows) == set(special_ckpt.values)
    for path, value in special_ckpt.values.items():
        expected = reference(value)
        for name, got in rows[path].items():  # JSON has no NaN or Inf: they are null
            if got is None:
                assert not math.isfinite(expected[name]), (path, name)
        found = {k: (expected[k] if v is None else v) for k, v in rows[path].items()}
        assert_stats(found, value)
    assert "f32.with_nan" in result.stderr
    assert run("stats", special_ckpt.path, "--fail-on-nonfinite").exit_code == 1
    assert run("stats", special_ckpt.path, "--fail-on-nonfinite", "--filter", "^(bf16|int8)$").exit_code == 0


def test_library_memory_budgets_are_sizes_or_bytes(big_ckpt):
    """The library takes the command line's sizes as well as ints, through one parser."""
    params = open_checkpoint(big_ckpt.path).params
    by_size = compute_stats(params, engine="host", memory_budget="2MiB")
    by_bytes = compute_stats(params, engine="host", memory_budget=2 * MiB)
    assert by_size.memory_budget == by_bytes.memory_budget == 2 * MiB
    assert [repr(r.moments) for r in by_size.params] == [repr(r.moments) for r in by_bytes.params]
    assert compute_norms(params, memory_budget="2GB").memory_budget == 2_000_000_000
    assert compute_norms(params, memory_budget=np.int64(4096)).memory_budget == 4096
    assert verify_checkpoint(big_ckpt.path, memory_budget="1MiB").ok
    assert diff_params(params, params, memory_budget="1MiB").counts()["identical"] == len(params)
    for bad, message in [("lots", "malformed size"), (100, "too small"), (True, "neither"), (2.5, "neither")]:
        with pytest.raises(UsageError, match=message):
            compute_norms(params, memory_budget=bad)


def test_table_stats_and_budget_option(big_ckpt):
    result = run("table", big_ckpt.path, "--stats", "--memory-budget", "1MiB", "--format", "json")
    assert result.exit_code == 0, result.stderr
    for row in json.loads(result.stdout)["params"]:
        found = {k: (math.nan if v is None else v) for k, v in row.items()}
        assert_stats(found, big_ckpt.values[row["path"]])
    bad = run("norms", big_ckpt.path, "--memory-budget", "lots")
    assert bad.exit_code == 2 and "malformed size" in bad.stderr
    bad = run("norms", big_ckpt.path, "--engine", "gpu")
    assert bad.exit_code == 2 and "'gpu' is not one of 'auto', 'host', 'mesh'" in bad.stderr


def test_the_same_inf_or_nan_in_both_sides_is_no_difference():
    """inf - inf is NaN: equal infinities must still count as equal, as equal NaNs do."""
    from paramscope.compute.diff import _PairSums

    a = np.array([1.0, np.inf, np.nan, -np.inf, 2.0], dtype=np.float32)
    b = np.array([1.0005, np.inf, np.nan, -np.inf, 2.0], dtype=np.float32)
    sums = _PairSums(rtol=1e-3, atol=0.0)
    sums.feed(a, b)
    result = sums.result()
    assert result.diff_norm == abs(np.float64(np.float32(1.0005)) - 1.0)
    assert result.beyond_tolerance == 0 and not result.identical
    same = _PairSums(rtol=0.0, atol=0.0)
    same.feed(a, a.copy())
    assert same.result().diff_norm == 0.0 and same.result().identical
