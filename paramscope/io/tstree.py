"""Trees of TensorStore zarr arrays: EasyDeL checkpoints and plain zarr folders.

Two layouts, one item kind (``tensorstore``), arrays read by TensorStore as zarr (v2 or v3):

- **EasyDeL** (``save_pretrained``, through eformer): ``tensorstore_index.json`` lists every array
  by save prefix, ``{"prefixes": {"model": [{"path": "model/lm_head/kernel", "shape", "dtype"},
  ...]}}``, each ``path`` a zarr folder relative to the checkpoint. Names are the paths less their
  prefix (``lm_head.kernel``, the NNX module path), or with it as the first component when the
  index holds several prefixes. ``checkpoint_metadata.json`` and a few ``config.json`` fields are
  shown by ``info``. ``model_structure.json`` (a pickled tree definition) is never read.
- **Plain zarr trees** (Levanter, hand-written ``ts.open`` trees): every folder holding zarr
  metadata (``.zarray``, or a ``zarr.json`` of an array) is one array, named by its path with
  ``/`` read as ``.``.
- **Levanter runs**: Levanter's ``Checkpointer`` saves each step as a zarr tree in ``step-<N>/``
  and writes ``metadata.json`` (``{"step", "timestamp"}``) into it last, once every array is
  stored. A folder of ``step-<N>`` trees is a root with steps, the latest finished one by default;
  a ``step-<N>`` folder without ``metadata.json`` is an unfinished save, skipped. A tree whose
  top-level folders look like steps is never read as one tree: two steps' arrays side by side
  would be one checkpoint's. A tree with ``metadata.json`` at its top is one step.

The layout comes from the one listing of the folder; nothing is imported or unpickled.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
from dataclasses import dataclass
from typing import Any

from paramscope.errors import CorruptCheckpoint, NotACheckpoint, StepNotFound, few
from paramscope.io import orbax, zarr
from paramscope.io.records import Item, Location, Step, StoredArray, dtype_info
from paramscope.io.storage import Tree, load_json, regular_file, rel_path
from paramscope.names import join_keys

KIND = "tensorstore"
UNFINISHED_STEPS = True  # ``locate`` takes ``allow_unfinished``, as Orbax's does
INDEX_FILE = "tensorstore_index.json"
CHECKPOINT_METADATA_FILE = "checkpoint_metadata.json"
CONFIG_FILE = "config.json"
CONFIG_FIELDS = ("architectures", "model_type")  # what ``info`` shows of a model's config
MAX_DEPTH = 64  # array folders deeper than this are not read
ZARR2_FILE, ZARR3_FILE = ".zarray", "zarr.json"
STEP_METADATA_FILE = "metadata.json"  # Levanter's, written once the step's arrays are stored
_STEP_FOLDER = re.compile(r"^step-(?P<step>\d+)$")
# Files only Orbax writes: a tree holding them is Orbax's to read (or to name as damaged).
_ORBAX_FILES = frozenset(
    {
        orbax.TREE_METADATA,
        orbax.CHECKPOINT_METADATA,
        orbax.OCDBT_MANIFEST,
        orbax.SHARDING_FILE,
        orbax.COMMIT_MARKER,
    }
)
_INDEX_HINT = "the checkpoint's tensorstore_index.json is damaged; re-save or restore it from a copy"


def _base(rel: str) -> str:
    return rel.rsplit("/", 1)[-1]


def _few(names: list[str], shown: int = 3) -> str:
    return few(names, shown)


# ----------------------------------------------------------------------------------------------
# Layout, from the tree's one listing


@dataclass(frozen=True)
class _Listed:
    """The zarr arrays under a folder: their folders (relative to it) and metadata file names."""

    arrays: dict[str, str]  # folder -> ".zarray" or "zarr.json"
    too_deep: int  # arrays below MAX_DEPTH, not read


def _zarr_folders(tree: Tree, rel: str) -> _Listed:
    """Every folder under ``rel`` with zarr metadata, from the listing; zarr v3 groups left out."""
    prefix = rel + "/" if rel else ""
    found: dict[str, str] = {}
    too_deep = 0
    for key in tree.keys():
        if not key.startswith(prefix):
            continue
        folder, _, name = key[len(prefix) :].rpartition("/")
        if name not in (ZARR2_FILE, ZARR3_FILE):
            continue
        if folder.count("/") >= MAX_DEPTH:
            too_deep += 1
        elif name == ZARR2_FILE or folder not in found:  # a folder with both is read as zarr v2
            found[folder] = name
    return _Listed(_drop_groups(tree, prefix, found), too_deep)


def _drop_groups(tree: Tree, prefix: str, found: dict[str, str]) -> dict[str, str]:
    """Leaves out zarr v3 groups. A ``zarr.json`` folder with other zarr metadata below it is a
    group. Arrays keep their chunks in subfolders (``c/0/0``) unless written with v2-style chunk
    keys or never written to; a folder without subfolders could be either, and its ``zarr.json``
    says which (read for those folders only, in one batch)."""
    v3 = [f for f, name in found.items() if name == ZARR3_FILE]
    if not v3:
        return found
    parents = set()
    for folder in found:
        parts = folder.split("/") if folder else []
        parents.update("/".join(parts[:i]) for i in range(len(parts)))
    groups = {f for f in v3 if f in parents}
    lone = [f for f in v3 if f not in groups and not tree.subdirs(prefix + f)]
    for folder, raw in zip(lone, tree.read_many([prefix + rel_path(f, ZARR3_FILE) for f in lone])):
        try:
            if load_json(raw or b"null").get("node_type") == "group":
                groups.add(folder)
        except (ValueError, AttributeError):
            pass  # damaged metadata: read as an array, which reports it
    return {f: name for f, name in found.items() if f not in groups}


def _below(tree: Tree, name: str) -> list[str]:
    """The folders below the tree's own that hold a file ``name``, relative."""
    return sorted(k[: -len(name) - 1] + "/" for k in tree.keys() if k.endswith("/" + name))


