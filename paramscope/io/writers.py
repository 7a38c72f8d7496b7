"""Arrays written to local files, streamed piece by piece: ``.npy``, ``.npz`` and ``.safetensors``.

Each writer takes the arrays' names, dtypes and shapes up front and then their bytes in C order,
so an array of any size is written within a memory budget. The file is written beside its final
name and renamed into place when complete: an interrupted write leaves no half file behind.

``.npy`` and ``.npz`` members carry numpy's header (``numpy.lib.format``); dtypes numpy itself
does not know (bfloat16, float8, int4 from ml_dtypes) are written as numpy and jax write them,
raw bytes of their size (``|V2`` for bfloat16), since the format has no name for them.
``.safetensors`` names every dtype it has a code for (``BF16``, ``F8_E4M3``, ...); its header
lists every tensor's offsets before the data, which is what lets it be streamed, so it is
written here from the format's specification rather than by the ``safetensors`` package, whose
writers take every tensor in memory at once. The files read back with ``numpy.load`` and
``safetensors.safe_open``.
"""

from __future__ import annotations

import json
import math
import os
import struct
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from paramscope.errors import UsageError
from paramscope.io.records import numpy_dtype

SUFFIXES = (".npy", ".npz", ".safetensors")


@dataclass(frozen=True)
class Entry:
    name: str
    dtype: str  # numpy / ml_dtypes name
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * numpy_dtype(self.dtype).itemsize


def file_format(path: str) -> str:
    """``npy``, ``npz`` or ``safetensors`` from a file name; refused otherwise."""
    lower = path.lower()
    for suffix in SUFFIXES:
        if lower.endswith(suffix):
            return suffix[1:]
    raise UsageError(
        f"cannot tell the format of {path!r} from its name", hint="name a .npy, .npz or .safetensors file"
    )


def safetensors_code(dtype: str) -> str | None:
    """The safetensors dtype code of a numpy / ml_dtypes dtype name; None when it has none."""
    from paramscope.io.safetensors import DTYPES

    for code, (name, _) in DTYPES.items():
        if name == dtype:
            return code
    return None


def npz_member(path: str) -> str:
    """The name of an array in an ``.npz`` file: its path's keys joined by ``/``, as big_vision
    names them (and paramscope reads them back as the same path).

    >>> npz_member("params.embed.embedding"), npz_member("bf16")
    ('params/embed/embedding', 'bf16')
    """
    from paramscope.names import split_path

    keys = split_path(path)
    return "/".join(keys) if all(keys) and not any("/" in k for k in keys) else path


def check_entries(fmt: str, entries: Sequence[Entry]) -> None:
    """Refuses, before anything is read, arrays a format cannot hold."""
    if fmt == "npy" and len(entries) != 1:
        raise UsageError(
            f"a .npy file holds one array, not {len(entries)}", hint="write a .npz or .safetensors"
        )
    if fmt == "safetensors":
        missing = [e for e in entries if safetensors_code(e.dtype) is None]
        if missing:
            raise UsageError(
                f"safetensors has no dtype for {missing[0].dtype} ({missing[0].name})",
                hint="write a .npy or .npz file instead",
            )
        names = [e.name for e in entries]
        if len(set(names)) != len(names):
            raise UsageError("two arrays would have one name in the file", hint="narrow the selection")


def _npy_header(entry: Entry) -> bytes:
    import io

    dtype = numpy_dtype(entry.dtype)
    if dtype.type.__module__.startswith("ml_dtypes"):  # numpy has no name for these types
        descr = f"|V{dtype.itemsize}"
    else:
        descr = np.lib.format.dtype_to_descr(dtype)
    buffer = io.BytesIO()
    header = {"descr": descr, "fortran_order": False, "shape": tuple(entry.shape)}
    np.lib.format.write_array_header_1_0(buffer, header)
    return buffer.getvalue()


