"""The one adapter around Orbax's on-disk format.

Everything that knows how Orbax lays out a checkpoint lives here: manager roots and step
folders, item kinds, ``_METADATA``, ``_sharding``, and the zarr arrays inside OCDBT databases or
plain folders. Arrays are opened with TensorStore, read-only, through its public spec API, so the
rest of paramscope never sees an Orbax or TensorStore type, and nothing here writes, creates,
deletes, imports handler classes named in metadata, or unpickles.
"""

from __future__ import annotations

import base64
import binascii
import functools
import json
import re
from collections.abc import Sequence
from typing import Any

from paramscope.errors import (
    CheckpointNotFound,
    CorruptCheckpoint,
    ItemNotFound,
    NotACheckpoint,
    ParamscopeError,
    StepNotFound,
    StorageError,
    few,
)
from paramscope.io import btree, storage
from paramscope.io.records import (
    ArrayReadError,
    Item,
    Location,
    SavedSharding,
    Step,
    StoredArray,
    dtype_info,
)
from paramscope.io.storage import Tree, load_json, rel_path, short_error
from paramscope.names import BOX_VALUE_KEY, join_keys

CHECKPOINT_METADATA = "_CHECKPOINT_METADATA"
STRINGS_FILE = "_strings.json"
STRING_TYPE = "string"
AGGREGATED_TYPES = ("jax.Array", "np.ndarray", "scalar")  # what an aggregate file held
TREE_METADATA = "_METADATA"
SHARDING_FILE = "_sharding"
OCDBT_MANIFEST = "manifest.ocdbt"
COMMIT_MARKER = "commit_success.txt"
TMP_MARKER = ".orbax-checkpoint-tmp"
ARRAY_ITEM_NAME = "checkpoint"  # ArrayCheckpointHandler stores its one array under this name
JSON_ITEM_FILE = "metadata"  # JsonCheckpointHandler's default file name

_PYTREE_MARKERS = (OCDBT_MANIFEST, SHARDING_FILE, "ocdbt.process_0", "array_metadatas", "d")
# grain's PyGrainCheckpointHandler: one JSON file of iterator state per process
_ITERATOR_FILE = re.compile(r"^process_\d+-of-\d+\.json$")
ITERATOR_KIND = "iterator"  # a dataset iterator's state (grain), not arrays
# Paxml's state item of checkpoint versions 1.0 and 1.1 (no OCDBT): PaxCheckpointHandler names
# each array by its dotted prefix name (``mdl_vars.params.lm.final_ln.scale``), one zarr folder
# each, and writes no _METADATA; the step's ``metadata`` JSON item holds ``{"version": 1.1}``.
PAXML_KIND = "paxml"
_PAXML_OCDBT_VERSION = 1.2  # from this version on, Paxml's state is an ordinary OCDBT pytree item
MAX_SHOWN_FILES = 16  # an iterator item's files whose content is shown
_STEP_NAME = re.compile(r"^(?:(?P<prefix>.*)_)?(?P<step>\d+)$")
_TMP_STEP_NAME = re.compile(r"^(?:(?P<prefix>.*)_)?(?P<step>\d+)\.orbax-checkpoint-tmp.*$")


# ----------------------------------------------------------------------------------------------
# Layout


def _parse_json(raw: bytes | None, where: str) -> Any:
    try:
        if raw is None:
            raise ValueError("the file is missing")
        return load_json(raw)
    except ValueError as err:
        raise CorruptCheckpoint(
            f"cannot read {where}: {err}", hint="the checkpoint's metadata is damaged or unreadable"
        ) from None


def read_json(tree: Tree, rel: str) -> Any:
    """A JSON metadata file; :class:`CorruptCheckpoint` when it is unreadable or not JSON."""
    return _parse_json(tree.read(rel), tree.path(rel))


def _is_finished_step(tree: Tree, rel: str) -> bool:
    if tree.is_file(rel_path(rel, COMMIT_MARKER)):
        return True
    meta_path = rel_path(rel, CHECKPOINT_METADATA)
    if tree.is_file(meta_path):
        try:
            meta = load_json(tree.read(meta_path) or b"")
        except ValueError:
            return False
        return isinstance(meta, dict) and meta.get("commit_timestamp_nsecs") is not None
    # Very old writers left no step metadata: a step folder with items counts as finished, and
    # so does one that is an Orbax 0.4 item (flax.training.checkpoints through Orbax 0.4, which
    # renames the folder to its step's name once written).
    if _item_kind(tree, rel) == "msgpack":
        return True
    kinds = {_item_kind(tree, rel_path(rel, name)) for name in tree.subdirs(rel)}
    return bool(kinds - {"unknown", "damaged"})


def _item_kind(tree: Tree, rel: str) -> str:
    # ArrayCheckpointHandler items hold one plain zarr array in `checkpoint/` (recent versions
    # add a _METADATA naming just that key), so they are recognised before pytrees.
    array_dir = rel_path(rel, ARRAY_ITEM_NAME)
    if tree.is_file(rel_path(array_dir, ".zarray")) or tree.is_file(rel_path(array_dir, "zarr.json")):
        return "array"
    if tree.is_file(array_dir):
        return "msgpack"  # Orbax <= 0.4: the tree as one msgpack file (paramscope.io.msgpack)
    if tree.is_file(rel_path(rel, TREE_METADATA)):
        return "pytree"
    if _json_file(tree, rel) is not None:
        return "json"
    if any(tree.exists(rel_path(rel, marker)) for marker in _PYTREE_MARKERS):
        return "damaged"  # the files of a pytree item, without the _METADATA that describes them
    return "unknown"


def _started_step(tree: Tree, rel: str) -> bool:
    """Whether an unfinished folder named like a step was begun by a checkpoint writer."""
    if tree.is_file(rel_path(rel, CHECKPOINT_METADATA)):
        return True
    return any(_item_kind(tree, rel_path(rel, name)) != "unknown" for name in tree.subdirs(rel))


