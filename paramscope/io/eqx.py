"""Equinox files: ``eqx.tree_serialise_leaves``, one ``.npy`` record per leaf, concatenated.

Equinox writes each array (and Python number) leaf of a model with ``jnp.save``/``np.save``, one
after the other, and nothing else: the leaves' names live in the model's Python code, not in the
file. So the arrays are listed by position (``0``, ``1``, ...: the order of the saved leaves in
``jax.tree_util.tree_leaves(model)``), with a note that names need the model. Equinox's own
documented pattern for hyperparameters writes one JSON line before the records; ``info`` shows it.

Each record's header gives its shape and dtype, so the next record's place; headers are read by
:mod:`paramscope.io.npy` (never unpickled) and array data by byte range. An object leaf (pickled)
ends the listing: its length is unknown, so the leaves after it cannot be found.
"""

from __future__ import annotations

import json
import weakref
from dataclasses import dataclass
from typing import Any

from paramscope.errors import CorruptCheckpoint, StorageError
from paramscope.io import npy
from paramscope.io.msgpack import _FileTree
from paramscope.io.records import Item, Location, StoredArray, single_file_location
from paramscope.io.storage import Tree

KIND = "equinox"
SUFFIX = ".eqx"
MAX_LINE_BYTES = 1_000_000  # the hyperparameter line read before the first record
NOTE = (
    "leaf names are not stored in an Equinox file: leaves are numbered 0, 1, ... in the order "
    "equinox saved them (jax.tree_util.tree_leaves of the model); names need the model's code"
)
_HINT = "the file is truncated or damaged"


@dataclass(frozen=True)
class _Leaf:
    index: int
    at: int  # where the record starts in the file
    record: npy.Record


@dataclass(frozen=True)
class _File:
    hyperparameters: Any  # the JSON line's value; None without one
    leaves: tuple[_Leaf, ...]
    unread: str  # why the listing stopped early ("" when every record was read)
    size: int


_FILES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tree -> {rel: _File}


def _first_record(head: bytes) -> int | None:
    """Where the first record starts: 0, after a JSON line, or None when the file is not one."""
    if head.startswith(npy.MAGIC):
        return 0
    if head[:1] not in (b"{", b"["):
        return None
    end = head.find(b"\n" + npy.MAGIC)
    return None if end < 0 else end + 1


def locate(tree: Tree, step: int | None) -> Location | None:
    """An Equinox file (a file starting with a ``.npy`` record, or with a JSON line and one);
    None for anything else. A file named ``.npy`` is numpy's single array, not this."""
    if tree.keys() or not tree.root_is_file():
        return None
    folder, _, name = tree.display.rstrip("/").rpartition("/")
    if name.lower().endswith(".npy"):
        return None
    single = _FileTree(folder or "/", name)
    head = single.read_range_or_none(name, 0, 4096)
    if _first_record(head) is None:
        if not (head[:1] in (b"{", b"[") and name.lower().endswith(SUFFIX)):
            return None
        head = single.read_range_or_none(name, 0, MAX_LINE_BYTES)
        if _first_record(head) is None:
            return None
    return single_file_location(tree, single, name, KIND, step)


def _read(tree: Tree, rel: str, start: int, stop: int) -> bytes:
    try:
        return tree.read_range(rel, start, stop)
    except StorageError as err:
        raise CorruptCheckpoint(f"{tree.path(rel)}: {err.message}", hint=_HINT) from None


def _file(item: Item) -> _File:
    cache = _FILES.setdefault(item.tree, {})
    if item.rel not in cache:
        cache[item.rel] = _walk(item.tree, item.rel)
    return cache[item.rel]


def _walk(tree: Tree, rel: str) -> _File:
    """Every record's header, one after the other, each checked against the file's size."""
    where = tree.path(rel)
    size = tree.file_size(rel)
    if size is None:
        raise CorruptCheckpoint(f"{where} is missing", hint="the checkpoint's files changed")
    head = tree.read_range_or_none(rel, 0, min(size, MAX_LINE_BYTES))
    at = _first_record(head)
    if at is None:
        raise CorruptCheckpoint(f"{where} does not start with a .npy record", hint=_HINT)
    hyperparameters = None
    if at:
        try:
            hyperparameters = json.loads(head[: at - 1])
        except (ValueError, RecursionError):
            raise CorruptCheckpoint(f"{where}: its first line is not JSON", hint=_HINT) from None
    leaves: list[_Leaf] = []
    unread = ""
    while at < size:
        prefix = _read(tree, rel, at, min(size, at + npy.PREFIX_BYTES))
        try:
            length = npy.header_length(prefix)
            if at + length > size:
                raise npy.Malformed(f"its header ends past the end of the file ({size:,} bytes)")
            record = npy.parse(_read(tree, rel, at, at + length))
        except npy.Malformed as err:
            raise CorruptCheckpoint(
                f"{where}: leaf {len(leaves)} at byte {at:,}: {err}", hint=_HINT
            ) from None
        leaves.append(_Leaf(len(leaves), at, record))
        if record.nbytes < 0:
            unread = f"leaf {len(leaves) - 1} is of {record.problem}: it and any leaves after it are not read"
            break
        end = at + record.data_start + record.nbytes
        if end > size:
            raise CorruptCheckpoint(
                f"{where}: leaf {len(leaves) - 1} {record.stored}{list(record.shape)} needs bytes up to "
                f"{end:,}, but the file has {size:,}",
                hint="the file is truncated",
            )
        at = end
    return _File(hyperparameters, tuple(leaves), unread, size)


def read_arrays(item: Item, problems: list[str], values: list | None = None) -> list[StoredArray]:
    """Every leaf, named by its position, from the records' headers alone."""
    found = _file(item)
    folder = item.rel.rpartition("/")[0]
    store = json.dumps(item.tree.spec(folder), sort_keys=True)
    name = item.rel.rpartition("/")[2]
    arrays = []
    for leaf in found.leaves:
        record = leaf.record
        if record.problem:
            if record.nbytes >= 0:
                problems.append(f"leaf {leaf.index} is of {record.problem}: not read")
            continue
        arrays.append(
            StoredArray(
                keys=(str(leaf.index),),
                shape=record.shape,
                dtype=record.dtype,
                itemsize=record.itemsize,
                chunks=record.shape,
                driver="bytes",
                store=store,
                name=name,
                sharding=None,
                value_type="np.ndarray",
                offset=leaf.at + record.data_start,
                stored_dtype=record.stored if record.recovered else "",
            )
        )
    if found.unread:
        problems.append(found.unread)
    return arrays


def notes(item: Item) -> list[str]:
    """What a reader of the arrays should know that is no problem of the file."""
    return [NOTE]


def audit_item(item: Item, arrays: list[StoredArray]) -> list[tuple[str | None, str]]:
    """Nothing beyond what reading the headers checked (every record inside the file)."""
    return []


def describe(item: Item) -> dict[str, Any]:
    """``storage`` "npy", and ``metadata``: the hyperparameter line, if any."""
    found = _file(item)
    metadata = None if found.hyperparameters is None else {"hyperparameters": found.hyperparameters}
    return {"storage": "npy", "metadata": metadata}


def disk_usage(item: Item) -> int | None:
    return None if item.tree.remote else item.tree.file_size(item.rel)
