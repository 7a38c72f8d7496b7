"""Checkpoints stored as one msgpack document: flax.training.checkpoints files and Orbax 0.4 items.

Two writers store a whole pytree as ``msgpack.packb(state_dict)``:

- ``flax.training.checkpoints`` (flax's own format before Orbax): a folder of files
  ``<prefix>_<step>`` (``checkpoint_400``; flax writes ``<prefix>_tmp`` first and renames it). A
  folder of such files is a root with steps; one such file is a single item. Arrays that no
  single host held whole (multi-host saves, ``save_checkpoint_multiprocess``) are strings
  ``//GDAPlaceholder:<a/b/c>``, their data a TensorStore zarr array in the folder
  ``<prefix>_<step>_gda/<a/b/c>``.
- Orbax 0.4 (and older) ``PyTreeCheckpointHandler`` items: a ``checkpoint`` file in the item
  folder. Aggregated leaves are stored in it; the others are strings ``PLACEHOLDER://<name>``
  naming a zarr array ``<name>`` in the item folder (or in its OCDBT database), with its
  sharding in ``_sharding``; string leaves are kept in ``_strings.json``.

flax encodes arrays as msgpack extensions: type 1 (an array) and type 3 (a numpy scalar) hold
the msgpack triple ``[shape, dtype name, C-order little-endian bytes]``, type 2 a Python complex
as ``[real, imag]``. Arrays larger than flax's ``MAX_CHUNK_SIZE`` are the map
``{"__msgpack_chunked_array__": true, "shape": {"0": d0, ...}, "chunks": {"0": <flat piece>,
...}}``: flat 1-d pieces of the C-order array, read here as one array made of byte segments.

Leaves, as numpy sees them: arrays keep their dtype; Python ints are int64 (uint64 above its
range), floats float64, bools bool and complex numbers complex128, each a 0-d array whose value
is kept in its record. Strings, bytes, None and empty containers hold no array and are not
listed. A msgpack array (a tuple or list) has keys ``"0"``, ``"1"``, ...

The document is never unpacked: :func:`_walk` reads its structure (type bytes and lengths) from a
small window that moves through the file, skips every array's data, and records where the data
lies; the data is read later by byte range. Every length is checked against the bytes left in
the file before anything is read or allocated, and nesting is bounded, so a damaged or hostile
file fails in one line, in time and memory bounded by its size.
"""

from __future__ import annotations

import json
import math
import re
import struct
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from paramscope.errors import CorruptCheckpoint, StepNotFound, StorageError
from paramscope.io import orbax
from paramscope.io.records import Item, Location, Step, StoredArray, dtype_info, numpy_dtype
from paramscope.io.storage import Tree, read_range

KIND = "msgpack"

ORBAX_FILE = "checkpoint"  # Orbax <= 0.4: the tree of a PyTreeCheckpointHandler item
STRINGS_FILE = "_strings.json"  # Orbax 0.4: string leaves, by dotted name
PLACEHOLDER = "PLACEHOLDER://"  # Orbax 0.4: a leaf stored beside the file
GDA_PLACEHOLDER = "//GDAPlaceholder:"  # flax: an array in the <file>_gda folder
GDA_SUFFIX = "_gda"
CHUNKED = "__msgpack_chunked_array__"

# A file up to this size is read in one request; a larger one through a window that starts
# small (each array's header is a few bytes before its data) and grows while reads are adjacent.
WHOLE_FILE = 16 << 20
WINDOW = 64 << 10
MAX_WINDOW = 4 << 20
MAX_DEPTH = 128  # nesting levels (real state dicts nest a few dozen at most)
MAX_TEXT = 1 << 16  # bytes of a map key or a placeholder
MAX_NDIM = 64

_STEP_FILE = re.compile(r"^(?:(?P<prefix>.*)_)?(?P<step>\d+)$")
_GDA_FOLDER = re.compile(r"^(?:(?P<prefix>.*)_)?(?P<step>\d+)_gda$")


# ----------------------------------------------------------------------------------------------
# Reading the structure


class _Malformed(Exception):
    """The document breaks the msgpack format or flax's encoding (turned into CorruptCheckpoint)."""


