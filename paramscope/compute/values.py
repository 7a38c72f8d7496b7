"""One array's values: a numpy-style slice of it, read lazily, and what is in it.

A slice (``[0, :8]``, ``[..., -1]``) is parsed from text without evaluating anything
(:func:`parse_index`), checked against the array's shape before any data is read
(:func:`select`), and read as the box of the array it spans, through the format's own array
handle (TensorStore's indexing for zarr arrays: only the chunks the box touches are decoded).

:func:`inspect` streams a selection in pieces that fit a memory budget, in C order, and finds in
one pass: its statistics (the same :class:`~paramscope.compute.moments.Accumulator` that
``stats`` uses, so the numbers are the same), where its NaN and Inf are, its largest |x|, and per
index of chosen axes the norm, max |x|, mean and NaN/Inf count. Reductions are in float64;
max |x|, mean and the largest |x| are over the finite values, as in ``stats``.
"""

from __future__ import annotations

import ast
import math
import operator
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from paramscope.compute.moments import Accumulator, Moments
from paramscope.errors import UsageError

EDGE_ITEMS = 3  # numpy's: the leading and trailing items of each axis a summary shows
SUMMARY_THRESHOLD = 1000  # numpy's: more elements than this are summarised


# ----------------------------------------------------------------------------------------------
# Slices as text


def parse_index(text: str) -> tuple:
    """A numpy index from its text (``[0, :8]``): integers, slices and ``...`` only, never
    evaluated.

    >>> parse_index("[0, :8]"), parse_index("[..., -1]"), parse_index("[::2]")
    ((0, slice(None, 8, None)), (Ellipsis, -1), (slice(None, None, 2),))
    """
    source = text.strip()
    if not (source.startswith("[") and source.endswith("]")):
        raise UsageError(f"malformed slice {text!r}", hint="write it as numpy does, e.g. '[0, :8]'")
    try:
        tree = ast.parse("a" + source, mode="eval").body
    except SyntaxError:
        raise UsageError(f"malformed slice {text!r}", hint="write it as numpy does, e.g. '[0, :8]'") from None
    if not isinstance(tree, ast.Subscript):
        raise UsageError(f"malformed slice {text!r}", hint="write it as numpy does, e.g. '[0, :8]'")
    parts = tree.slice.elts if isinstance(tree.slice, ast.Tuple) else [tree.slice]
    return tuple(_index_part(part, text) for part in parts)


def _index_part(node: ast.AST, text: str):
    if isinstance(node, ast.Slice):
        return slice(*(None if n is None else _integer(n, text) for n in (node.lower, node.upper, node.step)))
    if isinstance(node, ast.Constant) and node.value is Ellipsis:
        return Ellipsis
    return _integer(node, text)


def _integer(node: ast.AST, text: str) -> int:
    sign = 1
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        sign = -1 if isinstance(node.op, ast.USub) else 1
        node = node.operand
    if isinstance(node, ast.Constant) and type(node.value) is int:
        return sign * node.value
    raise UsageError(
        f"slice {text!r} holds {ast.unparse(node)!r}",
        hint="a slice takes integers, start:stop:step and ... only",
    )


def split_path(text: str) -> tuple[str, str | None]:
    """A parameter path and the slice written after it, if any.

    >>> split_path("params.embed.embedding[0, :8]"), split_path("params.embed.embedding")
    (('params.embed.embedding', '[0, :8]'), ('params.embed.embedding', None))
    """
    text = text.strip()
    if text.endswith("]") and "[" in text:
        at = text.rfind("[")
        return text[:at], text[at:]
    if "[" in text:
        raise UsageError(
            f"malformed slice in {text!r}: no closing ']'",
            hint="write the slice in numpy syntax, e.g. 'w[0, :8]' (quoted for the shell)",
        )
    return text, None


