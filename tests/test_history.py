"""history: every step of a run, exact, cached outside the checkpoint, and drawn."""

import json
import math
import os
import shutil
import time

import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import tree_snapshot
from test_cli import _process, run, run_json

STEPS = [10, 20, 30, 40, 50, 60]


def f64(x):
    return math.sqrt(float(np.sum(np.asarray(x, np.float64) ** 2)))


def tree_at(k):
    rng = np.random.default_rng(0)
    w, emb = rng.standard_normal((8, 16)).astype(np.float32), rng.standard_normal((16, 4)).astype(np.float32)
    bad = np.ones(5, np.float32)
    if k >= 3:  # the NaN appears at step 40
        bad[2] = np.nan
    noise = np.random.default_rng(k).standard_normal(emb.shape).astype(np.float32) * 0.01
    return {"blocks": {"grow": w * np.float32(1.5**k), "steady": w}, "emb": emb + noise, "bad": bad}


@pytest.fixture(scope="module")
def run_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("history") / "checkpoints")
    with ocp.CheckpointManager(root) as manager:
        for k, step in enumerate(STEPS):
            manager.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(tree_at(k))))
            manager.wait_until_finished()
    return root


def long_form(doc):
    table = {}
    for row in doc["series"]:
        table[(row["step"], row["path"], row["metric"])] = row["value"]
    return table


def test_norms_changes_drift_and_the_first_nan(run_root, tmp_path):
    doc = run_json("history", run_root, "--cache", tmp_path / "cache")
    values = long_form(doc)
    assert doc["steps"] == STEPS and doc["first_nonfinite_step"] == 40
    for k, step in enumerate(STEPS):
        tree = tree_at(k)
        assert values[(step, "blocks.grow", "norm")] == pytest.approx(f64(tree["blocks"]["grow"]), rel=1e-12)
        assert values[(step, "bad", "nonfinite")] == (1 if k >= 3 else 0)
        if k:
            before = tree_at(k - 1)
            expected = f64(tree["emb"].astype(np.float64) - before["emb"]) / f64(before["emb"])
            assert values[(step, "emb", "change")] == pytest.approx(expected, rel=1e-9)
            assert values[(step, "blocks.grow", "change")] == pytest.approx(0.5, rel=1e-6)
            assert values[(step, "blocks.steady", "change")] == 0.0
    assert (10, "emb", "change") not in values
    ranked = run_json("history", run_root, "--sort", "drift", "--no-cache", "-f", "json")
    text = run("history", run_root, "--sort", "drift", "--no-cache")
    first_row = next(line for line in text.stdout.splitlines()[4:] if line.strip())
    assert first_row.startswith("bad ")  # a NaN norm drifts without bound, ahead of 1.5^5
    assert "first NaN/Inf at step 40: bad" in text.stdout and "NaN/Inf first at step 40" in text.stderr
    assert ranked["steps"] == STEPS
    groups = run_json("history", run_root, "--depth", "1", "--no-cache", "--steps", "20:50:10")
    grouped = long_form(groups)
    assert groups["steps"] == [20, 30, 40, 50]
    blocks = math.sqrt(f64(tree_at(2)["blocks"]["grow"]) ** 2 + f64(tree_at(2)["blocks"]["steady"]) ** 2)
    assert grouped[(30, "blocks.grow", "norm")] == pytest.approx(f64(tree_at(2)["blocks"]["grow"]))
    text = run("history", run_root, "--depth", "1", "--no-cache", "--last", "2").stdout
    assert "blocks" in text and f"{blocks:.6g}" not in text  # last two steps shown: 50 and 60
    bad = run("history", run_root, "--steps", "10-20", "--no-cache")
    assert bad.exit_code == 2 and "malformed range of steps '10-20'" in bad.stderr
    bad = run("history", run_root, "--steps", "10:30:0", "--no-cache")
    assert bad.exit_code == 2 and bad.stderr.startswith(
        "paramscope: error: the stride of --steps '10:30:0' is 0"
    )
    assert len(bad.stderr.splitlines()) == 1
    assert run_json("history", run_root, "--steps", ":30", "--no-cache")["steps"] == [10, 20, 30]
    csv_lines = run("history", run_root, "-f", "csv", "--no-cache", "--last", "2").stdout.splitlines()
    assert csv_lines[0] == "step,path,metric,value" and csv_lines[1].startswith("50,")