def _list_steps(tree: Tree, rel: str = "") -> list[tuple[Step, str]]:
    steps = []
    for name in tree.subdirs(rel):
        step_rel = rel_path(rel, name)
        tmp = _TMP_STEP_NAME.match(name)
        if tmp:
            steps.append((Step(name, tree.path(step_rel), int(tmp.group("step")), finished=False), step_rel))
            continue
        match = _STEP_NAME.match(name)
        if match:
            finished = _is_finished_step(tree, step_rel)
            if finished or _started_step(tree, step_rel):  # not a step: e.g. run_1/ holding runs
                steps.append((Step(name, tree.path(step_rel), int(match.group("step")), finished), step_rel))
    return sorted(steps, key=lambda s: (s[0].step, s[0].finished, s[0].name))


def list_steps(root: str) -> list[Step]:
    """The step folders of a CheckpointManager root, finished and unfinished, by step."""
    return [step for step, _ in _list_steps(Tree(root))]


def _list_items(tree: Tree, step_rel: str) -> list[Item]:
    items = []
    for name in tree.subdirs(step_rel):
        rel = rel_path(step_rel, name)
        items.append(Item(name, tree.path(rel), _item_kind(tree, rel), tree, rel))
    if any(i.kind in ("unknown", "damaged") for i in items) and _paxml_version(tree, items) is not None:
        items = [Item(i.name, i.path, PAXML_KIND, tree, i.rel) if _paxml_state(tree, i) else i for i in items]
    return [i for i in items if i.kind != "unknown"]


def _paxml_version(tree: Tree, items: list[Item]) -> float | None:
    """The checkpoint version a Paxml step records in its ``metadata`` JSON item, where it is one
    without OCDBT (below 1.2); None for other steps."""
    meta = next((i for i in items if i.name == JSON_ITEM_FILE and i.kind == "json"), None)
    if meta is None:
        return None
    try:
        content = read_json_item(meta)
    except CorruptCheckpoint:
        return None  # named as damage when the item itself is read
    version = content.get("version") if isinstance(content, dict) else None
    if isinstance(version, (int, float)) and not isinstance(version, bool) and version < _PAXML_OCDBT_VERSION:
        return float(version)
    return None


def _paxml_arrays(tree: Tree, rel: str) -> list[str]:
    """The zarr array folders directly inside an item folder, by name."""
    return [
        name
        for name in tree.subdirs(rel)
        if tree.is_file(rel_path(rel_path(rel, name), ".zarray"))
        or tree.is_file(rel_path(rel_path(rel, name), "zarr.json"))
    ]


def _paxml_state(tree: Tree, item: Item) -> bool:
    """Whether an item of a Paxml step without OCDBT is its state: zarr folders of arrays named by
    their dotted paths, without _METADATA or an OCDBT database."""
    return (
        item.kind in ("unknown", "damaged")
        and not tree.exists(rel_path(item.rel, OCDBT_MANIFEST))
        and bool(_paxml_arrays(tree, item.rel))
    )


def list_items(step_path: str) -> list[Item]:
    return _list_items(Tree(step_path), "")


def _iterator_files(tree: Tree, rel: str) -> list[str]:
    """The per-process state files of a grain iterator item, relative to the tree."""
    prefix = rel + "/" if rel else ""
    return sorted(k for k in tree.keys() if k.startswith(prefix) and _ITERATOR_FILE.match(k[len(prefix) :]))


def _with_other_items(tree: Tree, step_rel: str, items: list[Item]) -> list[Item]:
    """A step's items, those that hold no arrays or JSON included: a dataset iterator (grain's
    per-process JSON files) and any item the step's metadata names with a handler paramscope does
    not read (kind "unknown", its handler kept). Each item is listed with its handler."""
    handlers: dict[str, str] = {}
    try:
        meta = read_json(tree, rel_path(step_rel, CHECKPOINT_METADATA))
        named = meta.get("item_handlers") if isinstance(meta, dict) else None
        if isinstance(named, dict):
            handlers = {str(k): str(v) for k, v in named.items()}
    except CorruptCheckpoint:
        pass  # no or unreadable step metadata: the folders alone tell
    listed = {item.name: item for item in items}
    out = []
    for name in tree.subdirs(step_rel):
        rel, handler = rel_path(step_rel, name), handlers.get(name, "")
        if name in listed:
            item = listed[name]
            out.append(Item(item.name, item.path, item.kind, tree, item.rel, handler))
        elif _iterator_files(tree, rel):
            out.append(Item(name, tree.path(rel), ITERATOR_KIND, tree, rel, handler))
        elif handler:
            out.append(Item(name, tree.path(rel), "unknown", tree, rel, handler))
    return out


def read_iterator_item(item: Item) -> dict[str, Any]:
    """An iterator item's state, by file: each file's JSON (its text where it is not JSON)."""
    files = _iterator_files(item.tree, item.rel)[:MAX_SHOWN_FILES]
    out: dict[str, Any] = {}
    for rel, raw in zip(files, item.tree.read_many(files)):
        text = (raw or b"").decode("utf-8", "replace")
        try:
            out[rel.rsplit("/", 1)[-1]] = json.loads(text)
        except ValueError:
            out[rel.rsplit("/", 1)[-1]] = text
    return out


