"""Every checkpoint format paramscope reads, behind one interface.

A path is offered to each format of :data:`paramscope.io.formats.FORMATS` in turn (Orbax
first), without naming any: the registry and the :class:`~paramscope.io.formats.Format` protocol
are in :mod:`paramscope.io.formats`. Files no format reads are named for what they are
(pickle-based files are refused, never unpickled). The rest of paramscope calls only this module: it locates
a checkpoint, lists an item's arrays, and opens them for reading, whatever wrote them.

The other formats, each a module: Hugging Face Flax folders (:mod:`~paramscope.io.hf_flax`),
safetensors, flax msgpack files, numpy ``.npz`` archives (:mod:`~paramscope.io.npz`: big_vision),
Equinox files (:mod:`~paramscope.io.eqx`: leaves by position, no names) and zarr trees (EasyDeL,
plain). ``.npy`` records (in ``.npz`` and ``.eqx``) are parsed by :mod:`~paramscope.io.npy`,
never ``np.load``: an object array is named and left unread.

A format module provides (:class:`~paramscope.io.formats.Format`):

- ``KIND``: the item kind it reads;
- ``locate(tree, step) -> Location | None``: the checkpoint at ``tree`` (a folder, or a file
  when ``tree.root_is_file()``), or None when it is not in this format (with ``UNFINISHED_STEPS``
  true, also ``allow_unfinished``: a run without a finished step resolves to no step);
- ``read_arrays(item, problems, values) -> list[StoredArray]``: from metadata alone (leaves that
  are not arrays, strings, appended to ``values`` as (path, value));
- ``audit_item(item, arrays) -> list[(name or None, problem)]``: what ``verify`` reports;
- ``describe(item) -> dict``: what ``info`` shows (``storage``, and ``metadata`` if any);
- ``notes(item) -> list[str]`` (optional): what a reader should know that is no damage (shown
  as warnings by the commands that read arrays, not problems for ``verify``): an Equinox file's
  leaves have no names, a shard read alone is one of several;
- ``disk_usage(item) -> int | None`` (optional): bytes of the item's files, None where unknown;
  without it, the bytes under the item's folder;
- ``witness_files(item) -> list[str]`` (optional): files (relative to ``item.tree``) that its
  writer replaces whenever the item is saved again, beside Orbax's metadata files.

Arrays are zarr arrays opened by TensorStore (``driver`` "zarr"/"zarr3"), raw C-order bytes
in a file (``driver`` "bytes", read by byte range through the storage seam), a deflated zip
member (``driver`` "deflated", decompressed in pieces), or a 0-d value kept in the record
(``driver`` "value"). A format module may also provide
``disk_usage(item) -> int | None`` where its files are not the item's folder.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

from paramscope.errors import CheckpointChanged, NotACheckpoint, ParamscopeError, few
from paramscope.io import zarr
from paramscope.io.formats import format_of, formats
from paramscope.io.orbax import read_iterator_item, read_json_item
from paramscope.io.records import (
    ArrayReadError,
    BytesArray,
    Item,
    Location,
    SavedSharding,
    Step,
    StoredArray,
    fill_problem,
    numpy_dtype,
)
from paramscope.io.storage import Tree, read_range, rel_path
from paramscope.io.zarr import finish_read, start_read

__all__ = [
    "ArrayReadError",
    "Item",
    "Location",
    "SavedSharding",
    "Step",
    "StoredArray",
    "audit_item",
    "check_witness",
    "first_witness",
    "commit_timestamp",
    "custom_metadata",
    "data_stamp",
    "describe",
    "disk_usage",
    "witness",
    "finish_read",
    "holds_arrays",
    "list_steps",
    "locate",
    "notes",
    "open_array",
    "open_arrays",
    "read_arrays",
    "read_iterator_item",
    "read_json_item",
    "read_step_metadata",
    "start_read",
    "step_bytes",
    "storage_format",
]


def _module(kind: str):
    """The format that reads items of ``kind``; None for items that hold no arrays."""
    return format_of(kind)


def _primary():
    """The first format tried: it reads the items no format claims (a damaged one, say)."""
    return formats()[0]


def witness(location: Location) -> tuple[tuple[str, bytes], ...]:
    """What identifies the data of a located step, cheaply: the storage stamps of the step's
    metadata file and of each item's metadata files (or its one file), a request for no bytes
    each. A step deleted or saved again (``max_to_keep``, ``force=True``) changes them all, since
    Orbax and the other writers replace these files rather than edit them in place."""
    tree = location.tree
    if tree is None:
        return ()
    rels = []
    if location.step_rel is not None:
        rels.append(rel_path(location.step_rel, "_CHECKPOINT_METADATA"))
    for item in location.items:
        if item.tree is not tree:
            continue
        if item.rel and tree.is_file(item.rel):
            rels.append(item.rel)
        else:
            rels += [rel_path(item.rel, "_METADATA"), rel_path(item.rel, "manifest.ocdbt")]
        rels += getattr(_module(item.kind), "witness_files", lambda _: [])(item)
    rels = [rel for rel in dict.fromkeys(rels) if rel]
    return tuple(zip(rels, tree.stamps(rels))) if rels else ()


def first_witness(location: Location, shown: str) -> tuple[tuple[str, bytes], ...]:
    """:func:`witness`, taken when reading begins, not when the step was opened (commands that
    read only metadata make no request for it); a file the step's listing held that is gone by
    then is a step deleted since it was opened."""
    now = witness(location)
    tree = location.tree
    if tree is not None and any(not stamp and tree.is_file(rel) for rel, stamp in now):
        _changed(location, shown, gone=True)
    return now


def check_witness(location: Location, before: tuple[tuple[str, bytes], ...], shown: str) -> None:
    """Raises :class:`CheckpointChanged` when the step's files were deleted or replaced since
    :func:`witness` gave ``before``: numbers read meanwhile may mix two saves, or fill what is
    gone."""
    now = witness(location)
    if now == before:
        return
    existed = dict(before)
    _changed(location, shown, gone=all(not stamp for rel, stamp in now if existed.get(rel)))


def _changed(location: Location, shown: str, gone: bool):
    what = f"step {location.step.step}" if location.step and location.step.step is not None else "it"
    raise CheckpointChanged(
        f"{shown}: {what} was {'deleted' if gone else 'saved again'} while it was read",
        hint="a trainer removed or replaced it (e.g. max_to_keep); read it again, or a step that is kept",
    )


def locate(
    path: str | os.PathLike | Tree, step: int | None = None, allow_unfinished: bool = False
) -> Location:
    """Resolves a path (local or URL) to one step's items, in whichever format it is. Given the
    path's :class:`Tree`, it answers from that tree's listing and the files it has read.

    Raises:
        ParamscopeError: The path is missing, not a checkpoint, or has no such step.
    """
    tree = path if isinstance(path, Tree) else Tree(os.fspath(path))
    # The first format's refusal stands if no other format reads the path; another's is final
    # (it recognised the path as its own, and says what is wrong with it).
    first: NotACheckpoint | None = None
    for position, module in enumerate(formats()):
        try:
            if allow_unfinished and getattr(module, "UNFINISHED_STEPS", False):
                found = module.locate(tree, step, allow_unfinished=True)
            else:
                found = module.locate(tree, step)
        except NotACheckpoint as refused:
            if position:
                raise
            first = refused
            continue
        if found is not None:
            return found
    refusal = holds_checkpoints(tree) or unsupported(tree)
    if refusal is not None:
        raise refusal from None
    if first is not None:
        raise first from None
    raise NotACheckpoint(f"{tree.display} is not a checkpoint paramscope reads")


_LOOKED_AT = 64  # files and folders inspected to name what a folder that is no checkpoint holds


def holds_checkpoints(tree: Tree) -> ParamscopeError | None:
    """The error for a folder that is no checkpoint itself but holds some: single-file checkpoints
    (``.npz``, ``.eqx``, msgpack) at its top, or checkpoint folders (Hugging Face Flax,
    safetensors) one level down, named so that the user can pass one. None when it holds none."""
    if not tree.keys() or tree.root_is_file():
        return None
    from paramscope.io import eqx, hf_flax, msgpack, npz, safetensors

    def readable(path: str, modules) -> bool:
        for module in modules:
            try:
                if module.locate(Tree(path), None) is not None:
                    return True
            except ParamscopeError:
                continue
        return False

    names = sorted(k for k in tree.keys() if "/" not in k)[:_LOOKED_AT]
    files = [n for n in names if readable(tree.path(n), (npz, eqx, msgpack))]
    if files:
        if len(files) == 1:
            held, hint = f"the checkpoint file {files[0]}", f"pass the file: {tree.path(files[0])}"
        else:
            more = f" and {len(files) - 3} more" if len(files) > 3 else ""
            held = f"checkpoint files ({', '.join(files[:3])}{more})"
            hint = f"pass one of the files, e.g. {tree.path(files[0])}"
        return NotACheckpoint(
            f"{tree.display} is a folder holding {held}, not a checkpoint itself", hint=hint
        )
    folders = [
        d + "/"
        for d in tree.subdirs("")[:_LOOKED_AT]
        if readable(tree.path(d), (hf_flax, safetensors, msgpack))
    ]
    if folders:
        more = f" and {len(folders) - 3} more" if len(folders) > 3 else ""
        return NotACheckpoint(
            f"{tree.display} is not a checkpoint",
            hint="found checkpoints under " + ", ".join(folders[:3]) + more + ": pass one",
        )
    return None


# Files that are not checkpoints paramscope reads, by how they begin (and their names): named
# for what they are. Pickle-based ones are refused: reading them means running their code.
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".pkl", ".pickle", ".ckpt", ".joblib")
_PICKLE_HINT = "paramscope never unpickles, since loading a pickle runs its code; convert it to safetensors"
_NOT_SUPPORTED = (  # (magic bytes at the start, what the file is)
    (b"\x89HDF\r\n\x1a\n", "an HDF5 file (Keras .h5 / .weights.h5)"),
    (b"GGUF", "a GGUF file (llama.cpp)"),
    (b"\x93NUMPY", "a numpy .npy file"),
)


def _sniff(head: bytes, name: str) -> str | None:
    """What a file is, from its first bytes and its name; None when it is not recognised."""
    lower = name.lower()
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "pickle"
    if head[:4] == b"PK\x03\x04":  # zip: torch.save archives hold a data.pkl
        if lower.endswith((".pt", ".pth", ".bin", ".ckpt")):
            return "pickle"
        return "a zip archive (Keras .keras or torch.save)"
    if head.startswith(b"\x93NUMPY") and b"'descr': '|O'" in head:
        return "pickle"  # an object array: its elements are pickled
    for magic, what in _NOT_SUPPORTED:
        if head.startswith(magic):
            return what
    if lower.endswith(PICKLE_SUFFIXES):
        return "pickle"
    return None


def unsupported(tree: Tree) -> ParamscopeError | None:
    """The error for a path that holds files of a format paramscope does not read (a file, or a
    folder of such files and nothing it reads); None when nothing is recognised."""
    if tree.root_is_file():
        parent, _, name = tree.display.rstrip("/").rpartition("/")
        found = [(name, _sniff(Tree(parent or "/").read_range_or_none(name, 0, 128), name))]
    else:
        names = sorted(k for k in tree.keys() if "/" not in k)
        found = [(n, _sniff(tree.read_range_or_none(n, 0, 128), n)) for n in names[:64]]
    found = [(n, what) for n, what in found if what]
    if not found:
        return None
    single = tree.root_is_file()
    pickled = [n for n, what in found if what == "pickle"]
    if pickled:
        message = (
            f"{tree.display} is pickle-based (a pickle or torch.save file)"
            if single
            else f"{tree.display} holds pickle-based files ({few(pickled, 3)}), no checkpoint"
        )
        return NotACheckpoint(message, hint=_PICKLE_HINT)
    name, what = found[0]
    return NotACheckpoint(
        f"{tree.display if single else tree.path(name)} is {what}, a format paramscope does not read",
        hint="paramscope reads Orbax, flax msgpack (Hugging Face Flax too), safetensors, EasyDeL, zarr, "
        "numpy .npz and Equinox checkpoints",
    )


def list_steps(path: str | os.PathLike) -> list[Step]:
    """The steps of a root, finished and unfinished (none for a single checkpoint)."""
    try:
        return locate(path, allow_unfinished=True).steps
    except ParamscopeError:
        return []


def disk_usage(item: Item) -> int | None:
    """Bytes an item's files take; None where the store cannot tell (buckets)."""
    usage = getattr(_module(item.kind), "disk_usage", None)
    return usage(item) if usage else item.tree.size(item.rel)


