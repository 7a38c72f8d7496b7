"""safetensors checkpoints: one file, a folder of files, or a sharded set with its index.

A ``.safetensors`` file (huggingface/safetensors, README "Format") is 8 bytes of a
little-endian unsigned length N, N bytes of a UTF-8 JSON object (the header), then the data
buffer. The header maps each tensor name to ``{"dtype", "shape", "data_offsets": [begin, end]}``,
offsets relative to the start of the buffer (byte 8 + N of the file), and may hold a
``__metadata__`` map of strings. Tensors are C-order and little-endian, and the buffer must be
covered by the tensors exactly, without holes or bytes after the last one.

What a user's path may be, read as one item whose arrays are the tensors, named as written
(``model.layers.0.mlp.up_proj.weight``):

- a ``.safetensors`` file;
- a ``*.safetensors.index.json`` file, or a folder holding one: its ``weight_map`` says which
  shard holds each tensor (transformers' sharded checkpoints, ``model-00001-of-00002.safetensors``);
- a folder of ``.safetensors`` files without an index: every file's tensors, merged.

Only headers are read for metadata, each checked against the file before anything it declares
is allocated: its length against safetensors' own limit (100,000,000 bytes) and the file, every
tensor's dtype, shape and byte range against the buffer and each other. Array data is read by
byte range (``driver`` "bytes"), so the same code reads local files and buckets. In a bucket,
where listings carry no sizes, a file costs four small requests: its length, its header, and one
byte at each side of the last tensor's end (the file holds all of it, and nothing after it).
"""

from __future__ import annotations

import json
import weakref
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from paramscope.errors import CorruptCheckpoint, ItemNotFound, StepNotFound, StorageError, few
from paramscope.io.records import Item, Location, StoredArray, numpy_dtype
from paramscope.io.storage import Tree

KIND = "safetensors"
SUFFIX = ".safetensors"
INDEX_SUFFIX = ".safetensors.index.json"
METADATA_KEY = "__metadata__"
MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit (MAX_HEADER_SIZE)
# paramscope's own, lower: a header is parsed whole into Python objects, tens of times its size
# (a 12 MB header of 200,000 tensors took 640 MB). Real headers list at most thousands of tensors
# in well under a megabyte.
MAX_READ_HEADER_BYTES = 16 << 20
MAX_TENSORS = 100_000
MAX_INDEX_BYTES = 100_000_000

# The header's dtype codes: (numpy/ml_dtypes name, bits per element). The packed 4- and 6-bit
# floats, several to a byte, have no numpy layout (None): their sizes are checked, their tensors
# are not read.
DTYPES: dict[str, tuple[str | None, int]] = {
    "BOOL": ("bool", 8),
    "U8": ("uint8", 8),
    "I8": ("int8", 8),
    "U16": ("uint16", 16),
    "I16": ("int16", 16),
    "F16": ("float16", 16),
    "BF16": ("bfloat16", 16),
    "U32": ("uint32", 32),
    "I32": ("int32", 32),
    "F32": ("float32", 32),
    "U64": ("uint64", 64),
    "I64": ("int64", 64),
    "F64": ("float64", 64),
    "C64": ("complex64", 64),
    "F8_E4M3": ("float8_e4m3fn", 8),
    "F8_E5M2": ("float8_e5m2", 8),
    "F8_E8M0": ("float8_e8m0fnu", 8),
    "F8_E4M3FNUZ": ("float8_e4m3fnuz", 8),
    "F8_E5M2FNUZ": ("float8_e5m2fnuz", 8),
    "F4": (None, 4),
    "F6_E2M3": (None, 6),
    "F6_E3M2": (None, 6),
}
_HINT = "the file is damaged, truncated, or was not written by safetensors"
_SHOWN_GAPS = 3


@dataclass(frozen=True)
class Tensor:
    """One tensor of a header: its dtype code, shape and byte range in the data buffer."""

    name: str
    code: str
    shape: tuple[int, ...]
    begin: int
    end: int


@dataclass(frozen=True)
class Header:
    """A file's header, checked: its length N, ``__metadata__``, tensors in data order, and the
    data buffer's size (None in a bucket, where only whether bytes follow the last tensor is
    known: ``trailing``)."""

    file: str  # as shown to people
    length: int
    metadata: dict[str, str] | None
    tensors: tuple[Tensor, ...]
    buffer: int | None
    trailing: bool = False

    @property
    def data_start(self) -> int:
        return 8 + self.length

    def holes(self) -> list[tuple[int, int]]:
        """Byte ranges of the data buffer no tensor covers (safetensors forbids them)."""
        holes, at = [], 0
        for tensor in self.tensors:
            if tensor.begin > at:
                holes.append((at, tensor.begin))
            at = max(at, tensor.end)
        if self.buffer is not None and self.buffer > at:
            holes.append((at, self.buffer))
        return holes