class Writer:
    """Writes arrays to ``path`` (through a temporary file beside it): :meth:`begin` an array,
    :meth:`write` its bytes in C order, then the next; :meth:`close` finishes the file."""

    def __init__(self, path: str, entries: Sequence[Entry], force: bool = False):
        self.path = path
        self.format = file_format(path)
        self.entries = list(entries)
        check_entries(self.format, self.entries)
        self.force = force
        self.partial = f"{path}.partial-{os.getpid()}"
        self._file = open(self.partial, "wb")  # noqa: SIM115 - closed by close() or abort()
        self._zip: zipfile.ZipFile | None = None
        self._member = None
        self._expected = 0
        if self.format == "safetensors":
            self._file.write(_safetensors_header(self.entries))
        elif self.format == "npz":
            self._zip = zipfile.ZipFile(self._file, "w", zipfile.ZIP_STORED, allowZip64=True)

    def begin(self, entry: Entry) -> None:
        self._finish_member()
        self._expected = entry.nbytes
        if self.format == "npy":
            self._file.write(_npy_header(entry))
        elif self.format == "npz":
            assert self._zip is not None
            self._member = self._zip.open(f"{npz_member(entry.name)}.npy", "w", force_zip64=True)
            self._member.write(_npy_header(entry))

    def write(self, data) -> None:
        data = memoryview(data).cast("B")
        self._expected -= len(data)
        (self._member or self._file).write(data)

    def _finish_member(self) -> None:
        if self._expected:
            raise ValueError(f"{self._expected} bytes of an array not written")
        if self._member is not None:
            self._member.close()
            self._member = None

    def close(self) -> None:
        self.finish()
        self.commit()

    def finish(self) -> None:
        """Writes what remains of the file (the zip's directory) and flushes it; the file is
        complete, readable under :attr:`partial`, not yet in place (:meth:`commit`)."""
        self._finish_member()
        if self._zip is not None:
            self._zip.close()
            self._zip = None
        self._file.flush()

    def sync(self) -> None:
        """Waits until the finished file is on the disk."""
        os.fsync(self._file.fileno())

    def commit(self, synced: bool = False) -> None:
        """Puts the finished file in place (after :meth:`sync`, done here unless ``synced``)."""
        if not synced:
            self.sync()
        self._file.close()
        if os.path.exists(self.path) and not self.force:
            self.abort()
            raise UsageError(
                f"{self.path} appeared while it was written", hint="pass --force to write over it"
            )
        os.replace(self.partial, self.path)

    def abort(self) -> None:
        if self._file.closed and not os.path.exists(self.partial):
            return
        try:
            if self._member is not None:
                self._member.close()
            if self._zip is not None:
                self._zip.close()
        except Exception:  # noqa: BLE001 - the file is removed anyway
            pass
        self._file.close()
        if os.path.exists(self.partial):
            os.remove(self.partial)


def _safetensors_header(entries: Sequence[Entry]) -> bytes:
    header: dict = {}
    offset = 0
    for entry in entries:
        code = safetensors_code(entry.dtype)
        header[entry.name] = {
            "dtype": code,
            "shape": list(entry.shape),
            "data_offsets": [offset, offset + entry.nbytes],
        }
        offset += entry.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    return struct.pack("<Q", len(raw)) + raw


def stored_spans(path: str, entries: Sequence[Entry], fmt: str | None = None) -> list[tuple[int, int] | None]:
    """Where each array's bytes lie in a written ``.safetensors``, ``.npz`` or ``.npy`` file, as the
    file's own headers say: (byte offset, byte count) per entry, None where the file names
    another dtype or shape, misplaces the array or lacks it. ``fmt``: the file's format, when
    its name does not tell it."""
    fmt = fmt or file_format(path)
    if fmt == "safetensors":
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
        out: list[tuple[int, int] | None] = []
        for entry in entries:
            found = header.get(entry.name)
            if (
                not isinstance(found, dict)
                or found.get("dtype") != safetensors_code(entry.dtype)
                or found.get("shape") != list(entry.shape)
                or not isinstance(found.get("data_offsets"), list)
                or len(found["data_offsets"]) != 2
                or found["data_offsets"][1] - found["data_offsets"][0] != entry.nbytes
            ):
                out.append(None)
            else:
                out.append((8 + length + found["data_offsets"][0], entry.nbytes))
        return out
    if fmt == "npy":
        header = _npy_header(entries[0])
        with open(path, "rb") as f:
            return [(len(header), entries[0].nbytes) if f.read(len(header)) == header else None]
    with open(path, "rb") as f, zipfile.ZipFile(f) as archive:
        names = set(archive.namelist())
        return [_npy_span(f, archive, e) if f"{npz_member(e.name)}.npy" in names else None for e in entries]


def _npy_span(f, archive: zipfile.ZipFile, entry: Entry) -> tuple[int, int] | None:
    """The bytes of an array in an uncompressed ``.npz`` member, behind the ``.npy`` header
    that names its dtype and shape (the header must be the one written for it)."""
    info = archive.getinfo(f"{npz_member(entry.name)}.npy")
    header = _npy_header(entry)
    if info.compress_type != zipfile.ZIP_STORED or info.file_size != len(header) + entry.nbytes:
        return None
    f.seek(info.header_offset)
    name_length, extra_length = struct.unpack("<HH", f.read(30)[26:30])
    start = info.header_offset + 30 + name_length + extra_length
    f.seek(start)
    if f.read(len(header)) != header:
        return None
    return start + len(header), entry.nbytes
