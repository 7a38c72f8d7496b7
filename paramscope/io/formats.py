"""What a checkpoint format is to paramscope, and the formats it reads, in the order tried.

A format is one module that provides what :class:`Format` lists (a module is its own instance:
its functions are the protocol's methods) and one line in :data:`FORMATS`. The dispatcher
(:mod:`paramscope.io.checkpoint`) walks :data:`FORMATS` without naming any of them: the first
whose ``locate`` recognises a path reads it, and an item is handed back to the format whose
kind it has. Arrays are opened by their ``driver`` (:mod:`paramscope.io.zarr` for zarr arrays
in any kvstore); what an opened array offers is :class:`ArrayHandle`.
"""

from __future__ import annotations

import importlib
from typing import Any, Protocol, runtime_checkable

from paramscope.io.records import Item, Location, StoredArray
from paramscope.io.storage import Tree

# The formats, by module, in the order they are tried: Orbax first (its layouts are the most
# specific), plain zarr trees last (any folder of zarr arrays is one). Adding a format: a module
# that provides :class:`Format`, and its name here.
FORMATS = (
    "paramscope.io.orbax",
    "paramscope.io.hf_flax",
    "paramscope.io.safetensors",
    "paramscope.io.msgpack",
    "paramscope.io.npz",
    "paramscope.io.eqx",
    "paramscope.io.tstree",
)


@runtime_checkable
class ArrayHandle(Protocol):
    """An opened array: sliced, a handle of the slice; read, a future whose ``result()`` is the
    numpy value (TensorStore's handles are such, and so are paramscope's own)."""

    def __getitem__(self, index: Any) -> ArrayHandle: ...

    def read(self) -> Any: ...


@runtime_checkable
class Format(Protocol):
    """A checkpoint format.

    ``KIND`` is the kind of the items it reads (``KINDS`` where it has several); a format whose
    ``UNFINISHED_STEPS`` is true takes ``allow_unfinished`` in ``locate``, as Orbax does.
    Optional beside these: ``notes(item)`` (what a reader should know that is no damage),
    ``disk_usage(item)`` (bytes of its files; default: the item's folder), ``witness_files(item)``
    (files its writer replaces on every save).
    """

    KIND: str

    def locate(self, tree: Tree, step: int | None) -> Location | None:
        """The checkpoint at ``tree`` in this format; None when it is not one."""

    def read_arrays(
        self, item: Item, problems: list[str], values: list[tuple[str, Any]] | None = None
    ) -> list[StoredArray]:
        """Every array of an item, from metadata alone (other leaves appended to ``values``)."""

    def audit_item(self, item: Item, arrays: list[StoredArray]) -> list[tuple[str | None, str]]:
        """Where the item's metadata and its stored arrays disagree (for ``verify``)."""

    def describe(self, item: Item) -> dict[str, Any]:
        """What ``info`` shows of an item beyond its arrays: ``storage``, ``metadata``."""


def formats() -> tuple[Format, ...]:
    """The format modules of :data:`FORMATS`, in order (imported on first use)."""
    return tuple(importlib.import_module(name) for name in FORMATS)


def kinds(module: Format) -> tuple[str, ...]:
    """The item kinds a format reads."""
    return tuple(getattr(module, "KINDS", (module.KIND,)))


def format_of(kind: str) -> Format | None:
    """The format that reads items of ``kind``; None for none."""
    for module in formats():
        if kind in kinds(module):
            return module
    return None
