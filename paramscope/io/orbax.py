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
    few,
)
from paramscope.io import storage
from paramscope.io.records import (
    STEP_NAME,
    Item,
    Location,
    SavedSharding,
    Step,
    StoredArray,
)
from paramscope.io.storage import Tree, load_json, rel_path
from paramscope.io.zarr import boxed_leaves, stored_array_names, zarr_arrays
from paramscope.names import join_keys

KIND = "pytree"
KINDS = ("pytree", "array", "damaged", "paxml")  # the items that hold arrays (json and iterator items do not)
UNFINISHED_STEPS = True  # ``locate`` takes ``allow_unfinished``

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
        match = STEP_NAME.match(name)
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
    steps_are_items = all(STEP_NAME.match(i.name) for i in items) and not tree.is_file(CHECKPOINT_METADATA)
    if (items and not steps_are_items) or tree.is_file(CHECKPOINT_METADATA):
        if step is not None:
            raise StepNotFound(
                f"--step {step} given, but {path} is a single step", hint="pass the manager root"
            )
        match = STEP_NAME.match(name)
        this = Step(name, path, int(match.group("step")) if match else None, _is_finished_step(tree, ""))
        return Location(path, "step", this, _with_other_items(tree, "", items), tree=tree, step_rel="")

    listed = _list_steps(tree)
    steps = [s for s, _ in listed]
    if not steps:
        found = _checkpoints_below(tree, "")
        hint = "pass a CheckpointManager root, a step folder or an item folder"
        if found:
            hint = "found checkpoints under " + few(found, 3)
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


def describe(item: Item) -> dict[str, Any]:
    """What ``info`` shows of an item beyond its arrays: how it stores them."""
    return {"storage": storage_format(item)} if item.kind in ("pytree", "array", PAXML_KIND) else {}


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
