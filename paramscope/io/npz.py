"""numpy ``.npz`` archives: big_vision checkpoints (``utils.save_checkpoint``) and released
ViT/Mixer weights.

An ``.npz`` is a zip archive of ``.npy`` records, one per array, named by the key given to
``np.savez`` (``params/embedding/kernel.npy``): ``np.savez`` stores them uncompressed
(``ZIP_STORED``), ``np.savez_compressed`` deflated. Names are read with ``/`` as ``.``
(``params.embedding.kernel``), as for plain zarr trees. The zip's central directory and each
record's header are read by byte range (so local files and buckets alike); a stored array's data
is then read by byte range like any raw array (``driver`` "bytes"), a deflated one by
decompressing its member in pieces up to the rows asked for (``driver`` "deflated": memory stays
bounded, and reading rows in order continues where the last read stopped).

Headers are parsed by :mod:`paramscope.io.npy`, never by ``np.load``: an object array (whose
elements are pickled) is named and left unread, and so is any dtype numpy cannot hold but a
2-byte void, which big_vision's ``recover_dtype`` reads as bfloat16 (so does paramscope). A
member's CRC-32 is checked by ``verify``.
"""

from __future__ import annotations

import io
import json
import re
import threading
import weakref
import zipfile
import zlib
from dataclasses import dataclass
from typing import Any

from paramscope.errors import CorruptCheckpoint, StorageError
from paramscope.io import npy
from paramscope.io.msgpack import _FileTree
from paramscope.io.records import BytesArray, Item, Location, StoredArray, single_file_location
from paramscope.io.storage import Tree, read_range

KIND = "npz"
ZIP_MAGIC = b"PK\x03\x04"
MEMBER_SUFFIX = ".npy"
PIECE_BYTES = 1 << 20  # how much is decompressed or skipped at a time
_NAME = re.compile(r"\.npz(-\d+)?$", re.IGNORECASE)  # big_vision's step copies: <path>-000001000
_HINT = "the archive is truncated or damaged"


@dataclass(frozen=True)
class _Member:
    name: str  # in the archive
    keys: tuple[str, ...]
    compress_type: int
    data_at: int  # where its bytes start in the archive (stored members); -1 for deflated
    size: int  # uncompressed bytes
    record: npy.Record | None
    problem: str = ""


class _RangeFile(io.RawIOBase):
    """A file of a kvstore read by byte range, for :mod:`zipfile` (which seeks and reads)."""

    def __init__(self, store: str, key: str, size: int):
        self._store, self._key, self._size, self._at = store, key, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._at

    def seek(self, offset: int, whence: int = 0) -> int:
        base = {0: 0, 1: self._at, 2: self._size}[whence]
        self._at = max(0, base + offset)
        return self._at

    def readinto(self, buffer) -> int:
        stop = min(self._size, self._at + len(buffer))
        if stop <= self._at:
            return 0
        raw = read_range(self._store, self._key, self._at, stop)
        buffer[: len(raw)] = raw
        self._at += len(raw)
        return len(raw)


def _open_zip(store: str, key: str, size: int) -> zipfile.ZipFile:
    return zipfile.ZipFile(io.BufferedReader(_RangeFile(store, key, size), buffer_size=PIECE_BYTES))


def _looks_like_npz(head: bytes, name: str) -> bool:
    """A zip whose name says npz, or whose first member is a ``.npy``."""
    if not head.startswith(ZIP_MAGIC):
        return False
    if _NAME.search(name):
        return True
    length = int.from_bytes(head[26:28], "little") if len(head) >= 30 else 0
    return head[30 : 30 + length].endswith(MEMBER_SUFFIX.encode())


def locate(tree: Tree, step: int | None) -> Location | None:
    """An ``.npz`` file; None for anything else."""
    if tree.keys() or not tree.root_is_file():
        return None
    folder, _, name = tree.display.rstrip("/").rpartition("/")
    single = _FileTree(folder or "/", name)
    if not _looks_like_npz(single.read_range_or_none(name, 0, 512), name):
        return None
    return single_file_location(tree, single, name, KIND, step)


def _keys(member: str) -> tuple[str, ...]:
    """A member's array name as path keys: split at ``/``; one key where that leaves empty parts."""
    stem = member[: -len(MEMBER_SUFFIX)] if member.endswith(MEMBER_SUFFIX) else member
    parts = tuple(stem.split("/"))
    return parts if all(parts) else (stem,)


