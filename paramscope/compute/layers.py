"""Scanned (stacked) layers: which arrays hold a stack of layers, along which axis, and their
per-layer rows.

Models built with ``nn.scan``, ``nnx.scan``/``nnx.vmap`` or MaxText's ``scan_layers`` store every
layer of a stack in one array with a layer axis. The axis of an array comes, in this order, from

1. ``--layer-axis REGEX=AXIS`` (the first pattern that matches the path);
2. what the checkpoint records: MaxText's ``scan_layers`` in the step's custom metadata (axis
   ``param_scan_axis``, default 1, for arrays under a ``layers`` component), or a saved sharding
   that puts a ``layers``/``stage`` mesh axis on one dimension;
3. the heuristic: the arrays under one stack component (``layers``, ``scan``, ``blocks``, ...)
   all have one dimension size in common, in exactly one place each (when several sizes are
   shared, the one that sits at the same axis, once, in every array).

An array the heuristic cannot settle (no common size, or the size in two places) is left whole,
with a warning naming it and ``--layer-axis``. The layer index becomes a path component of its
own, after the stack component: ``decoder.layers.mlp.wi_0.kernel`` -> ``decoder.layers.3.mlp.wi_0.kernel``.
"""

from __future__ import annotations

import math
import re
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, replace

from paramscope.errors import UsageError
from paramscope.io.inventory import ParamInfo
from paramscope.names import path_sort_key, split_path

STACK_NAMES = ("layers", "layer", "scan", "scanned", "blocks", "stages", "stack", "repeat")
MESH_LAYER_AXES = ("layers", "layer", "stage", "stages", "pipeline")


@dataclass(frozen=True)
class Stack:
    """How one array is unstacked."""

    axis: int
    size: int
    component: int  # the layer index goes after this path component
    rule: str  # "option", "metadata", "sharding" or "heuristic"


def parse_layer_axes(texts: Sequence[str] | None) -> list[tuple[re.Pattern, int]]:
    """``REGEX=AXIS`` options.

    >>> [(p.pattern, a) for p, a in parse_layer_axes(["layers=1"])]
    [('layers', 1)]
    """
    out = []
    for text in texts or ():
        pattern, sep, axis = text.rpartition("=")
        if not sep or not axis.lstrip("-").isdigit():
            raise UsageError(f"malformed --layer-axis {text!r}", hint="write REGEX=AXIS, e.g. 'layers=1'")
        try:
            out.append((re.compile(pattern), int(axis)))
        except re.error as err:
            raise UsageError(
                f"invalid --layer-axis regex {pattern!r}: {err}", hint="use a Python regex"
            ) from None
    return out


_ONE_LAYER = re.compile(r"^(?:" + "|".join(STACK_NAMES) + r")_\d+$")


def _stack_component(path: str) -> int | None:
    parts = split_path(path)
    for i, part in enumerate(parts[:-1]):
        name = part.lower()
        if _ONE_LAYER.match(name):  # unrolled: layers_3 is one layer, not a stack
            continue
        if name in STACK_NAMES or any(
            name.endswith("_" + s) or name.startswith(s + "_") for s in STACK_NAMES
        ):
            if not parts[i + 1].isdigit():  # already one array per layer: layers.3.kernel
                return i
    return None