class _Bytes:
    """Bytes of one file by offset: whole when small, else through a moving window."""

    def __init__(self, read: Callable[[int, int], bytes], size: int):
        self.size = size
        self._read = read
        self._start = 0
        self._window = WINDOW
        self._buffer = read(0, size) if size <= WHOLE_FILE else b""

    def take(self, pos: int, count: int) -> bytes:
        """``count`` bytes at ``pos`` (``count`` is small: a header, a key, a placeholder)."""
        if pos + count > self.size:
            raise _Malformed(f"the file ends inside a value (byte {pos:,} of {self.size:,})")
        at = pos - self._start
        if 0 <= at and at + count <= len(self._buffer):
            return self._buffer[at : at + count]
        adjacent = self._start <= pos <= self._start + len(self._buffer) + self._window
        self._window = min(MAX_WINDOW, self._window * 2) if adjacent else WINDOW
        self._start = pos
        self._buffer = self._read(pos, min(self.size, pos + max(count, self._window)))
        return self._buffer[:count]


# type byte -> (kind, struct format of what follows it); fixed-size kinds decode the value
_HEADS: dict[int, tuple[str, str]] = {
    0xC4: ("bin", ">B"),
    0xC5: ("bin", ">H"),
    0xC6: ("bin", ">I"),
    0xC7: ("ext", ">Bb"),
    0xC8: ("ext", ">Hb"),
    0xC9: ("ext", ">Ib"),
    0xCA: ("float", ">f"),
    0xCB: ("float", ">d"),
    0xCC: ("int", ">B"),
    0xCD: ("int", ">H"),
    0xCE: ("int", ">I"),
    0xCF: ("int", ">Q"),
    0xD0: ("int", ">b"),
    0xD1: ("int", ">h"),
    0xD2: ("int", ">i"),
    0xD3: ("int", ">q"),
    0xD4: ("fixext", ">b"),
    0xD5: ("fixext", ">b"),
    0xD6: ("fixext", ">b"),
    0xD7: ("fixext", ">b"),
    0xD8: ("fixext", ">b"),
    0xD9: ("str", ">B"),
    0xDA: ("str", ">H"),
    0xDB: ("str", ">I"),
    0xDC: ("array", ">H"),
    0xDD: ("array", ">I"),
    0xDE: ("map", ">H"),
    0xDF: ("map", ">I"),
}


def _head(src: _Bytes, pos: int) -> tuple[str, int, Any]:
    """(kind, position after the header, argument) of the value at ``pos``: the value of ints,
    floats, bools; the length of str/bin; the entry count of map/array; (length, type) of ext.
    Lengths are checked against the bytes left in the file."""
    first = src.take(pos, 1)[0]
    if first <= 0x7F:
        return "int", pos + 1, first
    if first >= 0xE0:
        return "int", pos + 1, first - 0x100
    if first <= 0x8F:
        kind, arg, after = "map", first & 0x0F, pos + 1
    elif first <= 0x9F:
        kind, arg, after = "array", first & 0x0F, pos + 1
    elif first <= 0xBF:
        kind, arg, after = "str", first & 0x1F, pos + 1
    elif first == 0xC0:
        return "nil", pos + 1, None
    elif first in (0xC2, 0xC3):
        return "bool", pos + 1, first == 0xC3
    elif first == 0xC1:
        raise _Malformed(f"byte {pos:,} (0xc1) is not msgpack")
    else:
        kind, fmt = _HEADS[first]
        size = struct.calcsize(fmt)
        fields = struct.unpack(fmt, src.take(pos + 1, size))
        after = pos + 1 + size
        if kind in ("int", "float"):
            return kind, after, fields[0]
        if kind == "fixext":
            kind, arg = "ext", (1 << (first - 0xD4), fields[0])
        else:
            arg = fields if kind == "ext" else fields[0]
    left = src.size - after
    article = "an" if kind[0] in "ae" else "a"
    if kind in ("map", "array"):
        if arg * (2 if kind == "map" else 1) > left:  # every entry takes at least a byte
            raise _Malformed(
                f"{article} {kind} of {arg:,} entries at byte {pos:,} runs past the end of the file"
            )
    elif (arg[0] if kind == "ext" else arg) > left:
        length = arg[0] if kind == "ext" else arg
        raise _Malformed(
            f"{article} {kind} of {length:,} bytes at byte {pos:,} runs past the end of the file"
        )
    return kind, after, arg