def locate(path: str | Tree, step: int | None = None, allow_unfinished: bool = False) -> Location:
    """Resolves a manager root, a step folder or an item folder to one step's items.

    ``allow_unfinished``: a root whose steps are all unfinished resolves to no step (for
    ``info``), rather than failing.

    ``path`` is a local path or a ``file://``, ``gs://`` or ``s3://`` URL (or its :class:`Tree`,
    so that another format asked next reuses the listing); the folder is listed once, and its
    layout is read from that listing.
    """
    tree = path if isinstance(path, Tree) else Tree(path)
    path = tree.display
    if not tree.keys():
        if tree.root_is_file():
            raise NotACheckpoint(
                f"{path} is a file, not a checkpoint folder",
                hint="pass the checkpoint folder (a manager root, a step folder or an item folder)",
            )
        if tree.is_empty_folder():
            raise NotACheckpoint(
                f"{path} is not a checkpoint (an empty folder)",
                hint="pass a CheckpointManager root, a step folder or an item folder",
            )
        raise CheckpointNotFound(f"{path} does not exist", hint="check the path")
    name = path.rstrip("/").rsplit("/", 1)[-1]
    if TMP_MARKER in name:
        raise StepNotFound(
            f"{path} is an unfinished step (a save that has not completed)",
            hint="pass a finished step or the manager root; `paramscope info` lists the steps",
        )
    kind = _item_kind(tree, "")
    if kind == "damaged":
        raise CorruptCheckpoint(
            f"{path} has the files of an Orbax item but no {TREE_METADATA}",
            hint="the item's metadata is missing: the save did not finish or the copy is incomplete",
        )
    if kind != "unknown":
        if step is not None:
            raise StepNotFound(
                f"--step {step} given, but {path} is a single item", hint="pass the manager root"
            )
        return Location(path, "item", None, [Item(name, path, kind, tree, "")], selected_item=name, tree=tree)

    items = _list_items(tree, "")
    # flax.training.checkpoints roots: each checkpoint_<N> folder is itself an item, a step
    steps_are_items = all(_STEP_NAME.match(i.name) for i in items) and not tree.is_file(CHECKPOINT_METADATA)
    if (items and not steps_are_items) or tree.is_file(CHECKPOINT_METADATA):
        if step is not None:
            raise StepNotFound(
                f"--step {step} given, but {path} is a single step", hint="pass the manager root"
            )
        match = _STEP_NAME.match(name)
        this = Step(name, path, int(match.group("step")) if match else None, _is_finished_step(tree, ""))
        return Location(path, "step", this, _with_other_items(tree, "", items), tree=tree, step_rel="")

    listed = _list_steps(tree)
    steps = [s for s, _ in listed]
    if not steps:
        found = _checkpoints_below(tree, "")
        hint = "pass a CheckpointManager root, a step folder or an item folder"
        if found:
            more = f" and {len(found) - 3} more" if len(found) > 3 else ""
            hint = "found checkpoints under " + ", ".join(found[:3]) + more
        raise NotACheckpoint(f"{path} is not a checkpoint (no _METADATA, no step folders)", hint=hint)
    finished = [(s, rel) for s, rel in listed if s.finished]
    if step is None:
        if not finished:
            if allow_unfinished:
                return Location(path, "root", None, [], steps=steps, tree=tree)
            names = ", ".join(s.name for s in steps[:3]) + (" ..." if len(steps) > 3 else "")
            raise StepNotFound(
                f"{path} has no finished step, only {len(steps)} unfinished: {names}",
                hint="wait for the save to complete; `paramscope info` lists the steps",
            )
        chosen, rel = finished[-1]
    else:
        matches = [(s, r) for s, r in finished if s.step == step]
        if not matches:
            available = few(s.step for s, _ in finished)
            raise StepNotFound(f"no finished step {step} in {path}", hint=f"finished steps: {available}")
        chosen, rel = matches[-1]
    return Location(
        path, "root", chosen, _step_items(tree, chosen, rel), steps=steps, tree=tree, step_rel=rel
    )


def _step_items(tree: Tree, step: Step, rel: str) -> list[Item]:
    """The items of a step folder; the folder itself where it is an item (flax's roots)."""
    kind = _item_kind(tree, rel)
    if kind not in ("unknown", "damaged"):
        return [Item(step.name, step.path, kind, tree, rel)]
    return _with_other_items(tree, rel, _list_items(tree, rel))


def _checkpoints_below(tree: Tree, rel: str, depth: int = 2) -> list[str]:
    """Folders up to ``depth`` levels below ``rel`` that hold a checkpoint (for a hint), relative."""
    found = []
    for name in tree.subdirs(rel):
        below = rel_path(rel, name)
        if _list_steps(tree, below) or _list_items(tree, below) or _item_kind(tree, below) != "unknown":
            found.append(name + "/")
        elif depth > 1:
            found += [name + "/" + inner for inner in _checkpoints_below(tree, below, depth - 1)]
    return found


def read_step_metadata(location: Location) -> Any:
    """The chosen step's ``_CHECKPOINT_METADATA``; None when the step has none (or no step)."""
    if location.tree is None:
        return None
    # an item folder written on its own (``PyTreeCheckpointer().save(path)``) has its own
    rel = rel_path(location.step_rel or "", CHECKPOINT_METADATA)
    if location.step_rel is None and location.kind != "item":
        return None
    return read_json(location.tree, rel) if location.tree.is_file(rel) else None


def _json_file(tree: Tree, rel: str) -> str | None:
    """The file of a JsonCheckpointHandler item: ``metadata`` (its default) or the item's name."""
    own = (rel or tree.display).rstrip("/").rsplit("/", 1)[-1]
    for name in (JSON_ITEM_FILE, own):
        candidate = rel_path(rel, name)
        if tree.is_file(candidate):
            return candidate
    return None


def read_json_item(item: Item) -> Any:
    return read_json(item.tree, _json_file(item.tree, item.rel) or rel_path(item.rel, JSON_ITEM_FILE))


def disk_usage(item: Item) -> int | None:
    """Bytes an item's files take; None where the store cannot tell (buckets)."""
    return item.tree.size(item.rel)


def step_bytes(path: str, step: int | None = None) -> int:
    """Bytes stored for the step a path resolves to (for a progress bar); 0 when it cannot be told
    (buckets: their listings carry no sizes)."""
    try:
        location = locate(path, step)
    except ParamscopeError:
        return 0
    return sum(disk_usage(i) or 0 for i in location.items)


# ----------------------------------------------------------------------------------------------
# Metadata


def kvstore_spec(tree: Tree, folder: str, use_ocdbt: bool | None = None) -> dict[str, Any]:
    """The kvstore of an item's arrays: its OCDBT database, or plain zarr folders."""
    if tree.is_file(rel_path(folder, OCDBT_MANIFEST)):
        return {"driver": "ocdbt", "base": tree.spec(folder), "cache_pool": storage.INDEX_CACHE}
    if use_ocdbt or any(name.startswith("ocdbt.process_") for name in tree.subdirs(folder)):
        raise CorruptCheckpoint(
            f"{tree.path(rel_path(folder, OCDBT_MANIFEST))} is missing",
            hint="the root of the item's OCDBT database is gone; the item cannot be read",
        )
    return tree.spec(folder)


