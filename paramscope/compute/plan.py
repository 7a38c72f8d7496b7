"""The read plan: which boxes of which arrays to read, in groups that fit a memory budget.

Arrays are read in groups that fit the limit; an array larger than that is read in slices along
its chunk boundaries. While one group is reduced the next one is being read and decoded by
TensorStore's threads, so decoding and reduction overlap and every core works.
"""

from __future__ import annotations

import math
import operator
import os
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from paramscope.errors import CorruptCheckpoint, UsageError
from paramscope.io import checkpoint
from paramscope.io.inventory import ParamInfo

MiB = 1 << 20
GiB = 1 << 30
# Arrays per group, whatever their bytes: a group's arrays are opened and read together, so this
# bounds the handles and futures held at once, while amortising each round trip over many arrays.
GROUP_ARRAYS = 4096
T = TypeVar("T")


MIN_MEMORY_BUDGET = 1 << 10  # 1 KiB: any less and a read would not hold a row of most arrays
_UNITS = {
    **{u: 1 for u in ("", "b")},
    **{u: 1000 for u in ("k", "kb")},
    "kib": 1 << 10,
    **{u: 1000**2 for u in ("m", "mb")},
    "mib": 1 << 20,
    **{u: 1000**3 for u in ("g", "gb")},
    "gib": 1 << 30,
    **{u: 1000**4 for u in ("t", "tb")},
    "tib": 1 << 40,
}


def parse_size(text: str) -> int:
    """Bytes from ``512MiB``, ``4GiB``, ``1.5GB``, ``1000000`` (binary and decimal units).

    >>> parse_size("512MiB"), parse_size("2GB"), parse_size("4096")
    (536870912, 2000000000, 4096)
    """
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", text)
    if not match or match.group(2).lower() not in _UNITS:
        raise UsageError(f"malformed size {text!r}", hint="write e.g. 512MiB, 4GiB or 2GB")
    size = int(float(match.group(1)) * _UNITS[match.group(2).lower()])
    if size < MIN_MEMORY_BUDGET:
        raise UsageError(
            f"memory budget {text!r} is too small",
            hint=f"give at least {MIN_MEMORY_BUDGET >> 10}KiB, e.g. 512MiB",
        )
    return size


def memory_budget_bytes(budget: int | str | None) -> int:
    """A memory budget as the library and the command line take it: bytes (an int), a size
    (``"256MiB"``, ``"2GB"``, see :func:`parse_size`), or None for :func:`default_memory_budget`.

    >>> memory_budget_bytes("64MiB"), memory_budget_bytes(4096)
    (67108864, 4096)
    """
    if budget is None:
        return default_memory_budget()
    if isinstance(budget, str):
        return parse_size(budget)
    try:
        size = operator.index(budget)  # int, numpy integers
    except TypeError:
        size = None
    if size is None or isinstance(budget, bool):
        raise UsageError(
            f"memory budget {budget!r} is neither a size nor a number of bytes",
            hint="give bytes (an int) or a size such as '512MiB'",
        )
    if size < MIN_MEMORY_BUDGET:
        raise UsageError(
            f"memory budget {size} is too small",
            hint=f"give at least {MIN_MEMORY_BUDGET >> 10}KiB, e.g. 512MiB",
        )
    return size