def test_a_damaged_step_is_left_out_and_every_other_step_kept(run_root, tmp_path):
    root = tmp_path / "run"
    shutil.copytree(run_root, root)
    for folder, _, names in os.walk(root / "30" / "params"):  # step 30's arrays cut short
        for name in names:
            if name.startswith("manifest") or folder.endswith("d"):
                os.truncate(os.path.join(folder, name), 10)
    result = run("history", root, "--no-cache", "-f", "json")
    assert result.exit_code == 3, result.stderr
    doc = json.loads(result.stdout)
    values = long_form(doc)
    kept = [s for s in STEPS if s != 30]
    assert doc["steps"] == kept
    for k, step in enumerate(STEPS):
        if step != 30:
            grow = f64(tree_at(k)["blocks"]["grow"])
            assert values[(step, "blocks.grow", "norm")] == pytest.approx(grow, rel=1e-12)
    # the step after the damaged one changed from the step before it: 1.5^2 - 1
    assert values[(40, "blocks.grow", "change")] == pytest.approx(1.25, rel=1e-6)
    lines = result.stderr.strip().splitlines()
    assert any(line.startswith("paramscope: warning: step 30 left out: ") for line in lines), lines
    assert lines[-1].startswith("paramscope: error: 1 damaged step(s) left out of the history: 30")


def test_nan_series_top_sort_and_options_that_would_do_nothing(run_root, manager_ckpt):
    text = run("history", run_root, "--no-cache", "--sort", "drift")
    bad_row = next(line for line in text.stdout.splitlines() if line.startswith("bad "))
    assert " nan " in bad_row and " inf " not in bad_row  # the drift of a norm that became NaN
    failing = run("history", run_root, "--no-cache", "--fail-on-nonfinite", "-f", "json")
    assert failing.exit_code == 1 and json.loads(failing.stdout)["steps"] == STEPS
    assert failing.stderr.splitlines()[-1].startswith(
        "paramscope: error: NaN/Inf in the run, first at step 40: bad"
    )
    assert run("history", run_root, "--no-cache", "--steps", ":30", "--fail-on-nonfinite").exit_code == 0
    every = long_form(run_json("history", run_root, "--no-cache"))
    last_norms = {path: v for (st, path, metric), v in every.items() if st == STEPS[-1] and metric == "norm"}
    largest = sorted(last_norms, key=lambda path: -(last_norms[path] or -1))[:2]  # NaN (null) last
    for fmt in ("json", "csv"):  # --top and --sort hold in every format
        result = run("history", run_root, "--no-cache", "--sort", "norm", "--top", "2", "-f", fmt)
        assert result.exit_code == 0, result.stderr
        if fmt == "json":
            rows = json.loads(result.stdout)["series"]
        else:
            header, *lines = result.stdout.splitlines()
            rows = [dict(zip(header.split(","), line.split(","))) for line in lines]
        paths = list(dict.fromkeys(row["path"] for row in rows))
        assert paths == largest, (fmt, paths)  # the largest norms at the last step, largest first
        assert {int(row["step"]) for row in rows} == set(STEPS)
    step = run("history", run_root, "--step", "20")
    assert step.exit_code == 2 and "--step 20 picks one" in step.stderr and step.stdout == ""
    hist = run("stats", manager_ckpt.path, "--hist", "head.kernel")
    assert hist.exit_code == 2 and "--hist draws its histogram with --plot" in hist.stderr


