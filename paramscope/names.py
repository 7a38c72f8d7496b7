"""Dotted parameter paths, the way training code names parameters.

Kept free of jax imports so the checkpoint reader and the CLI can use it cheaply.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence

# flax linen boxes (nn.Partitioned) and flax NNX variables are stored with a trailing
# `value` key. The box is an implementation detail; users name the parameter without it.
BOX_VALUE_KEY = "value"


def quote_key(key: str) -> str:
    """One path component as shown: a key that holds a dot (or is empty, or starts with a quote)
    is written as a JSON string, so that ``{'a.b': x}`` and ``{'a': {'b': y}}`` print as two
    different paths, ``"a.b"`` and ``a.b``.

    >>> quote_key("kernel"), quote_key("a.b"), quote_key("")
    ('kernel', '"a.b"', '""')
    """
    if key and "." not in key and not key.startswith('"'):
        return key
    return json.dumps(key, ensure_ascii=False)


def join_keys(keys: Sequence[str], unbox: bool = True) -> str:
    """Joins path keys with dots (quoting keys that hold dots), dropping a trailing box
    ``value`` key when ``unbox``.

    >>> join_keys(["params", "Dense_0", "kernel", "value"])
    'params.Dense_0.kernel'
    >>> join_keys(["mlp", "value"], unbox=False), join_keys(["layers", "0", "bias"])
    ('mlp.value', 'layers.0.bias')
    """
    keys = [str(k) for k in keys]
    if unbox and len(keys) > 1 and keys[-1] == BOX_VALUE_KEY:
        keys = keys[:-1]
    return ".".join(quote_key(k) for k in keys)


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


def split_path(path: str) -> list[str]:
    """The components of a dotted path as :func:`join_keys` wrote them, quoted keys kept whole
    (and still quoted, so that joining them again gives the same path).

    >>> split_path('params."a.b".kernel'), split_path("a.b")
    (['params', '"a.b"', 'kernel'], ['a', 'b'])
    """
    if '"' not in path:
        return path.split(".")
    parts, current, quoted, escaped = [], [], False, False
    for char in path:
        if quoted:
            current.append(char)
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                quoted = False
        elif char == '"':
            quoted = True
            current.append(char)
        elif char == ".":
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return parts


def path_sort_key(path: str) -> tuple[tuple[int, int, str], ...]:
    """The order of dotted paths everywhere rows are listed by path: component by component, a
    sequence index (digits only) by its number, before any name, names as strings. So the 21
    layers of a list read ``0, 1, 2, ..., 10``, not ``0, 1, 10, 11, ..., 2``.

    >>> sorted(["10.w", "2.w", "b", "a", "2.b"], key=path_sort_key)
    ['2.b', '2.w', '10.w', 'a', 'b']
    >>> sorted(["layers.10", "layers.9", "layers_10", "layers_9"], key=path_sort_key)
    ['layers.9', 'layers.10', 'layers_10', 'layers_9']
    """
    return tuple(
        (0, int(part), part) if part.isascii() and part.isdigit() else (1, 0, part)
        for part in split_path(path)
    )


def prefix_groups(path: str, depth: int) -> str:
    """The first `depth` components of a dotted path (depth 0 gives the empty string).

    >>> prefix_groups("params.block_0.Dense_0.kernel", 2)
    'params.block_0'
    """
    if depth <= 0:
        return ""
    return ".".join(split_path(path)[:depth])


def spec_text(spec) -> str:
    """A saved sharding as text: a partition spec the way JAX prints one, ``replicated`` where
    no dimension is split, ``-`` where the format stores none (None).

    >>> spec_text((None, "model")), spec_text([["data", "fsdp"], None]), spec_text([None, None])
    ("P(None, 'model')", "P(('data', 'fsdp'), None)", 'replicated')
    >>> spec_text(None)
    '-'
    """
    if spec is None:
        return "-"
    if all(e is None for e in spec):
        return "replicated"
    return "P(" + ", ".join(repr(tuple(e)) if isinstance(e, (list, tuple)) else repr(e) for e in spec) + ")"
