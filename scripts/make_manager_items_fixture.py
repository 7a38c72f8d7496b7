"""Write tests/data/manager_items: an Orbax CheckpointManager run whose steps hold items that are
not arrays.

Steps 1 and 2 of ``run/``, each with four items: ``state`` (``StandardSave`` of a small train
state), ``metadata`` and ``data_iter`` (``JsonSave``; ``data_iter`` holds a string with a line
break and a terminal escape, as a data pipeline's file name might), and ``grain_iter``
(``grain.python.PyGrainCheckpointSave`` of a grain ``DataLoader`` iterator, the handler
registered as ``PyGrainCheckpointHandler``: one ``process_0-of-1.json`` per process).

Run it with grain importable beside the versions the project is tested with, e.g.

    python -m pip install --no-deps --target /tmp/grain_pkgs "grain==0.2.*" cloudpickle \
        array_record portpicker psutil dm-tree
    PYTHONPATH=/tmp/grain_pkgs python scripts/make_manager_items_fixture.py tests/data/manager_items

It writes ``expected.json``: per step the items' kinds, the JSON items' content, the iterator's
state, and per array of ``state`` its dotted path, shape, dtype and float64 norm; and the versions.
"""

import importlib.metadata
import json
import os
import shutil
import sys

import grain.python as gp
import numpy as np
import orbax.checkpoint as ocp


def main(out):
    out = os.path.abspath(out)
    root = os.path.join(out, "run")
    shutil.rmtree(root, ignore_errors=True)
    os.makedirs(out, exist_ok=True)
    source = gp.RangeDataSource(0, 100, 1)
    sampler = gp.IndexSampler(len(source), gp.NoSharding(), shuffle=True, num_epochs=1, seed=0)
    iterator = iter(gp.DataLoader(data_source=source, sampler=sampler, worker_count=0))
    rng = np.random.default_rng(0)
    kernel = rng.standard_normal((3, 4)).astype(np.float32)
    steps = {}
    names = ("state", "metadata", "data_iter", "grain_iter")
    handlers = {"grain_iter": gp.PyGrainCheckpointHandler()}
    with ocp.CheckpointManager(root, item_names=names, item_handlers=handlers) as manager:
        for step in (1, 2):
            for _ in range(3):
                next(iterator)
            kernel = kernel * 0.5
            state = {
                "params": {"dense": {"kernel": kernel, "bias": np.full((4,), step, np.float32)}},
                "step": step,
            }
            metadata = {"model": "tiny", "lr": 0.1}
            data_iter = {"epoch": 0, "position": 3 * step, "file": "shard\n\x1b[31m-0"}
            manager.save(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave(state),
                    metadata=ocp.args.JsonSave(metadata),
                    data_iter=ocp.args.JsonSave(data_iter),
                    grain_iter=gp.PyGrainCheckpointSave(iterator),
                ),
            )
            manager.wait_until_finished()
            with open(os.path.join(root, str(step), "grain_iter", "process_0-of-1.json")) as f:
                grain_state = json.load(f)
            steps[str(step)] = {
                "kinds": {
                    "state": "pytree",
                    "metadata": "json",
                    "data_iter": "json",
                    "grain_iter": "iterator",
                },
                "json": {"metadata": metadata, "data_iter": data_iter},
                "iterator": {"process_0-of-1.json": grain_state},
                "leaves": {
                    name: {
                        "shape": list(np.shape(value)),
                        "dtype": np.asarray(value).dtype.name,
                        "norm": float(np.sqrt(np.sum(np.asarray(value, np.float64) ** 2))),
                    }
                    for name, value in (
                        ("params.dense.kernel", kernel),
                        ("params.dense.bias", state["params"]["dense"]["bias"]),
                        ("step", np.int64(step)),
                    )
                },
            }
        restored = manager.restore(2, args=ocp.args.Composite(state=ocp.args.StandardRestore(state)))
        np.testing.assert_array_equal(restored.state["params"]["dense"]["kernel"], kernel)
    versions = {
        name: importlib.metadata.version(name)
        for name in ("grain", "orbax-checkpoint", "jax", "jaxlib", "tensorstore", "numpy")
    }
    with open(os.path.join(out, "expected.json"), "w") as f:
        json.dump({"versions": versions, "steps": steps}, f, indent=1, sort_keys=True)
    print("wrote", out, versions)


if __name__ == "__main__":
    main(sys.argv[1])