def index_text(index: tuple) -> str:
    """An index as numpy syntax.

    >>> index_text((0, slice(None, 8), Ellipsis, slice(1, None, 2)))
    '[0, :8, ..., 1::2]'
    """

    def part(entry) -> str:
        if entry is Ellipsis:
            return "..."
        if isinstance(entry, slice):
            out = ("" if entry.start is None else str(entry.start)) + ":"
            out += "" if entry.stop is None else str(entry.stop)
            return out + (f":{entry.step}" if entry.step is not None else "")
        return str(entry)

    return "[" + ", ".join(part(e) for e in index) + "]"


# ----------------------------------------------------------------------------------------------
# Selections


@dataclass(frozen=True)
class Selection:
    """What an index picks of an array of ``shape``: per dimension one position (an int: the
    dimension is dropped) or a range of positions (kept)."""

    shape: tuple[int, ...]
    entries: tuple[int | range, ...]

    @property
    def out_shape(self) -> tuple[int, ...]:
        return tuple(len(e) for e in self.entries if isinstance(e, range))

    @property
    def count(self) -> int:
        return math.prod(self.out_shape)

    @property
    def kept(self) -> list[int]:
        """The array's dimensions the selection keeps, in order."""
        return [d for d, e in enumerate(self.entries) if isinstance(e, range)]

    @property
    def whole(self) -> bool:
        return all(isinstance(e, range) and e == range(n) for e, n in zip(self.entries, self.shape))

    def box(self) -> tuple[slice, ...]:
        """The box of the array the selection lies in (contiguous slices, what handles read)."""
        return tuple(slice(*_extent(e)) for e in self.entries)

    def box_count(self) -> int:
        return math.prod(hi - lo for lo, hi in map(_extent, self.entries))

    def within_box(self) -> tuple:
        """The numpy index that takes the selection out of its box."""
        out: list[Any] = []
        for entry in self.entries:
            lo, _ = _extent(entry)
            if isinstance(entry, int):
                out.append(0)
            elif not entry:
                out.append(slice(0, 0))
            else:
                stop = entry.stop - lo
                out.append(slice(entry.start - lo, stop if stop >= 0 else None, entry.step))
        return tuple(out)

    def positions(self, local: Sequence[np.ndarray]) -> np.ndarray:
        """Array indices (one row per element, a column per dimension) of elements given by
        their indices into the selection's result (one array per kept dimension)."""
        columns = []
        kept = iter(local)
        for entry in self.entries:
            if isinstance(entry, int):
                columns.append(np.full(len(local[0]) if local else 1, entry, dtype=np.int64))
            else:
                columns.append(entry.start + np.asarray(next(kept), dtype=np.int64) * entry.step)
        if not columns:
            return np.zeros((1, 0), dtype=np.int64)
        return np.stack(columns, axis=1)

    def with_entry(self, dim: int, entry: int | range) -> Selection:
        entries = list(self.entries)
        entries[dim] = entry
        return Selection(self.shape, tuple(entries))


def _extent(entry: int | range) -> tuple[int, int]:
    if isinstance(entry, int):
        return entry, entry + 1
    if not entry:
        return 0, 0
    return min(entry[0], entry[-1]), max(entry[0], entry[-1]) + 1