def locate(tree: Tree, step: int | None = None, allow_unfinished: bool = False) -> Location | None:
    """An EasyDeL checkpoint folder, a Levanter run or step, or a plain zarr tree; None for
    anything else. ``allow_unfinished``: a run whose steps are all unfinished resolves to no step
    (for ``info``), rather than failing."""
    keys = tree.keys()
    if not keys:
        return None
    if INDEX_FILE not in keys:
        if any(_base(k) in _ORBAX_FILES for k in keys):
            return None  # Orbax's own (it has said what is wrong with it)
        nested = _below(tree, INDEX_FILE)
        if nested:
            raise NotACheckpoint(
                f"{tree.display} is not a checkpoint (no {INDEX_FILE})",
                hint="found EasyDeL checkpoints under " + _few(nested),
            )
        arrays = _zarr_folders(tree, "").arrays
        run = _run(tree, arrays, step, allow_unfinished)
        if run is not None:
            return run
        runs = _runs_below(arrays)
        if runs:  # the steps of a run are never merged into one tree
            found, hint = ("a run", "pass it: ") if len(runs) == 1 else ("runs", "pass one, e.g. ")
            raise NotACheckpoint(
                f"{tree.display} is not one checkpoint: found {found} under {_few(runs)}",
                hint=hint + tree.path(runs[0].rstrip("/")),
            )
        if not arrays:
            return None
    name = _base(tree.display.rstrip("/")) or tree.display
    if step is not None:
        raise StepNotFound(
            f"--step {step} given, but {tree.display} is a single checkpoint", hint="drop --step"
        )
    item = Item(name, tree.display, KIND, tree, "")
    saved = None if INDEX_FILE in keys else step_metadata(tree, "")
    if saved is not None:  # a Levanter step folder
        this = Step(name, tree.display, saved["step"], True, _timestamp(saved))
        return Location(tree.display, "step", this, [item], tree=tree, step_rel="")
    return Location(tree.display, "item", None, [item], selected_item=name, tree=tree)


def _runs_below(arrays: dict[str, str]) -> list[str]:
    """The folders below the top whose subfolders are Levanter ``step-<N>`` trees, relative."""
    runs = set()
    for folder in arrays:
        parts = folder.split("/")
        for depth in range(1, len(parts)):
            if _STEP_FOLDER.match(parts[depth]):
                runs.add("/".join(parts[:depth]) + "/")
                break
    return sorted(runs)


def step_metadata(tree: Tree, rel: str) -> dict[str, Any] | None:
    """A Levanter step's ``metadata.json``: a JSON object with an integer ``step``; None where
    there is none (or it is not whole: the step is then unfinished)."""
    file = rel_path(rel, STEP_METADATA_FILE)
    if not tree.is_file(file):
        return None
    try:
        saved = json.loads(tree.read(file) or b"")
    except ValueError:
        return None
    number = saved.get("step") if isinstance(saved, dict) else None
    return saved if isinstance(number, int) and not isinstance(number, bool) else None


def _timestamp(saved: dict[str, Any]) -> str | None:
    stamp = saved.get("timestamp")
    return stamp if isinstance(stamp, str) else None


