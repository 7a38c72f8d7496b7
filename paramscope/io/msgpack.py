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

The document is read by :mod:`paramscope.io.msgpack_walk` (flax's encoding: arrays as msgpack
extensions, large ones split into ``__msgpack_chunked_array__`` pieces), never unpacked: only
its structure is read, and each array's data later by byte range.

Leaves, as numpy sees them: arrays keep their dtype; Python ints are int64 (uint64 above its
range), floats float64, bools bool and complex numbers complex128, each a 0-d array whose value
is kept in its record (``driver`` "value": msgpack stores numbers big-endian, or inside the type
byte). Strings, bytes, None and empty containers hold no array and are not listed. A msgpack
array (a tuple or list) has keys ``"0"``, ``"1"``, ...
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from typing import Any

from paramscope.errors import CorruptCheckpoint, NotACheckpoint, StepNotFound, StorageError, few
from paramscope.io import orbax, zarr
from paramscope.io.msgpack_walk import Leaf, Malformed, walk
from paramscope.io.records import STEP_NAME, Item, Location, Step, StoredArray, dtype_info
from paramscope.io.storage import Tree, read_range, rel_path
from paramscope.names import join_keys

KIND = "msgpack"

ORBAX_FILE = "checkpoint"  # Orbax <= 0.4: the tree of a PyTreeCheckpointHandler item
STRINGS_FILE = "_strings.json"  # Orbax 0.4: string leaves, by dotted name
PLACEHOLDER = "PLACEHOLDER://"  # Orbax 0.4: a leaf stored beside the file
GDA_PLACEHOLDER = "//GDAPlaceholder:"  # flax: an array in the <file>_gda folder
GDA_SUFFIX = "_gda"

# Hugging Face's sharded Flax weights (flax_model-00001-of-00004.msgpack), each with part of the tree
_HF_SHARD = re.compile(r"^(?P<base>.+)-(?P<index>\d+)-of-(?P<count>\d+)\.msgpack$")
_GDA_FOLDER = re.compile(r"^(?:(?P<prefix>.*)_)?(?P<step>\d+)_gda$")


# ----------------------------------------------------------------------------------------------
# Files, items and locations


@dataclass
class _Document:
    """One parsed msgpack file: where it is, and its leaves."""

    tree: Tree  # the tree holding the file (and, for Orbax items, the arrays beside it)
    folder: str  # the file's folder inside ``tree``
    name: str  # the file's name in that folder
    leaves: list[Leaf]

    @property
    def rel(self) -> str:
        return rel_path(self.folder, self.name)


class _FileTree(Tree):
    """The folder of one file, holding just that file: a file given alone is read without
    listing its folder, which may hold anything."""

    def __init__(self, folder: str, name: str):
        super().__init__(folder)
        self._keys = frozenset({name})


# Parsed documents are kept on the tree they were read from (a document names its tree, so a table
# keyed by trees would keep each tree, and its listing, alive for good), keyed by the file's path
# in the tree, the most recent few; they go with the tree. A tree is one listing of its folder,
# read once: a new tree (the next command, or open_checkpoint of a path) parses anew.
_DOCUMENTS_PER_TREE = 4


def _file_of(item: Item) -> tuple[str, str, bool]:
    """(folder, file name, whether the item is an Orbax item folder) of an item's msgpack file."""
    if item.rel and item.tree.is_file(item.rel):
        folder, _, name = item.rel.rpartition("/")
        return folder, name, False
    return item.rel, ORBAX_FILE, True


def _document(item: Item) -> _Document:
    folder, name, _ = _file_of(item)
    cache: dict[str, _Document] = item.tree.derived.setdefault("msgpack documents", {})
    rel = rel_path(folder, name)
    doc = cache.pop(rel, None)
    if doc is None:
        doc = _Document(item.tree, folder, name, _read_leaves(item.tree, folder, name))
    cache[rel] = doc  # the most recent last
    while len(cache) > _DOCUMENTS_PER_TREE:
        del cache[next(iter(cache))]
    return doc


