"""Integrity verification: decode every chunk of every array and check it against the metadata.

OCDBT packs many arrays into a few data files, so one damaged file spoils some arrays and not
others, and the metadata of a damaged array often still reads. Only decoding every chunk finds
the damage; :func:`verify_checkpoint` does, streaming under the memory budget, and reports each
unreadable or inconsistent array by path instead of stopping at the first.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from paramscope.compute.digest import DigestState, feed_box
from paramscope.compute.plan import memory_budget_bytes, stream_regions
from paramscope.errors import CorruptCheckpoint, ItemNotFound, few
from paramscope.io import checkpoint
from paramscope.io.inventory import ParamInfo, spec_per_dim
from paramscope.io.records import chunk_grid, skips_fill_chunks


@dataclass(frozen=True)
class Problem:
    item: str | None
    path: str | None
    problem: str


@dataclass
class VerifyResult:
    checkpoint: str
    step: int | None
    items: list[str]
    arrays: int
    bytes_read: int
    problems: list[Problem] = field(default_factory=list)
    digests_checked: int = 0  # arrays whose content was compared with a baseline's digest
    # What verify cannot prove, by item (e.g. chunks that read as the fill value)
    notes: list[str] = field(default_factory=list)
    baseline_step: int | None = None  # the step the digests compared with were recorded at

    @property
    def ok(self) -> bool:
        return not self.problems


def fill_notes(arrays_by_item: dict[str, list]) -> list[str]:
    """What verify cannot tell about items whose writer skips chunks equal to the fill value
    (Orbax before 0.7, plain zarr trees): a chunk that is not there reads as that value, as the
    writer's own restore reads it, so a lost chunk looks like one never written. Nothing for
    writers that store every chunk (a missing one is then damage, reported as such)."""
    unknown, sparse = [], []
    for item, arrays in arrays_by_item.items():
        skipping = [a for a in arrays if skips_fill_chunks(a)]
        if any(a.stored_chunks < 0 for a in skipping):
            unknown.append(repr(item))
        else:
            sparse += [a for a in skipping if a.shape and a.stored_chunks < chunk_grid(a)[0]]
    notes = []
    if unknown:
        notes.append(
            f"{'item' if len(unknown) == 1 else 'items'} {', '.join(unknown)}: the writer may skip chunks "
            "equal to the fill value (Orbax before 0.7 does, and the metadata does not say otherwise): a "
            "missing chunk reads as that value, so a lost chunk cannot be told from one never written"
        )
    if sparse:
        notes.append(
            f"{len(sparse)} array{'s' if len(sparse) > 1 else ''} ({sparse[0].path}"
            f"{', ...' if len(sparse) > 1 else ''}) lack{'' if len(sparse) > 1 else 's'} chunks, which "
            "read as the fill value: the writer skips chunks equal to it, so a lost chunk cannot be told "
            "from one never written"
        )
    return notes


def _chosen_items(location: checkpoint.Location, item: str | None) -> list[checkpoint.Item]:
    if item is None:
        return location.items
    chosen = [i for i in location.items if i.name == item]
    if not chosen:
        names = few(i.name for i in location.items)
        raise ItemNotFound(f"no item {item!r} in {location.path}", hint=f"items: {names}")
    return chosen


def verify_checkpoint(
    path: str | os.PathLike,
    step: int | None = None,
    item: str | None = None,
    memory_budget: int | str | None = None,
    on_bytes: Callable[[int], Any] | None = None,
    digests: Mapping[tuple[str, str], str] | None = None,
    baseline_step: int | None = None,
) -> VerifyResult:
    """Checks one step of a checkpoint: metadata, sharding file and every chunk of every array.

    Args:
        path: A CheckpointManager root, a step folder or an item folder.
        step: The step to check (default: the latest finished one).
        item: Check only this item (default: every item of the step).
        memory_budget: Bytes of array data held at once.
        on_bytes: Called with the bytes of each region once it is checked (progress).
        digests: Content digests recorded earlier (``Baseline.digests_by_item``), by item and
            path: each array's bytes are hashed while decoded, and one that differs is a problem.
        baseline_step: The step the digests were recorded at: when it is another step than the
            one checked, each content problem says so (training changes values without damage).

    Returns:
        A :class:`VerifyResult`; ``ok`` when no problem was found.
    """
    location = checkpoint.locate(os.fspath(path), step)
    before = checkpoint.witness(location)
    result = VerifyResult(location.path, location.step.step if location.step else None, [], 0, 0)
    try:
        checkpoint.read_step_metadata(location)
    except CorruptCheckpoint as err:
        result.problems.append(Problem(None, None, err.message))
    params: list[ParamInfo] = []
    owners: list[str] = []
    arrays_by_item: dict[str, list] = {}
    for chosen in _chosen_items(location, item):
        result.items.append(chosen.name)
        if chosen.kind == "json":
            try:
                checkpoint.read_json_item(chosen)
            except CorruptCheckpoint as err:
                result.problems.append(Problem(chosen.name, None, err.message))
            continue
        if chosen.kind == "iterator":  # grain's per-process state files must parse
            for name, state in checkpoint.read_iterator_item(chosen).items():
                if not isinstance(state, dict):
                    result.problems.append(Problem(chosen.name, None, f"{name} is not a JSON object"))
            continue
        if chosen.kind == "unknown":
            continue  # its handler's files are in a format paramscope does not read
        warnings: list[str] = []
        try:
            arrays = checkpoint.read_arrays(chosen, warnings)
            audit = checkpoint.audit_item(chosen, arrays)
        except CorruptCheckpoint as err:
            result.problems.append(Problem(chosen.name, None, err.message))
            continue
        result.problems += [Problem(chosen.name, None, w) for w in warnings]
        result.problems += [Problem(chosen.name, name, problem) for name, problem in audit]
        arrays_by_item[chosen.name] = arrays
        for array in arrays:
            params.append(
                ParamInfo(array.path, array.shape, array.dtype, array.itemsize, spec_per_dim(array), array)
            )
            owners.append(chosen.name)
    result.arrays = len(params)
    result.notes = fill_notes(arrays_by_item)

    failed: set[int] = set()

    def fail(region, err: CorruptCheckpoint) -> None:
        failed.add(region.param)
        reason = err.reason if isinstance(err, checkpoint.ArrayReadError) else err.message
        result.problems.append(Problem(owners[region.param], params[region.param].path, reason))

    def start(param: ParamInfo, handle, region):
        return checkpoint.start_read(handle, region.read_index, param.path)

    alias = {}  # an item folder checked alone answers to the baseline's one item, whatever its name
    recorded_items = {item for item, _ in digests or {}}
    if location.selected_item is not None and len(recorded_items) == 1:
        alias[location.selected_item] = next(iter(recorded_items))
    expected = [digests.get((alias.get(o, o), p.path)) if digests else None for o, p in zip(owners, params)]
    states = [DigestState(p.dtype, p.shape, p.itemsize) if e else None for p, e in zip(params, expected)]
    limit = max(1, memory_budget_bytes(memory_budget) // 2)
    for region, pending in stream_regions(params, limit, start, on_error=fail):
        param = params[region.param]
        if region.param in failed:  # one problem per array is enough
            continue
        try:
            value = checkpoint.finish_read(pending, param.path)
            if tuple(value.shape) != region.shape or value.dtype.name != param.dtype:
                raise CorruptCheckpoint(
                    f"decoded as {value.dtype.name}{list(value.shape)}, metadata says {param.dtype}"
                    f"{list(region.shape)}"
                )
            result.bytes_read += value.nbytes
            if states[region.param] is not None:
                feed_box(states[region.param], param.shape, region.index, value)
        except CorruptCheckpoint as err:
            fail(region, err)
        if on_bytes is not None:
            on_bytes(region.nbytes)
    result.baseline_step = baseline_step
    other = (
        f" (baseline is of step {baseline_step}, checkpoint step {result.step})"
        if baseline_step is not None and result.step is not None and baseline_step != result.step
        else ""
    )
    for position, (state, wanted) in enumerate(zip(states, expected)):
        if state is not None and position not in failed and state.complete and state.hexdigest() != wanted:
            result.problems.append(
                Problem(
                    owners[position],
                    params[position].path,
                    f"content differs from the baseline: digest {state.hexdigest()[:16]}..., "
                    f"recorded {wanted[:16]}...{other}",
                )
            )
    checkpoint.check_witness(location, before, os.fspath(path))
    if digests:
        result.digests_checked = sum(s is not None for s in states)
        if not result.digests_checked:
            result.problems.append(
                Problem(
                    None,
                    None,
                    "no array here has a digest in the baseline "
                    f"(its items: {', '.join(sorted(recorded_items))})",
                )
            )
    return result