def storage_format(item: Item) -> str:
    """'ocdbt' or 'zarr' (plain folders), for an item that holds arrays."""
    folder = item.rel if item.kind in ("pytree", PAXML_KIND) else rel_path(item.rel, ARRAY_ITEM_NAME)
    return "ocdbt" if kvstore_spec(item.tree, folder)["driver"] == "ocdbt" else "zarr"


def _parse_sharding(text: Any) -> SavedSharding | None:
    """A NamedSharding entry of ``_sharding``; None for other kinds; ValueError when malformed."""
    info = load_json(text) if isinstance(text, str) else text
    if not isinstance(info, dict) or info.get("sharding_type") != "NamedSharding":
        return None
    names, sizes = info.get("axis_names") or [], info.get("shape") or []
    if not isinstance(names, list) or not isinstance(sizes, list) or len(names) != len(sizes):
        raise ValueError("malformed mesh")
    mesh_axes = tuple((str(n), int(s)) for n, s in zip(names, sizes))
    spec = []
    for entry in info.get("partition_spec") or []:
        if isinstance(entry, list):
            entry = tuple(str(e) for e in entry) if entry else None
            if entry is not None and len(entry) == 1:
                entry = entry[0]
        elif entry is not None:
            entry = str(entry)
        spec.append(entry)
    return SavedSharding(mesh_axes, tuple(spec))


def read_shardings(
    tree: Tree, item_rel: str, problems: list[str], expected: bool = True
) -> dict[str, SavedSharding | None]:
    """Saved shardings by dotted name. A missing (when ``expected``) or damaged file leaves them
    unknown (the arrays are still readable) and adds a line to ``problems``."""
    rel = rel_path(item_rel, SHARDING_FILE)
    path = tree.path(rel)
    if not tree.is_file(rel):
        if expected:
            problems.append(f"{path} is missing: shardings are unknown")
        return {}
    try:
        raw = read_json(tree, rel)
    except CorruptCheckpoint:
        raw = None
    if not isinstance(raw, dict):
        problems.append(f"{path} is damaged (not a JSON object): shardings are unknown")
        return {}
    shardings = {}
    for key, value in raw.items():
        try:
            name = base64.urlsafe_b64decode(key.encode() + b"==").decode()
            shardings[name] = _parse_sharding(value)
        except (binascii.Error, UnicodeDecodeError, ValueError, TypeError, AttributeError):
            problems.append(f"{path} has an unreadable entry {str(key)[:40]!r}")
    return shardings


def _tree_entries(
    tree: Tree, item_rel: str
) -> tuple[list[tuple[tuple[str, ...], str]], list[tuple[str, ...]], bool | None, bool]:
    """(keys, value_type) of every leaf that holds array data, in the saved order; the keys of
    the string leaves (stored in ``_strings.json``, not as arrays); whether the metadata says
    the arrays live in an OCDBT database; and whether it says every chunk was written
    (``store_array_data_equal_to_fill_value``, Orbax 0.7 on: older writers skipped chunks
    equal to the fill value, which then read as that value)."""
    path = tree.path(rel_path(item_rel, TREE_METADATA))
    meta = read_json(tree, rel_path(item_rel, TREE_METADATA))
    tree = meta.get("tree_metadata") if isinstance(meta, dict) else None
    if not isinstance(tree, dict):
        raise CorruptCheckpoint(
            f"{path} has no tree_metadata", hint="the item's metadata is damaged or from an unknown writer"
        )
    entries, strings, aggregated = [], [], 0
    folder = path.rsplit("/", 1)[0]

    def tree_path(name: str) -> str:
        return f"{folder}/{name}"

    for entry in tree.values():
        try:
            keys = tuple(str(k["key"]) for k in entry["key_metadata"])
            value = entry.get("value_metadata") or {}
            if not keys or not isinstance(value, dict):
                raise TypeError
        except (KeyError, TypeError, AttributeError):
            raise CorruptCheckpoint(
                f"{path} has an entry of unexpected structure", hint="the item's metadata is damaged"
            ) from None
        if value.get("skip_deserialize") and value.get("value_type") in AGGREGATED_TYPES:
            aggregated += 1
        if value.get("skip_deserialize") or value.get("value_type") in ("None", None):
            continue
        if value.get("value_type") == STRING_TYPE:
            strings.append(keys)
            continue
        entries.append((keys, str(value.get("value_type"))))
    if aggregated:
        # values Orbax (<= 0.6) kept in the item's msgpack `checkpoint` file, which is not there
        # (an item that has it is read as msgpack): never report such an item as empty
        raise CorruptCheckpoint(
            f"{path} marks {aggregated} arrays as stored in the aggregate file "
            f"{tree_path(ARRAY_ITEM_NAME)!r}, which is missing",
            hint="the copy is incomplete: the file 'checkpoint' of the item holds their values",
        )
    return entries, strings, meta.get("use_ocdbt"), meta.get("store_array_data_equal_to_fill_value") is True


def boxed_leaves(all_keys: Sequence[tuple[str, ...]]) -> list[bool]:
    """Which leaves end in the ``value`` key of a flax box (linen ``nn.Partitioned``, an NNX
    ``Variable``) rather than in a real dict key named ``value``.

    Orbax writes both alike, so the tree's structure decides. A box holds nothing but its
    ``value`` and stands for a parameter of a module, so a ``value`` is a box's when it is the
    only key of a dict that is not at the top of the tree (``Dense_0.kernel.value``); and when
    every leaf of the tree ends in ``value`` (NNX state), all are. A real key is not dropped
    on a guess: ``{'mlp': {'value': w}}`` stays ``mlp.value``, and so does a ``value`` beside
    other keys.

    >>> boxed_leaves([("dense", "kernel", "value"), ("mlp", "value"), ("step",)])
    [True, False, False]
    >>> boxed_leaves([("model", "linear", "kernel", "value"), ("step", "value")])
    [True, True]
    >>> boxed_leaves([("a", "b", "value"), ("a", "b", "other")])
    [False, False]
    """
    children: dict[tuple[str, ...], set[str]] = {}
    for keys in all_keys:
        for depth in range(1, len(keys)):
            children.setdefault(keys[:depth], set()).add(keys[depth])
    ends = [len(keys) > 1 and keys[-1] == BOX_VALUE_KEY for keys in all_keys]
    if all(ends) and any(len(keys) > 2 for keys in all_keys):
        return ends
    return [
        end and len(keys) > 2 and children.get(keys[:-1]) == {BOX_VALUE_KEY}
        for end, keys in zip(ends, all_keys)
    ]