def _read_leaves(tree: Tree, folder: str, name: str) -> list[Leaf]:
    rel = rel_path(folder, name)
    size = tree.file_size(rel)
    if size is None:
        raise CorruptCheckpoint(
            f"{tree.path(rel)} is missing", hint="the checkpoint's files changed or are incomplete"
        )
    store = json.dumps(tree.spec(folder), sort_keys=True)
    try:
        return walk(lambda lo, hi: read_range(store, name, lo, hi), size, (PLACEHOLDER, GDA_PLACEHOLDER))
    except Malformed as err:
        first = read_range(store, name, 0, 1) if size else b""
        if not first or not (0x80 <= first[0] <= 0x9F or first[0] in (0xDC, 0xDD, 0xDE, 0xDF)):
            # no map or list at all: some other program's file of that name (TensorFlow keeps a
            # text file `checkpoint` in its checkpoint folders)
            raise NotACheckpoint(
                f"{tree.path(rel)} is not a msgpack checkpoint (it holds no map or list)",
                hint="pass an Orbax or flax checkpoint",
            ) from None
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
    match = STEP_NAME.match(file_name)
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
        match = STEP_NAME.match(key)
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
            available = few(number for number, _ in files)
            raise StepNotFound(
                f"no finished step {step} in {tree.display}", hint=f"finished steps: {available}"
            )
        chosen = matches[-1]
    item = Item(_item_name(chosen.name), chosen.path, KIND, tree, chosen.name)
    return Location(tree.display, "root", chosen, [item], steps=steps, tree=tree, step_rel=chosen.name)


# ----------------------------------------------------------------------------------------------
# Arrays


def _strings(tree: Tree, folder: str, problems: list[str]) -> dict[str, Any]:
    """The string leaves an Orbax 0.4 item keeps in ``_strings.json``, by dotted name."""
    rel = rel_path(folder, STRINGS_FILE)
    if not tree.is_file(rel):
        return {}
    try:
        found = orbax.read_json(tree, rel)
    except CorruptCheckpoint as err:
        problems.append(err.message)
        return {}
    if not isinstance(found, dict):
        problems.append(f"{tree.path(rel)} is not a JSON object")
        return {}
    return found


def _safe_name(name: str) -> bool:
    """Whether an array name from a placeholder stays inside its folder."""
    parts = name.split("/")
    return bool(name) and not name.startswith("/") and all(p not in ("", ".", "..") for p in parts)


def _placeholders(doc: _Document, orbax_item: bool, strings: dict[str, Any]) -> list[tuple[Leaf, str]]:
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


def _string_values(doc, stored: dict[str, Any], boxed, root, placeholders: set[int]) -> list[tuple[str, str]]:
    """(path, value) of the string leaves: in the document, or, for an Orbax 0.4 item's
    ``PLACEHOLDER://`` strings, in its ``_strings.json`` (``stored``)."""
    found = []
    for leaf, box in zip(doc.leaves, boxed):
        if leaf.kind != "text" or leaf.value is None or id(leaf) in placeholders:
            continue
        keys = leaf.keys or root
        value = leaf.value
        if value.startswith(PLACEHOLDER):
            value = stored.get(".".join(keys), value)
        found.append((join_keys(keys[:-1] if box else keys, unbox=False), value))
    return found


