"""Every checkpoint format paramscope reads, behind one interface.

Orbax layouts are tried first; a path Orbax does not recognise is offered to each other format
in turn (:data:`FORMATS`), and files no format reads are named for what they are (pickle-based
files are refused, never unpickled). The rest of paramscope calls only this module: it locates
a checkpoint, lists an item's arrays, and opens them for reading, whatever wrote them.

A format module provides:

- ``KIND``: the item kind it reads;
- ``locate(tree, step) -> Location | None``: the checkpoint at ``tree`` (a folder, or a file
  when ``tree.root_is_file()``), or None when it is not in this format;
- ``read_arrays(item, problems) -> list[StoredArray]``: from metadata alone;
- ``audit_item(item, arrays) -> list[(name or None, problem)]``: what ``verify`` reports;
- ``describe(item) -> dict``: what ``info`` shows (``storage``, and ``metadata`` if any).

Arrays are zarr arrays opened by TensorStore (``driver`` "zarr"/"zarr3"), raw C-order bytes
in a file (``driver`` "bytes", read by byte range through the storage seam), or a 0-d value
kept in the record (``driver`` "value"). A format module may also provide
``disk_usage(item) -> int | None`` where its files are not the item's folder.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Sequence
from typing import Any

from paramscope.errors import NotACheckpoint, ParamscopeError
from paramscope.io import orbax
from paramscope.io.orbax import (
    commit_timestamp,
    custom_metadata,
    finish_read,
    read_json_item,
    read_step_metadata,
    start_read,
)
from paramscope.io.records import (
    ArrayReadError,
    BytesArray,
    Item,
    Location,
    SavedSharding,
    Step,
    StoredArray,
    numpy_dtype,
)
from paramscope.io.storage import Tree, read_range

__all__ = [
    "ArrayReadError",
    "Item",
    "Location",
    "SavedSharding",
    "Step",
    "StoredArray",
    "audit_item",
    "commit_timestamp",
    "custom_metadata",
    "describe",
    "disk_usage",
    "finish_read",
    "list_steps",
    "locate",
    "open_array",
    "open_arrays",
    "read_arrays",
    "read_json_item",
    "read_step_metadata",
    "start_read",
    "step_bytes",
    "storage_format",
]

ORBAX_KINDS = ("pytree", "array", "json", "damaged", "unknown")


@functools.cache
def formats() -> tuple[Any, ...]:
    """The modules of the formats other than Orbax, in the order they are tried. Plain zarr trees
    (:mod:`~paramscope.io.tstree`) come last: any folder of zarr arrays is one."""
    from paramscope.io import msgpack, tstree

    return (msgpack, tstree)


def _module(kind: str):
    for module in formats():
        if module.KIND == kind:
            return module
    return None


def locate(path: str | os.PathLike, step: int | None = None, allow_unfinished: bool = False) -> Location:
    """Resolves a path (local or URL) to one step's items, in whichever format it is.

    Raises:
        ParamscopeError: The path is missing, not a checkpoint, or has no such step.
    """
    path = os.fspath(path)
    try:
        return orbax.locate(path, step, allow_unfinished)
    except NotACheckpoint as not_orbax:
        tree = Tree(path)
        for module in formats():
            found = module.locate(tree, step)
            if found is not None:
                return found
        raise not_orbax from None


def list_steps(path: str | os.PathLike) -> list[Step]:
    """The steps of a root, finished and unfinished (none for a single checkpoint)."""
    try:
        return locate(path, allow_unfinished=True).steps
    except ParamscopeError:
        return []


def disk_usage(item: Item) -> int | None:
    """Bytes an item's files take; None where the store cannot tell (buckets)."""
    usage = getattr(_module(item.kind), "disk_usage", None)
    return usage(item) if usage else orbax.disk_usage(item)


