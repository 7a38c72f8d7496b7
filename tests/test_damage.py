"""Never a number from data that is not there: missing chunks, and steps deleted or saved again
while they are read (a trainer's CheckpointManager writing and deleting steps beside paramscope)."""

import json
import math
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorstore as ts
from test_cli import run

import paramscope
from paramscope.errors import CheckpointChanged, ParamscopeError


def _save(path, tree, ocdbt):
    ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_ocdbt=ocdbt)).save(os.path.abspath(path), tree)


def _tree():
    rng = np.random.default_rng(3)
    return {
        "w": np.ones((64, 32), np.float32),  # one chunk, small: inline in an OCDBT b-tree
        "big": rng.standard_normal((300, 300)).astype(np.float32),  # in a data file of the database
        # enough single-chunk arrays of one shape to be read as one stack
        "small": {str(i): np.full((4,), i + 1, np.float32) for i in range(10)},
    }


def _delete_ocdbt_key(folder, key):
    """Deletes one key inside an OCDBT database, as damage or a partial copy would lose it."""
    kv = ts.KvStore.open({"driver": "ocdbt", "base": f"file://{os.path.abspath(folder)}/"}).result()
    kv.delete_range(ts.KvStore.KeyRange(key, key + "\0")).result()
    assert key not in [bytes(k).decode() for k in kv.list().result()]


@pytest.mark.parametrize("ocdbt", [False, True], ids=["zarr", "ocdbt"])
@pytest.mark.parametrize("array", ["w", "big", "small.3"])
def test_a_missing_chunk_fails_every_data_command(tmp_path, ocdbt, array):
    path = tmp_path / "z"
    _save(path, _tree(), ocdbt)
    chunk = f"{array}/0.0" if array != "small.3" else "small.3/0"
    if ocdbt:
        _delete_ocdbt_key(path, chunk)
    else:
        os.remove(path / chunk)
    for command in (["norms", "--per-param"], ["stats"], ["diff", path]):
        result = run(command[0], path, *command[1:], "--format", "json")
        assert result.exit_code == 3, (command, result.stdout)
        assert result.stdout == ""
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and f"array {array!r}" in lines[0], lines
        assert "a chunk the writer stored is missing" in lines[0]
    verify = run("verify", path, "--format", "json")
    assert verify.exit_code == 3
    problems = json.loads(verify.stdout)["problems"]
    assert [p["path"] for p in problems] == [array], problems
    assert "missing" in problems[0]["problem"]
    # the other arrays still read: a damaged chunk fails its own array only
    others = run("norms", path, "--per-param", "--filter", "^w$" if array != "w" else "^big$", "-f", "json")
    assert others.exit_code == 0, others.stderr


def test_chunks_an_older_writer_skipped_still_read_as_the_fill_value():
    """Orbax before 0.7 did not store chunks equal to the fill value: its items say nothing of
    ``store_array_data_equal_to_fill_value``, and their missing chunks are zeros, as Orbax restores them."""
    root = os.path.join(os.path.dirname(__file__), "data", "orbax_0_6_1", "checkpoints")
    meta = json.load(open(os.path.join(root, "checkpoint_100", "params", "_METADATA")))
    assert "store_array_data_equal_to_fill_value" not in meta
    result = run("verify", root, "--step", "100")
    assert result.exit_code == 0, result.stderr


def _manager_save(root, step, max_to_keep=None):
    manager = ocp.CheckpointManager(root, options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep))
    manager.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(_step_tree(step))))
    manager.wait_until_finished()
    manager.close()


def _step_tree(step):
    """Values that name their step: every element of every array is ``step``."""
    return {"a": np.full((1024, 512), step, np.float32), "b": {"c": np.full((1000,), step, np.float32)}}


def _reference_norm(step):
    return math.sqrt(float(step) ** 2 * (1024 * 512 + 1000))


def test_a_step_deleted_after_it_was_opened_is_an_error_naming_it(tmp_path):
    root = str(tmp_path / "run")
    for step in (1, 2):
        _manager_save(root, step)
    inv = paramscope.open_checkpoint(root)
    assert inv.step == 2
    shutil.rmtree(os.path.join(root, "2"))
    with pytest.raises(CheckpointChanged, match="step 2 was deleted while it was read"):
        paramscope.compute_norms(inv)


def test_a_step_saved_again_after_it_was_opened_is_an_error(tmp_path):
    root = str(tmp_path / "run")
    _manager_save(root, 1)
    inv = paramscope.open_checkpoint(root)
    ocp.StandardCheckpointer().save(os.path.join(root, "1", "params"), _step_tree(7), force=True)
    time.sleep(0)  # the new files are in place; the old inventory points at what is gone
    with pytest.raises(CheckpointChanged, match="saved again while it was read"):
        paramscope.compute_stats(inv)


WRITER = """
import sys, numpy as np, orbax.checkpoint as ocp
root, first = sys.argv[1], int(sys.argv[2])
manager = ocp.CheckpointManager(root, options=ocp.CheckpointManagerOptions(max_to_keep=2))
step = first
while True:
    tree = {"a": np.full((1024, 512), step, np.float32), "b": {"c": np.full((1000,), step, np.float32)}}
    manager.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(tree)))
    manager.wait_until_finished()
    step += 1
"""