def read_arrays(item: Item, problems: list[str], values: list | None = None) -> list[StoredArray]:
    """Every array of the item, from the msgpack structure (and the zarr metadata of the arrays
    stored beside it); no array data is read. String leaves are appended to ``values`` as
    (path, string)."""
    doc = _document(item)
    _, _, orbax_item = _file_of(item)
    strings = _strings(doc.tree, doc.folder, problems) if orbax_item else {}
    store = json.dumps(doc.tree.spec(doc.folder), sort_keys=True)
    root = (item.name,)
    # flax boxes (linen nn.Partitioned) are stored as {"value": array}: the tree decides which
    boxed = zarr.boxed_leaves([leaf.keys or root for leaf in doc.leaves])
    slots: list[StoredArray | None] = []
    for leaf, box in zip(doc.leaves, boxed):
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
                    boxed=box,
                    byteorder=leaf.byteorder,
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
                    boxed=box,
                )
            )
        else:
            slots.append(None)
    placeholders = _placeholders(doc, orbax_item, strings)
    if values is not None:
        values += _string_values(doc, strings, boxed, root, {id(leaf) for leaf, _ in placeholders})
    if placeholders:
        where = f"item {item.name!r}"
        if orbax_item:
            kv = orbax.kvstore_spec(doc.tree, doc.folder)
            shardings = orbax.read_shardings(doc.tree, doc.folder, problems, expected=False)
            entries = [(leaf.keys or root, name, "jax.Array") for leaf, name in placeholders]
        else:
            kv, prefix = _gda_store(doc)
            shardings = {}
            entries = [
                (leaf.keys or root, rel_path(prefix, name), "jax.Array") for leaf, name in placeholders
            ]
        box_of = {id(leaf): box for leaf, box in zip(doc.leaves, boxed)}
        placed = [box_of[id(leaf)] for leaf, _ in placeholders]
        stored = iter(zarr.zarr_arrays(kv, entries, shardings, where, placed))
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
    rel = rel_path(folder, orbax.TREE_METADATA)
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
            prefix = doc.name + GDA_SUFFIX
            gda_tree = doc.tree if not isinstance(doc.tree, _FileTree) else Tree(doc.tree.path(prefix))
            base = rel_path(doc.folder, prefix) if gda_tree is doc.tree else ""
            for name in sorted(_stored_zarr_names(gda_tree, base) - set(gda)):
                problems.append((name, f"stored in {prefix}/, but no placeholder in {doc.name} names it"))
            if doc.tree.scheme == "gs" and not gda_tree.is_file(rel_path(base, orbax.COMMIT_MARKER)):
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
    kv = orbax.kvstore_spec(doc.tree, doc.folder)
    if kv.get("driver") == "ocdbt":
        stored = zarr.stored_array_names(kv)
    else:
        stored = _stored_zarr_names(doc.tree, doc.folder)
    for name in sorted(stored - named):
        problems.append((name, f"stored, but no placeholder in {ORBAX_FILE} names it"))
    shardings = orbax.read_shardings(doc.tree, doc.folder, [], expected=False)
    for name in sorted(set(shardings) - named):
        problems.append((name, f"{orbax.SHARDING_FILE} has an entry for an array {ORBAX_FILE} does not hold"))
    return problems


def describe(item: Item) -> dict[str, Any]:
    """``storage``: "msgpack" (arrays in the file), "zarr"/"ocdbt" (arrays beside it), or both
    joined by "+"."""
    doc = _document(item)
    _, _, orbax_item = _file_of(item)
    inline = any(leaf.kind in ("array", "value") for leaf in doc.leaves)
    beside = _placeholders(doc, orbax_item, _strings(doc.tree, doc.folder, []) if orbax_item else {})
    kinds = ["msgpack"] if inline or not beside else []
    if beside:
        ocdbt = orbax_item and doc.tree.is_file(rel_path(doc.folder, orbax.OCDBT_MANIFEST))
        kinds.append("ocdbt" if ocdbt else "zarr")
    return {"storage": "+".join(kinds), "metadata": None}


def notes(item: Item) -> list[str]:
    """A shard of a sharded Hugging Face Flax checkpoint, read alone: which of how many, and the
    index that reads them all."""
    folder, name, orbax_item = _file_of(item)
    match = None if orbax_item else _HF_SHARD.match(name)
    if match is None:
        return []
    index = f"{match.group('base')}.msgpack.index.json"
    where = Tree(item.tree.display) if isinstance(item.tree, _FileTree) else item.tree
    rel = index if isinstance(item.tree, _FileTree) else rel_path(folder, index)
    beside = f"; its index {where.path(rel)} reads them all" if where.is_file(rel) else ""
    return [
        f"{name} is shard {int(match.group('index'))} of {int(match.group('count'))} of a sharded Flax "
        f"checkpoint: only its own arrays are read{beside}"
    ]


def disk_usage(item: Item) -> int | None:
    """Bytes of the item's files (a flax file with its ``_gda`` folder); None in buckets."""
    folder, name, orbax_item = _file_of(item)
    if item.tree.remote:
        return None
    if orbax_item:
        return item.tree.size(item.rel)
    total = item.tree.file_size(rel_path(folder, name)) or 0
    if isinstance(item.tree, _FileTree):
        gda = item.tree.path(name + GDA_SUFFIX)
        return total + (Tree(gda).size() or 0 if os.path.isdir(gda) else 0)
    return total + (item.tree.size(rel_path(folder, name + GDA_SUFFIX)) or 0)