def test_the_cache_reads_only_new_steps_and_never_the_checkpoint(run_root, tmp_path):
    root = str(tmp_path / "copy")
    shutil.copytree(run_root, root)
    cache = str(tmp_path / "cache")
    before = tree_snapshot(root)
    first = run_json("history", root, "--cache", cache, "--steps", "10:50")
    assert first["bytes_read"] > 0 and first["cached_steps"] == []
    again = run_json("history", root, "--cache", cache, "--steps", "10:50")
    assert again["bytes_read"] == 0 and again["cached_steps"] == [10, 20, 30, 40, 50]
    assert long_form(again) == long_form(first)
    grown = run_json("history", root, "--cache", cache)  # step 60 is new: it and 50 (for the change)
    one_step = (
        sum(np.asarray(v).nbytes for v in (tree_at(0)["blocks"]["grow"],) * 2) + tree_at(0)["emb"].nbytes + 20
    )
    assert 0 < grown["bytes_read"] <= 2 * one_step and grown["cached_steps"] == [10, 20, 30, 40, 50]
    assert tree_snapshot(root) == before and not any(n.endswith(".json") for n in os.listdir(root))
    meta = os.path.join(root, "50", "_CHECKPOINT_METADATA")  # step 50 rewritten in place
    document = json.loads(open(meta).read())
    document["commit_timestamp_nsecs"] = time.time_ns()
    open(meta, "w").write(json.dumps(document))
    rewritten = run_json("history", root, "--cache", cache)
    assert 50 not in rewritten["cached_steps"] and 60 not in rewritten["cached_steps"]
    for name in os.listdir(cache):  # a damaged cache is ignored, with a warning, and rebuilt
        open(os.path.join(cache, name), "w").write("{not json")
    result = run("history", root, "--cache", cache, "-f", "json")
    assert result.exit_code == 0 and "ignoring the unreadable history cache" in result.stderr
    assert json.loads(result.stdout)["cached_steps"] == []


@pytest.mark.parametrize("suffix", ["png", "svg", "pdf"])
def test_plots_are_drawn_from_the_same_numbers(run_root, tmp_path, suffix):
    from paramscope.compute.history import history, series
    from paramscope.io import orbax
    from paramscope.io.inventory import open_checkpoint
    from paramscope.output.plot import plot_history

    def open_step(step):
        inv = open_checkpoint(run_root, step=step)
        return inv, inv.params

    runs = series(
        history(STEPS, lambda step: orbax.commit_timestamp(orbax.locate(run_root, step)), open_step)
    )
    picture = str(tmp_path / f"history.{suffix}")
    drawn = plot_history(runs, picture, top=2)
    data = open(picture, "rb").read()
    magic = {"png": b"\x89PNG", "pdf": b"%PDF", "svg": b"<?xml"}[suffix]
    assert data.startswith(magic) and (suffix != "svg" or b"<svg" in data[:400])
    assert set(drawn) == {"bad", "blocks.grow"}  # the top 2 by drift get a line each
    grow = next(s for s in runs if s.path == "blocks.grow")
    assert drawn["blocks.grow"] == pytest.approx(grow.norms)
    assert drawn.xlim[0] < STEPS[0] and drawn.xlim[1] > STEPS[-1]  # NaN steps do not cut the axis
    assert drawn.first_nonfinite == 40
    assert len(drawn["bad"]) == len(STEPS) and [math.isnan(v) for v in drawn["bad"]] == [
        k >= 3 for k in range(6)
    ]
    if suffix == "svg":
        assert b"blocks.grow" in data and b"others (range)" in data
        assert b"first NaN/Inf: step 40" in data and b"NaN/Inf (at the top edge)" in data
    result = run("history", run_root, "--no-cache", "--plot", tmp_path / "plot.xyz")
    assert result.exit_code == 2 and "picture format" in result.stderr and ".pdf" in result.stderr


@pytest.mark.parametrize("command", ["history", "stats"])
def test_a_picture_that_cannot_be_written_is_refused_before_reading(tmp_path, command):
    missing = tmp_path / "checkpoint"  # nothing there: a refusal naming the picture came first
    for target, words in (
        (tmp_path / "no" / "such" / "folder" / "x.png", "no folder"),
        (tmp_path / "x.doc", "picture format"),
        *([("/proc/x.pdf", "not writable")] if os.path.isdir("/proc/self") else []),
    ):
        result = run(command, missing, "--plot", target)
        assert result.exit_code == 2 and result.stdout == "", (target, result.stderr)
        (line,) = result.stderr.strip().splitlines()
        assert line.startswith("paramscope: error: ") and words in line, line


def test_heatmap_nan_cells_have_their_own_colour_and_legend(tmp_path):
    from paramscope.output.plot import plot_layer_heatmap

    picture = tmp_path / "layers.svg"
    plot_layer_heatmap({"blocks": [[1.0, 2.0, 3.0], [1.0, math.nan, math.nan]]}, [10, 20, 30], str(picture))
    assert b"NaN/Inf" in picture.read_bytes()
    clean = tmp_path / "clean.svg"
    plot_layer_heatmap({"blocks": [[1.0, 2.0, 3.0], [1.0, 2.0, 2.5]]}, [10, 20, 30], str(clean))
    assert b"NaN/Inf" not in clean.read_bytes()


