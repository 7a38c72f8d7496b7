"""flax's msgpack encoding of a pytree, walked without unpacking the document.

``flax.serialization.msgpack_serialize`` (and Orbax <= 0.4, which reuses it) writes a state dict
as nested msgpack maps and arrays. Arrays are extensions: type 1 (an array) and type 3 (a numpy
scalar) hold the msgpack triple ``[shape, dtype name, C-order little-endian bytes]``, type 2 a
Python complex as ``[real, imag]``. Arrays larger than flax's ``MAX_CHUNK_SIZE`` are the map
``{"__msgpack_chunked_array__": true, "shape": {"0": d0, ...}, "chunks": {"0": <flat piece>,
...}}`` of flat 1-d pieces of the C-order array.

:func:`walk` reads only the structure (type bytes, lengths, keys, the small array headers) from
a window that moves through the file, skips every array's data and records where it lies, so
the data can be read later by byte range. Every length is checked against the bytes left in the
file before anything is read or allocated, nesting is bounded and never recursive, so a damaged
or hostile file ends in one :class:`Malformed`, in time and memory bounded by its size. (msgpack's
own unpacker would need the whole file in memory and gives no offsets.)
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from paramscope.io.records import dtype_info, numpy_dtype

CHUNKED = "__msgpack_chunked_array__"

# A file up to this size is read in one request; a larger one through a window that starts
# small (each array's header is a few bytes before its data) and grows while reads are adjacent.
WHOLE_FILE = 16 << 20
WINDOW = 64 << 10
MAX_WINDOW = 4 << 20
MAX_DEPTH = 128  # nesting levels (real state dicts nest a few dozen at most)
MAX_TEXT = 1 << 16  # bytes of a map key or a placeholder
MAX_NDIM = 64
# Leaves of one document: real pytrees hold thousands of arrays, not hundreds of thousands; each
# leaf costs a few kilobytes and some tens of microseconds once listed, so a 1 MB file of a
# million one-byte ints would take gigabytes and minutes to show.
MAX_LEAVES = 100_000
# Values of any kind walked in one document (maps, lists, nils, leaves): a file of a million
# empty maps holds no leaf, but walking it is not free either.
MAX_VALUES = 1_000_000


class Malformed(Exception):
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
            raise Malformed(f"the file ends inside a value (byte {pos:,} of {self.size:,})")
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
        raise Malformed(f"byte {pos:,} (0xc1) is not msgpack")
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
            raise Malformed(
                f"{article} {kind} of {arg:,} entries at byte {pos:,} runs past the end of the file"
            )
    elif (arg[0] if kind == "ext" else arg) > left:
        length = arg[0] if kind == "ext" else arg
        raise Malformed(f"{article} {kind} of {length:,} bytes at byte {pos:,} runs past the end of the file")
    return kind, after, arg


@dataclass(slots=True)
class Leaf:
    """One leaf of the document, in document order."""

    keys: tuple[str, ...]
    kind: str  # "array", "value", "text" (a string; placeholders kept), "other" (bytes)
    shape: tuple[int, ...] = ()
    dtype: str = ""
    segments: tuple[tuple[int, int], ...] = ()  # (file offset, bytes) of an array's data
    value: Any = None  # a scalar's value; a placeholder string
    byteorder: str = "<"  # an array's: flax writes little-endian, a dtype name may say ``>f4``


def _walk_document(src: _Bytes, markers: tuple[str, ...]) -> list[Leaf]:
    """Every leaf of a msgpack document, without reading array data. Iterative: nesting costs
    no Python recursion, and is refused past :data:`MAX_DEPTH`."""
    leaves: list[Leaf] = []
    stack: list[list] = []  # [is map, entries left, keys, next index]
    pos, keys, values = 0, (), 0
    while True:
        kind, after, arg = _head(src, pos)
        values += 1
        if values > MAX_VALUES:
            raise Malformed(f"more than {MAX_VALUES:,} values (at byte {pos:,})")
        if kind in ("map", "array"):
            if len(stack) >= MAX_DEPTH:
                raise Malformed(f"nesting deeper than {MAX_DEPTH} levels at byte {pos:,}")
            pos = after
            if arg:
                stack.append([kind == "map", arg, keys, 0])
        else:
            pos = _leaf(src, pos, kind, after, arg, keys, leaves, markers)
            if len(leaves) > MAX_LEAVES:
                raise Malformed(f"more than {MAX_LEAVES:,} leaves (at byte {pos:,})")
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
        raise Malformed(f"the document ends at byte {pos:,}, the file at byte {src.size:,}")
    return _join_chunked(leaves)


def _key(src: _Bytes, pos: int) -> tuple[str, int]:
    """A map key (a string, bytes or an int) and the position after it."""
    kind, after, arg = _head(src, pos)
    if kind == "int":
        return str(arg), after
    if kind in ("str", "bin"):
        if arg > MAX_TEXT:
            raise Malformed(f"a map key of {arg:,} bytes at byte {pos:,}")
        return _text(src.take(after, arg), pos), after + arg
    raise Malformed(f"a map key at byte {pos:,} is a {kind}, not a string")


def _text(raw: bytes, pos: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise Malformed(f"the string at byte {pos:,} is not UTF-8") from None


def _scalar_dtype(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int64" if value < 1 << 63 else "uint64"
    return "float64"


def _leaf(
    src: _Bytes,
    pos: int,
    kind: str,
    after: int,
    arg: Any,
    keys: tuple,
    leaves: list,
    markers: tuple[str, ...],
) -> int:
    """Records the leaf at ``pos`` (of header ``kind``/``after``/``arg``); returns where it ends."""
    if kind in ("int", "float", "bool"):
        leaves.append(Leaf(keys, "value", dtype=_scalar_dtype(arg), value=arg))
        return after
    if kind == "nil":
        return after
    if kind == "str":
        text = None
        for marker in markers:
            if arg >= len(marker) and src.take(after, len(marker)) == marker.encode():
                if arg > MAX_TEXT:
                    raise Malformed(f"a placeholder of {arg:,} bytes at byte {pos:,}")
                text = _text(src.take(after, arg), pos)
        if text is None and arg <= MAX_TEXT:  # a string leaf, shown as a value
            text = src.take(after, arg).decode("utf-8", "replace")
        leaves.append(Leaf(keys, "text", value=text))
        return after + arg
    if kind == "bin":
        leaves.append(Leaf(keys, "other"))
        return after + arg
    length, code = arg
    end = after + length
    if code in (1, 3):  # an array; a numpy scalar stored as a 0-d array
        shape, dtype, start, nbytes, order = _array_payload(src, after, end)
        leaves.append(Leaf(keys, "array", shape, dtype, ((start, nbytes),), byteorder=order))
    elif code == 2:  # a Python complex: [real, imag]
        leaves.append(Leaf(keys, "value", dtype="complex128", value=_complex_payload(src, after, end)))
    else:
        raise Malformed(f"unknown msgpack extension type {code} at byte {pos:,}")
    return end


def _payload_head(src: _Bytes, pos: int, end: int) -> tuple[str, int, Any]:
    kind, after, arg = _head(src, pos)
    extent = arg[0] if kind == "ext" else arg if kind in ("str", "bin") else 0
    if after + extent > end:
        raise Malformed(f"a value at byte {pos:,} runs past the end of its extension")
    return kind, after, arg


def _array_payload(src: _Bytes, pos: int, end: int) -> tuple[tuple[int, ...], str, int, int, str]:
    """(shape, numpy dtype name, data offset, data bytes, byte order) of flax's ``[shape, dtype,
    bytes]``. The byte order is ">" where the dtype name says so (``>f4``, as numpy writes a
    big-endian dtype), else "<"."""
    kind, pos, count = _payload_head(src, pos, end)
    if kind != "array" or count != 3:
        raise Malformed(f"the array at byte {pos:,} is not [shape, dtype, data]")
    kind, pos, ndim = _payload_head(src, pos, end)
    if kind != "array" or ndim > MAX_NDIM:
        raise Malformed(f"the shape at byte {pos:,} is not a list of at most {MAX_NDIM} sizes")
    shape = []
    for _ in range(ndim):
        kind, pos, dim = _payload_head(src, pos, end)
        if kind != "int" or dim < 0:
            raise Malformed(f"a dimension at byte {pos:,} is not a size")
        shape.append(dim)
    kind, after, length = _payload_head(src, pos, end)
    if kind not in ("str", "bin") or length > 64:
        raise Malformed(f"the dtype at byte {pos:,} is not a dtype name")
    name = _text(src.take(after, length), pos)
    try:
        dtype, itemsize = dtype_info(name)
        if not _numeric(name):
            raise TypeError
    except (TypeError, AttributeError, ValueError):
        raise Malformed(f"unknown dtype {name[:32]!r} at byte {pos:,}") from None
    order = ">" if numpy_dtype(name).str[0] == ">" else "<"
    pos = after + length
    kind, start, nbytes = _payload_head(src, pos, end)
    expected = math.prod(shape) * itemsize
    if kind not in ("str", "bin") or start + nbytes != end or nbytes != expected:
        raise Malformed(f"the data of a {dtype}{shape} array at byte {pos:,} is not {expected:,} bytes")
    return tuple(shape), dtype, start, nbytes, order


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
        raise Malformed(f"the complex number before byte {end:,} is not [real, imag]")
    return parts


def _join_chunked(leaves: list[Leaf]) -> list[Leaf]:
    """Leaves with each ``__msgpack_chunked_array__`` map made one array of its pieces."""
    owners = {leaf.keys[:-1] for leaf in leaves if leaf.keys and leaf.keys[-1] == CHUNKED}
    if not owners:
        return leaves
    parts: dict[tuple, list[Leaf]] = {owner: [] for owner in owners}
    out: list[Leaf] = []
    for leaf in leaves:
        owner = next((leaf.keys[:n] for n in range(len(leaf.keys)) if leaf.keys[:n] in owners), None)
        if owner is None:
            out.append(leaf)
            continue
        if not parts[owner]:
            out.append(Leaf(owner, "array"))  # filled in below, at the map's place
        parts[owner].append(leaf)
    for i, leaf in enumerate(out):
        if leaf.kind == "array" and leaf.keys in parts and not leaf.segments:
            out[i] = _chunked_array(leaf.keys, parts[leaf.keys])
    return out


def _decimal(key: str) -> bool:
    """Whether a key is an index as flax writes one: ASCII digits (``"²".isdigit()`` is true too).

    >>> _decimal("12"), _decimal("²"), _decimal("")
    (True, False, False)
    """
    return key.isascii() and key.isdigit()


def _chunked_array(owner: tuple, parts: list[Leaf]) -> Leaf:
    name = ".".join(owner) or "the document"
    shape: dict[int, int] = {}
    chunks: dict[int, Leaf] = {}
    marker = False
    for leaf in parts:
        rest = leaf.keys[len(owner) :]
        if rest == (CHUNKED,) and leaf.kind == "value" and leaf.value is True:
            marker = True
        elif len(rest) == 2 and rest[0] == "shape" and _decimal(rest[1]) and leaf.dtype == "int64":
            shape[int(rest[1])] = leaf.value
        elif len(rest) == 2 and rest[0] == "chunks" and _decimal(rest[1]) and leaf.kind == "array":
            chunks[int(rest[1])] = leaf
        else:
            raise Malformed(f"the chunked array {name!r} has an unexpected entry {'.'.join(rest)!r}")
    dims = [shape.get(i, -1) for i in range(len(shape))]
    pieces = [chunks.get(i) for i in range(len(chunks))]
    dtypes = {(p.dtype, p.byteorder) for p in pieces if p is not None}
    if (
        not marker
        or any(d < 0 for d in dims)
        or not pieces
        or any(p is None or len(p.shape) != 1 for p in pieces)
        or len(dtypes) != 1
        or sum(p.shape[0] for p in pieces) != math.prod(dims)
    ):
        raise Malformed(f"the chunked array {name!r} is not a shape and flat pieces that fill it")
    segments = tuple(segment for piece in pieces for segment in piece.segments)
    dtype, order = dtypes.pop()
    return Leaf(owner, "array", tuple(dims), dtype, segments, byteorder=order)


def walk(read: Callable[[int, int], bytes], size: int, markers: tuple[str, ...] = ()) -> list[Leaf]:
    """Every leaf of the msgpack document of ``size`` bytes read by ``read(start, stop)``, in
    document order, chunked arrays joined. Strings are kept as the leaf's ``value`` (up to
    :data:`MAX_TEXT` bytes; longer ones are skipped unread), and must be UTF-8 where they start
    with one of ``markers``.

    >>> import msgpack
    >>> array = msgpack.ExtType(1, msgpack.packb([[2], "float32", bytes(8)]))
    >>> doc = msgpack.packb({"w": array, "step": 3, "name": "x", "opt": [None, {}]})
    >>> [(leaf.keys, leaf.kind, leaf.shape, leaf.dtype) for leaf in walk(lambda a, b: doc[a:b], len(doc))]
    [(('w',), 'array', (2,), 'float32'), (('step',), 'value', (), 'int64'), (('name',), 'text', (), '')]

    Raises:
        Malformed: The document breaks the msgpack format or flax's encoding.
    """
    return _walk_document(_Bytes(read, size), markers)