_ARCHIVES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tree -> {rel: [_Member]}


def _store_of(item: Item) -> tuple[str, str]:
    folder, _, name = item.rel.rpartition("/")
    return json.dumps(item.tree.spec(folder), sort_keys=True), name


def _members(item: Item) -> list[_Member]:
    cache = _ARCHIVES.setdefault(item.tree, {})
    if item.rel not in cache:
        cache[item.rel] = _read_members(item)
    return cache[item.rel]


def _read_members(item: Item) -> list[_Member]:
    where = item.tree.path(item.rel)
    size = item.tree.file_size(item.rel)
    if size is None:
        raise CorruptCheckpoint(f"{where} is missing", hint="the checkpoint's files changed")
    store, key = _store_of(item)
    try:
        with _open_zip(store, key, size) as archive:
            infos = archive.infolist()
            return [_member(archive, info, store, key, size) for info in infos]
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError, NotImplementedError) as err:
        raise CorruptCheckpoint(f"{where} is not a readable npz archive: {err}", hint=_HINT) from None
    except StorageError as err:
        raise CorruptCheckpoint(f"{where}: {err.message}", hint=_HINT) from None


def _member(archive: zipfile.ZipFile, info: zipfile.ZipInfo, store: str, key: str, size: int) -> _Member:
    keys = _keys(info.filename)
    base = dict(name=info.filename, keys=keys, compress_type=info.compress_type, size=info.file_size)
    if info.is_dir():
        return _Member(**base, data_at=-1, record=None, problem="a folder")
    if not info.filename.endswith(MEMBER_SUFFIX):
        return _Member(**base, data_at=-1, record=None, problem="not a .npy array")
    if info.flag_bits & 0x1:
        return _Member(**base, data_at=-1, record=None, problem="encrypted")
    if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        return _Member(**base, data_at=-1, record=None, problem=f"compressed by method {info.compress_type}")
    data_at = -1
    if info.compress_type == zipfile.ZIP_STORED:
        local = read_range(store, key, info.header_offset, min(size, info.header_offset + 30))
        if len(local) < 30 or not local.startswith(ZIP_MAGIC):
            raise zipfile.BadZipFile(f"no local header for {info.filename!r}")
        data_at = info.header_offset + 30 + int.from_bytes(local[26:28], "little")
        data_at += int.from_bytes(local[28:30], "little")
        if data_at + info.file_size > size:
            raise zipfile.BadZipFile(f"member {info.filename!r} ends past the end of the archive")
        prefix = read_range(store, key, data_at, min(data_at + info.file_size, data_at + npy.PREFIX_BYTES))
        length = _length(prefix, info)
        head = read_range(store, key, data_at, data_at + length)
    else:
        with archive.open(info) as stream:
            prefix = stream.read(npy.PREFIX_BYTES)
            length = _length(prefix, info)
            head = prefix[:length] + stream.read(max(0, length - len(prefix)))
    try:
        record = npy.parse(head)
    except npy.Malformed as err:
        raise zipfile.BadZipFile(f"member {info.filename[:200]!r}: {err}") from None
    if record.nbytes >= 0 and record.data_start + record.nbytes != info.file_size:
        raise zipfile.BadZipFile(
            f"member {info.filename[:200]!r}: its header says {record.stored}{list(record.shape)} "
            f"({record.nbytes:,} bytes), but it holds {info.file_size - record.data_start:,}"
        )
    return _Member(**base, data_at=data_at, record=record, problem=record.problem)


def _length(prefix: bytes, info: zipfile.ZipInfo) -> int:
    try:
        length = npy.header_length(prefix)
    except npy.Malformed:
        return len(prefix)  # parse() says what is wrong
    return min(length, info.file_size)


