"""Many small arrays: TensorStore work per command grows with the arrays, results equal float64.

The counts come from thin counting wrappers around the adapter's functions (and TensorStore's own
``ts.open``): each wrapper counts and calls the real function, so nothing is faked.
"""

import collections
import functools
import math
import re

import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorstore
from test_cli import run, run_json
from test_stats import assert_stats

from paramscope import compute_norms, compute_stats, open_checkpoint
from paramscope.compute import plan
from paramscope.compute.diff import _PairSums, diff_params
from paramscope.compute.moments import BLOCK
from paramscope.io import checkpoint as adapter
from paramscope.io import zarr

ARRAYS = 2500


def _values(rng, arrays):
    values = {}
    for i in range(arrays):
        shape = [(16, 8), (3,), (40,), (7, 5)][i % 4]
        dtype = np.float32 if i % 5 else np.int32
        scale = 1 + i % 7
        values[f"layer_{i // 10:04d}.w{i % 10}"] = (scale * rng.standard_normal(shape)).astype(dtype)
    return values


def _save(path, values):
    tree = {}
    for name, value in values.items():
        layer, key = name.split(".")
        tree.setdefault(layer, {})[key] = value
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(path, tree)
    checkpointer.wait_until_finished()


@pytest.fixture(scope="session")
def many(tmp_path_factory):
    """Two checkpoints of 2,500 small arrays (float32 and int32); B differs from A in 25 of them."""
    rng = np.random.default_rng(12)
    a = _values(rng, ARRAYS)
    b = dict(a)
    changed = sorted(a)[::100]
    for name in changed:
        b[name] = a[name] + np.ones_like(a[name])
    root = tmp_path_factory.mktemp("many")
    _save(str(root / "a"), a)
    _save(str(root / "b"), b)
    return str(root / "a"), str(root / "b"), a, b, changed


class Counts:
    """Counts calls into the adapter and TensorStore while a test runs."""

    def __init__(self, monkeypatch):
        self.calls = collections.Counter()
        self._wrap(monkeypatch, tensorstore, "open", "ts.open")
        self._wrap(monkeypatch, adapter, "open_arrays", "open_arrays", arg_len="arrays opened")
        self._wrap(monkeypatch, zarr, "_read_kv", "_read_kv", arg_len="keys read", arg=1)
        self._wrap(monkeypatch, adapter, "start_read", "start_read")

    def _wrap(self, monkeypatch, owner, name, label, arg_len=None, arg=0):
        real = getattr(owner, name)

        @functools.wraps(real)
        def counting(*args, **kwargs):
            self.calls[label] += 1
            if arg_len:
                self.calls[arg_len] += len(args[arg])
            return real(*args, **kwargs)

        monkeypatch.setattr(owner, name, counting)

    def __getitem__(self, label):
        return self.calls[label]


def _counted(monkeypatch, *args):
    counts = Counts(monkeypatch)
    out = run_json(*args)
    monkeypatch.undo()
    return counts, out


@pytest.mark.parametrize(
    "command",
    [
        ("norms", "--per-param"),
        ("stats",),
        ("verify",),
        ("diff", "B"),
        ("check", "--baseline", "BASELINE"),
        ("table", "--norms"),
    ],
)
def test_tensorstore_work_grows_with_the_arrays(many, monkeypatch, tmp_path, command):
    """Each array is opened at most once (twice for diff; small arrays of one metadata together,
    as one stack) and read once, and opens come in batches: the counts grow no faster than the
    arrays a command reads, whatever their number."""
    path_a, path_b, values, _, _ = many
    baseline = tmp_path / "baseline.json"
    result = run("snapshot", path_a, "-o", baseline)
    assert result.exit_code == 0, result.stderr
    name, *options = command
    options = [path_b if o == "B" else str(baseline) if o == "BASELINE" else o for o in options]
    per_array = []
    filterable = name in ("norms", "stats", "diff", "table")
    for pattern in ("^layer_00[0-4]", ".") if filterable else (None,):  # 500 arrays, then 2,500
        filtered = ("--filter", pattern) if pattern else ()
        arrays = sum(1 for p in values if re.search(pattern or ".", p))
        counts, _ = _counted(monkeypatch, name, path_a, *options, *filtered)
        sides = 2 if name == "diff" else 1
        assert 0 < counts["ts.open"] <= sides * arrays
        assert counts["arrays opened"] == sides * arrays
        assert counts["start_read"] == sides * arrays
        assert counts["open_arrays"] <= math.ceil(arrays / plan.GROUP_ARRAYS) + 1
        assert counts["_read_kv"] <= 2 * sides  # one batch of metadata reads per item and side
        assert counts["keys read"] == sides * ARRAYS  # every array's zarr metadata, read once
        per_array.append((counts["ts.open"] + counts["start_read"]) / arrays)
    assert per_array[-1] <= per_array[0]


