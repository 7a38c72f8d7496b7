"""The records every checkpoint format is read into, and the handles its arrays are read through.

A format module (:mod:`paramscope.io.orbax`, :mod:`paramscope.io.safetensors`, ...) turns what it
finds on disk into a :class:`Location` with :class:`Item` s, and each item into
:class:`StoredArray` s; the rest of paramscope reads arrays through handles that behave alike
for every format (``handle[index].read().result()`` is a numpy array).
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from paramscope.errors import CorruptCheckpoint
from paramscope.io.storage import Tree, short_error
from paramscope.names import join_keys


@dataclass(frozen=True)
class SavedSharding:
    """A NamedSharding as saved: the mesh's axes and one partition entry per dimension."""

    mesh_axes: tuple[tuple[str, int], ...]
    spec: tuple[Any, ...]  # per dimension: None, an axis name, or a tuple of axis names


@dataclass(frozen=True)
class StoredArray:
    """One array of an item: its tree keys, shape, dtype, and where TensorStore finds it."""

    keys: tuple[str, ...]
    shape: tuple[int, ...]
    dtype: str
    itemsize: int
    chunks: tuple[int, ...]
    driver: str  # "zarr" or "zarr3" (opened by TensorStore), "bytes" (C-order raw bytes in a file)
    store: str  # JSON of the TensorStore kvstore spec of the item's folder (shared by its arrays)
    name: str  # the array's key in that store
    sharding: SavedSharding | None
    value_type: str
    # The zarr metadata as stored, less shape and chunk shape: arrays written alike share one
    # string, so 100,000 arrays do not hold 100,000 copies (see :func:`_metadata_template`).
    metadata_template: str = field(default="", compare=False, repr=False)
    # Formats that store an array as raw bytes in a file (``driver`` "bytes"): where they start
    # in the file ``name``; -1 for the others.
    offset: int = -1
    # Whether the last key is the ``value`` of a flax box (dropped from the path users see).
    boxed: bool = False
    # Whether the writer stored every chunk, fill-valued ones included (Orbax's
    # ``store_array_data_equal_to_fill_value``): a missing chunk is then damage, never zeros.
    every_chunk_written: bool = False
    # ``driver`` "bytes": the byte order of the stored elements, "<" or ">" (a msgpack array's
    # dtype name may say ``>f4``).
    byteorder: str = "<"
    # Zarr arrays in a listed folder (plain zarr trees, where a chunk never written reads as the
    # fill value): how many of its chunks are stored; -1 when unknown. See :func:`fill_problem`.
    stored_chunks: int = -1
    # The dtype as the file stores it, where paramscope reads it as another (``.npy`` records
    # store bfloat16 as the 2-byte void ``<V2``); empty where they are the same.
    stored_dtype: str = ""
    # Whether the checkpoint records how this array was sharded (Orbax's ``_sharding`` holds an
    # entry for it; ``sharding`` None then means replicated or on one device). Formats that
    # store no sharding (safetensors, msgpack, npz, ...) leave it False: unknown, not replicated.
    sharding_saved: bool = False

    @property
    def path(self) -> str:
        return join_keys(self.keys[:-1] if self.boxed else self.keys, unbox=False)


# An array whose chunks were not all written reads as its fill value where they are missing. Such
# values cost time and memory to make without any byte on disk behind them, so an array is read
# only while they stay within these (a [2**40] array of no chunks would otherwise take hours).
# The name of a step (a folder, or a file): its number, after an optional ``PREFIX_``
# (Orbax's ``step_prefix``, flax's ``checkpoint_``).
STEP_NAME = re.compile(r"^(?:(?P<prefix>.*)_)?(?P<step>\d+)$")

MAX_FILL_ELEMENTS = 1 << 27
MAX_MISSING_CHUNKS = 1 << 16


