"""An OCDBT item's b-tree, read whole: every key, and the values it holds inline.

Orbax writes an item's arrays into one OCDBT database whose b-tree is usually a single node
(``max_decoded_node_bytes`` 100 MB), with every zarr metadata file and every chunk of up to
``max_inline_value_bytes`` (1 KiB) stored inline in it. TensorStore looks a key up in such a node
at a cost that grows with the node (about 50 us a key among 40,000, 425 us among 200,000), so
reading 20,000 small arrays key by key costs seconds of lookups. ``tensorstore.ocdbt.dump``
returns a node's entries in one call (0.25 s for 40,000): from it the metadata of every array is
a dictionary lookup, and an array whose chunks are all inline is staged in TensorStore's
in-memory kvstore and opened there, so that TensorStore's zarr driver still decodes it (small
arrays of one metadata, one chunk each, as the chunks of one array: see
:func:`paramscope.io.zarr.open_arrays`). Values stored outside the b-tree (large chunks) are read
by key as before. Whatever cannot be read this way (another layout, a damaged node) is left to
the key-by-key path, which reports it.

Memory: a b-tree's inline values, and a copy of those staged, while it is kept; b-trees are let go
beyond :data:`CACHE_BYTES` of inline values (their arrays are then read key by key).
"""

from __future__ import annotations

import bisect
import json
from dataclasses import dataclass, field
from typing import Any

from paramscope.io import storage
from paramscope.io.session import SESSION

MIN_KEYS = 64  # below this many keys wanted, key-by-key reads cost less than the whole b-tree
METADATA_FILES = (".zarray", ".zattrs", ".zgroup", "zarr.json")
OUTSIDE = None  # the value of a key stored outside the b-tree: read by key


@dataclass
class BTree:
    """The keys of one OCDBT database, sorted, with their inline values (``OUTSIDE`` for values
    stored in data files)."""

    keys: list[str]
    values: dict[str, bytes | None]
    context: Any
    root: dict[str, Any]  # the root the manifest named when it was read
    nbytes: int  # of the inline values
    staged: dict[str, Any] = field(default_factory=dict)  # array name -> its in-memory kvstore
    _memory: Any = None  # TensorStore's in-memory kvstore, in a context of its own
    _writes: list[Any] = field(default_factory=list)

    def has(self, key: str) -> bool:
        return key in self.values

    def under(self, name: str) -> list[str]:
        """The keys below an array's folder (``name/...``), metadata files left out."""
        prefix = name + "/"
        start = bisect.bisect_left(self.keys, prefix)
        end = bisect.bisect_left(self.keys, name + "0")  # "0" sorts right after "/"
        return [k for k in self.keys[start:end] if k[len(prefix) :] not in METADATA_FILES]

    def stage(self, name: str):
        """The in-memory kvstore holding an array's chunks (its folder), when every one of them
        is inline; None when one is stored outside the b-tree. Staged once; the writes are
        complete after :meth:`flush`."""
        if name in self.staged:
            return self.staged[name]
        chunks = self.under(name)
        if any(self.values[k] is OUTSIDE for k in chunks):
            return None
        if self._memory is None:
            import tensorstore as ts

            # its own context: the store lives as long as this b-tree or an array opened over it
            self._memory = ts.KvStore.open({"driver": "memory"}, context=ts.Context()).result()
        folder = self._memory / f"{name}/"
        for k in chunks:
            self._writes.append(folder.write(k[len(name) + 1 :], self.values[k]))
        self.staged[name] = folder
        return folder

    def single_chunk(self, name: str) -> bytes | None:
        """The inline bytes of an array stored as exactly one chunk, else None."""
        chunks = self.under(name)
        return self.values[chunks[0]] if len(chunks) == 1 else None

    def stage_stack(self, chunks: list[bytes], key) -> Any:
        """A folder of a new in-memory kvstore (freed with the last array opened over it) holding
        the chunks of single-chunk arrays as chunks ``key(i)`` of one array with a leading axis;
        the writes are complete after :meth:`flush`."""
        import tensorstore as ts

        folder = ts.KvStore.open({"driver": "memory"}, context=ts.Context()).result() / "stack/"
        self._writes += [folder.write(key(i), chunk) for i, chunk in enumerate(chunks)]
        return folder

    def drop(self) -> None:
        """Lets go of the staged chunks: they are freed with the last array opened over them."""
        self.flush()
        self._memory = None
        self.staged.clear()

    def flush(self) -> None:
        """Waits for the staged chunks to be written."""
        writes, self._writes = self._writes, []
        for write in writes:
            write.result()


CACHE_BYTES = 128 << 20  # inline bytes of the b-trees kept at once (older ones are let go)


def read(store: str) -> BTree | None:
    """The b-tree of the OCDBT database with the kvstore spec ``store`` (JSON); None when it is
    not an OCDBT database or cannot be read whole. The manifest is read every time (one small
    file); the b-tree is read again unless the manifest names the root already read: OCDBT never
    changes a node once written (a new write makes a new root), as TensorStore's own cache
    assumes, so a database rewritten in place is read anew."""
    context = storage.context()
    earlier = SESSION.btrees.pop(store, None)  # kept only if the manifest still names its root
    try:
        spec = json.loads(store)
        if spec.get("driver") != "ocdbt":
            return None
        import tensorstore as ts

        base = ts.KvStore.open(spec["base"], context=context).result()
        root = _root(ts.ocdbt.dump(base, context=context).result())
        if earlier is not None and earlier.context is context and earlier.root == root:
            tree, earlier = earlier, None
        else:
            tree = _dump(base, root, context)
    except Exception:  # noqa: BLE001 - any failure leaves it to the key-by-key reads, which report it
        return None
    finally:
        if earlier is not None:
            earlier.drop()
    SESSION.btrees[store] = tree
    total = 0
    for key in reversed(list(SESSION.btrees)):  # the most recent first; let the older ones go past the cap
        total += SESSION.btrees[key].nbytes
        if total > CACHE_BYTES and key != store:
            SESSION.btrees.pop(key).drop()
    return tree


def loaded(store: str) -> BTree | None:
    """The b-tree of ``store`` as :func:`read` last read it in this process and context (no I/O;
    the arrays opened from it were listed by that reading), or None."""
    tree = SESSION.btrees.get(store)
    return tree if tree is not None and tree.context is storage.context() else None


def _root(manifest: dict[str, Any]) -> dict[str, Any]:
    versions = manifest.get("versions") or []
    if not versions:
        raise ValueError("no version")
    return max(versions, key=lambda v: v["generation_number"])["root"]


def _dump(base, root: dict[str, Any], context) -> BTree:
    import tensorstore as ts

    values: dict[str, bytes | None] = {}
    level = [(root["location"], b"")] if "location" in root else []
    while level:  # one level of the tree at a time, its nodes read concurrently
        futures = [ts.ocdbt.dump(base, location, context=context) for location, _ in level]
        below = []
        for (_, prefix), future in zip(level, futures):
            for entry in future.result()["entries"]:
                if "location" in entry:  # a child node: its keys follow the common prefix
                    below.append((entry["location"], prefix + bytes(entry["subtree_common_prefix"])))
                else:
                    key = (prefix + bytes(entry["key"])).decode("utf-8")
                    inline = entry.get("inline_value")
                    values[key] = bytes(inline) if inline is not None else OUTSIDE
        level = below
    nbytes = sum(len(v) for v in values.values() if v is not None)
    return BTree(sorted(values), values, context, root, nbytes)