def default_memory_budget() -> int:
    """A quarter of the available memory, between 256 MiB and 4 GiB."""
    try:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        available = 4 * GiB
    return int(min(max(available // 4, 256 * MiB), 4 * GiB))


# ----------------------------------------------------------------------------------------------
# Read plan


@dataclass(frozen=True)
class Region:
    """A box of one array to read: its global index and shape."""

    param: int  # position in the params list
    index: tuple[slice, ...]
    shape: tuple[int, ...]
    nbytes: int
    whole: bool = False  # the whole array: read without slicing

    @property
    def read_index(self) -> tuple[slice, ...] | None:
        """The index to read, None for the whole array (slicing a handle costs a few µs)."""
        return None if self.whole else self.index


def _boxes(shape: tuple[int, ...], chunks: tuple[int, ...], itemsize: int, limit: int) -> Iterator[tuple]:
    """Index boxes covering an array, each at most ``limit`` bytes when a row allows it.

    Boxes are slabs of whole rows, so each is contiguous in the flattened array. They slice the
    leading axis in multiples of the chunk size along it when a band of chunks fits, so each
    chunk is decoded once; a smaller budget cuts through chunks (decoding them once per box).
    An axis whose single rows are too large is taken one row at a time and the next axis is
    split the same way.
    """
    full = tuple(slice(0, d) for d in shape)
    if math.prod(shape) * itemsize <= limit or not shape:
        yield full
        return
    row = math.prod(shape[1:]) * itemsize
    if row <= limit:
        step = max(1, limit // row)
        chunk = chunks[0] if chunks and chunks[0] > 0 else 1
        if step >= chunk:
            step -= step % chunk
        for start in range(0, shape[0], step):
            yield (slice(start, min(start + step, shape[0])), *full[1:])
        return
    for i in range(shape[0]):
        for rest in _boxes(shape[1:], chunks[1:], itemsize, limit):
            yield (slice(i, i + 1), *rest)


def plan_reads(
    params: Sequence[ParamInfo], limit: int, select: Callable[[list[Region]], list[bool]] | None = None
) -> list[list[Region]]:
    """Groups of regions, each group at most ``limit`` bytes (or one region of one row) and
    :data:`GROUP_ARRAYS` regions.

    ``select`` is given every region of the plan (the same list in every process) and says which
    to read, so that cooperating processes can share one plan out.
    """
    regions = []
    for position, param in enumerate(params):
        nbytes = math.prod(param.shape) * param.itemsize
        if nbytes <= limit or not param.shape:  # the common case, without the box generator
            full = tuple(slice(0, d) for d in param.shape)
            regions.append(Region(position, full, param.shape, nbytes, whole=True))
            continue
        for index in _boxes(param.shape, param.stored.chunks if param.stored else (), param.itemsize, limit):
            shape = tuple(s.stop - s.start for s in index)
            regions.append(Region(position, index, shape, math.prod(shape) * param.itemsize))
    if select is not None:
        regions = [region for region, chosen in zip(regions, select(regions)) if chosen]
    groups: list[list[Region]] = []
    current: list[Region] = []
    size = 0
    for region in regions:
        if current and (size + region.nbytes > limit or len(current) >= GROUP_ARRAYS):
            groups.append(current)
            current, size = [], 0
        current.append(region)
        size += region.nbytes
    if current:
        groups.append(current)
    return groups


def decode_once_limit(params: Sequence[ParamInfo], budget: int) -> tuple[int, bool]:
    """The group limit of :func:`stream_regions` within ``budget``, and whether to read ahead.

    Reading ahead holds two groups, so each is half the budget; where half would cut an array
    through its stored chunks (each then decoded twice) and one band of whole chunks fits the
    budget, groups are the whole budget, read one at a time: decoding costs more than waiting.
    """
    half = budget // 2
    for param in params:
        if not param.shape or math.prod(param.shape) * param.itemsize <= half:
            continue
        chunks = param.stored.chunks if param.stored else ()
        chunk = chunks[0] if chunks and chunks[0] > 0 else 1
        band = math.prod(param.shape[1:]) * param.itemsize * min(chunk, param.shape[0])
        if half < band <= budget:
            return budget, False
    return max(1, half), True


def stream_regions(
    params: Sequence[ParamInfo],
    limit: int,
    start: Callable[[ParamInfo, Any, Region], Any],
    on_error: Callable[[Region, Exception], None] | None = None,
    select: Callable[[list[Region]], list[bool]] | None = None,
    partners: Sequence[ParamInfo] | None = None,
    ahead: bool = True,
) -> Iterator[tuple[Region, Any]]:
    """Yields ``(region, start(param, handle, region))`` in plan order, one group ahead.

    The reads of the next group (at most ``limit`` bytes) are started before the regions of the
    current one are handed out, so decoding overlaps whatever the caller does with them. The
    arrays a group needs are opened together, concurrently (one round trip per group, not per
    array); each is opened once, for its first region, and let go after its last. With
    ``partners`` (one per param, e.g. the other checkpoint of a diff) each param's partner is
    opened with it and ``handle`` is the pair of handles. With ``on_error``, a
    :class:`CorruptCheckpoint` from opening or starting a read is passed to it and that array's
    remaining regions are skipped; without, it propagates. Without ``ahead``, each group is
    read when its turn comes (one group held, not two).
    """
    groups = plan_reads(params, limit, select)
    remaining = Counter(region.param for group in groups for region in group)
    handles: dict[int, Any] = {}
    failed: dict[int, CorruptCheckpoint | None] = {}  # None: its error was handed on already

    def open_group(group: list[Region]) -> None:
        needed = list(dict.fromkeys(r.param for r in group))
        needed = [i for i in needed if i not in handles and i not in failed]
        stored = [params[i].stored for i in needed]
        if partners is not None:
            stored += [partners[i].stored for i in needed]
        opened = checkpoint.open_arrays(stored)
        for k, i in enumerate(needed):
            mine = [opened[k]] if partners is None else [opened[k], opened[k + len(needed)]]
            error = next((h for h in mine if isinstance(h, CorruptCheckpoint)), None)
            if error is not None:
                failed[i] = error
            else:
                handles[i] = mine[0] if partners is None else tuple(mine)

    def begin(group: list[Region]):
        open_group(group)
        started = []
        for region in group:
            try:
                if region.param in failed:
                    if failed[region.param] is None:
                        continue
                    raise failed[region.param]
                started.append((region, start(params[region.param], handles[region.param], region)))
            except CorruptCheckpoint as err:
                if on_error is None:
                    raise
                failed[region.param] = None
                handles.pop(region.param, None)
                on_error(region, err)
        return started

    for _, current in one_ahead(groups, begin, ahead):
        for region, started in current:
            yield region, started
            remaining[region.param] -= 1
            if not remaining[region.param]:
                handles.pop(region.param, None)


def one_ahead(items: Iterable[T], start: Callable[[T], Any], ahead: bool = True) -> Iterator[tuple[T, Any]]:
    """Yields ``(item, start(item))`` in order, the next item started before the current one is
    handed out (``ahead``), so its reading overlaps whatever the caller does with the current.

    >>> [(item, started) for item, started in one_ahead([1, 2], lambda n: n * 10)]
    [(1, 10), (2, 20)]
    """
    items = iter(items)
    if not ahead:
        for item in items:
            yield item, start(item)
        return
    upcoming = next(items, _END)
    started = start(upcoming) if upcoming is not _END else None
    while upcoming is not _END:
        current, current_started = upcoming, started
        upcoming = next(items, _END)
        started = start(upcoming) if upcoming is not _END else None
        yield current, current_started


_END = object()