@dataclass
class _Leaf:
    """One leaf of the document, in document order."""

    keys: tuple[str, ...]
    kind: str  # "array", "value", "text" (a string; placeholders kept), "other" (bytes)
    shape: tuple[int, ...] = ()
    dtype: str = ""
    segments: tuple[tuple[int, int], ...] = ()  # (file offset, bytes) of an array's data
    value: Any = None  # a scalar's value; a placeholder string


def _walk(src: _Bytes) -> list[_Leaf]:
    """Every leaf of a msgpack document, without reading array data. Iterative: nesting costs
    no Python recursion, and is refused past :data:`MAX_DEPTH`."""
    leaves: list[_Leaf] = []
    stack: list[list] = []  # [is map, entries left, keys, next index]
    pos, keys = 0, ()
    while True:
        kind, after, arg = _head(src, pos)
        if kind in ("map", "array"):
            if len(stack) >= MAX_DEPTH:
                raise _Malformed(f"nesting deeper than {MAX_DEPTH} levels at byte {pos:,}")
            pos = after
            if arg:
                stack.append([kind == "map", arg, keys, 0])
        else:
            pos = _leaf(src, pos, kind, after, arg, keys, leaves)
        while stack:
            frame = stack[-1]
            if not frame[1]:
                stack.pop()
                continue
            frame[1] -= 1
            if frame[0]:
                key, pos = _key(src, pos)
            else:
                key = str(frame[3])
            frame[3] += 1
            keys = (*frame[2], key)
            break
        else:
            break
    if pos != src.size:
        raise _Malformed(f"the document ends at byte {pos:,}, the file at byte {src.size:,}")
    return _join_chunked(leaves)


def _key(src: _Bytes, pos: int) -> tuple[str, int]:
    """A map key (a string, bytes or an int) and the position after it."""
    kind, after, arg = _head(src, pos)
    if kind == "int":
        return str(arg), after
    if kind in ("str", "bin"):
        if arg > MAX_TEXT:
            raise _Malformed(f"a map key of {arg:,} bytes at byte {pos:,}")
        return _text(src.take(after, arg), pos), after + arg
    raise _Malformed(f"a map key at byte {pos:,} is a {kind}, not a string")