def find_stacks(
    params: Sequence[ParamInfo],
    layer_axes: Sequence[tuple[re.Pattern, int]] = (),
    custom: dict | None = None,
) -> tuple[dict[str, Stack], list[str]]:
    """The stacked arrays among ``params`` (by path) and warnings about arrays left whole."""
    stacks: dict[str, Stack] = {}
    warnings: list[str] = []
    undecided: dict[str, list[ParamInfo]] = defaultdict(list)
    maxtext_axis = None
    if custom and custom.get("scan_layers"):
        maxtext_axis = int(custom.get("param_scan_axis", 1))
    unscanned = bool(custom) and custom.get("scan_layers") is False  # the run says: no stacks
    # MaxText scans its parameters (and their optimizer state) on param_scan_axis; other state
    # under a `layers` component (NNX rng keys and counts) is stacked its own way, so the axis
    # applies where it holds the number of layers most such arrays agree on
    metadata_sizes = Counter(
        p.shape[maxtext_axis]
        for p in params
        if maxtext_axis is not None
        and maxtext_axis < len(p.shape)
        and (c := _stack_component(p.path)) is not None
        and split_path(p.path)[c] == "layers"
    )
    layer_count = metadata_sizes.most_common(1)[0][0] if metadata_sizes else None
    for param in params:
        component = _stack_component(param.path)
        ndim = len(param.shape)
        option = next((axis for pattern, axis in layer_axes if pattern.search(param.path)), None)
        if option is not None:
            axis = option + ndim if option < 0 else option
            if not 0 <= axis < ndim:
                raise UsageError(
                    f"--layer-axis {option} is not an axis of {param.path} (shape {param.shape})",
                    hint="axes count from 0",
                )
            where = component if component is not None else max(0, len(split_path(param.path)) - 2)
            stacks[param.path] = Stack(axis, param.shape[axis], where, "option")
            continue
        if component is None or ndim == 0 or unscanned:
            continue
        sharded = [
            d
            for d, entry in enumerate(param.sharding or ())
            if any(name in MESH_LAYER_AXES for name in ((entry,) if isinstance(entry, str) else entry or ()))
        ]
        if (
            maxtext_axis is not None
            and split_path(param.path)[component] == "layers"
            and maxtext_axis < ndim
            and param.shape[maxtext_axis] == layer_count
        ):
            stacks[param.path] = Stack(maxtext_axis, param.shape[maxtext_axis], component, "metadata")
        elif len(sharded) == 1:
            stacks[param.path] = Stack(sharded[0], param.shape[sharded[0]], component, "sharding")
        else:
            prefix = ".".join(split_path(param.path)[: component + 1])
            undecided[prefix].append(param)
    decided = defaultdict(set)  # a sibling already settled tells the stack's size
    for path, stack in stacks.items():
        component = _stack_component(path)
        if component is not None:
            decided[".".join(split_path(path)[: component + 1])].add(stack.size)
    for prefix, group in undecided.items():
        common = set(group[0].shape)
        for param in group[1:]:
            common &= set(param.shape)
        sizes = sorted(s for s in common if s > 1)
        if len(decided[prefix]) == 1:
            sizes = sorted(decided[prefix] & common) or sizes
        if len(sizes) > 1:  # several shared sizes: the one found once, at one axis, in every array
            placed = [
                size
                for size in sizes
                if len({_only_axis(p.shape, size) for p in group} - {None}) == 1
                and all(_only_axis(p.shape, size) is not None for p in group)
            ]
            sizes = placed if len(placed) == 1 else sizes
        if (len(group) < 2 and len(decided[prefix]) != 1) or len(sizes) != 1:
            reason = "it has no sibling to compare with" if len(group) < 2 else "no one size is shared"
            if len(sizes) > 1:
                reason = f"the sizes {', '.join(map(str, sizes))} are all shared"
            warnings += [
                f"{param.path} {param.shape} looks stacked under {prefix!r} but {reason}: left whole "
                "(settle it with --layer-axis REGEX=AXIS)"
                for param in group
            ]
            continue
        size = sizes[0]
        for param in group:
            axes = [d for d, s in enumerate(param.shape) if s == size]
            if len(axes) == 1:
                stacks[param.path] = Stack(axes[0], size, _stack_component(param.path), "heuristic")
            else:
                warnings.append(
                    f"{param.path} {param.shape} has {size} layers on axes {axes}: left whole "
                    "(settle it with --layer-axis REGEX=AXIS)"
                )
    return stacks, warnings


def _only_axis(shape: Sequence[int], size: int) -> int | None:
    """The one axis of ``shape`` with this size; None when there is none or more than one."""
    axes = [d for d, s in enumerate(shape) if s == size]
    return axes[0] if len(axes) == 1 else None


def layer_path(path: str, stack: Stack, index: int) -> str:
    """The path of one layer: its index after the stack component.

    >>> layer_path("decoder.layers.mlp.wi_0.kernel", Stack(1, 4, 1, "metadata"), 3)
    'decoder.layers.3.mlp.wi_0.kernel'
    """
    parts = split_path(path)
    return ".".join([*parts[: stack.component + 1], str(index), *parts[stack.component + 1 :]])