def _zarr_metadata(raw: bytes, where: str) -> tuple[tuple[int, ...], str, int, tuple[int, ...], str, str]:
    """(shape, dtype name, itemsize, chunk shape, TensorStore driver, metadata template) of a
    zarr2/zarr3 array."""
    try:
        return _parse_zarr_metadata(raw)
    except (ValueError, KeyError, TypeError, AttributeError, OverflowError):
        raise CorruptCheckpoint(
            f"bad zarr metadata for {where}", hint="the array's metadata is damaged"
        ) from None


# Arrays of one shape and dtype store byte-identical metadata: a model's layers parse it once.
@functools.lru_cache(maxsize=4096)
def _parse_zarr_metadata(raw: bytes) -> tuple[tuple[int, ...], str, int, tuple[int, ...], str, str]:
    meta = load_json(raw)
    shape = tuple(int(d) for d in meta["shape"])
    if any(d < 0 for d in shape):
        raise ValueError("negative dimension")
    if meta.get("zarr_format") == 3:
        chunks = meta["chunk_grid"]["configuration"]["chunk_shape"]
        info = *dtype_info(meta["data_type"]), tuple(int(c) for c in chunks), "zarr3"
    else:
        info = *dtype_info(meta["dtype"]), tuple(int(c) for c in meta["chunks"]), "zarr"
    return shape, *info, _metadata_template(meta)


_TEMPLATES: dict[str, str] = {}


def _metadata_template(meta: dict[str, Any]) -> str:
    """The metadata without shape and chunk shape, as one shared string per distinct template."""
    meta = dict(meta)
    meta.pop("shape")
    if meta.get("zarr_format") == 3:
        meta["chunk_grid"] = {**meta["chunk_grid"], "configuration": {}}
    else:
        meta.pop("chunks")
    text = json.dumps(meta, sort_keys=True)
    return _TEMPLATES.setdefault(text, text)


@functools.lru_cache(maxsize=1024)
def _array_spec(
    template: str, driver: str, shape: tuple[int, ...], chunks: tuple[int, ...], complete: bool = False
):
    """The TensorStore spec of arrays of one metadata, built and parsed once, not per array.
    ``complete``: every chunk was written, so TensorStore fails a read of a missing one
    instead of filling it with the fill value."""
    import tensorstore as ts

    meta = json.loads(template)
    meta["shape"] = list(shape)
    if driver == "zarr3":
        meta["chunk_grid"]["configuration"] = {"chunk_shape": list(chunks)}
    else:
        meta["chunks"] = list(chunks)
    return ts.Spec({"driver": driver, "metadata": meta, "fill_missing_data_reads": not complete})


def _read_kv(kvstore: dict[str, Any], keys: list[str]) -> list[bytes | None]:
    """Reads many keys of one kvstore concurrently; None for a missing key. Many keys of an
    OCDBT database are taken from its b-tree, read whole (:mod:`paramscope.io.btree`)."""
    tree = btree.read(json.dumps(kvstore, sort_keys=True)) if len(keys) >= btree.MIN_KEYS else None
    if tree is None:
        return _read_keys(kvstore, keys)
    found: list[bytes | None] = [tree.values.get(key) for key in keys]
    outside = [i for i, key in enumerate(keys) if tree.has(key) and found[i] is btree.OUTSIDE]
    if outside:  # stored in data files: read by key
        for i, value in zip(outside, _read_keys(kvstore, [keys[i] for i in outside])):
            found[i] = value
    return found


def _read_keys(kvstore: dict[str, Any], keys: list[str]) -> list[bytes | None]:
    """Reads keys of one kvstore one by one, concurrently; None for a missing key."""
    import tensorstore as ts

    for key in keys:
        storage.refuse_special(kvstore, key)
    try:
        store = ts.KvStore.open(kvstore, context=storage.context()).result()
        futures = [store.read(key) for key in keys]
        results = [f.result() for f in futures]
    except Exception as err:  # TensorStore raises ValueError/RuntimeError subclasses
        fault = storage.store_fault(err, kvstore)
        if fault is not None:  # the store failed, not the files
            raise fault from None
        raise CorruptCheckpoint(
            f"cannot read the array store at {_where(kvstore)}: {short_error(err)}",
            hint="the checkpoint's data files are missing or damaged",
        ) from None
    return [bytes(r.value) if r.state == "value" else None for r in results]


def _where(kvstore: dict[str, Any]) -> str:
    """A kvstore spec as a path or URL, for messages."""
    base = kvstore.get("base", kvstore)
    if base.get("driver") == "file":
        return base.get("path", "").rstrip("/")
    scheme = "gs" if base.get("driver") == "gcs" else "s3"
    return f"{scheme}://{base.get('bucket')}/{base.get('path', '')}".rstrip("/")