def _run(tree: Tree, arrays: dict[str, str], step: int | None, allow_unfinished: bool) -> Location | None:
    """A folder of Levanter ``step-<N>`` trees as a root with steps; None when it has none."""
    tops = {folder.split("/", 1)[0] for folder in arrays}
    steps: list[Step] = []
    for name in tree.subdirs(""):
        match = _STEP_FOLDER.match(name)
        saved = step_metadata(tree, name) if match else None
        if match and (saved is not None or name in tops):  # begun: it holds arrays or metadata
            number, finished = int(match["step"]), saved is not None
            steps.append(Step(name, tree.path(name), number, finished, _timestamp(saved or {})))
    if not steps:
        return None
    steps.sort(key=lambda s: (s.step, s.finished, s.name))
    others = sorted(top or "." for top in tops if not _STEP_FOLDER.match(top))
    if others:
        raise NotACheckpoint(
            f"{tree.display} holds step folders ({_few([s.name for s in steps])}) and other arrays "
            f"({_few(others)}): not one checkpoint",
            hint=f"pass one step folder, e.g. {tree.path(steps[-1].name)}",
        )
    finished = [s for s in steps if s.finished]
    if step is None:
        if not finished:
            if allow_unfinished:
                return Location(tree.display, "root", None, [], steps=steps, tree=tree)
            raise StepNotFound(
                f"{tree.display} has no finished step, only {len(steps)} unfinished: "
                f"{_few([s.name for s in steps])}",
                hint=f"a step is finished once Levanter writes its {STEP_METADATA_FILE}; "
                "`paramscope info` lists the steps",
            )
        chosen = finished[-1]
    else:
        matches = [s for s in finished if s.step == step]
        if not matches:
            available = ", ".join(str(s.step) for s in finished) or "none"
            raise StepNotFound(
                f"no finished step {step} in {tree.display}", hint=f"finished steps: {available}"
            )
        chosen = matches[-1]
    item = Item(chosen.name, chosen.path, KIND, tree, chosen.name)
    return Location(tree.display, "root", chosen, [item], steps=steps, tree=tree, step_rel=chosen.name)


# ----------------------------------------------------------------------------------------------
# The EasyDeL index


@dataclass(frozen=True)
class _Entry:
    keys: tuple[str, ...]
    folder: str  # relative to the item
    shape: Any  # as the index says (checked by audit_item)
    dtype: Any


def _has_index(item: Item) -> bool:
    return item.tree.is_file(rel_path(item.rel, INDEX_FILE))


def _index_entries(item: Item) -> list[_Entry]:
    """The arrays ``tensorstore_index.json`` lists, named; :class:`CorruptCheckpoint` when it is
    unreadable or not of the expected structure."""
    rel = rel_path(item.rel, INDEX_FILE)
    where = item.tree.path(rel)
    index = orbax.read_json(item.tree, rel)
    prefixes = index.get("prefixes") if isinstance(index, dict) else None
    if not isinstance(prefixes, dict) or not prefixes:
        raise CorruptCheckpoint(f"{where} has no 'prefixes' object", hint=_INDEX_HINT)
    entries: list[_Entry] = []
    for prefix, listed in prefixes.items():
        if not isinstance(listed, list):
            raise CorruptCheckpoint(f"{where}: prefix {str(prefix)[:40]!r} is not a list", hint=_INDEX_HINT)
        for entry in listed:
            path = entry.get("path") if isinstance(entry, dict) else None
            parts = path.split("/") if isinstance(path, str) else []
            if not parts or any(p in ("", ".", "..") for p in parts):
                raise CorruptCheckpoint(
                    f"{where} has an entry without a valid relative path under {str(prefix)[:40]!r}",
                    hint=_INDEX_HINT,
                )
            keys = tuple(parts[1:]) if parts[0] == prefix and len(parts) > 1 else tuple(parts)
            if len(prefixes) > 1:
                keys = (str(prefix), *keys)
            entries.append(_Entry(keys, path, entry.get("shape"), entry.get("dtype")))
    seen: dict[str, str] = {}
    for entry in entries:
        name = join_keys(entry.keys)
        if name in seen:
            raise CorruptCheckpoint(
                f"{where} lists {name!r} twice ({seen[name]}, {entry.folder})", hint=_INDEX_HINT
            )
        seen[name] = entry.folder
    return entries


def _stored_kind(tree: Tree, folder: str) -> str | None:
    if tree.is_file(rel_path(folder, ZARR2_FILE)):
        return ZARR2_FILE
    return ZARR3_FILE if tree.is_file(rel_path(folder, ZARR3_FILE)) else None