@dataclass(frozen=True)
class LayerView:
    """One row after unstacking: a whole array (``layer`` None) or one layer of a stacked one."""

    info: ParamInfo  # path, shape, dtype, sharding as the row shows them
    source: int  # position of the stored array in the params list
    layer: int | None = None
    stack: Stack | None = None


def unstack(params: Sequence[ParamInfo], stacks: dict[str, Stack]) -> list[LayerView]:
    """Every array, its stacked ones as one view per layer."""
    views = []
    for position, param in enumerate(params):
        stack = stacks.get(param.path)
        if stack is None:
            views.append(LayerView(param, position))
            continue
        shape = param.shape[: stack.axis] + param.shape[stack.axis + 1 :]
        spec = None
        if param.sharding is not None:
            rest = param.sharding[: stack.axis] + param.sharding[stack.axis + 1 :]
            spec = rest if any(e is not None for e in rest) else None
        for j in range(stack.size):
            info = replace(
                param,
                path=layer_path(param.path, stack, j),
                shape=shape,
                sharding=spec,
                layer=(stack.axis, j),
            )
            views.append(LayerView(info, position, j, stack))
    return views


def layer_results(views: Sequence[LayerView], result):
    """The ScanResult of a scan with ``unstack``, as one row per view (per layer where stacked)."""
    from paramscope.compute.engines import ParamStats

    rows = []
    for view in views:
        whole = result.params[view.source]
        if view.layer is None:
            rows.append(ParamStats(view.info, whole.moments, whole.digest))
        else:
            rows.append(ParamStats(view.info, result.layers[view.source][view.layer]))
    # the totals of what is shown (layers picked by a filter may be part of an array read whole)
    global_norm = math.sqrt(math.fsum(r.moments.sum_sq for r in rows))
    return replace(result, params=rows, global_norm=global_norm, nonfinite=sum(r.nonfinite for r in rows))


@dataclass
class LayerRow:
    stack: str  # the stacked arrays' common prefix, e.g. decoder.layers
    layer: int
    norms: dict[str, float]  # kind (path after the layer index) -> norm
    norm: float  # of the whole layer
    nonfinite: int


def layer_table(views: Sequence[LayerView], result) -> list[LayerRow]:
    """One row per layer of each stack: the norm of each of its arrays and of the whole layer."""
    rows: dict[tuple[str, int], tuple[dict[str, float], list[float], list[int]]] = {}
    # paired by path: views the scan left out (typed PRNG keys) have no numbers, and must not
    # shift the others onto the wrong arrays
    by_path = {r.param.path: r for r in result.params}
    for view in views:
        stats = by_path.get(view.info.path)
        if view.stack is None or stats is None:
            continue
        parts = split_path(view.info.path)
        stack = ".".join(parts[: view.stack.component + 1])
        kind = ".".join(parts[view.stack.component + 2 :])
        norms, squares, nonfinite = rows.setdefault((stack, view.layer), ({}, [], []))
        norms[kind] = stats.norm
        squares.append(stats.moments.sum_sq)
        nonfinite.append(stats.nonfinite)
    return [
        LayerRow(stack, layer, norms, math.sqrt(math.fsum(squares)), sum(nonfinite))
        for (stack, layer), (norms, squares, nonfinite) in sorted(
            rows.items(), key=lambda entry: (path_sort_key(entry[0][0]), entry[0][1])
        )
    ]


def scan_views(views: Sequence[LayerView], params: Sequence[ParamInfo], **options):
    """Reads the arrays the views need once, and returns one row per view (see :func:`layer_results`)."""
    from paramscope.compute.engines import scan

    sources = sorted({v.source for v in views})
    position = {source: k for k, source in enumerate(sources)}
    unstacked = {position[v.source]: v.stack.axis for v in views if v.stack is not None}
    result = scan([params[s] for s in sources], unstack=unstacked, **options)
    return layer_results([replace(v, source=position[v.source]) for v in views], result)