def test_without_matplotlib_the_error_names_the_extra(run_root, tmp_path):
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['matplotlib'] = None\n"  # as if the extra were not installed
        "from paramscope.cli.app import main; main()"
    )
    args = ["history", run_root, "--no-cache", "-q", "--plot", str(tmp_path / "x.png")]
    result = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stdout == ""
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("paramscope: error: plotting needs matplotlib") and "paramscope[plot]" in line


def test_stats_plot_and_value_histogram(manager_ckpt, tmp_path):
    from paramscope.compute.moments import Histogram

    values = manager_ckpt.values[200]["params"]
    picture = tmp_path / "stats.svg"
    result = run("stats", manager_ckpt.path, "--plot", picture, "--hist", "head.kernel", "-f", "json")
    assert result.exit_code == 0 and "wrote" in result.stderr and b"<svg" in picture.read_bytes()[:400]
    doc = json.loads(result.stdout)
    bins = doc["histogram"]["bins"]
    kernel = np.asarray(values["head.kernel"], np.float64).reshape(-1)
    assert sum(b["count"] for b in bins) == kernel.size
    for b in bins:  # each bin holds exactly the values in [low, high) by magnitude, of its sign
        inside = (np.abs(kernel) >= min(abs(b["low"]), abs(b["high"]))) & (
            np.abs(kernel) < max(abs(b["low"]), abs(b["high"]))
        )
        inside &= (kernel < 0) if b["low"] < 0 else (kernel > 0)
        assert b["count"] == int(np.count_nonzero(inside)) or b["low"] == b["high"] == 0
    histogram = Histogram()
    histogram.feed(np.array([0.0, 1.0, -3.0, np.nan, np.inf, 0.75]))
    assert histogram.bins() == [(-4.0, -2.0, 1), (0.0, 0.0, 1), (0.5, 1.0, 1), (1.0, 2.0, 1)]
    assert (histogram.nan, histogram.inf) == (1, 1)
    from paramscope import compute_stats, open_checkpoint
    from paramscope.output.plot import plot_stats

    inv = open_checkpoint(manager_ckpt.path)
    stats = compute_stats(inv.params)
    heights = plot_stats([(r.param.path, r.norm) for r in stats.params], str(tmp_path / "bars.png"))
    assert heights == pytest.approx([f64(values[r.param.path]) for r in stats.params], rel=1e-9)
    bad = run("stats", manager_ckpt.path, "--plot", tmp_path / "x.png", "--hist", "nope")
    assert bad.exit_code == 2 and "--hist 'nope'" in bad.stderr


def test_a_single_checkpoint_is_not_a_run():
    single = os.path.join(os.path.dirname(__file__), "data", "safetensors", "single", "model.safetensors")
    result = run("history", single)
    assert result.exit_code == 3 and result.stderr.count("\n") == 1
    assert "is a single checkpoint, not a run of steps" in result.stderr


def test_the_history_of_a_flax_msgpack_run(tmp_path):
    """flax.training.checkpoints files carry no commit time: a step is cached by when its file
    last changed, so a file rewritten in place is read again."""
    root = str(tmp_path / "run")
    shutil.copytree(os.path.join(os.path.dirname(__file__), "data", "flax_msgpack", "checkpoints"), root)
    cache = tmp_path / "cache"
    cold = run_json("history", root, "--depth", "1", "--cache", cache)
    assert cold["steps"] == [1, 2] and cold["cached_steps"] == [] and cold["bytes_read"] > 0
    warm = run_json("history", root, "--depth", "1", "--cache", cache)
    assert warm["cached_steps"] == [1, 2] and warm["bytes_read"] == 0 and warm["series"] == cold["series"]
    stamp = os.stat(os.path.join(root, "checkpoint_2")).st_mtime_ns
    os.utime(os.path.join(root, "checkpoint_2"), ns=(stamp + 10**9, stamp + 10**9))  # rewritten
    again = run_json("history", root, "--depth", "1", "--cache", cache)
    assert again["cached_steps"] == [1] and again["bytes_read"] > 0