def _text(raw: bytes, pos: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise _Malformed(f"the string at byte {pos:,} is not UTF-8") from None


def _scalar_dtype(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int64" if value < 1 << 63 else "uint64"
    return "float64"


def _leaf(src: _Bytes, pos: int, kind: str, after: int, arg: Any, keys: tuple, leaves: list) -> int:
    """Records the leaf at ``pos`` (of header ``kind``/``after``/``arg``); returns where it ends."""
    if kind in ("int", "float", "bool"):
        leaves.append(_Leaf(keys, "value", dtype=_scalar_dtype(arg), value=arg))
        return after
    if kind == "nil":
        return after
    if kind == "str":
        text = None
        for marker in (PLACEHOLDER, GDA_PLACEHOLDER):
            if arg >= len(marker) and src.take(after, len(marker)) == marker.encode():
                if arg > MAX_TEXT:
                    raise _Malformed(f"a placeholder of {arg:,} bytes at byte {pos:,}")
                text = _text(src.take(after, arg), pos)
        leaves.append(_Leaf(keys, "text", value=text))
        return after + arg
    if kind == "bin":
        leaves.append(_Leaf(keys, "other"))
        return after + arg
    length, code = arg
    end = after + length
    if code in (1, 3):  # an array; a numpy scalar stored as a 0-d array
        shape, dtype, start, nbytes = _array_payload(src, after, end)
        leaves.append(_Leaf(keys, "array", shape, dtype, ((start, nbytes),)))
    elif code == 2:  # a Python complex: [real, imag]
        leaves.append(_Leaf(keys, "value", dtype="complex128", value=_complex_payload(src, after, end)))
    else:
        raise _Malformed(f"unknown msgpack extension type {code} at byte {pos:,}")
    return end


def _payload_head(src: _Bytes, pos: int, end: int) -> tuple[str, int, Any]:
    kind, after, arg = _head(src, pos)
    extent = arg[0] if kind == "ext" else arg if kind in ("str", "bin") else 0
    if after + extent > end:
        raise _Malformed(f"a value at byte {pos:,} runs past the end of its extension")
    return kind, after, arg


def _array_payload(src: _Bytes, pos: int, end: int) -> tuple[tuple[int, ...], str, int, int]:
    """(shape, numpy dtype name, data offset, data bytes) of flax's ``[shape, dtype, bytes]``."""
    kind, pos, count = _payload_head(src, pos, end)
    if kind != "array" or count != 3:
        raise _Malformed(f"the array at byte {pos:,} is not [shape, dtype, data]")
    kind, pos, ndim = _payload_head(src, pos, end)
    if kind != "array" or ndim > MAX_NDIM:
        raise _Malformed(f"the shape at byte {pos:,} is not a list of at most {MAX_NDIM} sizes")
    shape = []
    for _ in range(ndim):
        kind, pos, dim = _payload_head(src, pos, end)
        if kind != "int" or dim < 0:
            raise _Malformed(f"a dimension at byte {pos:,} is not a size")
        shape.append(dim)
    kind, after, length = _payload_head(src, pos, end)
    if kind not in ("str", "bin") or length > 64:
        raise _Malformed(f"the dtype at byte {pos:,} is not a dtype name")
    name = _text(src.take(after, length), pos)
    try:
        dtype, itemsize = dtype_info(name)
        if not _numeric(name):
            raise TypeError
    except (TypeError, AttributeError, ValueError):
        raise _Malformed(f"unknown dtype {name[:32]!r} at byte {pos:,}") from None
    pos = after + length
    kind, start, nbytes = _payload_head(src, pos, end)
    expected = math.prod(shape) * itemsize
    if kind not in ("str", "bin") or start + nbytes != end or nbytes != expected:
        raise _Malformed(f"the data of a {dtype}{shape} array at byte {pos:,} is not {expected:,} bytes")
    return tuple(shape), dtype, start, nbytes


def _numeric(name: str) -> bool:
    """Whether a dtype holds numbers: numpy's bool, int, float and complex, or ml_dtypes' types
    (bfloat16, float8_*, int4, ...); not objects, strings, dates or structures."""
    dtype = numpy_dtype(name)
    return dtype.kind in "biufc" or (dtype.kind == "V" and dtype.type.__module__ == "ml_dtypes")


def _complex_payload(src: _Bytes, pos: int, end: int) -> list[float]:
    kind, pos, count = _payload_head(src, pos, end)
    parts = []
    for _ in range(count if kind == "array" and count == 2 else 0):
        kind, pos, part = _payload_head(src, pos, end)
        if kind in ("int", "float") and not isinstance(part, bool):
            parts.append(float(part))
    if len(parts) != 2 or pos != end:
        raise _Malformed(f"the complex number before byte {end:,} is not [real, imag]")
    return parts


def _join_chunked(leaves: list[_Leaf]) -> list[_Leaf]:
    """Leaves with each ``__msgpack_chunked_array__`` map made one array of its pieces."""
    owners = {leaf.keys[:-1] for leaf in leaves if leaf.keys and leaf.keys[-1] == CHUNKED}
    if not owners:
        return leaves
    parts: dict[tuple, list[_Leaf]] = {owner: [] for owner in owners}
    out: list[_Leaf] = []
    for leaf in leaves:
        owner = next((leaf.keys[:n] for n in range(len(leaf.keys)) if leaf.keys[:n] in owners), None)
        if owner is None:
            out.append(leaf)
            continue
        if not parts[owner]:
            out.append(_Leaf(owner, "array"))  # filled in below, at the map's place
        parts[owner].append(leaf)
    for i, leaf in enumerate(out):
        if leaf.kind == "array" and leaf.keys in parts and not leaf.segments:
            out[i] = _chunked_array(leaf.keys, parts[leaf.keys])
    return out


def _chunked_array(owner: tuple, parts: list[_Leaf]) -> _Leaf:
    name = ".".join(owner) or "the document"
    shape: dict[int, int] = {}
    chunks: dict[int, _Leaf] = {}
    marker = False
    for leaf in parts:
        rest = leaf.keys[len(owner) :]
        if rest == (CHUNKED,) and leaf.kind == "value" and leaf.value is True:
            marker = True
        elif len(rest) == 2 and rest[0] == "shape" and rest[1].isdigit() and leaf.dtype == "int64":
            shape[int(rest[1])] = leaf.value
        elif len(rest) == 2 and rest[0] == "chunks" and rest[1].isdigit() and leaf.kind == "array":
            chunks[int(rest[1])] = leaf
        else:
            raise _Malformed(f"the chunked array {name!r} has an unexpected entry {'.'.join(rest)!r}")
    dims = [shape.get(i, -1) for i in range(len(shape))]
    pieces = [chunks.get(i) for i in range(len(chunks))]
    dtypes = {p.dtype for p in pieces if p is not None}
    if (
        not marker
        or any(d < 0 for d in dims)
        or not pieces
        or any(p is None or len(p.shape) != 1 for p in pieces)
        or len(dtypes) != 1
        or sum(p.shape[0] for p in pieces) != math.prod(dims)
    ):
        raise _Malformed(f"the chunked array {name!r} is not a shape and flat pieces that fill it")
    segments = tuple(segment for piece in pieces for segment in piece.segments)
    return _Leaf(owner, "array", tuple(dims), dtypes.pop(), segments)


# ----------------------------------------------------------------------------------------------
# Files, items and locations


@dataclass
class _Document:
    """One parsed msgpack file: where it is, and its leaves."""

    tree: Tree  # the tree holding the file (and, for Orbax items, the arrays beside it)
    folder: str  # the file's folder inside ``tree``
    name: str  # the file's name in that folder
    leaves: list[_Leaf]

    @property
    def rel(self) -> str:
        return _join(self.folder, self.name)


class _FileTree(Tree):
    """The folder of one file, holding just that file: a file given alone is read without
    listing its folder, which may hold anything."""

    def __init__(self, folder: str, name: str):
        super().__init__(folder)
        self._keys = frozenset({name})


_DOCUMENTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tree -> {file: _Document}


def _join(*parts: str) -> str:
    return "/".join(p for p in parts if p)


def _file_of(item: Item) -> tuple[str, str, bool]:
    """(folder, file name, whether the item is an Orbax item folder) of an item's msgpack file."""
    if item.rel and item.tree.is_file(item.rel):
        folder, _, name = item.rel.rpartition("/")
        return folder, name, False
    return item.rel, ORBAX_FILE, True


def _document(item: Item) -> _Document:
    folder, name, _ = _file_of(item)
    cache = _DOCUMENTS.setdefault(item.tree, {})
    rel = _join(folder, name)
    if rel not in cache:
        cache[rel] = _Document(item.tree, folder, name, _read_leaves(item.tree, folder, name))
    return cache[rel]


def _read_leaves(tree: Tree, folder: str, name: str) -> list[_Leaf]:
    rel = _join(folder, name)
    size = tree.file_size(rel)
    if size is None:
        raise CorruptCheckpoint(
            f"{tree.path(rel)} is missing", hint="the checkpoint's files changed or are incomplete"
        )
    store = json.dumps(tree.spec(folder), sort_keys=True)
    try:
        return _walk(_Bytes(lambda lo, hi: read_range(store, name, lo, hi), size))
    except _Malformed as err:
        raise CorruptCheckpoint(
            f"{tree.path(rel)} is not a readable msgpack checkpoint: {err}",
            hint="the file is truncated or damaged",
        ) from None


def _looks_like_msgpack(head: bytes) -> bool:
    """Whether a file starts the way flax's checkpoint files do: a map whose first key is a
    string (or an empty map), one array extension, or a multi-host placeholder."""
    if not head:
        return False
    first = head[0]
    key_at = 1 if 0x80 <= first <= 0x8F else 3 if first == 0xDE else 5 if first == 0xDF else None
    if key_at is not None:
        if first == 0x80:
            return len(head) == 1
        return len(head) > key_at and (0xA0 <= head[key_at] <= 0xBF or 0xD9 <= head[key_at] <= 0xDB)
    code_at = {0xC7: 2, 0xC8: 3, 0xC9: 5, **{b: 1 for b in range(0xD4, 0xD9)}}.get(first)
    if code_at is not None:
        return len(head) > code_at and head[code_at] in (1, 3)
    return GDA_PLACEHOLDER.encode() in head[:24]


def _sniff(tree: Tree, rel: str) -> bool:
    """Whether a file of the tree starts like a flax checkpoint (one or two small reads)."""
    folder, _, name = rel.rpartition("/")
    store = json.dumps(tree.spec(folder), sort_keys=True)
    try:
        head = read_range(store, name, 0, 24)
    except StorageError:  # shorter than that, or the store failed (then file_size or the read says so)
        size = tree.file_size(rel)
        if not size:
            return False
        head = read_range(store, name, 0, min(24, size))
    return _looks_like_msgpack(head)


def _item_name(file_name: str) -> str:
    """A flax file's item: the files' prefix (``checkpoint``), the same at every step."""
    match = _STEP_FILE.match(file_name)
    if match is None:
        return file_name
    return match.group("prefix") or ORBAX_FILE


def locate(tree: Tree, step: int | None) -> Location | None:
    """A flax.training.checkpoints file, or a folder of them (a root with steps); None for
    anything else. (Orbax 0.4 items are found by the Orbax layout code.)"""
    if not tree.keys():
        if not tree.root_is_file():
            return None
        folder, _, name = tree.display.rstrip("/").rpartition("/")
        single = _FileTree(folder or "/", name)
        if not _sniff(single, name):
            return None
        if step is not None:
            raise StepNotFound(
                f"--step {step} given, but {tree.display} is a single file", hint="pass its folder"
            )
        item = Item(_item_name(name), tree.display, KIND, single, name)
        return Location(tree.display, "item", None, [item], selected_item=item.name, tree=single)

    files: list[tuple[int, str]] = []
    unfinished: dict[int, str] = {}
    for key in tree.keys():
        head, _, rest = key.partition("/")
        match = _STEP_FILE.match(key)
        if match and not rest:
            files.append((int(match.group("step")), key))
        gda = _GDA_FOLDER.match(head)
        if gda and rest:
            unfinished[int(gda.group("step"))] = head[: -len(GDA_SUFFIX)]
    files.sort()
    if not files or not _sniff(tree, files[-1][1]):
        return None
    done = {name for _, name in files}
    steps = [Step(name, tree.path(name), number, True) for number, name in files]
    steps += [
        Step(name, tree.path(name), number, False) for number, name in unfinished.items() if name not in done
    ]
    steps.sort(key=lambda s: (s.step, s.finished, s.name))
    if step is None:
        chosen = [s for s in steps if s.finished][-1]
    else:
        matches = [s for s in steps if s.finished and s.step == step]
        if not matches:
            available = ", ".join(str(number) for number, _ in files)
            raise StepNotFound(
                f"no finished step {step} in {tree.display}", hint=f"finished steps: {available}"
            )
        chosen = matches[-1]
    item = Item(_item_name(chosen.name), chosen.path, KIND, tree, chosen.name)
    return Location(tree.display, "root", chosen, [item], steps=steps, tree=tree, step_rel=chosen.name)


# ----------------------------------------------------------------------------------------------
# Arrays


def _strings(tree: Tree, folder: str, problems: list[str]) -> set[str]:
    """Names of the string leaves an Orbax 0.4 item keeps in ``_strings.json``."""
    rel = _join(folder, STRINGS_FILE)
    if not tree.is_file(rel):
        return set()
    try:
        found = orbax.read_json(tree, rel)
    except CorruptCheckpoint as err:
        problems.append(err.message)
        return set()
    if not isinstance(found, dict):
        problems.append(f"{tree.path(rel)} is not a JSON object")
        return set()
    return set(found)


def _safe_name(name: str) -> bool:
    """Whether an array name from a placeholder stays inside its folder."""
    parts = name.split("/")
    return bool(name) and not name.startswith("/") and all(p not in ("", ".", "..") for p in parts)


def _placeholders(doc: _Document, orbax_item: bool, strings: set[str]) -> list[tuple[_Leaf, str]]:
    """(leaf, array name) of each placeholder leaf that names an array (strings are skipped)."""
    marker = PLACEHOLDER if orbax_item else GDA_PLACEHOLDER
    found = []
    for leaf in doc.leaves:
        if leaf.kind != "text" or not isinstance(leaf.value, str) or not leaf.value.startswith(marker):
            continue
        name = leaf.value[len(marker) :]
        if orbax_item and name in strings:
            continue
        if not (_safe_name(name) or (name == "" and not orbax_item)):
            raise CorruptCheckpoint(
                f"{doc.tree.path(doc.rel)} has a placeholder {leaf.value[:80]!r} naming no array",
                hint="the file is damaged",
            )
        found.append((leaf, name))
    return found


def _gda_store(doc: _Document) -> tuple[dict[str, Any], str]:
    """(kvstore spec, prefix of names) of a flax file's ``<file>_gda`` folder."""
    return doc.tree.spec(doc.folder), doc.name + GDA_SUFFIX


def read_arrays(item: Item, problems: list[str]) -> list[StoredArray]:
    """Every array of the item, from the msgpack structure (and the zarr metadata of the arrays
    stored beside it); no array data is read."""
    doc = _document(item)
    _, _, orbax_item = _file_of(item)
    strings = _strings(doc.tree, doc.folder, problems) if orbax_item else set()
    store = json.dumps(doc.tree.spec(doc.folder), sort_keys=True)
    root = (item.name,)
    slots: list[StoredArray | None] = []
    for leaf in doc.leaves:
        keys = leaf.keys or root
        if leaf.kind == "array":
            dtype, itemsize = dtype_info(leaf.dtype)
            (first, _), *more = leaf.segments
            slots.append(
                StoredArray(
                    keys=keys,
                    shape=leaf.shape,
                    dtype=dtype,
                    itemsize=itemsize,
                    chunks=leaf.shape,
                    driver="bytes",
                    store=store,
                    name=doc.name,
                    sharding=None,
                    value_type="np.ndarray",
                    metadata_template=json.dumps([list(s) for s in leaf.segments]) if more else "",
                    offset=-1 if more else first,
                )
            )
        elif leaf.kind == "value":
            dtype, itemsize = dtype_info(leaf.dtype)
            slots.append(
                StoredArray(
                    keys=keys,
                    shape=(),
                    dtype=dtype,
                    itemsize=itemsize,
                    chunks=(),
                    driver="value",
                    store=store,
                    name=doc.name,
                    sharding=None,
                    value_type="scalar",
                    metadata_template=json.dumps(leaf.value),
                )
            )
        else:
            slots.append(None)
    placeholders = _placeholders(doc, orbax_item, strings)
    if placeholders:
        where = f"item {item.name!r}"
        if orbax_item:
            kv = orbax._kvstore_spec(doc.tree, doc.folder)
            shardings = orbax._read_shardings(doc.tree, doc.folder, problems, expected=False)
            entries = [(leaf.keys or root, name, "jax.Array") for leaf, name in placeholders]
        else:
            kv, prefix = _gda_store(doc)
            shardings = {}
            entries = [(leaf.keys or root, _join(prefix, name), "jax.Array") for leaf, name in placeholders]
        stored = iter(orbax.zarr_arrays(kv, entries, shardings, where))
        by_leaf = {id(leaf): next(stored) for leaf, _ in placeholders}
        slots = [by_leaf.get(id(leaf), slot) for leaf, slot in zip(doc.leaves, slots)]
    arrays = [slot for slot in slots if slot is not None]
    seen: set[str] = set()
    for array in arrays:
        if array.path in seen:
            raise CorruptCheckpoint(
                f"{doc.tree.path(doc.rel)} holds two values at {array.path!r}", hint="the file is damaged"
            )
        seen.add(array.path)
    return arrays


# ----------------------------------------------------------------------------------------------
# verify and info


def _metadata_leaves(tree: Tree, folder: str) -> set[str] | None:
    """Dotted names of the leaves an Orbax 0.4 ``_METADATA`` lists (None leaves left out);
    None when there is no ``_METADATA``; CorruptCheckpoint when it is unreadable."""
    rel = _join(folder, orbax.TREE_METADATA)
    if not tree.is_file(rel):
        return None
    meta = orbax.read_json(tree, rel)
    entries = meta.get("tree_metadata") if isinstance(meta, dict) else None
    if not isinstance(entries, dict):
        raise CorruptCheckpoint(
            f"{tree.path(rel)} has no tree_metadata", hint="the item's metadata is damaged"
        )
    names = set()
    for entry in entries.values():
        try:
            keys = [str(k["key"]) for k in entry["key_metadata"]]
            value_type = (entry.get("value_metadata") or {}).get("value_type")
        except (KeyError, TypeError, AttributeError):
            raise CorruptCheckpoint(
                f"{tree.path(rel)} has an entry of unexpected structure",
                hint="the item's metadata is damaged",
            ) from None
        if value_type not in ("None", None):
            names.add(".".join(keys))
    return names


def _stored_zarr_names(tree: Tree, folder: str) -> set[str]:
    """Names of the zarr arrays in a plain folder of the tree, from its listing."""
    names = set()
    prefix = folder + "/" if folder else ""
    for key in tree.keys():
        if key.startswith(prefix):
            for suffix in ("/.zarray", "/zarr.json"):
                if key.endswith(suffix):
                    names.add(key[len(prefix) : -len(suffix)])
    return names


def audit_item(item: Item, arrays: list[StoredArray]) -> list[tuple[str | None, str]]:
    """Where the msgpack tree, ``_METADATA``, ``_strings.json``, ``_sharding`` and the arrays
    stored beside the file disagree (for ``verify``)."""
    doc = _document(item)
    _, _, orbax_item = _file_of(item)
    problems: list[tuple[str | None, str]] = []
    if not orbax_item:
        gda = [name for _, name in _placeholders(doc, False, set())]
        if gda:
            kv, prefix = _gda_store(doc)
            gda_tree = doc.tree if not isinstance(doc.tree, _FileTree) else Tree(doc.tree.path(prefix))
            base = _join(doc.folder, prefix) if gda_tree is doc.tree else ""
            for name in sorted(_stored_zarr_names(gda_tree, base) - set(gda)):
                problems.append((name, f"stored in {prefix}/, but no placeholder in {doc.name} names it"))
            if doc.tree.scheme == "gs" and not gda_tree.is_file(_join(base, orbax.COMMIT_MARKER)):
                problems.append(
                    (None, f"{prefix}/{orbax.COMMIT_MARKER} is missing: flax refuses to restore it from GCS")
                )
        return problems

    named = {name for _, name in _placeholders(doc, True, _strings(doc.tree, doc.folder, []))}
    try:
        listed = _metadata_leaves(doc.tree, doc.folder)
    except CorruptCheckpoint as err:
        problems.append((None, err.message))
        listed = None
    if listed is not None:
        in_file = {".".join(leaf.keys) for leaf in doc.leaves}
        for name in sorted(listed - in_file):
            problems.append((name, f"listed in {orbax.TREE_METADATA}, but not in {ORBAX_FILE}"))
        for name in sorted(in_file - listed):
            problems.append((name, f"in {ORBAX_FILE}, but not listed in {orbax.TREE_METADATA}"))
    kv = orbax._kvstore_spec(doc.tree, doc.folder)
    if kv.get("driver") == "ocdbt":
        stored = orbax._stored_array_names(kv)
    else:
        stored = _stored_zarr_names(doc.tree, doc.folder)
    for name in sorted(stored - named):
        problems.append((name, f"stored, but no placeholder in {ORBAX_FILE} names it"))
    shardings = orbax._read_shardings(doc.tree, doc.folder, [], expected=False)
    for name in sorted(set(shardings) - named):
        problems.append((name, f"{orbax.SHARDING_FILE} has an entry for an array {ORBAX_FILE} does not hold"))
    return problems


def describe(item: Item) -> dict[str, Any]:
    """``storage``: "msgpack" (arrays in the file), "zarr"/"ocdbt" (arrays beside it), or both
    joined by "+"."""
    doc = _document(item)
    _, _, orbax_item = _file_of(item)
    inline = any(leaf.kind in ("array", "value") for leaf in doc.leaves)
    beside = _placeholders(doc, orbax_item, _strings(doc.tree, doc.folder, []) if orbax_item else set())
    kinds = ["msgpack"] if inline or not beside else []
    if beside:
        ocdbt = orbax_item and doc.tree.is_file(_join(doc.folder, orbax.OCDBT_MANIFEST))
        kinds.append("ocdbt" if ocdbt else "zarr")
    return {"storage": "+".join(kinds), "metadata": None}


def disk_usage(item: Item) -> int | None:
    """Bytes of the item's files (a flax file with its ``_gda`` folder); None in buckets."""
    folder, name, orbax_item = _file_of(item)
    if item.tree.remote:
        return None
    if orbax_item:
        return item.tree.size(item.rel)
    total = item.tree.file_size(_join(folder, name)) or 0
    if isinstance(item.tree, _FileTree):
        import os

        gda = item.tree.path(name + GDA_SUFFIX)
        return total + (Tree(gda).size() or 0 if os.path.isdir(gda) else 0)
    return total + (item.tree.size(_join(folder, name + GDA_SUFFIX)) or 0)