def test_metadata_commands_read_each_array_metadata_once(many, monkeypatch):
    path_a, _, _, _, _ = many
    for args in (("count", "--depth", "2"), ("table",), ("info",), ("mask", "--exclude", "w1$")):
        counts, _ = _counted(monkeypatch, args[0], path_a, *args[1:])
        assert counts["ts.open"] == 0 and counts["start_read"] == 0
        assert counts["_read_kv"] == 1 and counts["keys read"] == ARRAYS


def test_many_arrays_equal_float64(many):
    path_a, _, values, _, _ = many
    params = open_checkpoint(path_a).params
    assert [p.path for p in params] == sorted(values)
    stats = compute_stats(params, engine="host")
    for found in stats.params:
        assert_stats(found.moments.stats(), values[found.param.path], rel=1e-12)
    expected = math.sqrt(math.fsum(float(np.sum(v.astype(np.float64) ** 2)) for v in values.values()))
    assert stats.global_norm == pytest.approx(expected, rel=1e-13)


def test_many_arrays_same_bits_under_any_budget_and_group(many, monkeypatch):
    """Small groups (a small memory budget, or few arrays per group) change nothing, bit for bit."""
    path_a, _, _, _, _ = many
    params = open_checkpoint(path_a).params
    whole = [r.moments for r in compute_stats(params, engine="host").params]
    small_budget = [r.moments for r in compute_stats(params, engine="host", memory_budget=4096).params]
    monkeypatch.setattr(plan, "GROUP_ARRAYS", 7)
    counts = Counts(monkeypatch)
    few_per_group = compute_norms(params, engine="host")
    assert counts["open_arrays"] == math.ceil(ARRAYS / 7)
    assert small_budget == whole
    assert [r.moments.sum_sq for r in few_per_group.params] == [m.sum_sq for m in whole]


def test_plan_bounds_group_bytes_and_arrays(many):
    params = open_checkpoint(many[0]).params
    groups = plan.plan_reads(params, 8192)
    assert sum(len(g) for g in groups) == ARRAYS
    assert all(len(g) <= plan.GROUP_ARRAYS and sum(r.nbytes for r in g) <= 8192 for g in groups)
    assert all(r.whole for g in groups for r in g)


def test_many_arrays_diff_equals_float64(many):
    path_a, path_b, a, b, changed = many
    result = diff_params(open_checkpoint(path_a).params, open_checkpoint(path_b).params)
    by_path = {d.path: d for d in result.params}
    assert result.counts()["changed"] == len(changed)
    for name in a:
        values = by_path[name].values
        x, y = a[name].astype(np.float64), b[name].astype(np.float64)
        assert values.identical == (name not in changed)
        assert values.diff_norm == pytest.approx(float(np.sqrt(np.sum((x - y) ** 2))), rel=1e-12)
        assert values.norm_b == pytest.approx(float(np.sqrt(np.sum(y**2))), rel=1e-12)


def test_unchanged_values_are_compared_exactly():
    x = np.random.default_rng(2).standard_normal(3 * BLOCK + 5).astype(np.float32)
    sums = _PairSums(0.0, 0.0)
    sums.feed(x, x.copy())
    result = sums.result()
    norm = float(np.sqrt(np.sum(x.astype(np.float64) ** 2)))
    assert result.identical and result.diff_norm == result.max_abs_diff == result.beyond_tolerance == 0
    assert result.norm_a == result.norm_b == pytest.approx(norm, rel=1e-12)
    assert result.cosine == pytest.approx(1.0, rel=1e-12)
    x[[3, 7]] = np.nan
    sums = _PairSums(0.0, 0.0)
    sums.feed(x, x.copy())  # the same NaNs: no difference, and no fast path past them
    assert sums.result().identical and sums.result().diff_norm == 0


def test_verify_many_arrays(many):
    out = run_json("verify", many[0])
    assert out["arrays"] == ARRAYS and out["problems"] == []
    assert out["bytes_read"] == sum(v.nbytes for v in many[2].values())