# ----------------------------------------------------------------------------------------------
# The format's interface


def read_arrays(item: Item, problems: list[str], values: list | None = None) -> list[StoredArray]:
    """Every array of the item, from its zarr metadata (read concurrently); no array data."""
    tree = item.tree
    if _has_index(item):
        entries = _index_entries(item)
        missing = [join_keys(e.keys) for e in entries if not _stored_kind(tree, rel_path(item.rel, e.folder))]
        if missing:
            raise CorruptCheckpoint(
                f"{_arrays(len(missing))} listed in {tree.path(rel_path(item.rel, INDEX_FILE))} "
                f"{'is' if len(missing) == 1 else 'are'} not stored: {_few(missing)}",
                hint="the checkpoint is incomplete: an array folder is missing",
            )
        listed = [(e.keys, e.folder, "jax.Array") for e in entries]
        return _with_stored_chunks(
            tree, item.rel, zarr.zarr_arrays(tree.spec(item.rel), listed, None, f"item {item.name!r}")
        )
    found = _zarr_folders(tree, item.rel)
    if found.too_deep:
        problems.append(f"{_arrays(found.too_deep)} deeper than {MAX_DEPTH} folders not read")
    # the folder itself may be an array: it is read from its parent, under the folder's name
    own = _own_array(item) if "" in found.arrays else []
    listed = [(tuple(f.split("/")), f, "jax.Array") for f in sorted(found.arrays) if f]
    arrays = zarr.zarr_arrays(tree.spec(item.rel), listed, None, f"item {item.name!r}") if listed else []
    return _with_stored_chunks(tree, item.rel, own, own=True) + _with_stored_chunks(tree, item.rel, arrays)


def _with_stored_chunks(
    tree: Tree, rel: str, arrays: list[StoredArray], own: bool = False
) -> list[StoredArray]:
    """The arrays with the number of their chunks the listing holds (``stored_chunks``), so that
    reading one whose chunks are mostly missing (fill value) is refused before it starts
    (:func:`paramscope.io.records.fill_problem`). ``own``: the arrays are the folder ``rel``
    itself. Local chunk files that are not regular files are refused here, before TensorStore
    would open them."""
    if not arrays:
        return arrays
    by_folder = {"" if own else a.name: a for a in arrays}
    counts = dict.fromkeys(by_folder, 0)
    prefix = rel + "/" if rel else ""
    for key in tree.keys():
        if not key.startswith(prefix):
            continue
        inner, end = key[len(prefix) :], len(key) - len(prefix)
        for _ in range(MAX_DEPTH + 2):  # a chunk key has at most a "c" and one part per dimension
            end = inner.rfind("/", 0, end)
            folder = inner[:end] if end > 0 else ""
            array = by_folder.get(folder)
            if array is not None:
                chunk = inner[end + 1 :] if end >= 0 else inner
                if _is_chunk_key(chunk, array.driver, array.metadata_template, array.shape, array.chunks):
                    if not tree.remote:
                        regular_file(os.path.join(tree.display, key))
                    counts[folder] += 1
                break
            if end <= 0:
                break
    return [dataclasses.replace(a, stored_chunks=counts["" if own else a.name]) for a in arrays]


@functools.lru_cache(maxsize=256)
def _chunk_key_format(driver: str, template: str) -> tuple[str, str]:
    """(prefix, separator) of the chunk keys of arrays of one zarr metadata template."""
    meta = json.loads(template) if template else {}
    if driver == "zarr3":
        encoding = meta.get("chunk_key_encoding") or {}
        default = encoding.get("name", "default") == "default"
        separator = (encoding.get("configuration") or {}).get("separator", "/" if default else ".")
        return ("c", separator) if default else ("", separator)
    return "", meta.get("dimension_separator") or "."


def _is_chunk_key(key: str, driver: str, template: str, shape: tuple, chunks: tuple) -> bool:
    """Whether ``key`` (relative to an array's folder) names a chunk inside the array's grid."""
    prefix, separator = _chunk_key_format(driver, template)
    if not shape:
        return key == (prefix or "0")
    if prefix:
        if not key.startswith(prefix + separator):
            return False
        key = key[len(prefix) + len(separator) :]
    parts = key.split(separator)
    if len(parts) != len(shape) or len(chunks) != len(shape):
        return False
    for part, dim, chunk in zip(parts, shape, chunks):
        if not part.isdigit() or int(part) * max(1, chunk) >= max(dim, 1):
            return False
    return True


