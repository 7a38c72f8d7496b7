"""The optimizer beside each parameter: Adam-family moments aligned by path, and the update.

Optimizer states are saved as trees whose leaves repeat the parameters' paths under a moment
name: ``opt_state.0.mu.<param path>`` for ``adamw``, ``opt_state.1.0.mu...`` for
``chain(clip, adamw)``, ``opt_state.inner_state.0.mu...`` for ``inject_hyperparams``,
``opt_state.inner_opt_state.0.mu...`` for ``MultiSteps``, ``...inner_states.<label>.inner_state
.0.mu...`` for ``multi_transform``. A leaf is aligned with the parameter whose path follows its
moment name, and confirmed by shape (the moment's dtype may differ: ``mu_dtype``). The step count
is the ``count`` leaf beside the moments.

Keras 3 names its optimizer variables flat, the parameter's path joined by underscores before the
moment's name (``optimizer_variables.adam.tiny_dense_kernel_momentum`` and ``..._velocity`` for
``trainable_variables.tiny.dense.kernel``), with the step count in ``iteration``; such a state is
aligned by that name, and its update is the one Keras' Adam applies, whose eps is added to
``sqrt(v)`` before the bias correction: ``mu_hat * sqrt(1 - b2^t) / (sqrt(nu) + eps)``.

For each parameter, in one streaming pass reading the parameter, mu and nu region by region
together: ||param||, ||mu||, ||sqrt(nu)|| (= sqrt(sum nu)), max sqrt(nu), and the update Adam
applies at the stored step, ``mu_hat / (sqrt(nu_hat) + eps)`` with ``mu_hat = mu / (1 - b1^t)``,
``nu_hat = nu / (1 - b2^t)``, its norm and its ratio to ||param|| (times ``lr`` when given).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from paramscope.compute.moments import Accumulator
from paramscope.compute.plan import memory_budget_bytes, stream_regions
from paramscope.io import checkpoint
from paramscope.io.inventory import ParamInfo
from paramscope.names import split_path

FIRST = ("mu", "m", "exp_avg", "momentum")
SECOND = ("nu", "v", "exp_avg_sq", "velocity")
FACTORED = ("v_row", "v_col")
MOMENTS = FIRST + SECOND + FACTORED
COUNTS = ("count", "iteration")  # the step count beside the moments: optax, Keras
KERAS_MOMENTS = {"momentum": "mu", "velocity": "nu"}


@dataclass
class Moment:
    param: str  # the parameter's path
    kind: str  # "mu", "nu", "v_row", "v_col"
    prefix: str  # the optimizer path before the moment name (where its count lives)
    leaf: ParamInfo


@dataclass
class OptimEntry:
    path: str
    param: ParamInfo
    mu: ParamInfo | None = None
    nu: ParamInfo | None = None
    factored: list[ParamInfo] = field(default_factory=list)
    count_leaf: ParamInfo | None = None
    count: int | None = None
    # results
    norm: float | None = None
    mu_norm: float | None = None
    sqrt_nu_norm: float | None = None
    max_sqrt_nu: float | None = None
    update_norm: float | None = None
    ratio: float | None = None


@dataclass
class Alignment:
    entries: list[OptimEntry]
    unmatched: list[str]  # optimizer leaves that match no parameter
    stateless: list[str]  # parameters without optimizer state (frozen, e.g. by multi_transform)
    mismatched: list[str]  # leaves whose shape does not match their parameter
    convention: str = "optax"  # whose Adam update formula: "optax" or "keras" (flat moment names)


def align(params: Sequence[ParamInfo], opt_leaves: Sequence[ParamInfo]) -> Alignment:
    """Pairs each optimizer moment with its parameter by path, confirmed by shape."""
    by_path = {p.path: p for p in params}
    # a TrainState puts "params." before the parameters' paths; the moments do not repeat it
    for p in params:
        if p.path.startswith("params.") and p.path[len("params.") :] not in by_path:
            by_path[p.path[len("params.") :]] = p
    entries = {p.path: OptimEntry(p.path, p) for p in params}
    counts = {}  # the optimizer path before a count leaf -> the leaf
    for leaf in opt_leaves:
        parts = split_path(leaf.path)
        if parts[-1] in COUNTS:
            counts[".".join(parts[:-1])] = leaf
    flat = _flat_names(by_path)
    unmatched, mismatched = [], []
    convention = "optax"
    for leaf in opt_leaves:
        parts = split_path(leaf.path)
        if parts[-1] in COUNTS:
            continue
        moment = None
        for k, part in enumerate(parts[:-1]):
            rest = ".".join(parts[k + 1 :])
            if part in MOMENTS and rest in by_path:
                moment = Moment(rest, part, ".".join(parts[:k]), leaf)
                break
        if moment is None:
            stem, _, name = parts[-1].rpartition("_")
            if name in KERAS_MOMENTS and stem in flat:
                moment = Moment(flat[stem], KERAS_MOMENTS[name], ".".join(parts[:-1]), leaf)
                convention = "keras"
        if moment is None:
            unmatched.append(leaf.path)
            continue
        param = by_path[moment.param]
        entry = entries[param.path]
        if moment.kind in FACTORED:
            entry.factored.append(leaf)
        elif leaf.shape != param.shape:
            mismatched.append(f"{leaf.path} {leaf.shape} vs {param.path} {param.shape}")
            continue
        elif moment.kind in FIRST:
            entry.mu = leaf
        else:
            entry.nu = leaf
        entry.count_leaf = entry.count_leaf or counts.get(moment.prefix)
    stateless = [e.path for e in entries.values() if e.mu is None and e.nu is None and not e.factored]
    return Alignment(list(entries.values()), unmatched, stateless, mismatched, convention)


def _flat_names(by_path: dict[str, ParamInfo]) -> dict[str, str]:
    """Each parameter's path as Keras names its optimizer variables (keys joined by
    underscores) -> the path; a name two parameters share is left out (it aligns neither)."""
    names: dict[str, str | None] = {}
    for path in by_path:
        name = "_".join(part.strip('"') for part in split_path(path))
        names[name] = None if name in names and names[name] != path else path
    return {name: path for name, path in names.items() if path is not None}


def _read_scalar(leaf: ParamInfo) -> Any:
    handle = checkpoint.open_array(leaf.stored)
    return checkpoint.finish_read(checkpoint.start_read(handle, (), leaf.path), leaf.path)


def optimizer_pass(
    alignment: Alignment,
    *,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    lr: float | None = None,
    memory_budget: int | str | None = None,
    on_bytes: Callable[[int], Any] | None = None,
) -> list[OptimEntry]:
    """Reads each parameter with its mu and nu, region by region together, and fills the entries
    (the update by the alignment's convention: optax's or Keras')."""
    keras = alignment.convention == "keras"
    entries = alignment.entries
    for entry in entries:
        if entry.count_leaf is not None:
            entry.count = int(np.asarray(_read_scalar(entry.count_leaf)))
    # one plan over the parameters; each region of a parameter is read from mu and nu too
    limit = max(1, memory_budget_bytes(memory_budget) // 6)
    params = [e.param for e in entries]
    partners: dict[tuple[int, str], Any] = {}

    def handle_of(position: int, which: str):
        key = (position, which)
        if key not in partners:
            leaf = getattr(entries[position], which)
            partners[key] = checkpoint.open_array(leaf.stored) if leaf is not None else None
        return partners[key]

    def start(param: ParamInfo, handle, region):
        position = region.param
        reads = {"param": checkpoint.start_read(handle, param.index_in_store(region.index), param.path)}
        for which in ("mu", "nu"):
            other = handle_of(position, which)
            if other is not None:
                leaf = getattr(entries[position], which)
                reads[which] = checkpoint.start_read(other, leaf.index_in_store(region.index), leaf.path)
        return reads

    sums = {
        i: {k: Accumulator(full=k == "nu") for k in ("param", "mu", "nu", "update")}
        for i in range(len(params))
    }
    for region, reads in stream_regions(params, limit, start):
        entry, acc = entries[region.param], sums[region.param]
        values = {k: checkpoint.finish_read(f, entry.path) for k, f in reads.items()}
        for kind, value in values.items():
            acc[kind].feed(value)
        if "mu" in values and "nu" in values and entry.count:
            mu = values["mu"].astype(np.float64) / (1 - b1**entry.count)
            nu = values["nu"].astype(np.float64)
            if keras:  # Keras adds eps to sqrt(v) and corrects the bias in the step size
                acc["update"].feed(mu * math.sqrt(1 - b2**entry.count) / (np.sqrt(nu) + eps))
            else:
                acc["update"].feed(mu / (np.sqrt(nu / (1 - b2**entry.count)) + eps))
        if on_bytes is not None:
            on_bytes(region.nbytes)
    for position in range(len(params)):
        entry, acc = entries[position], sums[position]
        entry.norm = acc["param"].result().norm
        if entry.mu is not None:
            entry.mu_norm = acc["mu"].result().norm
        if entry.nu is not None:
            nu = acc["nu"].result()
            entry.sqrt_nu_norm = math.sqrt(max(nu.mean * nu.finite, 0.0)) if nu.finite else math.nan
            entry.max_sqrt_nu = math.sqrt(max(nu.max, 0.0)) if nu.finite else math.nan
        if entry.mu is not None and entry.nu is not None and entry.count:
            entry.update_norm = acc["update"].result().norm
            scale = lr if lr is not None else 1.0
            if entry.norm:
                entry.ratio = scale * entry.update_norm / entry.norm
            else:  # a zero parameter: any update is infinitely large next to it, none is no ratio
                entry.ratio = math.inf if entry.update_norm else None
    return entries


PARAM_ITEMS = ("params", "model", "trainable_variables")
OPT_ITEMS = ("opt_state", "optimizer", "opt", "optimizer_state", "optimizer_variables")


def split_state(open_item: Callable[[str | None], Any], items: Sequence[str], params_item, opt_item):
    """(inventory, parameters, optimizer leaves): from two items, or from one train-state item."""
    if params_item is None and opt_item is None:
        params_item = next((i for i in PARAM_ITEMS if i in items), None)
        opt_item = next((i for i in OPT_ITEMS if i in items), None)
    if params_item is not None and opt_item is not None:
        inv = open_item(params_item)
        return inv, inv.params, open_item(opt_item).params
    inv = open_item(params_item or opt_item)
    found = _state_roots([split_path(p.path) for p in inv.params])
    if found is None:
        from paramscope.errors import ItemNotFound, few

        raise ItemNotFound(
            "cannot tell the parameters from the optimizer state",
            hint=f"name them with --params-item and --opt-item (items: {few(items)})",
        )
    prefix, param_root, opt_root = found
    depth = len(prefix)
    params, opt = [], []
    for p in inv.params:
        parts = split_path(p.path)
        if tuple(parts[:depth]) != prefix or len(parts) <= depth + 1:
            continue
        if parts[depth] == param_root:  # named as the training code names them, inside the parameters
            params.append(replace(p, path=".".join(parts[depth + 1 :])))
        elif parts[depth] == opt_root:
            opt.append(replace(p, path=".".join(parts[depth:])))
    return inv, params, opt


def _state_roots(paths: Sequence[list[str]]) -> tuple[tuple[str, ...], str, str] | None:
    """Where a train state keeps its parameters and its optimizer state side by side: (the keys
    above them, the parameters' key, the optimizer's key), at the shallowest level (a TrainState
    at the top, or saved under a key such as ``model`` or ``state``); None when nowhere."""
    for depth in range(3):
        below: dict[tuple[str, ...], set[str]] = {}
        for parts in paths:
            if len(parts) > depth + 1:
                below.setdefault(tuple(parts[:depth]), set()).add(parts[depth])
        for prefix in sorted(below):
            names = below[prefix]
            param_root = next((i for i in PARAM_ITEMS if i in names), None)
            opt_root = next((i for i in OPT_ITEMS if i in names), None)
            if param_root is not None and opt_root is not None:
                return prefix, param_root, opt_root
    return None


def _layer_of(leaf: ParamInfo | None, path: str, shape: tuple[int, ...], axis: int, index: int):
    return None if leaf is None else replace(leaf, path=path, shape=shape, layer=(axis, index))


def unstack_alignment(alignment: Alignment, stacks) -> Alignment:
    """One entry per layer of each stacked parameter, its moments sliced alike (same shape)."""
    from paramscope.compute.layers import layer_path

    entries = []
    for entry in alignment.entries:
        stack = stacks.get(entry.path)
        if stack is None:
            entries.append(entry)
            continue
        shape = entry.param.shape[: stack.axis] + entry.param.shape[stack.axis + 1 :]
        for j in range(stack.size):
            path = layer_path(entry.path, stack, j)
            param, mu, nu = (
                _layer_of(leaf, path, shape, stack.axis, j) for leaf in (entry.param, entry.mu, entry.nu)
            )
            entries.append(OptimEntry(path, param, mu, nu, [], entry.count_leaf))
    return replace(alignment, entries=entries)