def _corrupt(where: str, problem: str, hint: str = _HINT) -> CorruptCheckpoint:
    return CorruptCheckpoint(f"{where}: {problem}", hint=hint)


def _element_count(shape: tuple[int, ...], limit: int) -> int | None:
    """The product of ``shape``; None as soon as it passes ``limit`` (a hostile header's shape
    could otherwise make a number of millions of digits)."""
    if 0 in shape:
        return 0
    count = 1
    for dim in shape:
        count *= dim
        if count > limit:
            return None
    return count


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise _Duplicate(key)
        seen[key] = value
    return seen


class _Duplicate(ValueError):
    pass


def parse_header(raw: bytes, where: str, buffer: int | None) -> tuple[dict[str, str] | None, list[Tensor]]:
    """The ``__metadata__`` and tensors (in data order) of a header's N bytes, every entry checked:
    dtype known, shape of non-negative integers, ``data_offsets`` two integers holding exactly
    the tensor's bytes, inside a buffer of ``buffer`` bytes (when known), no two overlapping.

    Raises:
        CorruptCheckpoint: One line naming ``where``, the tensor and what is wrong.
    """
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise _corrupt(where, f"the header is not UTF-8 (byte {err.start} of {len(raw)})") from None
    if raw.count(b'"data_offsets"') > MAX_TENSORS:  # counted before anything is parsed
        raise _corrupt(
            where,
            f"the header lists more than {MAX_TENSORS:,} tensors, more than paramscope reads from one file",
            hint="split the checkpoint into shards (a *.safetensors.index.json and its files)",
        )
    try:
        doc = json.loads(text, object_pairs_hook=_no_duplicates)
    except _Duplicate as err:
        raise _corrupt(where, f"the header names {str(err)!r} twice") from None
    except RecursionError:
        raise _corrupt(where, "the header is not JSON (nested too deeply)") from None
    except ValueError as err:
        raise _corrupt(where, f"the header is not JSON ({str(err)[:120]})") from None
    if not isinstance(doc, dict):
        raise _corrupt(where, f"the header is a JSON {type(doc).__name__}, not an object")
    metadata = doc.pop(METADATA_KEY, None)
    if metadata is not None and not (
        isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())
    ):
        raise _corrupt(where, f"{METADATA_KEY} is not a map of strings to strings")
    tensors = [_tensor(name, entry, where, buffer) for name, entry in doc.items()]
    tensors.sort(key=lambda t: (t.begin, t.end))
    last: Tensor | None = None
    for tensor in tensors:
        if tensor.begin == tensor.end:
            continue
        if last is not None and tensor.begin < last.end:
            raise _corrupt(
                where,
                f"tensors {last.name!r} (bytes {last.begin}-{last.end}) and {tensor.name!r} "
                f"(bytes {tensor.begin}-{tensor.end}) overlap",
            )
        last = tensor
    return metadata, tensors