def read_arrays(
    item: Item, problems: list[str] | None = None, values: list[tuple[str, Any]] | None = None
) -> list[StoredArray]:
    """Every array of an item, from metadata alone; leaves that are not arrays (strings) are
    appended to ``values`` as (path, value) by the formats that store them."""
    problems = problems if problems is not None else []
    return (_module(item.kind) or _primary()).read_arrays(item, problems, values)


def _step_format(location: Location):
    """The format of a located step: that of its items that hold arrays (the first format's for
    a step of none)."""
    claimed = [_module(item.kind) for item in location.items]
    return next((m for m in claimed if m is not None and m is not _primary()), _primary())


def _step_metadata(location: Location):
    """The format of a step if it keeps step metadata (``commit_timestamp``...), else None."""
    module = _step_format(location)
    return module if hasattr(module, "commit_timestamp") else None


def read_step_metadata(location: Location) -> Any:
    """The chosen step's metadata (Orbax's ``_CHECKPOINT_METADATA``); None where there is none."""
    module = _step_metadata(location)
    return module.read_step_metadata(location) if module else None


def custom_metadata(location: Location) -> dict[str, Any]:
    """The step's custom metadata (e.g. MaxText's ``scan_layers``); empty where there is none."""
    module = _step_metadata(location)
    return module.custom_metadata(location) if module else {}


