"""Parameter utilities for in-memory pytrees.

The functions of ``xlstm_jax.trainer.base.param_utils`` with the same names, signatures and
meaning, made exact in every dtype and usable both inside and outside ``shard_map``:

* reductions accumulate in float32 or wider, never in a bf16/fp16 parameter's own dtype;
* a partitioned parameter's local sum is ``psum``-ed only over mesh axes that are bound (inside
  ``shard_map``); outside, the array is global and its plain sum is already the full norm;
* paths are dotted and unboxed (``params.Dense_0.kernel``, not ``...kernel.value``), so weight
  decay regexes such as ``kernel$`` match boxed parameters too.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from paramscope._mask import mask_predicate
from paramscope.names import dotted_path, path_sort_key

PyTree = Any

__all__ = [
    "is_partitioned",
    "get_num_params",
    "tabulate_params",
    "get_grad_norms",
    "get_param_norms",
    "get_sharded_norm_logits",
    "get_sharded_global_norm",
    "get_param_mask_fn",
]


def is_partitioned(x: Any) -> bool:
    """Checks whether an object is a flax ``nn.Partitioned`` box.

    ``nn.LogicallyPartitioned`` is a subclass and counts too. Use it as ``is_leaf`` in tree maps
    to treat boxes as leaves; plain arrays and other leaves stay leaves.

    Args:
        x: The object to check.

    Returns:
        Whether ``x`` is a Partitioned.

    >>> import jax.numpy as jnp
    >>> from flax import linen as nn
    >>> is_partitioned(nn.Partitioned(jnp.ones(3), names=("model",)))
    True
    >>> is_partitioned(jnp.ones(3))
    False
    """
    return isinstance(x, nn.Partitioned)


def _unbox(x: Any) -> Any:
    return x.value if is_partitioned(x) else x


def _leaves_with_paths(tree: PyTree) -> list[tuple[str, Any]]:
    """(dotted path, leaf) pairs, with Partitioned boxes as single leaves."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_partitioned)
    return [(dotted_path(path), leaf) for path, leaf in flat]


def get_num_params(params: PyTree) -> int:
    """Calculates the number of parameters in a pytree.

    A Partitioned box counts its value's size; leaves without a size (None, strings) count 0.

    Args:
        params: The parameters as a pytree.

    Returns:
        The number of parameters.

    >>> import jax.numpy as jnp
    >>> from flax import linen as nn
    >>> w = nn.Partitioned(jnp.ones((3, 4)), names=(None, "tp"))
    >>> get_num_params({"w": w, "b": jnp.ones(4), "n": "x"})
    16
    """
    leaves = jax.tree_util.tree_leaves(params, is_leaf=is_partitioned)
    return sum(int(np.size(leaf)) if hasattr(leaf, "size") else 0 for leaf in map(_unbox, leaves))


def _accumulation_dtype(dtype: Any) -> Any:
    """float32 for every dtype narrower than it (bf16, fp16, ints, bool); wider floats stay."""
    dtype = jnp.dtype(dtype)
    if jnp.issubdtype(dtype, jnp.floating) and dtype.itemsize >= 4:
        return dtype
    return jnp.float32


def _sum_of_squares(value: jax.Array) -> jax.Array:
    value = jnp.asarray(value)
    if jnp.issubdtype(value.dtype, jnp.complexfloating):
        value = jnp.abs(value)
    value = value.astype(_accumulation_dtype(value.dtype))
    return jnp.sum(jnp.square(value))


def _bound_axes(names: Sequence[Any]) -> tuple[str, ...]:
    """The mesh axis names among `names` that are bound here, i.e. inside ``shard_map``."""
    bound = []
    for name in jax.tree_util.tree_leaves(tuple(names)):
        if name is None or name in bound:
            continue
        try:
            jax.lax.axis_size(name)
        except NameError:
            continue
        bound.append(name)
    return tuple(bound)


