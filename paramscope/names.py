"""Dotted parameter paths, the way training code names parameters.

Kept free of jax imports so the checkpoint reader and the CLI can use it cheaply.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

# flax linen boxes (nn.Partitioned) and flax NNX variables are stored with a trailing
# `value` key. The box is an implementation detail; users name the parameter without it.
BOX_VALUE_KEY = "value"


def join_keys(keys: Sequence[str]) -> str:
    """Joins path keys with dots, dropping a trailing box `value` key.

    >>> join_keys(["params", "Dense_0", "kernel", "value"])
    'params.Dense_0.kernel'
    >>> join_keys(["layers", "0", "bias"])
    'layers.0.bias'
    """
    keys = [str(k) for k in keys]
    if len(keys) > 1 and keys[-1] == BOX_VALUE_KEY:
        keys = keys[:-1]
    return ".".join(keys)


def key_name(key: object) -> str:
    """The name of one jax key-path entry (dict key, sequence index, attribute)."""
    for attr in ("key", "idx", "name"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def dotted_path(key_path: Iterable[object]) -> str:
    """A jax key path as a dotted string, unboxing linen boxes and NNX variables.

    >>> import jax
    >>> [dotted_path(p) for p, _ in jax.tree_util.tree_flatten_with_path({"a": [1, {"b": 2}]})[0]]
    ['a.0', 'a.1.b']
    """
    return join_keys([key_name(k) for k in key_path])


def prefix_groups(path: str, depth: int) -> str:
    """The first `depth` components of a dotted path (depth 0 gives the empty string).

    >>> prefix_groups("params.block_0.Dense_0.kernel", 2)
    'params.block_0'
    """
    if depth <= 0:
        return ""
    return ".".join(path.split(".")[:depth])