def commit_timestamp(location: Location) -> int | None:
    """When the step was committed (nanoseconds); None where unknown. Formats without step
    metadata (msgpack, safetensors, zarr trees) on a local disk: when their files last changed,
    so a step rewritten in place is told apart; in buckets, unknown."""
    module = _step_metadata(location)
    if module:
        return module.commit_timestamp(location)
    if any(item.tree.remote for item in location.items) or not location.items:
        return None
    latest = 0
    for item in location.items:
        for path in _files(item.path):
            try:
                latest = max(latest, os.stat(path).st_mtime_ns)
            except OSError:
                return None
    return latest or None


def data_stamp(location: Location) -> str | None:
    """What identifies the data of a step, for a cache of numbers computed from it: a short
    string that changes whenever the data may have; None where nothing identifies it (nothing is
    then cached).

    - Orbax steps: the commit timestamp (None for an unfinished step), and for each item that
      holds arrays, its ``_METADATA`` and every OCDBT ``manifest.ocdbt`` (a write makes a new
      root generation): their bytes and, on a local disk, their sizes and mtimes; for an item
      without OCDBT (plain zarr) on a local disk, the size and mtime of every file. An item
      rewritten in place (``StandardCheckpointer().save(item, force=True)``) leaves the step's
      commit time as it was, and is told apart by these.
    - Formats without step metadata (msgpack, safetensors, zarr trees), on a local disk only:
      the path, size and mtime of every file of each item, and of a flax multi-host save's
      ``<file>_gda/`` folder beside it. In a bucket: None.
    """
    import hashlib

    parts: list[str] = []
    module = _step_metadata(location)
    if module:
        stamp = module.commit_timestamp(location)
        if stamp is None:
            return None
        parts.append(str(stamp))
        for item in location.items:
            if holds_arrays(item):
                parts += _orbax_item_stamp(item)
    else:
        if any(item.tree.remote for item in location.items) or not location.items:
            return None
        for item in location.items:
            gda = item.path + "_gda"  # flax: the arrays of a multi-host save, beside the file
            for path in (item.path, gda) if os.path.isdir(gda) else (item.path,):
                stats = _file_stats(path)
                if stats is None:
                    return None
                parts += stats
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:32]