def read_arrays(
    item: Item, problems: list[str] | None = None, values: list[tuple[str, Any]] | None = None
) -> list[StoredArray]:
    """Every array of an item, from metadata alone: no array data is read.

    Problems that leave the arrays readable (a missing or damaged ``_sharding``) are appended to
    ``problems``; anything worse raises :class:`CorruptCheckpoint`. The item's leaves that are
    not arrays (strings) are appended to ``values`` as (path, value).
    """
    problems = problems if problems is not None else []
    complete = False
    if item.kind == "array":
        entries = [((item.name,), "jax.Array")]
        names = [ARRAY_ITEM_NAME]
        kv = item.tree.spec(item.rel)
        shardings = {item.name: read_shardings(item.tree, item.rel, problems).get(ARRAY_ITEM_NAME)}
    elif item.kind == "pytree":
        entries, strings, use_ocdbt, complete = _tree_entries(item.tree, item.rel)
        if strings and values is not None:
            values += _read_strings(item, strings, entries, problems)
        if not entries:  # only strings (e.g. Keras' model_config item): no array store to open
            return []
        names = [".".join(keys) for keys, _ in entries]
        _warn_shared_names(item, [keys for keys, _ in entries], problems)
        kv = kvstore_spec(item.tree, item.rel, use_ocdbt)
        boxed = boxed_leaves([keys for keys, _ in entries] + strings)[: len(entries)]
        jax_arrays = any(value_type == "jax.Array" for _, value_type in entries)
        shardings = read_shardings(item.tree, item.rel, problems, expected=jax_arrays)
    elif item.kind == PAXML_KIND:
        names = sorted(_paxml_arrays(item.tree, item.rel))
        entries = [(tuple(name.split(".")), "jax.Array") for name in names]
        kv = item.tree.spec(item.rel)
        shardings = read_shardings(item.tree, item.rel, problems, expected=False)
    elif item.kind == "damaged":
        raise CorruptCheckpoint(
            f"item {item.name!r} ({item.path}) has no {TREE_METADATA}",
            hint="the item's metadata is missing: the save did not finish or the copy is incomplete",
        )
    else:
        raise ItemNotFound(
            f"item {item.name!r} holds no arrays (it is {item.kind})", hint="choose a pytree item"
        )

    keys_of = _random_key_impls(item) if item.kind == "pytree" else {}
    return zarr_arrays(
        kv,
        [
            (keys, name, f"prng_key:{keys_of[name]}" if name in keys_of else value_type)
            for (keys, value_type), name in zip(entries, names)
        ],
        shardings,
        f"item {item.name!r}",
        boxed if item.kind == "pytree" else [False] * len(entries),
        every_chunk_written=complete,
    )


def _read_strings(
    item: Item,
    strings: list[tuple[str, ...]],
    entries: list[tuple[tuple[str, ...], str]],
    problems: list[str],
) -> list[tuple[str, Any]]:
    """The string leaves of an item, from its ``_strings.json`` (by Orbax's dotted names)."""
    rel = rel_path(item.rel, STRINGS_FILE)
    raw = item.tree.read(rel)
    try:
        stored = load_json(raw) if raw is not None else None
    except ValueError:
        stored = None
    if not isinstance(stored, dict):
        state = "missing" if raw is None else "damaged"
        problems.append(f"{item.tree.path(rel)} is {state}: the item's string values are unknown")
        stored = {}
    boxed = boxed_leaves([keys for keys, _ in entries] + strings)[len(entries) :]
    found = []
    for keys, box in zip(strings, boxed):
        value = stored.get(".".join(keys))
        if value is None and stored:
            problems.append(f"{item.tree.path(rel)} has no value for {join_keys(keys, unbox=False)}")
        found.append((join_keys(keys[:-1] if box else keys, unbox=False), value))
    return found


def _random_key_impls(item: Item) -> dict[str, str]:
    """The arrays that hold typed PRNG keys (``jax.random.key``), with their implementation, from
    ``array_metadatas/`` (Orbax stores a key array as its uint32 key data, and says so there)."""
    folder = rel_path(item.rel, "array_metadatas")
    found: dict[str, str] = {}
    for name in sorted(k for k in item.tree.keys() if k.startswith(folder + "/process_")):
        try:
            doc = load_json(item.tree.read(name) or b"")
            for entry in doc.get("array_metadatas") or ():
                meta = entry.get("array_metadata") or {}
                impl = (meta.get("ext_metadata") or {}).get("random_key_impl")
                if impl:
                    found[str(meta["param_name"])] = str(impl)
        except (ValueError, TypeError, AttributeError, KeyError):
            continue  # a damaged record only loses the naming of keys
    return found


def shared_names(all_keys: Sequence[tuple[str, ...]]) -> dict[str, list[tuple[str, ...]]]:
    """Leaves whose keys Orbax joins into one array name (``{'a.b': x, 'a': {'b': y}}``): it
    stores one array for both, so one of the two values is lost. By that name."""
    by_name: dict[str, list[tuple[str, ...]]] = {}
    for keys in all_keys:
        by_name.setdefault(".".join(keys), []).append(keys)
    return {name: keys for name, keys in by_name.items() if len(keys) > 1}


def _warn_shared_names(item: Item, all_keys: list[tuple[str, ...]], problems: list[str]) -> None:
    for name, keys in shared_names(all_keys).items():
        shown = " and ".join(join_keys(k, unbox=False) for k in keys)
        problems.append(
            f"item {item.name!r}: {shown} are stored as one array {name!r}; one of their values is lost"
        )


def zarr_arrays(
    kv: dict[str, Any],
    entries: Sequence[tuple[tuple[str, ...], str, str]],
    shardings: dict[str, SavedSharding | None] | None = None,
    where: str = "the checkpoint",
    boxed: Sequence[bool] | None = None,
    every_chunk_written: bool = False,
) -> list[StoredArray]:
    """The zarr (v2 or v3) arrays of one kvstore, from their metadata files, read concurrently.

    ``entries``: (tree keys, array name in the store, value type) of each array; ``shardings``
    by dotted keys; ``boxed``: which end in a box's ``value`` (default: :func:`boxed_leaves`);
    ``every_chunk_written``: the writer stored every chunk, so a missing one fails its read.
    Used for Orbax items and for any other format that stores zarr arrays.
    """
    if boxed is None:
        boxed = boxed_leaves([keys for keys, _, _ in entries])
    names = [name for _, name, _ in entries]
    v2 = _read_kv(kv, [f"{n}/.zarray" for n in names])
    missing = [i for i, raw in enumerate(v2) if raw is None]
    v3 = _read_kv(kv, [f"{names[i]}/zarr.json" for i in missing]) if missing else []
    for i, raw in zip(missing, v3):
        v2[i] = raw
    arrays = []
    store = json.dumps(kv, sort_keys=True)
    shardings = shardings or {}
    for (keys, name, value_type), raw, box in zip(entries, v2, boxed):
        if raw is None:
            raise CorruptCheckpoint(
                f"array {name!r} of {where} is listed in the metadata but not stored",
                hint="the checkpoint is incomplete or damaged",
            )
        shape, dtype, itemsize, chunks, driver, template = _zarr_metadata(raw, name)
        arrays.append(
            StoredArray(
                keys=keys,
                shape=shape,
                dtype=dtype,
                itemsize=itemsize,
                chunks=chunks,
                driver=driver,
                store=store,
                name=name,
                sharding=shardings.get(".".join(keys)),
                sharding_saved=".".join(keys) in shardings,
                value_type=value_type,
                metadata_template=template,
                boxed=box,
                every_chunk_written=every_chunk_written,
            )
        )
    return arrays