def test_reads_beside_a_trainer_that_saves_and_deletes_steps_are_exact_or_errors(tmp_path):
    """A real CheckpointManager (max_to_keep=2) saves and deletes steps in another process while
    this one opens and reads the latest step again and again: every answer is the float64
    reference of the step it names, or an error; never a zero or partly-zero norm."""
    root = str(tmp_path / "run")
    for step in (1, 2):
        _manager_save(root, step, max_to_keep=2)
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, root, "3"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    exact = errors = 0
    seen = set()
    rng = np.random.default_rng(0)
    try:
        deadline = time.monotonic() + 25
        while time.monotonic() < deadline and exact + errors < 300:
            try:
                # the oldest kept step is the next one deleted; a pause between opening and
                # reading stands for a slow read
                steps = [int(name) for name in os.listdir(root) if name.isdigit()]
                inv = paramscope.open_checkpoint(root, step=min(steps) if exact % 2 else None)
                time.sleep(rng.uniform(0, 0.3))
                result = paramscope.compute_norms(inv)
            except ParamscopeError:
                errors += 1
                continue
            assert result.global_norm == pytest.approx(_reference_norm(inv.step), rel=1e-6), inv.step
            exact += 1
            seen.add(inv.step)
        assert writer.poll() is None, "the trainer stopped early"
        # the command line too, a few times: exit 0 with the right numbers, or exit 3
        for _ in range(3):
            for command in ("norms", "stats", "history"):
                result = run(command, root, "--format", "json")
                assert result.exit_code in (0, 3), result.stderr
                if result.exit_code == 3:
                    errors += 1
                    continue
                doc = json.loads(result.stdout)
                if command == "history":
                    sizes = {"a": 1024 * 512, "b.c": 1000}
                    norms = [e for e in doc["series"] if e["metric"] == "norm"]
                    assert {e["step"] for e in norms} == set(doc["steps"])
                    for e in norms:
                        assert e["value"] == pytest.approx(e["step"] * math.sqrt(sizes[e["path"]]), rel=1e-6)
                else:
                    assert doc["global_norm"] == pytest.approx(_reference_norm(doc["step"]), rel=1e-6)
                exact += 1
    finally:
        writer.kill()
        writer.wait()
    assert exact > 0
    print(f"{exact} exact answers, {errors} errors, steps {sorted(seen)}")


def test_symlinked_steps_and_items_read_like_real_ones(tmp_path):
    """A run assembled from links (a step linked in from another run, an item folder linked into a
    step) reads as if the folders were there; a link back up the tree is not followed forever."""
    source = str(tmp_path / "source")
    for step in (1, 2):
        _manager_save(source, step)
    run_root = tmp_path / "linked"
    run_root.mkdir()
    shutil.copytree(os.path.join(source, "1"), run_root / "1")
    os.symlink(os.path.join(source, "2"), run_root / "2")
    os.symlink(run_root, os.path.join(source, "2", "back"))  # a cycle through the linked step
    latest = run("norms", run_root, "--format", "json")
    assert latest.exit_code == 0, latest.stderr
    doc = json.loads(latest.stdout)
    assert doc["step"] == 2 and doc["global_norm"] == pytest.approx(_reference_norm(2), rel=1e-6)
    assert run("norms", run_root, "--step", "2").exit_code == 0
    history = run("history", run_root, "--format", "json")
    assert history.exit_code == 0, history.stderr
    assert json.loads(history.stdout)["steps"] == [1, 2]
    step_folder = tmp_path / "step"
    step_folder.mkdir()
    shutil.copy(os.path.join(source, "2", "_CHECKPOINT_METADATA"), step_folder)
    os.symlink(os.path.join(source, "2", "params"), step_folder / "params")
    item = json.loads(run("norms", step_folder, "--format", "json").stdout)
    assert item["global_norm"] == pytest.approx(_reference_norm(2), rel=1e-6)


def test_a_step_deleted_while_history_reads_the_run_is_named(tmp_path):
    root = str(tmp_path / "run")
    for step in (1, 2, 3):
        _manager_save(root, step)
    deleted = []

    def delete_the_last_step(_):
        if not deleted:
            shutil.rmtree(os.path.join(root, "3"))
            deleted.append(3)

    result = paramscope.history(root, cache=False, on_bytes=delete_the_last_step)
    assert deleted
    # the deleted step is left out and named; the steps before it keep their numbers
    assert [s.step for s in result.value.result.steps] == [1, 2]
    assert any(n.startswith("step 3 left out: ") and "step 3 was deleted" in n for n in result.warnings), (
        result.warnings
    )
    for step in result.value.result.steps:
        assert math.sqrt(sum(v["norm"] ** 2 for v in step.stats.values())) == pytest.approx(
            _reference_norm(step.step), rel=1e-6
        )
    only = str(tmp_path / "only")
    _manager_save(only, 1)

    def delete_it(_):
        shutil.rmtree(os.path.join(only, "1"), ignore_errors=True)

    with pytest.raises(CheckpointChanged, match="step 1 was deleted"):  # no step left: its error
        paramscope.history(only, cache=False, on_bytes=delete_it)