def read_arrays(item: Item, problems: list[str], values: list | None = None) -> list[StoredArray]:
    """Every ``.npy`` member, from the central directory and the records' headers alone."""
    store, key = _store_of(item)
    size = item.tree.file_size(item.rel)
    arrays: list[StoredArray] = []
    seen: set[tuple[str, ...]] = set()
    for member in _members(item):
        if member.problem:
            problems.append(f"{member.name[:200]!r} is {_what(member.problem)}: not read")
            continue
        record = member.record
        if member.keys in seen:
            raise CorruptCheckpoint(
                f"{item.tree.path(item.rel)} holds {member.name[:200]!r} twice", hint=_HINT
            )
        seen.add(member.keys)
        stored = member.compress_type == zipfile.ZIP_STORED
        arrays.append(
            StoredArray(
                keys=member.keys,
                shape=record.shape,
                dtype=record.dtype,
                itemsize=record.itemsize,
                chunks=record.shape,
                driver="bytes" if stored else "deflated",
                store=store,
                name=key,
                sharding=None,
                value_type="np.ndarray",
                metadata_template=""
                if stored
                else json.dumps({"member": member.name, "archive_bytes": size}),
                offset=member.data_at + record.data_start if stored else record.data_start,
                stored_dtype=record.stored if record.recovered else "",
            )
        )
    return arrays


def _where(member: _Member, size: int | None) -> str:
    """What a deflated member's handle needs: its name and the archive's size."""
    return json.dumps({"member": member.name, "archive_bytes": size})


def _what(problem: str) -> str:
    return problem if problem.startswith(("a ", "not ", "encrypted", "compressed")) else f"of {problem}"


class _Stream:
    """A deflated member read forwards: a read at or after where the last one stopped goes on
    from there; one before it starts again from the member's start. Pieces of at most
    :data:`PIECE_BYTES` are decompressed at a time."""

    def __init__(self, store: str, key: str, member: str, size: int):
        self._store, self._key, self._member, self._size = store, key, member, size
        self._lock = threading.Lock()
        self._archive: zipfile.ZipFile | None = None
        self._stream = None
        self._at = 0

    def _reopen(self) -> None:
        self.close()
        self._archive = _open_zip(self._store, self._key, self._size)
        self._stream = self._archive.open(self._member)
        self._at = 0

    def close(self) -> None:
        if self._archive is not None:
            self._archive.close()
        self._archive = self._stream = None

    def read(self, lo: int, hi: int) -> bytes:
        with self._lock:
            if self._stream is None or lo < self._at:
                self._reopen()
            while self._at < lo:
                skipped = len(self._stream.read(min(PIECE_BYTES, lo - self._at)))
                if not skipped:
                    raise EOFError(f"the member ends at byte {self._at:,}")
                self._at += skipped
            pieces = []
            while self._at < hi:
                piece = self._stream.read(min(PIECE_BYTES, hi - self._at))
                if not piece:
                    raise EOFError(f"the member ends at byte {self._at:,}")
                pieces.append(piece)
                self._at += len(piece)
            return b"".join(pieces)


def open_member(array: StoredArray) -> BytesArray:
    """The handle of a deflated member's array (``driver`` "deflated")."""
    where = json.loads(array.metadata_template)
    stream = _Stream(array.store, array.name, where["member"], where["archive_bytes"])
    return BytesArray(array.shape, array.dtype, array.offset, stream.read)


def audit_item(item: Item, arrays: list[StoredArray]) -> list[tuple[str | None, str]]:
    """Each member's CRC-32 against its bytes (read again, in pieces): a changed byte of a stored
    array reads as another number, which only the checksum tells."""
    store, key = _store_of(item)
    size = item.tree.file_size(item.rel) or 0
    problems: list[tuple[str | None, str]] = []
    try:
        archive = _open_zip(store, key, size)
    except (zipfile.BadZipFile, OSError, StorageError) as err:
        return [(None, f"cannot open the archive again: {err}")]
    with archive:
        for member in _members(item):
            if member.problem:
                continue
            try:
                with archive.open(member.name) as stream:
                    while stream.read(PIECE_BYTES):
                        pass
            except (zipfile.BadZipFile, zlib.error, EOFError, OSError, StorageError) as err:
                path = ".".join(member.keys)
                problems.append((path, f"member {member.name[:200]!r} fails its check: {err}"))
    return problems


def describe(item: Item) -> dict[str, Any]:
    """``storage`` "npz" (stored members) or "npz-deflated" (any deflated one)."""
    deflated = any(m.compress_type == zipfile.ZIP_DEFLATED for m in _members(item))
    return {"storage": "npz-deflated" if deflated else "npz", "metadata": None}


def disk_usage(item: Item) -> int | None:
    return None if item.tree.remote else item.tree.file_size(item.rel)