def get_sharded_norm_logits(x: jax.Array | nn.Partitioned) -> jax.Array:
    """Calculates the squared norm of one (possibly sharded) parameter or gradient.

    Inside ``shard_map`` a Partitioned holds this device's shard: its local sum of squares is
    ``psum``-ed over the mesh axes named in its partition names. Outside ``shard_map`` the value
    is a global array and its plain sum is the full squared norm. Both give the same number.
    The sum accumulates in float32 or wider.

    Args:
        x: The parameter or gradient (an array or an ``nn.Partitioned``).

    Returns:
        The norm logit, i.e. the squared L2 norm, as a float32 (or wider) scalar.

    >>> import jax.numpy as jnp
    >>> float(get_sharded_norm_logits(jnp.array([3.0, 4.0], dtype=jnp.bfloat16)))
    25.0
    """
    if is_partitioned(x):
        norm_logit = _sum_of_squares(x.value)
        axes = _bound_axes(x.names)
        return jax.lax.psum(norm_logit, axis_name=axes) if axes else norm_logit
    return _sum_of_squares(x)


def get_sharded_global_norm(x: PyTree) -> tuple[jax.Array, PyTree]:
    """Calculates the global L2 norm of a (possibly sharded) pytree and each leaf's norm.

    Args:
        x: The pytree. Each leaf should be an array or an ``nn.Partitioned``.

    Returns:
        The global norm, and a pytree of the same structure (boxes replaced by their norm)
        with the norm of each leaf.

    >>> import jax.numpy as jnp
    >>> norm, per_leaf = get_sharded_global_norm({"a": jnp.array([3.0]), "b": jnp.array([4.0])})
    >>> float(norm), float(per_leaf["a"])
    (5.0, 3.0)
    """
    norm_logits = jax.tree_util.tree_map(get_sharded_norm_logits, x, is_leaf=is_partitioned)
    leaves = jax.tree_util.tree_leaves(norm_logits)
    if not leaves:
        return jnp.zeros((), jnp.float32), norm_logits
    dtype = jnp.result_type(*leaves)
    norm_sq = jnp.sum(jnp.stack([leaf.astype(dtype) for leaf in leaves]))
    return jnp.sqrt(norm_sq), jax.tree_util.tree_map(jnp.sqrt, norm_logits)


def _norm_metrics(prefix: str, tree: PyTree, return_per_param: bool) -> dict[str, Any]:
    global_norm, per_leaf = get_sharded_global_norm(tree)
    metrics = {prefix: global_norm}
    if return_per_param:
        for path, norm in _leaves_with_paths(per_leaf):
            metrics[f"{prefix}_{path}"] = norm
    return metrics


def get_grad_norms(grads: PyTree, return_per_param: bool = False) -> dict[str, Any]:
    """Determines the gradient norms.

    Args:
        grads: The gradients as a pytree.
        return_per_param: Whether to add one ``grad_norm_<path>`` entry per parameter.

    Returns:
        ``{"grad_norm": global_norm}`` plus, when asked, the norm of each parameter.

    >>> import jax.numpy as jnp
    >>> {k: float(v) for k, v in get_grad_norms({"w": jnp.array([6.0, 8.0])}, True).items()}
    {'grad_norm': 10.0, 'grad_norm_w': 10.0}
    """
    return _norm_metrics("grad_norm", grads, return_per_param)


def get_param_norms(params: PyTree, return_per_param: bool = False) -> dict[str, Any]:
    """Determines the parameter norms.

    Args:
        params: The parameters as a pytree.
        return_per_param: Whether to add one ``param_norm_<path>`` entry per parameter.

    Returns:
        ``{"param_norm": global_norm}`` plus, when asked, the norm of each parameter.

    >>> import jax.numpy as jnp
    >>> {k: float(v) for k, v in get_param_norms({"b": {"x": jnp.ones(4)}}, True).items()}
    {'param_norm': 2.0, 'param_norm_b.x': 2.0}
    """
    return _norm_metrics("param_norm", params, return_per_param)