def _arrays(count: int) -> str:
    return f"{count} array{'s' if count != 1 else ''}"


def _own_array(item: Item) -> list[StoredArray]:
    spec = item.tree.spec(item.rel)
    parent, _, name = spec["path"].rstrip("/").rpartition("/")
    if not name:
        raise NotACheckpoint(
            f"{item.path} is one zarr array at the root of a bucket", hint="copy it into a folder"
        )
    kv = {**spec, "path": parent + "/" if parent or item.tree.scheme == "file" else ""}
    return zarr.zarr_arrays(kv, [((name,), name, "jax.Array")], None, f"array {name!r}")


def witness_files(item: Item) -> list[str]:
    """Levanter writes a step's ``metadata.json`` again whenever it saves the step."""
    return [rel_path(item.rel, STEP_METADATA_FILE)]


def audit_item(item: Item, arrays: list[StoredArray]) -> list[tuple[str | None, str]]:
    """Where ``tensorstore_index.json`` and the stored arrays disagree: shapes, dtypes, arrays
    stored but not listed, and unreadable ``checkpoint_metadata.json`` / ``config.json``."""
    if not _has_index(item):
        return []
    problems: list[tuple[str | None, str]] = []
    by_folder = {a.name: a for a in arrays}
    listed = set()
    for entry in _index_entries(item):
        listed.add(entry.folder)
        array = by_folder.get(entry.folder)
        name = join_keys(entry.keys)
        if array is None:
            problems.append((name, f"listed in {INDEX_FILE} but not stored"))
            continue
        shape = _shape(entry.shape)
        if shape is None:
            problems.append((name, f"its {INDEX_FILE} entry has a malformed shape {str(entry.shape)[:40]}"))
        elif shape != array.shape:
            problems.append(
                (name, f"{INDEX_FILE} says shape {list(shape)}, the stored array has {list(array.shape)}")
            )
        dtype = _dtype(entry.dtype)
        if dtype is None:
            problems.append((name, f"its {INDEX_FILE} entry has an unknown dtype {str(entry.dtype)[:40]!r}"))
        elif dtype != array.dtype:
            problems.append((name, f"{INDEX_FILE} says dtype {dtype}, the stored array has {array.dtype}"))
    for folder in sorted(set(_zarr_folders(item.tree, item.rel).arrays) - listed):
        problems.append((folder, f"stored, but not listed in {INDEX_FILE}"))
    for file in (CHECKPOINT_METADATA_FILE, CONFIG_FILE):
        rel = rel_path(item.rel, file)
        if item.tree.is_file(rel) and not isinstance(_json_object(item.tree, rel), dict):
            problems.append((None, f"{item.tree.path(rel)} is not a JSON object"))
    return problems


def _shape(value: Any) -> tuple[int, ...] | None:
    if not isinstance(value, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in value):
        return None
    return tuple(value) if all(d >= 0 for d in value) else None


def _dtype(value: Any) -> str | None:
    try:
        return dtype_info(value)[0] if isinstance(value, str) else None
    except (TypeError, AttributeError):
        return None


def _json_object(tree: Tree, rel: str) -> dict[str, Any] | None:
    try:
        value = orbax.read_json(tree, rel)
    except CorruptCheckpoint:
        return None
    return value if isinstance(value, dict) else None


def describe(item: Item) -> dict[str, Any]:
    """``storage`` ("zarr" or "zarr3") and ``metadata``: for EasyDeL the model's architecture
    and type from ``config.json`` and the content of ``checkpoint_metadata.json``, for a Levanter
    step its ``metadata.json``."""
    tree = item.tree
    if _has_index(item):
        try:
            folders = [rel_path(item.rel, e.folder) for e in _index_entries(item)]
        except CorruptCheckpoint:
            folders = []
        kinds = {_stored_kind(tree, f) for f in folders}
    else:
        kinds = set(_zarr_folders(tree, item.rel).arrays.values())
    storage = "zarr3" if kinds == {ZARR3_FILE} else "zarr"
    if not _has_index(item):
        return {"storage": storage, "metadata": step_metadata(tree, item.rel)}
    metadata: dict[str, Any] = {}
    config = _json_object(tree, rel_path(item.rel, CONFIG_FILE)) or {}
    metadata.update({k: config[k] for k in CONFIG_FIELDS if k in config})
    saved = _json_object(tree, rel_path(item.rel, CHECKPOINT_METADATA_FILE)) or {}
    metadata.update({k: v for k, v in saved.items() if k not in metadata})
    return {"storage": storage, "metadata": metadata or None}
