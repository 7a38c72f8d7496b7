"""paramscope: inspect JAX checkpoints without the model code.

It reads Orbax checkpoints (0.4 to v1, OCDBT or zarr, any mesh), flax msgpack files, safetensors,
Hugging Face Flax folders, numpy ``.npz`` archives, Equinox files, EasyDeL checkpoints, plain zarr
trees and Levanter runs, on disk or in ``gs://`` and ``s3://`` buckets. :func:`paramscope.open`
is the front door of the Python API (:mod:`paramscope.api`); every command of the CLI is a view
of it.

The library half offers the parameter utilities of xLSTM-JAX's trainer for in-memory pytrees
(:mod:`paramscope.param_utils`) and readers for checkpoints on disk
(:mod:`paramscope.io.inventory`, :mod:`paramscope.compute.engines`). Heavy modules (jax, flax, orbax) load
only when one of their names is first used, so ``import paramscope`` stays cheap.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "open": "paramscope.api",
    "Checkpoint": "paramscope.api",
    "Result": "paramscope.api",
    "Array": "paramscope.api",
    "history": "paramscope.api",
    "diff": "paramscope.api",
    "info": "paramscope.api",
    "optim": "paramscope.api",
    "verify": "paramscope.api",
    "snapshot": "paramscope.api",
    "check": "paramscope.api",
    "is_partitioned": "paramscope.param_utils",
    "get_num_params": "paramscope.param_utils",
    "tabulate_params": "paramscope.param_utils",
    "get_grad_norms": "paramscope.param_utils",
    "get_param_norms": "paramscope.param_utils",
    "get_sharded_norm_logits": "paramscope.param_utils",
    "get_sharded_global_norm": "paramscope.param_utils",
    "get_param_mask_fn": "paramscope.param_utils",
    "open_checkpoint": "paramscope.io.inventory",
    "Inventory": "paramscope.io.inventory",
    "ParamInfo": "paramscope.io.inventory",
    "count_params": "paramscope.io.inventory",
    "weight_decay_mask": "paramscope.io.inventory",
    "compute_norms": "paramscope.compute.engines",
    "compute_stats": "paramscope.compute.engines",
    "scan": "paramscope.compute.engines",
    "verify_checkpoint": "paramscope.compute.verify",
    "diff_params": "paramscope.compute.diff",
    "ParamscopeError": "paramscope.errors",
    "digest": "paramscope.compute.digest",
}

__all__ = ["__version__", *_EXPORTS]


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("paramscope")
    except PackageNotFoundError:  # a source tree that is not installed
        return "0.0.0"


def __getattr__(name: str):
    if name == "__version__":  # importlib.metadata is slow to import: only on demand
        globals()[name] = _version()
        return globals()[name]
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'paramscope' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(__all__)
