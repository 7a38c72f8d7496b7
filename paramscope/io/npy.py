"""numpy ``.npy`` records: the header of one array, read without numpy's loader (never unpickled).

A record (numpy's ``NEP 1`` format) is the magic ``\\x93NUMPY``, a version byte pair, the header's
length (2 bytes in version 1, 4 in versions 2 and 3, little-endian), then the header (a Python
dict literal: ``descr``, ``fortran_order``, ``shape``) padded with spaces, then the data in C
order (or Fortran order). Headers are parsed by :mod:`numpy.lib.format` (a literal, never code).

numpy has no bfloat16: ``np.save`` of an ml_dtypes bfloat16 array writes a 2-byte void
(``<V2`` or ``|V2``), and the readers of the formats that store them (big_vision's
``recover_dtype``, ``jax.numpy.load``) read every 2-byte void array as bfloat16. So does this
module, and says so (``stored``). Any other void, object (pickled), string, datetime or
big-endian array is named and left unread, never guessed.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

MAGIC = b"\x93NUMPY"
PREFIX_BYTES = 12  # magic, version, and the longest length field
MAX_HEADER_BYTES = 1_000_000


class Malformed(ValueError):
    """A record whose header cannot be read; the message says why."""


@dataclass(frozen=True)
class Record:
    """One array's header: where its data starts (from the record's start) and what it holds."""

    shape: tuple[int, ...]
    dtype: str  # the numpy/ml_dtypes name it is read as ("" when it is not read)
    stored: str  # the dtype as the header writes it ("<f4", "<V2")
    itemsize: int
    data_start: int
    nbytes: int  # -1 when unknown (object arrays: their elements are pickled)
    problem: str = ""  # why the array is not read

    @property
    def recovered(self) -> bool:
        """Whether the dtype was recovered from a 2-byte void (bfloat16)."""
        return self.dtype == "bfloat16" and "V" in self.stored


def header_length(prefix: bytes) -> int:
    """Bytes from a record's start to its data, from its first :data:`PREFIX_BYTES` bytes."""
    if not prefix.startswith(MAGIC) or len(prefix) < 10:
        raise Malformed("it does not start with numpy's magic bytes")
    major = prefix[6]
    if major == 1:
        return 10 + int.from_bytes(prefix[8:10], "little")
    if major in (2, 3) and len(prefix) >= 12:
        length = int.from_bytes(prefix[8:12], "little")
        if length > MAX_HEADER_BYTES:
            raise Malformed(f"its header claims {length:,} bytes")
        return 12 + length
    raise Malformed(f"it has an unknown format version {major}.{prefix[7]}")


def parse(head: bytes) -> Record:
    """The record whose header is ``head`` (exactly :func:`header_length` bytes)."""
    from numpy.lib import format as npformat

    stream = io.BytesIO(head)
    try:
        version = npformat.read_magic(stream)
        if version == (1, 0):
            shape, fortran, dtype = npformat.read_array_header_1_0(stream, max_header_size=MAX_HEADER_BYTES)
        else:
            shape, fortran, dtype = npformat.read_array_header_2_0(stream, max_header_size=MAX_HEADER_BYTES)
        stored = npformat.dtype_to_descr(dtype)
    except (ValueError, SyntaxError, TypeError) as err:
        raise Malformed(f"its header is not numpy's ({' '.join(str(err).split())[:160]})") from None
    shape = tuple(int(d) for d in shape)
    stored = stored if isinstance(stored, str) else str(stored)
    start = len(head)
    if dtype.hasobject:
        return Record(shape, "", stored, 0, start, -1, f"dtype {stored} (Python objects, stored pickled)")
    count = 1
    for dim in shape:
        count *= dim
    nbytes = count * dtype.itemsize
    name, problem = _read_as(dtype, stored)
    if not problem and fortran and sum(d > 1 for d in shape) > 1:
        problem = "stored in Fortran order"
    return Record(shape, name, stored, dtype.itemsize, start, nbytes, problem)


def _read_as(dtype, stored: str) -> tuple[str, str]:
    """(dtype name it is read as, why it is not read) of a header's dtype."""
    if dtype.kind == "V":
        if dtype.itemsize == 2 and dtype.names is None and dtype.subdtype is None:
            return "bfloat16", ""
        what = "structured" if dtype.names else f"{dtype.itemsize}-byte void"
        return "", f"dtype {stored} ({what}; only 2-byte voids are known: bfloat16)"
    if dtype.kind not in "biufc":
        return "", f"dtype {stored} (not numbers)"
    if dtype.byteorder == ">":
        return "", f"dtype {stored} (big-endian)"
    return dtype.name, ""