def get_param_mask_fn(
    exclude: Sequence[str] | None, include: Sequence[str] | None = None
) -> Callable[[PyTree], PyTree]:
    """Returns a function that maps params to a boolean mask, e.g. for weight decay.

    Regexes are matched with ``re.search`` against each parameter's dotted, unboxed path.
    With ``exclude``, every parameter but the matches is True; with ``include``, only the
    matches; with neither, all. The mask keeps the structure of the params (Partitioned boxes
    hold a boolean), so it plugs into ``optax.masked`` and ``optax.adamw(mask=...)``.

    Args:
        exclude: Regexes of parameters to exclude, or None.
        include: Regexes of parameters to include, or None. Not together with ``exclude``.

    Returns:
        A function from a params pytree to a pytree of booleans.

    Raises:
        ValueError: Both ``exclude`` and ``include`` are given, or a regex is invalid.

    >>> import jax.numpy as jnp
    >>> mask_fn = get_param_mask_fn(exclude=["bias$", "norm"])
    >>> mask_fn({"dense": {"kernel": jnp.ones(2), "bias": jnp.ones(2)}, "norm": {"scale": jnp.ones(2)}})
    {'dense': {'bias': False, 'kernel': True}, 'norm': {'scale': False}}
    """
    decide = mask_predicate(exclude, include)

    def leaf_mask(path, leaf):
        flag = decide(dotted_path(path))
        return leaf.replace_boxed(flag) if is_partitioned(leaf) else flag

    def mask_fn(params: PyTree) -> PyTree:
        return jax.tree_util.tree_map_with_path(leaf_mask, params, is_leaf=is_partitioned)

    return mask_fn


def _sharding_label(leaf: Any) -> str:
    from paramscope.names import spec_text

    return spec_text(tuple(leaf.names) if is_partitioned(leaf) else ())


def tabulate_params(
    state: Any,
    show_weight_decay: bool = False,
    weight_decay_exclude: Sequence[str] | None = None,
    weight_decay_include: Sequence[str] | None = None,
) -> str:
    """Summarizes the parameters as a text table.

    One row per parameter, sorted by path: name (dotted, unboxed), shape, count, dtype and
    sharding (the Partitioned names as ``P('model', None)``, or ``replicated``); with
    ``show_weight_decay`` a column with the mask of :func:`get_param_mask_fn`. The table is
    preceded by the total number of global parameters.

    Args:
        state: A TrainState-like object (anything with ``.params``) or the parameters.
        show_weight_decay: Whether to show the weight decay mask.
        weight_decay_exclude: Regexes of parameters to exclude from weight decay.
        weight_decay_include: Regexes of parameters to include in weight decay.

    Returns:
        The summary table as a string.

    >>> import jax.numpy as jnp
    >>> print(tabulate_params({"w": jnp.ones((2, 3))}).splitlines()[0])
    Total number of global parameters: 6
    """
    from rich import box
    from rich.console import Console
    from rich.table import Table

    params = state.params if hasattr(state, "params") else state
    rows = sorted(_leaves_with_paths(params), key=lambda row: path_sort_key(row[0]))
    decide = mask_predicate(weight_decay_exclude, weight_decay_include) if show_weight_decay else None

    table = Table(box=box.SIMPLE_HEAD, show_edge=False)
    for header, justify in (
        ("Name", "left"),
        ("Shape", "left"),
        ("Count", "right"),
        ("Dtype", "left"),
        ("Sharding", "left"),
    ):
        table.add_column(header, justify=justify, overflow="fold")
    if decide is not None:
        table.add_column("Weight Decay")
    total = 0
    for path, leaf in rows:
        value = _unbox(leaf)
        shape = tuple(np.shape(value))
        count = int(np.size(value)) if hasattr(value, "size") else 0
        total += count
        cells = [
            path,
            str(shape),
            f"{count:_}",
            str(getattr(value, "dtype", type(value).__name__)),
            _sharding_label(leaf),
        ]
        if decide is not None:
            cells.append(str(decide(path)))
        table.add_row(*cells)
    buffer = io.StringIO()
    Console(file=buffer, width=200, color_system=None, force_terminal=False).print(table)
    body = "\n".join(line.rstrip() for line in buffer.getvalue().splitlines())
    return f"Total number of global parameters: {total:_}\n\n{body}"