def _orbax_item_stamp(item: Item) -> list[str]:
    import hashlib

    tree, prefix = item.tree, f"{item.rel}/" if item.rel else ""
    names = sorted(
        k
        for k in tree.keys()
        if k.startswith(prefix) and (k == prefix + "_METADATA" or k.endswith("manifest.ocdbt"))
    )
    # _METADATA by its bytes (read anyway to open the item); each manifest.ocdbt, which TensorStore
    # reads itself, by its storage generation alone (a request for no bytes), not read twice
    metadata = [n for n in names if not n.endswith("manifest.ocdbt")]
    manifests = [n for n in names if n.endswith("manifest.ocdbt")]
    parts = [
        f"{name} {hashlib.sha256(data).hexdigest() if data is not None else '-'}"
        for name, data in zip(metadata, tree.read_many(metadata))
    ]
    parts += [f"{name} {stamp.hex() or '-'}" for name, stamp in zip(manifests, tree.stamps(manifests))]
    if not tree.remote:
        local = tree.path(item.rel) if item.rel else tree.path()
        parts += (
            _file_stats(local)
            if not any(n.endswith("manifest.ocdbt") for n in names)
            else _file_stats(*(tree.path(n) for n in names))
        ) or ["-"]
    return parts


def _file_stats(*paths: str) -> list[str] | None:
    """``path size mtime`` of every file at or below the paths; None when one cannot be read."""
    out = []
    for path in paths:
        for name in sorted(_files(path)):
            try:
                stat = os.stat(name)
            except OSError:
                return None
            shown = os.path.join(os.path.basename(path), os.path.relpath(name, path))  # however given
            out.append(f"{shown} {stat.st_size} {stat.st_mtime_ns}")
    return out