@pytest.mark.parametrize("dtype", [np.float32, np.int32, np.float16], ids=str)
def test_one_upcast_for_a_step_and_its_change_gives_the_same_numbers(dtype):
    from paramscope.compute.history import difference_sum_sq
    from paramscope.compute.moments import BLOCK, Accumulator

    rng = np.random.default_rng(5)
    size = 2 * BLOCK + 123  # whole blocks and a short last one
    before = (rng.standard_normal(size) * 100).astype(dtype)
    now = (before.astype(np.float64) + rng.standard_normal(size)).astype(dtype)
    for full in (False, True):
        fused, apart = Accumulator(full, span=BLOCK), Accumulator(full, span=BLOCK)
        sums = fused.feed_difference(now, before)
        apart.feed(now)
        assert sums == difference_sum_sq(now, before)
        assert fused.result() == apart.result()
    assert math.fsum(sums) == pytest.approx(np.sum((now.astype(np.float64) - before) ** 2), rel=1e-12)


def test_an_item_rewritten_in_place_is_read_again(run_root, tmp_path):
    """Saving an item again into its step (force=True) keeps the step's commit time: the cache is
    keyed by the item's own metadata and OCDBT manifest too. (Each run is its own process, as on
    the command line: TensorStore keeps what it read of a database for the life of a process.)"""
    root = str(tmp_path / "copy")
    shutil.copytree(run_root, root)
    cache = str(tmp_path / "cache")

    def history_of(*args):
        result = _process("history", root, "--format", "json", *args)
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    assert history_of("--cache", cache)["cached_steps"] == []
    step_meta = open(os.path.join(root, "50", "_CHECKPOINT_METADATA")).read()
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(os.path.join(root, "50", "params"), tree_at(0), force=True)
    checkpointer.wait_until_finished()
    assert open(os.path.join(root, "50", "_CHECKPOINT_METADATA")).read() == step_meta
    warm = history_of("--cache", cache)
    assert warm["cached_steps"] == [10, 20, 30, 40] and warm["bytes_read"] > 0
    assert long_form(warm) == long_form(history_of("--no-cache"))
    assert long_form(warm)[(50, "blocks.grow", "norm")] == pytest.approx(f64(tree_at(0)["blocks"]["grow"]))


def test_a_flax_gda_folder_rewritten_is_read_again(tmp_path):
    """A flax multi-host save keeps its large arrays in ``checkpoint_<step>_gda/``: their files
    identify the step's data as much as the msgpack file does."""
    root = str(tmp_path / "run")
    shutil.copytree(os.path.join(os.path.dirname(__file__), "data", "flax_msgpack_gda", "checkpoints"), root)
    cache = tmp_path / "cache"
    cold = run_json("history", root, "--cache", cache)
    assert run_json("history", root, "--cache", cache)["cached_steps"] == [1, 2]
    chunk = os.path.join("params", "Dense_0", "kernel", "0.0")
    shutil.copyfile(
        os.path.join(root, "checkpoint_1_gda", chunk), os.path.join(root, "checkpoint_2_gda", chunk)
    )
    again = run_json("history", root, "--cache", cache)
    assert again["cached_steps"] == [1] and again["bytes_read"] > 0
    assert long_form(again) == long_form(run_json("history", root, "--no-cache")) != long_form(cold)


def test_cache_entries_of_the_wrong_shape_are_ignored_with_a_warning(run_root, tmp_path):
    cache = tmp_path / "cache"
    first = run_json("history", run_root, "--cache", cache)
    (name,) = os.listdir(cache)
    document = json.loads((cache / name).read_text())
    entries = document["steps"]
    entries["10"]["stats"] = ["not", "a", "mapping"]
    entries["20"]["stats"]["emb"]["norm"] = "80"
    entries["30"]["change"] = {"emb": 10**400}
    entries["40"] = 5
    entries["50"]["stamp"] = None
    (cache / name).write_text(json.dumps(document))
    result = run("history", run_root, "--cache", cache, "-f", "json")
    assert result.exit_code == 0 and "Traceback" not in result.stderr
    assert result.stderr.count("ignoring the damaged entry of step") == 5
    doc = json.loads(result.stdout)
    assert doc["cached_steps"] == [60] and long_form(doc) == long_form(first)
    for damaged in ('{"version": 2, "key": 1, "steps": []}', "[" * 100_000, '{"steps": ' + "{" * 100_000):
        (cache / name).write_text(damaged)
        result = run("history", run_root, "--cache", cache, "-f", "json")
        assert result.exit_code == 0 and "ignoring the unreadable history cache" in result.stderr, (
            result.stderr
        )
        assert json.loads(result.stdout)["cached_steps"] == []