def select(shape: Sequence[int], index: tuple | None, shown: str = "") -> Selection:
    """The selection ``index`` makes of an array of ``shape`` (None: all of it). Stricter than
    numpy where numpy would silently return less: an integer or a slice bound outside the
    dimension is refused, as is an index of more dimensions than the array has.

    >>> select((4, 6), (1, slice(None, None, 2))).entries
    (1, range(0, 6, 2))
    >>> select((4, 6), (Ellipsis, -1)).out_shape
    (4,)
    """
    shape = tuple(int(d) for d in shape)
    shown = shown or index_text(index or ())
    index = tuple(index or ())
    if sum(1 for e in index if e is Ellipsis) > 1:
        raise UsageError(f"slice {shown} has more than one '...'", hint="an index takes at most one")
    given = sum(1 for e in index if e is not Ellipsis)
    if given > len(shape):
        raise UsageError(
            f"slice {shown} has {given} indices, the array {len(shape)} dimension(s) {tuple(shape)}",
            hint="index each dimension at most once",
        )
    if Ellipsis in index:
        at = index.index(Ellipsis)
        index = index[:at] + (slice(None),) * (len(shape) - given) + index[at + 1 :]
    index = index + (slice(None),) * (len(shape) - len(index))
    entries: list[int | range] = []
    for dim, (entry, size) in enumerate(zip(index, shape)):
        if isinstance(entry, slice):
            if entry.step == 0:
                raise UsageError(f"slice {shown}: a step of 0 in dimension {dim}", hint="steps are nonzero")
            for bound in (entry.start, entry.stop):
                if bound is not None and not -size <= bound <= size:
                    raise UsageError(
                        f"slice {shown} is out of range: {bound} in dimension {dim} of size {size}",
                        hint=f"the array's shape is {tuple(shape)}",
                    )
            entries.append(range(*entry.indices(size)))
        else:
            try:
                entry = operator.index(entry)
            except TypeError:
                raise UsageError(
                    f"slice {shown} holds {entry!r}", hint="an index takes integers, slices and ... only"
                ) from None
            if not -size <= entry < size:
                raise UsageError(
                    f"slice {shown} is out of range: index {entry} in dimension {dim} of size {size}",
                    hint=f"the array's shape is {tuple(shape)}",
                )
            entries.append(entry + size if entry < 0 else entry)
    return Selection(shape, tuple(entries))


def check_axes(axes: Sequence[int], selection: Selection) -> list[int]:
    """Axes of the selection's result (negative from the end), checked; refused before reading."""
    rank = len(selection.out_shape)
    out = []
    for axis in axes:
        if not -rank <= axis < rank:
            raise UsageError(
                f"--axis {axis} is out of range for shape {selection.out_shape}",
                hint=f"give an axis from 0 to {rank - 1}" if rank else "a scalar has no axes",
            )
        axis = axis + rank if axis < 0 else axis
        if axis in out:
            raise UsageError(f"--axis {axis} given twice", hint="give each axis once")
        out.append(axis)
    return out


# ----------------------------------------------------------------------------------------------
# Reading


def start_read(
    handle, selection: Selection, path: str, index_in_store: Callable | None = None
) -> Callable[[], np.ndarray]:
    """Starts reading a selection's box through an array handle (``handle[box].read()``);
    returns the function that waits for it and gives the selection's values."""
    from paramscope.io import checkpoint

    box = selection.box() if selection.entries else None
    if box is not None and index_in_store is not None:
        box = index_in_store(box)
    pending = checkpoint.start_read(handle, box, path)
    within = selection.within_box() if selection.entries else None

    def finish() -> np.ndarray:
        values = np.asarray(checkpoint.finish_read(pending, path))
        return values if within is None else values[within]

    return finish


def read(handle, selection: Selection, path: str, index_in_store: Callable | None = None) -> np.ndarray:
    """The values of a selection, through an array handle: only its box is read."""
    return start_read(handle, selection, path, index_in_store)()


def pieces(
    selection: Selection, itemsize: int, limit: int, chunks: Sequence[int] = ()
) -> Iterator[Selection]:
    """The selection cut into selections whose boxes hold at most ``limit`` bytes where a row
    allows it, in C order of its elements (so their values, flattened one after the other, are
    the selection's). Bands along the leading kept axis are whole multiples of the chunk size
    there when a band of chunks fits, so each chunk is decoded once."""
    yield from _pieces(selection, selection.kept, itemsize, limit, tuple(chunks))


