"""Write tests/data/penzai: a penzai model's parameters saved the way penzai documents it.

A ``pz.nn.Sequential`` of eleven ``pz.nn.Affine`` layers (22 parameters: weights and biases, one
bf16), its parameters unbound and frozen with ``pz.unbind_params(model, freeze=True)`` and the
resulting list saved with ``ocp.StandardCheckpointer`` into ``params/``. Orbax stores each
``ParameterValue`` by its list index, its ``value`` (a ``NamedArray``) and that array's
``data_array``: paths ``0.value.data_array`` ... ``21.value.data_array``. The parameters' labels
and axis names are static, not stored.

Run it in a throwaway environment, never in the project's own:

    python3.11 -m venv /tmp/venv_pz && /tmp/venv_pz/bin/pip install penzai orbax-checkpoint
    /tmp/venv_pz/bin/python scripts/make_penzai_fixture.py tests/data/penzai

It writes ``expected.json``: for every stored leaf its dotted path, the parameter's label (for
people; not in the checkpoint), shape, dtype and float64 norm of the values in memory, and the
versions. The script restores the checkpoint with Orbax and checks the values.
"""

import importlib.metadata
import json
import os
import shutil
import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from penzai import pz


def main(out):
    out = os.path.abspath(out)
    path = os.path.join(out, "params")
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(out, exist_ok=True)
    layers = []
    for i in range(11):
        layers.append(
            pz.nn.Affine.from_config(
                name=f"layer{i}",
                init_base_rng=jax.random.key(i),
                input_axes={"features": 4},
                output_axes={"features_out": 4},
            )
        )
        layers.append(pz.nn.Elementwise(jax.nn.relu) if hasattr(pz.nn, "Elementwise") else pz.nn.Identity())
    model = pz.nn.Sequential(layers)
    # one bf16 parameter, as mixed-precision models have
    model = (
        pz.select(model)
        .at_instances_of(pz.Parameter)
        .where(lambda p: p.label == "layer10/AddBias.bias")
        .apply(lambda p: pz.Parameter(value=p.value.astype(jnp.bfloat16), label=p.label))
    )
    _, params = pz.unbind_params(model, freeze=True)
    leaves = {}
    for path_keys, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        name = ".".join(str(getattr(k, "idx", getattr(k, "name", getattr(k, "key", k)))) for k in path_keys)
        index = int(name.split(".")[0])
        value = np.asarray(leaf)
        leaves[name] = {
            "label": params[index].label,
            "shape": list(value.shape),
            "dtype": value.dtype.name,
            "norm": float(np.sqrt(np.sum(value.astype(np.float64) ** 2))),
        }
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(path, params)
    checkpointer.wait_until_finished()
    restored = checkpointer.restore(path, params)
    for (p, a), (_, b) in zip(
        jax.tree_util.tree_flatten_with_path(restored)[0], jax.tree_util.tree_flatten_with_path(params)[0]
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=jax.tree_util.keystr(p))
    versions = {
        name: importlib.metadata.version(name)
        for name in ("penzai", "orbax-checkpoint", "jax", "jaxlib", "tensorstore", "numpy")
    }
    with open(os.path.join(out, "expected.json"), "w") as f:
        json.dump({"versions": versions, "leaves": leaves}, f, indent=1, sort_keys=True)
    print("wrote", out, versions, sorted(leaves)[:4])


if __name__ == "__main__":
    main(sys.argv[1])