def _files(path: str):
    """A local file, or every file below a local folder."""
    if not os.path.isdir(path):
        yield path
        return
    for folder, _, names in os.walk(path):
        for name in names:
            yield os.path.join(folder, name)


def notes(item: Item) -> list[str]:
    """What a reader of an item's arrays should know that is no damage (see the module doc)."""
    module = _module(item.kind)
    return list(getattr(module, "notes", lambda _: [])(item)) if module else []


def holds_arrays(item: Item) -> bool:
    """Whether an item is one whose arrays can be listed (a damaged Orbax item counts: reading it
    fails loudly)."""
    return _module(item.kind) is not None


def audit_item(item: Item, arrays: list[StoredArray]) -> list[tuple[str | None, str]]:
    """Where an item's metadata and its stored arrays disagree (for ``verify``)."""
    return (_module(item.kind) or _primary()).audit_item(item, arrays)


def storage_format(item: Item) -> str:
    """How an item stores its arrays ('ocdbt', 'zarr', 'safetensors', ...)."""
    return (_module(item.kind) or _primary()).describe(item).get("storage", "")


def describe(item: Item) -> dict[str, Any]:
    """What ``info`` shows of an item beyond its arrays: ``storage`` and ``metadata``."""
    return (_module(item.kind) or _primary()).describe(item)


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
    tensorstore = []
    for i, array in enumerate(arrays):
        problem = fill_problem(array) if array.driver not in ("bytes", "value", "deflated") else None
        if problem is not None:
            handles[i] = ArrayReadError("read", array.path, ValueError(problem))
            handles[i].hint = "the array was never written whole; its stored chunks are all there is"
        elif array.driver not in ("bytes", "value", "deflated"):
            tensorstore.append(i)
    for i, handle in zip(tensorstore, zarr.open_arrays([arrays[i] for i in tensorstore])):
        handles[i] = handle
    for i, array in enumerate(arrays):
        if array.driver == "bytes":
            handles[i] = _bytes_handle(array)
        elif array.driver == "value":
            handles[i] = _value_handle(array)
        elif array.driver == "deflated":
            from paramscope.io import npz

            handles[i] = npz.open_member(array)
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
            array.shape,
            array.dtype,
            array.offset,
            lambda lo, hi: read_range(store, key, lo, hi),
            array.byteorder,
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

    return BytesArray(array.shape, array.dtype, 0, read_pieces, array.byteorder)


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