def _pieces(selection: Selection, kept: list[int], itemsize: int, limit: int, chunks) -> Iterator[Selection]:
    if selection.box_count() * itemsize <= limit or not kept or selection.count == 0:
        yield selection
        return
    dim = kept[0]
    entry = selection.entries[dim]
    assert isinstance(entry, range)
    row = selection.with_entry(dim, entry[:1]).box_count() * itemsize
    if row <= limit:
        step = max(1, limit // row // max(1, abs(entry.step)))
        chunk = chunks[dim] if dim < len(chunks) and chunks[dim] > 0 else 1
        if step >= chunk and abs(entry.step) == 1:
            step -= step % chunk
            if entry.step == 1:  # bands end on the chunk grid, wherever the selection starts
                start = 0
                while start < len(entry):
                    end = (entry.start + start) // chunk * chunk + step - entry.start
                    yield selection.with_entry(dim, entry[start:end])
                    start = end
                return
        for start in range(0, len(entry), step):
            yield selection.with_entry(dim, entry[start : start + step])
        return
    for k in range(len(entry)):
        yield from _pieces(selection.with_entry(dim, entry[k : k + 1]), kept[1:], itemsize, limit, chunks)


def band_limit(
    selection: Selection, itemsize: int, limit: int, chunks: Sequence[int] = ()
) -> tuple[int, bool]:
    """The bytes of the pieces a selection is streamed in within ``limit``, and whether the next
    piece is read while one is reduced (two pieces held). Reading ahead halves the pieces; where
    that would cut through stored chunks (each then decoded twice) and one band of whole chunks
    fits the limit, the pieces are those bands, read one at a time: decoding dominates.

    >>> band_limit(select((4096, 8192), None), 4, 64 << 20, (2048, 2048))  # one band: 64 MiB
    (67108864, False)
    >>> band_limit(select((4096, 8192), None), 4, 256 << 20, (2048, 2048))
    (134217728, True)
    """
    kept = selection.kept
    if not kept or selection.box_count() * itemsize <= limit // 2:
        return limit // 2, True
    dim = kept[0]
    entry = selection.entries[dim]
    assert isinstance(entry, range)
    chunk = chunks[dim] if dim < len(chunks) and chunks[dim] > 0 else 1
    band = selection.with_entry(dim, entry[: min(chunk, len(entry))]).box_count() * itemsize
    if band > limit // 2 and band <= limit and abs(entry.step) == 1:
        return limit, False
    return max(itemsize, limit // 2), True


def chunks_touched(selection: Selection, chunks: Sequence[int]) -> tuple[int, int]:
    """(chunks the selection's box touches, chunks of the array), from the stored chunk shape."""
    if len(chunks) != len(selection.shape) or not selection.shape:
        return 1, 1
    touched = total = 1
    for (lo, hi), size, chunk in zip(map(_extent, selection.entries), selection.shape, chunks):
        chunk = max(1, chunk)
        total *= -(-size // chunk)
        touched *= (-(-hi // chunk) - lo // chunk) if hi > lo else 0
    return touched, total


# ----------------------------------------------------------------------------------------------
# What is in a selection, in one streaming pass


@dataclass
class AxisTable:
    """Per index of the chosen axes (of the selection's result): norm, max |x|, mean, NaN, Inf."""

    axes: list[int]
    labels: list[list[int]]  # per chosen axis: the array index of each position
    sum_sq: np.ndarray
    max_abs: np.ndarray
    sums: np.ndarray
    finite: np.ndarray
    nan: np.ndarray
    inf: np.ndarray

    @property
    def norm(self) -> np.ndarray:
        return np.sqrt(self.sum_sq)

    @property
    def mean(self) -> np.ndarray:
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.finite > 0, self.sums / np.maximum(self.finite, 1), np.nan)

    def rows(self) -> Iterator[tuple[tuple[int, ...], dict[str, Any]]]:
        norm, mean = self.norm, self.mean
        for position in np.ndindex(*self.sum_sq.shape):
            label = tuple(self.labels[k][p] for k, p in enumerate(position))
            yield (
                label,
                {
                    "norm": float(norm[position]),
                    "max_abs": float(self.max_abs[position]) if self.finite[position] else math.nan,
                    "mean": float(mean[position]),
                    "nan": int(self.nan[position]),
                    "inf": int(self.inf[position]),
                },
            )


@dataclass
class Inspection:
    """What :func:`inspect` found in a selection."""

    selection: Selection
    moments: Moments
    nonfinite: list[tuple[tuple[int, ...], float]] = field(default_factory=list)  # first K: index, value
    top: list[tuple[tuple[int, ...], float]] = field(default_factory=list)  # largest |x| first
    axis: AxisTable | None = None
    bytes_read: int = 0
    requested_nonfinite: int | None = None  # the K asked for, None when not asked
    requested_top: int | None = None
    corner: Any = None  # the values a numpy summary of the selection shows (see corner())


SUB_BLOCK = 1 << 17  # elements reduced at once: their float64 copies stay small (1 MiB)


def _comparable(values: np.ndarray) -> np.ndarray:
    """The values as float32 or float64 numbers equal to their float64 values (no copy for
    float32 and float64): |x|, NaN and Inf tests and comparisons on them are exact. Complex
    values become their magnitudes."""
    if np.iscomplexobj(values):
        return np.abs(values).astype(np.float64)
    if values.dtype in (np.float32, np.float64):
        return values
    if values.dtype.kind == "f" or _ml_float(values.dtype):
        return values.astype(np.float32)  # every float of 16 bits or fewer is a float32 exactly
    return values.astype(np.float64)


def _ml_float(dtype: np.dtype) -> bool:
    if dtype.kind != "V":
        return False
    import ml_dtypes

    try:
        ml_dtypes.finfo(dtype)
    except ValueError:
        return False
    return True


def _sub_blocks(shape: tuple[int, ...]) -> Iterator[tuple[tuple[slice, ...], tuple[int, ...]]]:
    """Boxes of an array of ``shape`` of about :data:`SUB_BLOCK` elements, in C order, with where
    each starts: along the first axis whose trailing axes hold fewer, one index at a time
    along the axes before it."""
    if not shape:
        yield (), ()
        return
    axis = 0
    while axis < len(shape) - 1 and math.prod(shape[axis + 1 :]) > SUB_BLOCK:
        axis += 1
    step = max(1, SUB_BLOCK // max(1, math.prod(shape[axis + 1 :])))
    rest = tuple(slice(None) for _ in shape[axis + 1 :])
    for lead in np.ndindex(*shape[:axis]):
        for start in range(0, shape[axis], step):
            box = tuple(slice(i, i + 1) for i in lead) + (slice(start, start + step),) + rest
            yield box, (*lead, start) + (0,) * len(rest)


class _Top:
    """The K largest |x| seen so far, ties to the first in C order, values fed in C order; kept
    by their position in the selection's result, turned into array indices at the end."""

    def __init__(self, k: int):
        self.k = k
        self.magnitude = np.empty(0)
        self.position = np.empty(0, dtype=np.int64)
        self.value = np.empty(0)

    def feed(self, comparable: np.ndarray, flat_start: Callable) -> None:
        full = self.position.size == self.k
        if full and comparable.size:
            # once K are kept most blocks hold none above the K-th: two passes tell, without |x|
            low, high = comparable.min(), comparable.max()
            if -self.magnitude[-1] <= low and high <= self.magnitude[-1]:  # False for NaN
                return
        magnitude = np.abs(comparable).reshape(-1)
        if not np.isfinite(magnitude.max(initial=0.0)):  # NaN or Inf: never among the largest
            magnitude = np.where(np.isfinite(magnitude), magnitude, -1)
        if full:  # a later value enters only above the K-th: equal ones lose the tie
            candidates = np.flatnonzero(magnitude > self.magnitude[-1])
            if not candidates.size:
                return
            picked = candidates[_largest(magnitude[candidates], self.k)]
        else:
            picked = _largest(magnitude, self.k)
            picked = picked[magnitude[picked] >= 0]
        if not picked.size:
            return
        flat_values = comparable.reshape(-1)
        magnitude = np.concatenate([self.magnitude, magnitude[picked].astype(np.float64)])
        position = np.concatenate([self.position, flat_start(picked)])
        value = np.concatenate([self.value, flat_values[picked].astype(np.float64)])
        order = np.lexsort((position, -magnitude))[: self.k]
        self.magnitude, self.position, self.value = magnitude[order], position[order], value[order]

    def result(self, selection: Selection) -> list[tuple[tuple[int, ...], float]]:
        indices = _indices(selection, [0] * len(selection.out_shape), selection.out_shape, self.position)
        return [(index, float(v)) for index, v in zip(indices, self.value)]


def _largest(magnitude: np.ndarray, k: int) -> np.ndarray:
    """Positions of the ``k`` largest (ties at the K-th: the first ones), in no order."""
    if magnitude.size <= k:
        return np.arange(magnitude.size)
    kth = magnitude[np.argpartition(magnitude, magnitude.size - k)[magnitude.size - k]]
    above = np.flatnonzero(magnitude > kth)
    tied = np.flatnonzero(magnitude == kth)[: k - above.size]
    return np.concatenate([above, tied])


def inspect(
    start_piece: Callable[[Selection], Callable[[], np.ndarray]],
    selection: Selection,
    itemsize: int,
    limit: int,
    chunks: Sequence[int] = (),
    nonfinite: int | None = None,
    top: int | None = None,
    axes: Sequence[int] = (),
    dtype: Any = None,
) -> Inspection:
    """Streams a selection and reduces it: ``start_piece(piece)`` starts reading one piece and
    returns the function that waits for its values.

    Pieces are bands of whole stored chunks where they fit ``limit`` (see :func:`band_limit`),
    the next read while one is reduced; each piece is reduced in sub-blocks of
    :data:`SUB_BLOCK` elements, so the float64 copies the sums need stay a few MiB.
    ``nonfinite``: keep the first K NaN/Inf (in C order) with their indices; ``top``: the K
    largest finite |x| (ties: the first in C order); ``axes``: per index of these axes of the
    result, the reductions of :class:`AxisTable`. The values a numpy summary shows
    (:func:`corner`) are kept as they stream by (``Inspection.corner``, of ``dtype``)."""
    accumulator = Accumulator(True, size=selection.count)
    found = Inspection(selection, Moments(0, 0.0, 0, 0), requested_nonfinite=nonfinite, requested_top=top)
    sel_kept = selection.kept
    out_shape = selection.out_shape
    table = None
    if axes:
        grid = tuple(out_shape[a] for a in axes)
        table = AxisTable(
            list(axes),
            [list(selection.entries[sel_kept[a]]) for a in axes],
            np.zeros(grid),
            np.zeros(grid),
            np.zeros(grid),
            np.zeros(grid, dtype=np.int64),
            np.zeros(grid, dtype=np.int64),
            np.zeros(grid, dtype=np.int64),
        )
    best = _Top(top) if top else None
    shown = [(_local_box(selection, sub), where) for sub, where in corner(selection)]
    found.corner = np.empty(corner_shape(selection), dtype=dtype) if dtype is not None else None
    piece_limit, ahead = band_limit(selection, itemsize, limit, chunks)
    want = nonfinite is not None or best is not None or table is not None
    from paramscope.compute.plan import one_ahead

    # the statistics of a piece are reduced on other threads while this one finds the rest
    feeder, workers = ThreadPoolExecutor(max_workers=1), ThreadPoolExecutor(max_workers=os.cpu_count() or 1)
    try:
        for piece, finish in one_ahead(pieces(selection, itemsize, piece_limit, chunks), start_piece, ahead):
            values = finish()
            found.bytes_read += piece.box_count() * itemsize
            feeding = feeder.submit(accumulator.feed, values, workers)
            try:
                _reduce_piece(found, piece, values, selection, shown, want, nonfinite, best, table)
            finally:
                feeding.result()
    finally:
        feeder.shutdown(wait=False)
        workers.shutdown(wait=False)
    found.moments = accumulator.result()
    found.top = best.result(selection) if best is not None and best.position.size else []
    found.axis = table
    if found.corner is None:
        found.corner = np.empty(corner_shape(selection), dtype=dtype)
    return found


def _reduce_piece(found, piece, values, selection, shown, want, nonfinite, best, table) -> None:
    """One piece: what it holds of the summary's values, then its sub-blocks."""
    if values.size == 0:
        return
    sel_kept = selection.kept
    local_start = [
        (piece.entries[d].start - selection.entries[d].start) // selection.entries[d].step
        if len(piece.entries[d])
        else 0
        for d in sel_kept
    ]
    if found.corner is None:
        found.corner = np.empty(corner_shape(selection), dtype=values.dtype)
    _copy_corner(found.corner, shown, values, local_start)
    if not want:
        return
    for box, offset in _sub_blocks(values.shape):
        block = values[box]
        start = [lo + o for lo, o in zip(local_start, offset)]
        _reduce_block(found, block, start, selection, nonfinite, best, table)


def _reduce_block(found, block, start, selection, nonfinite, best, table) -> None:
    """One sub-block of the selection's values (starting at ``start`` in the result)."""
    comparable = _comparable(block)
    exact_int = block.dtype.kind in "iub"
    bad = None
    if not exact_int and (table is not None or (nonfinite is not None and len(found.nonfinite) < nonfinite)):
        finite = np.isfinite(comparable)
        bad = None if finite.all() else ~finite
    if nonfinite is not None and bad is not None and len(found.nonfinite) < nonfinite:
        where = np.flatnonzero(bad)[: nonfinite - len(found.nonfinite)]
        flat = comparable.reshape(-1)
        for index, value in zip(_indices(selection, start, block.shape, where), flat[where]):
            found.nonfinite.append((index, float(value)))
    if best is not None:
        out_shape = selection.out_shape

        def flat_start(picked):
            if not out_shape:
                return np.zeros(picked.size, dtype=np.int64)
            local = np.unravel_index(picked, block.shape)
            return np.ravel_multi_index(tuple(lo + np.asarray(c) for lo, c in zip(start, local)), out_shape)

        best.feed(comparable, flat_start)
    if table is not None:
        _reduce_axes(table, comparable, bad, table.axes, start)


def _indices(selection: Selection, start, shape, flat: np.ndarray) -> list[tuple[int, ...]]:
    """Array indices of elements of a box of the selection's result (``flat``: their positions
    in the box, which starts at ``start``)."""
    flat = np.atleast_1d(flat)
    if not shape:
        rows = np.repeat(selection.positions([]), flat.size, axis=0)
    else:
        local = np.unravel_index(flat, shape)
        rows = selection.positions([lo + np.asarray(c) for lo, c in zip(start, local)])
    return [tuple(int(v) for v in row) for row in rows]


def _local_box(selection: Selection, sub: Selection) -> list[tuple[int, int]]:
    """The box a sub-selection (with the same steps) spans in the selection's result."""
    out = []
    for d in selection.kept:
        entry, part = selection.entries[d], sub.entries[d]
        assert isinstance(entry, range) and isinstance(part, range)
        lo = (part.start - entry.start) // entry.step if len(part) else 0
        out.append((lo, lo + len(part)))
    return out


def _copy_corner(out: np.ndarray, shown, values: np.ndarray, local_start: list[int]) -> None:
    """Copies what a piece holds of the summary's pieces into ``out``."""
    if not local_start:
        out[...] = values
        return
    for box, where in shown:
        source, target = [], []
        for (lo, hi), at, start, n in zip(box, where, local_start, values.shape):
            a, b = max(lo, start), min(hi, start + n)
            if a >= b:
                break
            source.append(slice(a - start, b - start))
            target.append(slice(at.start + a - lo, at.start + b - lo))
        else:
            out[tuple(target)] = values[tuple(source)]


def _reduce_axes(table: AxisTable, comparable: np.ndarray, bad, axes: Sequence[int], start) -> None:
    dims = list(range(comparable.ndim))
    others = tuple(d for d in dims if d not in axes)
    span = tuple(slice(start[a], start[a] + comparable.shape[a]) for a in axes)
    order = [sorted(axes).index(a) for a in axes]  # reductions keep the axes in array order

    def arranged(result: np.ndarray) -> np.ndarray:
        return np.transpose(result, order) if order != sorted(order) else result

    wide = comparable if comparable.dtype == np.float64 else comparable.astype(np.float64)
    table.sum_sq[span] += np.einsum(wide, dims, wide, dims, list(axes))
    if bad is None:
        table.sums[span] += np.einsum(wide, dims, list(axes))
        table.finite[span] += math.prod(wide.shape[d] for d in others)
        # max |x| as the larger of max x and -min x, on the values' own dtype: no |x| array
        high = np.max(comparable, axis=others, initial=0)
        largest = np.maximum(high, -np.min(comparable, axis=others, initial=0))
    else:
        finite = ~bad
        nan = np.isnan(comparable)
        clean = np.where(finite, wide, 0.0)
        table.sums[span] += np.einsum(clean, dims, list(axes))
        table.finite[span] += arranged(np.sum(finite, axis=others))
        table.nan[span] += arranged(np.sum(nan, axis=others))
        table.inf[span] += arranged(np.sum(bad & ~nan, axis=others))
        largest = np.max(np.abs(clean), axis=others, initial=0)
    table.max_abs[span] = np.maximum(table.max_abs[span], arranged(largest))


# ----------------------------------------------------------------------------------------------
# Values as numpy prints them


def corner(selection: Selection, edge: int = EDGE_ITEMS) -> list[tuple[Selection, tuple[slice, ...]]]:
    """The pieces of a selection that a numpy summary shows (``edge`` leading and trailing items
    of each long axis, and one between that the summary elides), with where each goes in the
    array :func:`summary` prints."""
    summarised = selection.count > SUMMARY_THRESHOLD
    runs_per_dim = []
    for d in selection.kept:
        entry = selection.entries[d]
        assert isinstance(entry, range)
        n = len(entry)
        if summarised and n > 2 * edge:
            runs_per_dim.append([(entry[: edge + 1], 0), (entry[n - edge :], edge + 1)])
        else:
            runs_per_dim.append([(entry, 0)])
    out = []
    for combination in np.ndindex(*[len(r) for r in runs_per_dim]) if runs_per_dim else [()]:
        sub = selection
        where = []
        for d, k in zip(selection.kept, combination):
            run, at = runs_per_dim[selection.kept.index(d)][k]
            sub = sub.with_entry(d, run)
            where.append(slice(at, at + len(run)))
        out.append((sub, tuple(where)))
    return out


def corner_shape(selection: Selection, edge: int = EDGE_ITEMS) -> tuple[int, ...]:
    summarised = selection.count > SUMMARY_THRESHOLD
    return tuple(2 * edge + 1 if summarised and n > 2 * edge else n for n in selection.out_shape)


def summary(
    values: np.ndarray, count: int, exact: bool = False, edge: int = EDGE_ITEMS, linewidth: int = 100
) -> str:
    """The values as numpy prints an array of ``count`` elements (``values``: all of them, or
    the corner :func:`corner` reads), in lines of at most ``linewidth`` characters where numpy
    can; ``exact``: every float to its shortest exact digits."""
    threshold = 0 if count > SUMMARY_THRESHOLD else sys.maxsize
    options = dict(edgeitems=edge, threshold=threshold, linewidth=linewidth)
    if exact:
        options.update(floatmode="unique", precision=17)
    with np.printoptions(**options):
        return np.array2string(values, separator=" ")