def read_arrays(
    item: Item, problems: list[str] | None = None, values: list[tuple[str, Any]] | None = None
) -> list[StoredArray]:
    """Every array of an item, from metadata alone; leaves that are not arrays (strings) are
    appended to ``values`` as (path, value) by the formats that store them."""
    problems = problems if problems is not None else []
    module = _module(item.kind)
    return module.read_arrays(item, problems) if module else orbax.read_arrays(item, problems, values)


def audit_item(item: Item, arrays: list[StoredArray]) -> list[tuple[str | None, str]]:
    """Where an item's metadata and its stored arrays disagree (for ``verify``)."""
    module = _module(item.kind)
    return module.audit_item(item, arrays) if module else orbax.audit_item(item, arrays)


def storage_format(item: Item) -> str:
    """How an item stores its arrays ('ocdbt', 'zarr', 'safetensors', ...)."""
    module = _module(item.kind)
    return module.describe(item)["storage"] if module else orbax.storage_format(item)


def describe(item: Item) -> dict[str, Any]:
    """What ``info`` shows of an item beyond its arrays: ``storage`` and ``metadata``."""
    module = _module(item.kind)
    if module:
        return module.describe(item)
    return {"storage": orbax.storage_format(item)} if item.kind in ("pytree", "array") else {}


def step_bytes(path: str, step: int | None = None) -> int:
    """Bytes stored for the step a path resolves to (for a progress bar); 0 when unknown."""
    try:
        location = locate(path, step)
    except ParamscopeError:
        return 0
    return sum(disk_usage(i) or 0 for i in location.items)


def open_arrays(arrays: Sequence[StoredArray]) -> list[Any]:
    """Opens many stored arrays read-only; returns, in order, a handle (sliceable, ``.read()``)
    or the :class:`ArrayReadError` of each."""
    handles: list[Any] = [None] * len(arrays)
    zarr = [i for i, a in enumerate(arrays) if a.driver not in ("bytes", "value")]
    for i, handle in zip(zarr, orbax.open_arrays([arrays[i] for i in zarr])):
        handles[i] = handle
    for i, array in enumerate(arrays):
        if array.driver == "bytes":
            handles[i] = _bytes_handle(array)
        elif array.driver == "value":
            handles[i] = _value_handle(array)
    return handles


def open_array(array: StoredArray):
    """Opens one stored array read-only; returns its handle."""
    (handle,) = open_arrays([array])
    if isinstance(handle, ArrayReadError):
        raise handle
    return handle


def _bytes_handle(array: StoredArray) -> BytesArray:
    """The handle of raw bytes: at ``offset`` of file ``name``, or, where ``metadata_template``
    lists segments (``[[file offset, bytes], ...]``), the concatenation of those pieces."""
    store, key = array.store, array.name
    if not array.metadata_template:
        return BytesArray(
            array.shape, array.dtype, array.offset, lambda lo, hi: read_range(store, key, lo, hi)
        )
    segments = [(int(at), int(size)) for at, size in json.loads(array.metadata_template)]

    def read_pieces(lo: int, hi: int) -> bytes:
        out, base = [], 0
        for at, size in segments:
            a, b = max(lo, base), min(hi, base + size)
            if a < b:
                out.append(read_range(store, key, at + a - base, at + b - base))
            base += size
        return b"".join(out)

    return BytesArray(array.shape, array.dtype, 0, read_pieces)


def _value_handle(array: StoredArray) -> BytesArray:
    """The handle of a 0-d value kept in the record itself (``metadata_template``: its JSON, a
    complex number as ``[real, imag]``), for scalars whose bytes in the file are not C-order
    little-endian (msgpack's ints and floats)."""
    import numpy as np

    value = json.loads(array.metadata_template)
    if isinstance(value, list):
        value = complex(*value)
    raw = np.asarray(value, dtype=numpy_dtype(array.dtype).newbyteorder("<")).tobytes()
    return BytesArray((), array.dtype, 0, lambda lo, hi: raw[lo:hi])