def _tensor(name: str, entry: Any, where: str, buffer: int | None) -> Tensor:
    at = f"tensor {name[:200]!r}"
    if not isinstance(entry, dict):
        raise _corrupt(where, f"{at} is described by a JSON {type(entry).__name__}, not an object")
    code, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(code, str):
        raise _corrupt(where, f"{at} has no dtype")
    if code not in DTYPES:
        raise _corrupt(where, f"{at} has dtype {code[:40]!r}, which safetensors does not define")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise _corrupt(where, f"{at} has shape {json.dumps(shape)[:80]}, not a list of non-negative integers")
    if not (
        isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int and o >= 0 for o in offsets)
    ):
        raise _corrupt(
            where, f"{at} has data_offsets {json.dumps(offsets)[:80]}, not two non-negative integers"
        )
    begin, end = offsets
    if end < begin:
        raise _corrupt(where, f"{at} has data_offsets [{begin}, {end}], which end before they begin")
    bits = DTYPES[code][1]
    count = _element_count(tuple(shape), (end - begin) * 8 // bits + 1)
    if count is None or count * bits != (end - begin) * 8:
        needed = "more" if count is None else f"{count * bits / 8:g}"
        raise _corrupt(
            where,
            f"{at} has data_offsets [{begin}, {end}] ({end - begin} bytes), but shape {shape} of "
            f"{code} needs {needed} bytes",
        )
    if buffer is not None and end > buffer:
        raise _corrupt(
            where,
            f"{at} has data_offsets [{begin}, {end}], past the end of the data buffer ({buffer} bytes)",
            hint="the file is truncated or damaged",
        )
    return Tensor(name, code, tuple(shape), begin, end)


# ----------------------------------------------------------------------------------------------
# Files


def _read(tree: Tree, key: str, start: int, stop: int, what: str) -> bytes:
    try:
        return tree.read_range(key, start, stop)
    except StorageError as err:
        if err.message.endswith(" is missing"):
            raise _corrupt(tree.path(key), "the file is missing", hint="the copy is incomplete") from None
        raise _corrupt(tree.path(key), f"{what} ({err.message})", hint="the file is truncated") from None


def read_header(tree: Tree, key: str) -> Header:
    """A file's header, checked against the file before anything it declares is read."""
    where = tree.path(key)
    size = None if tree.remote else tree.file_size(key)
    if not tree.remote:
        if size is None:
            raise _corrupt(where, "the file is missing", hint="the copy is incomplete")
        if size < 8:
            raise _corrupt(where, f"the file has {size} bytes, fewer than the 8 of the header's length")
    length = int.from_bytes(_read(tree, key, 0, 8, "the file is shorter than 8 bytes"), "little")
    if length > MAX_HEADER_BYTES:
        raise _corrupt(
            where,
            f"the header length is {length:,} bytes, more than safetensors allows ({MAX_HEADER_BYTES:,})",
        )
    if length > MAX_READ_HEADER_BYTES:
        raise _corrupt(
            where,
            f"the header is {length:,} bytes, more than paramscope reads ({MAX_READ_HEADER_BYTES:,})",
            hint="headers of real checkpoints are far smaller; the file is damaged or hostile",
        )
    if size is not None and length > size - 8:
        raise _corrupt(
            where, f"the header length is {length:,} bytes, but the file holds {size - 8:,} after it"
        )
    raw = _read(tree, key, 8, 8 + length, f"the header length is {length:,} bytes, longer than the file")
    buffer = None if size is None else size - 8 - length
    metadata, tensors = parse_header(raw, where, buffer)
    trailing = False
    if tree.remote:
        end = max((t.end for t in tensors), default=0)
        if end and not tree.has_byte(key, 8 + length + end - 1):
            last = max(tensors, key=lambda t: t.end)
            raise _corrupt(
                where,
                f"tensor {last.name[:200]!r} has data_offsets [{last.begin}, {last.end}], past the end of "
                "the file",
                hint="the file is truncated or damaged",
            )
        trailing = tree.has_byte(key, 8 + length + end)
    return Header(where, length, metadata, tuple(tensors), buffer, trailing)


@dataclass(frozen=True)
class Layout:
    """The files of an item: the index (or None) and the data files, as keys of ``tree``."""

    tree: Tree
    index: str | None
    files: tuple[str, ...]
    listed: bool  # whether ``tree`` was listed (a folder), so the listing says what exists


def _shown_name(tree: Tree) -> str:
    return tree.display.rstrip("/").rsplit("/", 1)[-1]


def locate(tree: Tree, step: int | None) -> Location | None:
    """A safetensors file, index file, or folder of them at ``tree``; None when it is not one."""
    name = _shown_name(tree)
    keys = tree.keys()
    if keys:
        top = sorted(k for k in keys if "/" not in k)
        indexes = [k for k in top if k.endswith(INDEX_SUFFIX)]
        if not indexes and not any(k.endswith(SUFFIX) for k in top):
            return None
        if len(indexes) > 1:
            raise ItemNotFound(
                f"{tree.display} holds {len(indexes)} safetensors indexes: {', '.join(indexes[:4])}",
                hint=f"pass one of them, e.g. {tree.path(indexes[0])}",
            )
        item = Item(name, tree.display, KIND, tree, indexes[0] if indexes else "")
        home = tree
    elif name.endswith(SUFFIX) or name.endswith(INDEX_SUFFIX):
        parent = tree.display[: -len(name)].rstrip("/") or "/"
        home = Tree(parent)
        item = Item(name, tree.display, KIND, home, name)
    else:
        return None
    if step is not None:
        raise StepNotFound(
            f"--step {step} given, but {tree.display} is a safetensors checkpoint (no steps)",
            hint="leave out --step",
        )
    return Location(tree.display, "item", None, [item], selected_item=name, tree=home)


def layout(item: Item) -> Layout:
    """Which files an item reads: the index's shards, the one file, or the folder's files."""
    tree, rel = item.tree, item.rel
    listed = rel == "" or (rel.endswith(INDEX_SUFFIX) and item.path == tree.display)
    if rel.endswith(INDEX_SUFFIX):
        return Layout(tree, rel, tuple(sorted(set(_weight_map(tree, rel, listed).values()))), listed)
    if rel:
        return Layout(tree, None, (rel,), False)
    return Layout(
        tree, None, tuple(sorted(k for k in tree.keys() if "/" not in k and k.endswith(SUFFIX))), True
    )


# An index read once per located checkpoint (its Tree), not once per question asked of it.
_INDEXES: weakref.WeakKeyDictionary[Tree, dict[str, tuple[dict[str, str], Any]]] = weakref.WeakKeyDictionary()
_HEADERS: weakref.WeakKeyDictionary[Tree, dict[str, Header]] = weakref.WeakKeyDictionary()


def read_index(tree: Tree, key: str, listed: bool) -> tuple[dict[str, str], Any]:
    """An index's ``weight_map`` (tensor name -> shard key) and its ``metadata``."""
    cache = _INDEXES.setdefault(tree, {})
    if key in cache:
        return cache[key]
    where = tree.path(key)
    size = None if tree.remote else tree.file_size(key)
    if (size is not None and size > MAX_INDEX_BYTES) or (tree.remote and tree.has_byte(key, MAX_INDEX_BYTES)):
        raise _corrupt(
            where, f"the index is larger than {MAX_INDEX_BYTES:,} bytes", hint="pass a shard instead"
        )
    raw = tree.read(key)
    if raw is None:
        raise _corrupt(where, "the index is missing", hint="the copy is incomplete")
    try:
        doc = json.loads(raw)
    except RecursionError:
        raise _corrupt(
            where, "the index is not JSON (nested too deeply)", hint="the index is damaged"
        ) from None
    except ValueError as err:
        raise _corrupt(
            where, f"the index is not JSON ({str(err)[:120]})", hint="the index is damaged"
        ) from None
    weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise _corrupt(
            where, "the index has no weight_map of tensor names to files", hint="the index is damaged"
        )
    folder = key.rpartition("/")[0]
    shards = {}
    for shard in set(weight_map.values()):
        parts = shard.split("/")
        if shard.startswith("/") or any(p in ("", ".", "..") for p in parts):
            raise _corrupt(
                where,
                f"the weight_map names {shard[:200]!r}, not a file beside the index",
                hint="the index is damaged",
            )
        shards[shard] = f"{folder}/{shard}" if folder else shard
    # Without a listing (an index file given by itself), reading a missing shard's header says so.
    for shard, rel in sorted(shards.items()) if listed else ():
        if not tree.is_file(rel):
            raise _corrupt(
                where,
                f"the index names the shard {shard!r}, which is missing",
                hint="the download or copy is incomplete",
            )
    metadata = doc.get("metadata")
    if not isinstance(metadata, dict):
        metadata = None
    cache[key] = ({name: shards[shard] for name, shard in weight_map.items()}, metadata)
    return cache[key]


def _weight_map(tree: Tree, key: str, listed: bool) -> dict[str, str]:
    return read_index(tree, key, listed)[0]


def _headers(tree: Tree, files: Iterable[str]) -> list[Header]:
    """The headers of many files, read concurrently (a bucket answers each in a round trip)."""
    cache = _HEADERS.setdefault(tree, {})
    files = list(files)
    missing = [f for f in files if f not in cache]
    if len(missing) > 1:
        with ThreadPoolExecutor(
            max_workers=min(16, len(missing)), thread_name_prefix="paramscope-header"
        ) as pool:
            for key, header in zip(missing, pool.map(lambda f: read_header(tree, f), missing)):
                cache[key] = header
    elif missing:
        cache[missing[0]] = read_header(tree, missing[0])
    return [cache[f] for f in files]


# ----------------------------------------------------------------------------------------------
# The format interface


def read_arrays(item: Item, problems: list[str], values: list | None = None) -> list[StoredArray]:
    """Every tensor of an item, from the headers alone.

    Tensors the index does not place in the file that holds them, and tensors of a dtype numpy
    cannot hold (packed 4- and 6-bit floats), are left out with a line in ``problems``.
    """
    found = layout(item)
    tree = found.tree
    weight_map = _weight_map(tree, found.index, found.listed) if found.index else None
    headers = _headers(tree, found.files)
    store = json.dumps(tree.spec(), sort_keys=True)
    arrays: list[StoredArray] = []
    owner: dict[str, str] = {}
    for key, header in zip(found.files, headers):
        unindexed, unread = [], []
        for tensor in header.tensors:
            if weight_map is not None and weight_map.get(tensor.name) != key:
                unindexed.append(tensor.name)
                continue
            if tensor.name in owner:
                raise CorruptCheckpoint(
                    f"tensor {tensor.name!r} is in both {tree.path(owner[tensor.name])} and {header.file}",
                    hint="pass one of the files, or a folder with a model.safetensors.index.json",
                )
            owner[tensor.name] = key
            dtype = _numpy_name(tensor.code)
            if dtype is None:
                unread.append(f"{tensor.name[:200]!r} ({tensor.code})")
                continue
            arrays.append(
                StoredArray(
                    keys=name_keys(tensor.name),
                    shape=tensor.shape,
                    dtype=dtype,
                    itemsize=DTYPES[tensor.code][1] // 8,
                    chunks=tensor.shape,
                    driver="bytes",
                    store=store,
                    name=key,
                    sharding=None,
                    value_type="np.ndarray",
                    offset=header.data_start + tensor.begin,
                )
            )
        if unindexed:
            problems.append(
                f"{header.file} holds {_some(unindexed)}, which {found.index} does not place there: not read"
            )
        if unread:
            packed = _some(unread, quote=False)
            problems.append(f"{header.file}: tensors of packed 4- and 6-bit dtypes are not read: {packed}")
    if weight_map is not None:
        for name, key in weight_map.items():
            if owner.get(name) != key:
                raise _corrupt(
                    tree.path(found.index),
                    f"the index places tensor {name[:200]!r} in {key}, whose header does not list it",
                    hint="the index and its shards do not belong together",
                )
    if found.index and found.listed:
        beside = sorted(set(k for k in tree.keys() if "/" not in k and k.endswith(SUFFIX)) - set(found.files))
        if beside:
            problems.append(f"{_some(beside)} beside {found.index}, which does not name them: not read")
    return arrays


def _numpy_name(code: str) -> str | None:
    name = DTYPES[code][0]
    if name is None:
        return None
    try:
        return numpy_dtype(name).name
    except (TypeError, AttributeError):  # an ml_dtypes without this type
        return None


def _some(names: list[str], shown: int = 3, quote: bool = True) -> str:
    """The first few names, then how many more."""
    return few([repr(n[:200]) if quote else n for n in names], shown)


def audit_item(item: Item, arrays: list[StoredArray]) -> list[tuple[str | None, str]]:
    """What safetensors forbids but a reader survives: bytes of a data buffer no tensor covers.

    Bounds, overlaps and sizes were checked when the headers were read.
    """
    found = layout(item)
    problems: list[tuple[str | None, str]] = []
    for header in _headers(found.tree, found.files):
        holes = header.holes()
        if holes:
            spans = few([f"{a}-{b}" for a, b in holes], _SHOWN_GAPS)
            problems.append(
                (
                    None,
                    f"{header.file}: bytes {spans} of the data buffer belong to no tensor "
                    "(safetensors requires the tensors to cover it exactly)",
                )
            )
        if header.trailing:
            problems.append(
                (None, f"{header.file}: bytes follow the last tensor's data (safetensors forbids them)")
            )
    return problems


def describe(item: Item) -> dict[str, Any]:
    """``storage`` "safetensors", and ``metadata`` by file: the index's ``metadata`` and each
    file's ``__metadata__`` (None when none has any)."""
    found = layout(item)
    metadata: dict[str, Any] = {}
    prefix = found.index.rpartition("/")[0] + "/" if found.index and "/" in found.index else ""
    if found.index:
        index_metadata = read_index(found.tree, found.index, found.listed)[1]
        if index_metadata is not None:
            metadata[found.index[len(prefix) :]] = index_metadata
    for key, header in zip(found.files, _headers(found.tree, found.files)):
        if header.metadata is not None:
            metadata[key[len(prefix) :] if key.startswith(prefix) else key] = header.metadata
    return {"storage": "safetensors", "metadata": metadata or None}


def disk_usage(item: Item) -> int | None:
    """Bytes of the item's files (the index and the files it reads); None in a bucket."""
    found = layout(item)
    if found.tree.remote:
        return None
    sizes = [found.tree.file_size(k) for k in ((found.index,) if found.index else ()) + found.files]
    return sum(s or 0 for s in sizes)


def name_keys(name: str) -> tuple[str, ...]:
    """A tensor's name as path keys: split at its dots, so that the path shown is the name as
    written (``model.layers.0.weight``); a name whose dots do not split it into plain keys
    (``a..b``) stays one key, shown quoted.

    >>> name_keys("model.layers.0.weight"), name_keys("a..b")
    (('model', 'layers', '0', 'weight'), ('a..b',))
    """
    keys = tuple(name.split("."))
    return keys if all(k and not k.startswith('"') for k in keys) else (name,)