# ----------------------------------------------------------------------------------------------
# Data


_STORES: dict[str, tuple[Any, Any]] = {}  # store spec -> (context, opened kvstore)


def _open_store(store: str, context):
    """The opened kvstore of an item (JSON spec ``store``), once per process and context."""
    import tensorstore as ts

    cached = _STORES.get(store)
    if cached is None or cached[0] is not context:
        if len(_STORES) >= 32:
            _STORES.clear()
        cached = _STORES[store] = (context, ts.KvStore.open(json.loads(store), context=context).result())
    return cached[1]


def open_arrays(arrays: Sequence[StoredArray]) -> list[Any]:
    """Opens many stored arrays read-only, all at once; returns, in order, a TensorStore handle
    (sliceable, ``.read()``) or the :class:`ArrayReadError` of each.

    The opens run concurrently in TensorStore's threads, over the item's one opened kvstore.
    Each is given the zarr metadata :func:`read_arrays` already read (``assume_metadata``), so
    opening costs no I/O: only reading the data does. Arrays whose chunks an OCDBT b-tree holds
    inline (:mod:`paramscope.io.btree`) are opened over a copy of those chunks in memory, and
    single-chunk ones of one metadata together, as one stack (:func:`_stacked`).
    """
    import tensorstore as ts

    context = storage.context()
    futures: list[Any] = []
    trees: dict[str, btree.BTree] = {}
    stacked = _stacked(arrays)
    for position, array in enumerate(arrays):
        if position in stacked:
            futures.append(stacked[position])
            continue
        try:
            tree = trees[array.store] if array.store in trees else btree.loaded(array.store)
            if tree is not None:
                trees[array.store] = tree
            kvstore = tree.stage(array.name) if tree is not None else None
            if kvstore is None:
                kvstore = _open_store(array.store, context) / f"{array.name}/"
            if array.metadata_template:
                complete = array.every_chunk_written
                spec = _array_spec(array.metadata_template, array.driver, array.shape, array.chunks, complete)
                future = ts.open(spec, kvstore=kvstore, read=True, assume_metadata=True, context=context)
            else:
                future = ts.open(
                    {"driver": array.driver, "fill_missing_data_reads": not array.every_chunk_written},
                    kvstore=kvstore,
                    read=True,
                    open=True,
                    context=context,
                )
            futures.append(future)
        except Exception as err:
            futures.append(storage.store_fault(err, array.store) or ArrayReadError("open", array.path, err))
    for tree in trees.values():
        tree.flush()
    handles = []
    for array, future in zip(arrays, futures):
        if isinstance(future, StorageError):
            raise future
        if isinstance(future, (ArrayReadError, _StackMember)):
            handles.append(future)
            continue
        try:
            handles.append(future.result())
        except Exception as err:
            fault = storage.store_fault(err, array.store)
            if fault is not None:
                raise fault from None
            handles.append(ArrayReadError("open", array.path, err))
    return handles


STACK_MIN = 8  # single-chunk arrays of one metadata opened as one array from this many


def _stacked(arrays: Sequence[StoredArray]) -> dict[int, _StackMember]:
    """Handles of the small arrays among ``arrays`` that are stored inline in their item's b-tree
    as exactly one chunk, by position: those of one metadata and shape are staged as the chunks
    of one array with a leading axis, opened once and read once (TensorStore decodes the chunks
    concurrently), instead of one open and one read each."""
    import tensorstore as ts

    groups: dict[tuple, list[int]] = {}
    for position, array in enumerate(arrays):
        if array.shape and array.metadata_template and tuple(array.chunks) == tuple(array.shape):
            key = (array.store, array.metadata_template, array.driver, array.shape)
            groups.setdefault(key, []).append(position)
    members: dict[int, _StackMember] = {}
    context = storage.context()
    for (store, template, driver, shape), positions in groups.items():
        tree = btree.loaded(store) if len(positions) >= STACK_MIN else None
        if tree is None:
            continue
        chunks = [tree.single_chunk(arrays[p].name) for p in positions]
        positions = [p for p, chunk in zip(positions, chunks) if chunk]
        if len(positions) < STACK_MIN:
            continue
        stacked_template = _stack_template(template, shape)
        if stacked_template is None:
            continue
        try:
            folder = tree.stage_stack([c for c in chunks if c], _stack_key(template, driver, len(shape)))
            tree.flush()
            spec = _array_spec(stacked_template, driver, (len(positions), *shape), (1, *shape), True)
            handle = ts.open(spec, kvstore=folder, read=True, assume_metadata=True, context=context).result()
        except Exception:  # noqa: BLE001 - opened one by one instead, which reports any problem
            continue
        stack = _Stack(handle)
        for k, p in enumerate(positions):
            members[p] = _StackMember(stack, k)
    return members


def _stack_template(template: str, shape: tuple[int, ...]) -> str | None:
    """The metadata of a stack of single-chunk arrays of metadata ``template`` and ``shape``: a
    zarr3 shard of one inner chunk gains the leading axis too (its bytes are the same); None
    when the metadata holds anything else that is per dimension."""
    meta = json.loads(template)
    if meta.get("dimension_names") is not None or '"transpose"' in template:
        return None
    for codec in meta.get("codecs") or []:
        if codec.get("name") == "sharding_indexed":
            configuration = codec.get("configuration") or {}
            if configuration.get("chunk_shape") != list(shape):
                return None
            configuration["chunk_shape"] = [1, *shape]
    return json.dumps(meta, sort_keys=True)