def chunk_grid(array: StoredArray) -> tuple[int, list[int]]:
    """How many chunks an array has, and the shape of one."""
    chunks = [max(1, c) for c in array.chunks] if len(array.chunks) == len(array.shape) else array.shape
    return math.prod(-(-d // max(1, c)) for d, c in zip(array.shape, chunks)), list(chunks)


def skips_fill_chunks(array: StoredArray) -> bool:
    """Whether the array's writer may have left out chunks equal to the fill value (zarr arrays
    of Orbax before 0.7 and of plain zarr trees), which then read as that value: a lost chunk
    and one never written look alike."""
    return array.driver in ("zarr", "zarr3") and not array.every_chunk_written


def fill_problem(array: StoredArray) -> str | None:
    """Why an array with chunks that are not stored is not read, or None: more than
    :data:`MAX_FILL_ELEMENTS` elements or :data:`MAX_MISSING_CHUNKS` chunks missing."""
    if array.stored_chunks < 0 or not array.shape:
        return None
    grid, chunks = chunk_grid(array)
    missing = grid - array.stored_chunks
    filled = math.prod(array.shape) - array.stored_chunks * math.prod(chunks)
    if missing > MAX_MISSING_CHUNKS:
        return (
            f"{missing:,} of its {grid:,} chunks are not stored (paramscope reads an array with at most "
            f"{MAX_MISSING_CHUNKS:,} missing)"
        )
    if filled > MAX_FILL_ELEMENTS:
        return (
            f"{filled:,} of its elements lie in chunks that are not stored (paramscope reads at most "
            f"{MAX_FILL_ELEMENTS:,} elements of fill value)"
        )
    return None


@dataclass(frozen=True)
class Item:
    name: str
    path: str  # as shown to people: a local path or a URL
    # Orbax: "pytree", "array", "json", "damaged" (no _METADATA) or "unknown"; other formats
    # their own name ("safetensors", "msgpack", ...), which picks the module that reads them.
    kind: str
    tree: Tree = field(compare=False, repr=False)
    rel: str = ""  # the item's folder inside ``tree``
    handler: str = ""  # Orbax: the handler class the step's metadata names for it, if any


@dataclass(frozen=True)
class Step:
    name: str
    path: str
    step: int | None
    finished: bool
    timestamp: str | None = None  # when it was saved, as its writer recorded it (Levanter's ISO time)


@dataclass
class Location:
    """What a user's path points at, resolved down to one step."""

    path: str
    kind: str  # "root", "step" or "item"
    step: Step | None
    items: list[Item]
    steps: list[Step] = field(default_factory=list)
    selected_item: str | None = None  # set when the path is an item folder
    tree: Tree | None = field(default=None, repr=False)
    step_rel: str | None = None  # the chosen step's folder inside ``tree``


@functools.cache
def dtype_info(name: str) -> tuple[str, int]:
    """(numpy name, itemsize) of a dtype name; TypeError/AttributeError when unknown."""
    dtype = numpy_dtype(name)
    return dtype.name, dtype.itemsize


class ArrayReadError(CorruptCheckpoint):
    """One array's data could not be read; ``path`` and ``reason`` say which and why."""

    def __init__(self, verb: str, path: str, err: BaseException):
        self.path = path
        self.reason = short_error(err)
        super().__init__(
            f"cannot {verb} array {path!r}: {self.reason}", hint="the checkpoint's data files are damaged"
        )


# ----------------------------------------------------------------------------------------------
# Arrays stored as raw bytes: read by byte range, one slab of leading-axis rows at a time


def _pool() -> ThreadPoolExecutor:
    from paramscope.io.session import SESSION

    return SESSION.pool()


class BytesArray:
    """An array stored as C-order bytes (of ``byteorder``) at ``start`` of a file, read through
    ``read_range(start, stop) -> bytes``. ``handle[index].read().result()`` reads only the bytes
    ``index`` needs, as TensorStore handles do for zarr chunks: leading axes where the index picks
    one position are stepped over, and the rows of the next axis that it touches are read whole.
    So a box of whole rows (what a read plan cuts an array into) costs exactly its own bytes, and
    an array with no elements costs nothing, whatever its other dimensions."""

    def __init__(
        self,
        shape: tuple[int, ...],
        dtype: str,
        start: int,
        read_range: Callable[[int, int], bytes],
        byteorder: str = "<",
    ):
        self.shape = tuple(shape)
        self.dtype = dtype
        self.start = start
        self.byteorder = byteorder
        self._read_range = read_range
        self._index: tuple = ()

    def __getitem__(self, index) -> BytesArray:
        view = BytesArray(self.shape, self.dtype, self.start, self._read_range, self.byteorder)
        view._index = index if isinstance(index, tuple) else (index,)
        return view

    def read(self):
        return _pool().submit(self._fetch)

    def _fetch(self):
        import numpy as np

        dtype = numpy_dtype(self.dtype).newbyteorder(self.byteorder)
        shape, index = self.shape, self._index
        if 0 in shape:  # no elements: only the shape of the selection is needed
            return np.empty(shape, dtype.newbyteorder("="))[index].copy()
        if not shape:
            raw = self._read_range(self.start, self.start + dtype.itemsize)
            return np.frombuffer(raw, dtype).reshape(())[index].astype(dtype.newbyteorder("="))
        start, axis, kept = self.start, 0, []
        while axis < len(shape) - 1 and axis < len(index):
            position = _one_position(index[axis], shape[axis])
            if position is None:
                break
            start += position * dtype.itemsize * math.prod(shape[axis + 1 :])
            kept.append(isinstance(index[axis], slice))
            axis += 1
        rows = shape[axis]
        first = index[axis] if axis < len(index) else slice(None)
        if isinstance(first, slice):
            picked = range(*first.indices(rows))  # its ends, not its elements: O(1) for any length
            lo, hi = (min(picked[0], picked[-1]), max(picked[0], picked[-1]) + 1) if picked else (0, 0)
            within = slice(picked.start - lo, None if picked.stop - lo < 0 else picked.stop - lo, picked.step)
        else:
            lo = int(first) + rows if int(first) < 0 else int(first)
            hi, within = lo + 1, 0
        row_bytes = dtype.itemsize * math.prod(shape[axis + 1 :])
        raw = self._read_range(start + lo * row_bytes, start + hi * row_bytes) if hi > lo else b""
        block = np.frombuffer(raw, dtype).reshape((1,) * axis + (hi - lo, *shape[axis + 1 :]))
        # a stepped-over axis is one long in the block: a slice keeps it, an integer index drops it
        block = block[tuple(slice(None) if keep else 0 for keep in kept)]
        rest = (slice(None),) * sum(kept) + (within, *index[axis + 1 :])
        return np.array(block[rest], dtype=dtype.newbyteorder("="))


def _one_position(selection, size: int) -> int | None:
    """The one position an index entry picks along an axis of ``size``; None when it picks
    another number of positions."""
    if isinstance(selection, slice):
        picked = range(*selection.indices(size))
        return picked[0] if len(picked) == 1 else None
    try:
        position = int(selection)
    except TypeError:
        return None
    return position + size if position < 0 else position


@functools.cache
def numpy_dtype(name: str):
    """The numpy dtype of a dtype name, ml_dtypes' (bfloat16, float8_*, int4) included."""
    import ml_dtypes
    import numpy as np

    try:
        return np.dtype(name)
    except TypeError:
        return np.dtype(getattr(ml_dtypes, name))


def single_file_location(tree: Tree, single: Tree, name: str, kind: str, step: int | None) -> Location:
    """The location of a checkpoint that is one file ``name`` of ``single`` (its folder): one item,
    no steps (``--step`` is refused)."""
    from paramscope.errors import StepNotFound

    if step is not None:
        raise StepNotFound(
            f"--step {step} given, but {tree.display} is a single file", hint="leave out --step"
        )
    item = Item(name, tree.display, kind, single, name)
    return Location(tree.display, "item", None, [item], selected_item=name, tree=single)