def _stack_key(template: str, driver: str, rank: int):
    """The key of chunk ``i`` of a stack of single-chunk arrays of ``rank`` dimensions."""
    meta = json.loads(template)
    if driver == "zarr3":
        encoding = meta.get("chunk_key_encoding") or {}
        default = encoding.get("name", "default") == "default"
        separator = (encoding.get("configuration") or {}).get("separator", "/" if default else ".")
        prefix = "c" + separator if default else ""
    else:
        separator, prefix = meta.get("dimension_separator") or ".", ""
    zeros = separator.join(["0"] * rank)
    return lambda i: f"{prefix}{i}{separator}{zeros}"


class _Stack:
    """Arrays staged as one (a leading axis): read once, when the first of them is."""

    def __init__(self, handle):
        self.handle = handle
        self.future = None

    def start(self) -> None:
        if self.future is None:
            self.future = self.handle.read()

    def value(self, k: int):
        self.start()
        try:
            return self.future.result()[k]
        except Exception:  # noqa: BLE001 - one damaged chunk: each read alone, to say which
            return self.handle[k].read().result()


class _StackMember:
    """The handle of one array of a :class:`_Stack`: read whole, it shares the stack's one read;
    sliced, it is a view of the stack."""

    def __init__(self, stack: _Stack, k: int):
        self.stack, self.k = stack, k

    def __getitem__(self, index):
        return self.stack.handle[(self.k, *(index if isinstance(index, tuple) else (index,)))]

    def read(self):
        self.stack.start()
        return _StackRead(self.stack, self.k)


class _StackRead:
    def __init__(self, stack: _Stack, k: int):
        self.stack, self.k = stack, k

    def result(self):
        return self.stack.value(self.k)


def start_read(handle, index: tuple[slice, ...] | None, path: str):
    """Starts reading one slice of an opened array (``index`` None: all of it);
    :func:`finish_read` waits for it."""
    try:
        return (handle if index is None else handle[index]).read()
    except Exception as err:
        raise (storage.store_fault(err) or ArrayReadError("read", path, err)) from None


def finish_read(future, path: str):
    """The numpy value of a read started by :func:`start_read`."""
    try:
        return future.result()
    except Exception as err:
        raise (storage.store_fault(err) or ArrayReadError("read", path, err)) from None


def stored_array_names(kvstore: dict[str, Any]) -> set[str]:
    """Names of the arrays a kvstore holds (those with zarr metadata), by listing its keys."""
    import tensorstore as ts

    try:
        keys = ts.KvStore.open(kvstore, context=storage.context()).result().list().result()
    except Exception as err:
        fault = storage.store_fault(err, kvstore)
        if fault is not None:
            raise fault from None
        raise CorruptCheckpoint(
            f"cannot list the array store: {short_error(err)}", hint="the store is damaged"
        ) from None
    names = set()
    for key in keys:
        key = bytes(key).decode("utf-8", "replace")
        for suffix in ("/.zarray", "/zarr.json"):
            if key.endswith(suffix):
                names.add(key[: -len(suffix)])
    return names


def audit_item(item: Item, arrays: list[StoredArray]) -> list[tuple[str | None, str]]:
    """Where an item's ``_METADATA`` tree, its ``_sharding`` file and its stored arrays disagree.

    Returns (array name or None, problem) pairs; reads metadata only.
    """
    if item.kind != "pytree":
        return []
    problems: list[tuple[str | None, str]] = []
    for name, keys in shared_names([a.keys for a in arrays]).items():
        shown = " and ".join(join_keys(k, unbox=False) for k in keys)
        problems.append((name, f"{shown} are stored as one array: one of their values is lost"))
    listed = {a.name: a for a in arrays}
    kvstore = json.loads(arrays[0].store) if arrays else None
    if kvstore is not None:
        for name in sorted(stored_array_names(kvstore) - set(listed)):
            problems.append((name, f"stored, but not listed in {TREE_METADATA}"))
    shardings = read_shardings(item.tree, item.rel, [], expected=False)
    for name in sorted(set(shardings) - set(listed)):
        problems.append((name, f"{SHARDING_FILE} has an entry for an array {TREE_METADATA} does not list"))
    for array in arrays:
        if array.value_type == "jax.Array" and shardings and array.name not in shardings:
            problems.append((array.name, f"a jax.Array without an entry in {SHARDING_FILE}"))
        sharding = array.sharding
        if sharding is None:
            continue
        if len(sharding.spec) > len(array.shape):
            problems.append(
                (
                    array.name,
                    f"its partition spec has {len(sharding.spec)} entries for {len(array.shape)} dimensions",
                )
            )
        axes = dict(sharding.mesh_axes)
        for entry in sharding.spec:
            for axis in (entry,) if isinstance(entry, str) else entry or ():
                if axis not in axes:
                    problems.append(
                        (array.name, f"its partition spec names axis {axis!r}, not in the saved mesh")
                    )
    return problems


def custom_metadata(location: Location) -> dict[str, Any]:
    """The step's custom metadata (``_CHECKPOINT_METADATA``), e.g. MaxText's ``scan_layers``."""
    try:
        meta = read_step_metadata(location)
    except CorruptCheckpoint:
        return {}
    custom = meta.get("custom_metadata") or meta.get("custom") if isinstance(meta, dict) else None
    return custom if isinstance(custom, dict) else {}


def commit_timestamp(location: Location) -> int | None:
    """When the step was committed (nanoseconds), from ``_CHECKPOINT_METADATA``; None if unknown
    (absent, or no time a clock gives: NaN, negative, past 64 bits)."""
    try:
        meta = read_step_metadata(location)
    except CorruptCheckpoint:
        return None
    value = meta.get("commit_timestamp_nsecs") if isinstance(meta, dict) else None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 2**63:
        return None  # NaN fails the comparison too
    return int(value)
