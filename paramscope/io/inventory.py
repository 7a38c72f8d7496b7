"""What a checkpoint holds, from metadata alone: parameters, counts, masks, steps and items.

Nothing here reads array data or imports jax, so these answers take the same time for a 1 MB
and a 100 GB checkpoint of the same structure.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from paramscope._mask import compile_patterns, mask_predicate
from paramscope.errors import ItemNotFound, ParamscopeError, UsageError, few
from paramscope.io import checkpoint
from paramscope.io.storage import Tree
from paramscope.names import path_sort_key, prefix_groups, quote_key, split_path

DEFAULT_ITEM = "params"


@dataclass(frozen=True)
class ParamInfo:
    """One parameter (array) of a checkpoint.

    Attributes:
        path: Dotted path, relative to the chosen subtree, with boxes unboxed.
        shape: Global shape.
        dtype: dtype name (``float32``, ``bfloat16``, ...).
        itemsize: Bytes per element.
        sharding: The saved partition spec, one entry per dimension (None, an axis name, or a
            tuple of axis names), or None when replicated, single-device or unknown (see
            :attr:`sharding_stored`).
        stored: Where the array lives (for reading its data).
    """

    path: str
    shape: tuple[int, ...]
    dtype: str
    itemsize: int
    sharding: tuple[Any, ...] | None
    stored: checkpoint.StoredArray = field(compare=False, repr=False)
    layer: tuple[int, int] | None = field(default=None, compare=False)  # (axis, index) of a stack

    def index_in_store(self, index: tuple[slice, ...] | None) -> tuple | None:
        """The index to read from the stored array for an index of this parameter: a layer of a
        stacked array reads its own slice (its layer axis dropped), anything else reads as asked."""
        if self.layer is None:
            return index
        axis, position = self.layer
        index = tuple(slice(0, d) for d in self.shape) if index is None else tuple(index)
        return (*index[:axis], position, *index[axis:])

    @property
    def sharding_stored(self) -> bool:
        """Whether the checkpoint records this array's sharding (Orbax does; safetensors,
        msgpack, npz and the like do not): without it ``sharding`` None is unknown, not replicated."""
        if self.stored is None:  # a baseline's record: what the document said
            return self.sharding is not None
        return bool(getattr(self.stored, "sharding_saved", False))

    @property
    def random_key(self) -> str | None:
        """The implementation of a typed PRNG key array (its stored values are key data)."""
        kind = getattr(self.stored, "value_type", "") or ""
        return kind.split(":", 1)[1] if kind.startswith("prng_key:") else None

    @property
    def count(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.count * self.itemsize


@dataclass
class Inventory:
    """The parameters of one step of a checkpoint, and where they came from."""

    checkpoint: str
    step: int | None
    items: list[str]
    subtree: str | None
    params: list[ParamInfo]
    saved_mesh: tuple[tuple[str, int], ...] | None
    warnings: list[str] = field(default_factory=list)
    shown: str = ""  # the path as the caller wrote it (relative stays relative)
    custom: dict[str, Any] = field(default_factory=dict)  # the step's custom metadata
    views: list | None = None  # with --unstack: where each shown parameter comes from (LayerView)
    # leaves that are not arrays (strings): {"path", "type", "value"}
    values: list[dict[str, Any]] = field(default_factory=list)
    # what identified the step's data when it was opened, or (in a bucket) when reading began
    # (:func:`checkpoint.witness`, :func:`checkpoint.first_witness`)
    location: Any = field(default=None, repr=False, compare=False)
    witness: tuple | None = field(default=None, repr=False, compare=False)

    def begin_read(self) -> None:
        """Notes what identifies the step's data before its arrays are read, where it was not
        noted when the step was opened (a request for no bytes per metadata file in a bucket);
        raises :class:`CheckpointChanged` if the step was deleted since it was opened."""
        if self.location is not None and self.witness is None:
            self.witness = checkpoint.first_witness(self.location, self.shown or self.checkpoint)

    def check_unchanged(self) -> None:
        """Raises :class:`CheckpointChanged` when the step's files were deleted or replaced
        since reading began: numbers read meanwhile may mix two saves, or fill what is gone."""
        if self.location is not None and self.witness is not None:
            checkpoint.check_witness(self.location, self.witness, self.shown or self.checkpoint)

    @property
    def total_count(self) -> int:
        return sum(p.count for p in self.params)

    @property
    def total_bytes(self) -> int:
        return sum(p.nbytes for p in self.params)


def sharding_json(spec) -> list | None:
    """A partition spec as JSON: one entry per dimension (axis name, list of names, or null).

    >>> sharding_json((None, ("data", "fsdp"))), sharding_json(None)
    ([None, ['data', 'fsdp']], None)
    """
    if spec is None:
        return None
    return [list(e) if isinstance(e, tuple) else e for e in spec]


def param_sharding_json(param: ParamInfo) -> list | None:
    """A parameter's saved sharding as JSON: one entry per dimension (all null: replicated), or
    None where the checkpoint stores no sharding."""
    if not param.sharding_stored:
        return None
    if param.sharding is None:
        return [None] * len(param.shape)
    return sharding_json(param.sharding)


def spec_per_dim(array: checkpoint.StoredArray) -> tuple[Any, ...] | None:
    """The saved partition spec with one entry per dimension; None when nothing is sharded."""
    if array.sharding is None:
        return None
    spec = list(array.sharding.spec[: len(array.shape)])
    spec += [None] * (len(array.shape) - len(spec))
    return tuple(spec) if any(entry is not None for entry in spec) else None


def _select_items(location: checkpoint.Location, item: str | None) -> list[checkpoint.Item]:
    """The items to read. A damaged item (no _METADATA) is chosen like a pytree item, so that
    reading it fails loudly instead of the choice silently falling to another item."""
    readable = [i for i in location.items if checkpoint.holds_arrays(i)]
    if location.selected_item is not None:
        others = [i for i in readable if i.name == item and item != location.selected_item]
        if others:  # a folder of two formats' weights: the other one, by name
            return others
        if item is not None and item != location.selected_item:
            raise ItemNotFound(
                f"--item {item} given, but {location.path} is the item {location.selected_item!r}",
                hint="pass the step folder or the manager root to choose an item",
            )
        chosen = [i for i in readable if i.name == location.selected_item]
        if not chosen:
            raise ItemNotFound(f"{location.path} holds no arrays (a JSON item)", hint="pass a pytree item")
        return chosen
    if item is not None:
        chosen = [i for i in readable if i.name == item]
        others = [i for i in location.items if i.name == item and not checkpoint.holds_arrays(i)]
        if others:
            raise ItemNotFound(
                f"item {item!r} is {item_kind_text(others[0])}, not arrays{_content_text(others[0])}",
                hint=f"`paramscope info {location.path}` shows every item and its content",
            )
        if not chosen:
            names = few(i.name for i in readable)
            raise ItemNotFound(f"no item {item!r} with arrays in {location.path}", hint=f"items: {names}")
        return chosen
    pytrees = [i for i in readable if i.kind != "array"]
    defaults = [i for i in pytrees if i.name == DEFAULT_ITEM]
    if defaults:
        return defaults
    if pytrees:
        return pytrees
    if readable:
        return readable
    raise ItemNotFound(
        f"{location.path} has no item that holds arrays",
        hint="`paramscope info` lists the items; the step may be empty or damaged",
    )


def item_kind_text(item: checkpoint.Item) -> str:
    """What an item that holds no arrays is, for people."""
    if item.kind == "json":
        return "a JSON item"
    if item.kind == "iterator":
        return "a dataset iterator's state (grain)"
    return f"an item of a handler paramscope does not read ({item.handler or 'unnamed'})"


MAX_SHOWN_CONTENT = 300  # characters of an item's content shown in a one-line message


def shown_content(value: Any, limit: int = MAX_SHOWN_CONTENT) -> str:
    r"""JSON content on one line, with every character that is not printable (control
    characters, line breaks, terminal escapes) escaped; cut after ``limit`` characters between
    whole values, marked ``...``: a number is shown exactly, or not at all.

    >>> shown_content({"a": "x\x1b\x7f\u2028y"}), shown_content([1.25, 3.5], limit=9)
    ('{"a": "x\\u001b\\u007f\\u2028y"}', '[1.25...')
    """

    def printable(text: str) -> str:
        return "".join(c if c.isprintable() else f"\\u{ord(c):04x}" for c in text)

    text = printable(json.dumps(value, ensure_ascii=False))
    if len(text) <= limit:
        return text
    kept, size = [], 0
    for chunk in json.JSONEncoder(ensure_ascii=False).iterencode(value):  # never splits a value
        chunk = printable(chunk)
        if size + len(chunk) > limit - 3:
            break
        kept.append(chunk)
        size += len(chunk)
    return "".join(kept) + "..."


def item_content(item: checkpoint.Item) -> Any:
    """The content of a JSON item, or an iterator item's state by file; None for other items."""
    if item.kind == "json":
        return checkpoint.read_json_item(item)
    if item.kind == "iterator":
        return checkpoint.read_iterator_item(item)
    return None


def _content_text(item: checkpoint.Item) -> str:
    try:
        content = item_content(item)
    except ParamscopeError as err:
        return f" ({err.message[:120]})"
    return "" if content is None else f": {shown_content(content)}"


def _relative(path: str, subtree: str) -> str | None:
    if path == subtree:
        return split_path(path)[-1]
    if path.startswith(subtree + "."):
        return path[len(subtree) + 1 :]
    return None


def open_checkpoint(
    path: str | os.PathLike,
    step: int | None = None,
    item: str | None = None,
    subtree: str | None = None,
    tree: Tree | None = None,
) -> Inventory:
    """Lists the parameters of a checkpoint from its metadata.

    Args:
        path: A CheckpointManager root, a step folder or an item folder.
        step: The step to read (a root only); default the latest finished step.
        item: The item to read; default ``params`` if present, else the only pytree item,
            else every pytree item with its name as the first path component.
        subtree: Keep only this dotted subtree, with paths relative to it.
        tree: The :class:`~paramscope.io.storage.Tree` of ``path`` when it is already open: the
            steps of a run are then read from its one listing, each file once.

    Returns:
        The :class:`Inventory` of the chosen step and items.

    Raises:
        ParamscopeError: The path is missing, not a checkpoint, or has no such step or item.
    """
    location = checkpoint.locate(tree if tree is not None else os.fspath(path), step)
    # on a disk what identifies the step is noted at once (no request); in a bucket when reading
    # begins, so that commands reading only metadata make no request for it
    local = location.tree is not None and not location.tree.remote
    witness = checkpoint.witness(location) if local else None
    items = _select_items(location, item)
    warnings: list[str] = []
    found = []
    for chosen in items:
        values: list[tuple[str, Any]] = []
        try:
            found.append((chosen, checkpoint.read_arrays(chosen, warnings, values), values))
        except ParamscopeError:  # metadata that vanished under us: a step deleted, not damage
            checkpoint.first_witness(location, os.fspath(path))
            raise
        warnings += checkpoint.notes(chosen)
    if item is None and len(found) > 1:
        # several pytree items and none named `params`: those holding only strings (Keras'
        # model_config beside its pytree) do not make the others' paths longer
        with_arrays = [entry for entry in found if entry[1]]
        if len(with_arrays) == 1:
            found = with_arrays
    params = []
    shown_values = []
    saved_mesh = None
    for chosen, arrays, values in found:
        prefix = "" if len(found) == 1 else f"{quote_key(chosen.name)}."
        for name, value in values:
            name = prefix + name
            if subtree:
                name = _relative(name, subtree)
            if name is not None:
                shown_values.append({"path": name, "type": type(value).__name__, "value": value})
        for array in arrays:
            name = prefix + array.path
            if subtree:
                name = _relative(name, subtree)
                if name is None:
                    continue
            if saved_mesh is None and array.sharding is not None:
                saved_mesh = array.sharding.mesh_axes
            params.append(
                ParamInfo(name, array.shape, array.dtype, array.itemsize, spec_per_dim(array), array)
            )
    params.sort(key=lambda p: path_sort_key(p.path))  # every format, every command: one order
    items = [chosen for chosen, _, _ in found]
    if subtree and not params:
        warnings.append(f"subtree {subtree!r} matches no parameter (paths are dotted, e.g. params.Dense_0)")
    return Inventory(
        checkpoint=location.path,
        step=location.step.step if location.step else None,
        items=[i.name for i in items],
        subtree=subtree,
        params=params,
        saved_mesh=saved_mesh,
        warnings=warnings,
        shown=os.fspath(path),
        custom=checkpoint.custom_metadata(location),
        values=shown_values,
        location=location,
        witness=witness,
    )


def filter_params(params: Sequence[ParamInfo], pattern: str | None) -> list[ParamInfo]:
    """The params whose path matches ``pattern`` (``re.search``); all when it is None."""
    if pattern is None:
        return list(params)
    try:
        regex = re.compile(pattern)
    except re.error as err:
        raise UsageError(
            f"invalid --filter regex {pattern!r}: {err}", hint="use a Python regular expression"
        ) from None
    return [p for p in params if regex.search(p.path)]


# ----------------------------------------------------------------------------------------------
# As JSON: an inventory read by one process and handed to others (never pickled)

INVENTORY_FORMAT = 1
# Long strings many arrays share (an item's kvstore spec, a zarr metadata template): sent once
# each, by index, and shared again by the arrays rebuilt from them.
_SHARED_FIELDS = ("store", "metadata_template")


def _undims(entries) -> tuple[Any, ...] | None:
    """A partition spec from :func:`sharding_json`."""
    return None if entries is None else tuple(tuple(e) if isinstance(e, list) else e for e in entries)


def _stored_to_json(array: checkpoint.StoredArray, shared: dict[str, int]) -> dict[str, Any]:
    # plain fields as they are (a field added later travels too); tuples, the sharding and the
    # shared strings explicitly
    doc = {f.name: getattr(array, f.name) for f in fields(array)}
    for name in _SHARED_FIELDS:
        if name in doc:
            doc[name] = shared.setdefault(doc[name], len(shared))
    doc.update(
        keys=list(array.keys),
        shape=list(array.shape),
        chunks=list(array.chunks),
        sharding=None
        if array.sharding is None
        else {
            "mesh_axes": [list(axis) for axis in array.sharding.mesh_axes],
            "spec": sharding_json(array.sharding.spec),
        },
    )
    return doc


def _stored_from_json(doc: dict[str, Any], shared: list[str]) -> checkpoint.StoredArray:
    sharding = doc["sharding"]
    return checkpoint.StoredArray(
        **{
            **doc,
            **{name: shared[doc[name]] for name in _SHARED_FIELDS if name in doc},
            "keys": tuple(doc["keys"]),
            "shape": tuple(doc["shape"]),
            "chunks": tuple(doc["chunks"]),
            "sharding": None
            if sharding is None
            else checkpoint.SavedSharding(
                tuple((str(name), int(size)) for name, size in sharding["mesh_axes"]),
                _undims(sharding["spec"]),
            ),
        }
    )


def inventory_to_json(inv: Inventory) -> str:
    """An :class:`Inventory` as JSON text, for :func:`inventory_from_json` in another process.

    Everything in it is plain values; ``views`` (derived from the parameters) is not included.
    """
    shared: dict[str, int] = {}
    params = [
        {
            "path": p.path,
            "shape": list(p.shape),
            "dtype": p.dtype,
            "itemsize": p.itemsize,
            "sharding": sharding_json(p.sharding),
            "stored": None if p.stored is None else _stored_to_json(p.stored, shared),
        }
        for p in inv.params
    ]
    doc = {
        "format": INVENTORY_FORMAT,
        "checkpoint": inv.checkpoint,
        "step": inv.step,
        "items": inv.items,
        "subtree": inv.subtree,
        "saved_mesh": None if inv.saved_mesh is None else [list(a) for a in inv.saved_mesh],
        "warnings": inv.warnings,
        "shown": inv.shown,
        "custom": inv.custom,
        "values": inv.values,
        "shared": list(shared),
        "params": params,
    }
    return json.dumps(doc, separators=(",", ":"))


def inventory_from_json(text: str | bytes) -> Inventory:
    """The :class:`Inventory` that :func:`inventory_to_json` wrote."""
    doc = json.loads(text)
    if doc.get("format") != INVENTORY_FORMAT:
        raise ValueError(f"unknown inventory format {doc.get('format')!r}")
    shared = doc["shared"]
    params = [
        ParamInfo(
            p["path"],
            tuple(p["shape"]),
            p["dtype"],
            p["itemsize"],
            _undims(p["sharding"]),
            None if p["stored"] is None else _stored_from_json(p["stored"], shared),
        )
        for p in doc["params"]
    ]
    mesh = doc["saved_mesh"]
    return Inventory(
        checkpoint=doc["checkpoint"],
        step=doc["step"],
        items=doc["items"],
        subtree=doc["subtree"],
        params=params,
        saved_mesh=None if mesh is None else tuple((str(n), int(s)) for n, s in mesh),
        warnings=doc["warnings"],
        shown=doc["shown"],
        custom=doc["custom"],
        values=doc.get("values", []),
    )


# ----------------------------------------------------------------------------------------------
# Counts


@dataclass
class CountResult:
    total_count: int
    total_bytes: int
    by_dtype: dict[str, tuple[int, int]]  # dtype -> (count, bytes)
    groups: list[tuple[str, int, int, int]]  # (prefix, count, bytes, leaves)


def count_params(params: Sequence[ParamInfo], depth: int = 1) -> CountResult:
    """Parameter counts and bytes: in total, by dtype, and by the first ``depth`` path components.

    >>> from paramscope.io.inventory import ParamInfo
    >>> p = [ParamInfo("a.w", (2, 3), "float32", 4, None, None)]
    >>> p.append(ParamInfo("b", (4,), "bfloat16", 2, None, None))
    >>> r = count_params(p, depth=1)
    >>> r.total_count, r.by_dtype, r.groups
    (10, {'bfloat16': (4, 8), 'float32': (6, 24)}, [('a', 6, 24, 1), ('b', 4, 8, 1)])
    """
    by_dtype: dict[str, list[int]] = {}
    groups: dict[str, list[int]] = {}
    for param in params:
        entry = by_dtype.setdefault(param.dtype, [0, 0])
        entry[0] += param.count
        entry[1] += param.nbytes
        group = groups.setdefault(prefix_groups(param.path, depth), [0, 0, 0])
        group[0] += param.count
        group[1] += param.nbytes
        group[2] += 1
    return CountResult(
        total_count=sum(p.count for p in params),
        total_bytes=sum(p.nbytes for p in params),
        by_dtype={k: (v[0], v[1]) for k, v in sorted(by_dtype.items())},
        groups=[(k, *v) for k, v in sorted(groups.items(), key=lambda entry: path_sort_key(entry[0]))],
    )


# ----------------------------------------------------------------------------------------------
# Weight-decay masks


@dataclass
class MaskResult:
    include: list[str] | None
    exclude: list[str] | None
    decisions: list[tuple[ParamInfo, bool]]
    unmatched_patterns: list[str]

    def totals(self, decayed: bool) -> tuple[int, int]:
        chosen = [p for p, flag in self.decisions if flag == decayed]
        return sum(p.count for p in chosen), len(chosen)


def weight_decay_mask(
    params: Sequence[ParamInfo],
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
) -> MaskResult:
    """The weight-decay decision for each parameter, as ``get_param_mask_fn`` makes it.

    Raises:
        UsageError: Both include and exclude are given, or a regex is invalid.
    """
    include = list(include) if include else None
    exclude = list(exclude) if exclude else None
    try:
        decide = mask_predicate(exclude, include)
        patterns = compile_patterns(include or exclude or [])
    except ValueError as err:
        message = str(err)
        raise UsageError(
            message[:1].lower() + message[1:],
            hint="give either include or exclude patterns, as Python regular expressions",
        ) from None
    unmatched = [p.pattern for p in patterns if not any(p.search(param.path) for param in params)]
    return MaskResult(include, exclude, [(p, decide(p.path)) for p in params], unmatched)


# ----------------------------------------------------------------------------------------------
# Steps and items


@dataclass
class ItemSummary:
    name: str
    kind: str
    storage: str | None
    arrays: int | None
    count: int | None
    bytes_on_disk: int | None  # None where the store cannot tell (buckets)
    content: Any = None  # JSON items: their value; iterator items: their state, by file
    metadata: dict[str, Any] | None = None  # metadata the format keeps beside the arrays, by file
    handler: str = ""  # the handler class the step's metadata names for it (Orbax), if any


@dataclass
class InfoResult:
    checkpoint: str
    layout: str  # "root", "step" or "item"
    step: int | None
    steps: list[checkpoint.Step]
    items: list[ItemSummary]
    warnings: list[str] = field(default_factory=list)
    shown: str = ""  # the path as the caller wrote it
    step_metadata: dict[str, Any] = field(default_factory=dict)


def step_metadata(location) -> dict[str, Any]:
    """What the chosen step's ``_CHECKPOINT_METADATA`` says, for people: the API that wrote it,
    when it was started and committed (UTC, ISO 8601), custom metadata and metrics."""
    try:
        meta = checkpoint.read_step_metadata(location)
    except ParamscopeError:
        return {}
    if not isinstance(meta, dict):
        return {}
    handlers = meta.get("item_handlers")
    names = handlers.values() if isinstance(handlers, dict) else [handlers]
    v1 = any(".v1." in str(h) for h in names) or (
        location.tree is not None
        and location.tree.is_file(f"{location.step_rel or ''}/orbax.checkpoint".lstrip("/"))
    )
    out: dict[str, Any] = {"writer": "Orbax (v1 API)" if v1 else "Orbax"}
    for key, label in (("init_timestamp_nsecs", "started"), ("commit_timestamp_nsecs", "committed")):
        value = meta.get(key)
        if isinstance(value, (int, float)):
            out[label] = _iso(value)
    for key in ("custom_metadata", "metrics"):
        value = meta.get(key)
        if value:
            out[key] = value
    return out


def _iso(nanoseconds: float) -> str:
    """A time in nanoseconds since the epoch, in ISO 8601; ``unknown`` for what is no time (NaN,
    1e30: a damaged metadata file).

    >>> _iso(1.7e18), _iso(float("nan")), _iso(1e30)
    ('2023-11-14T22:13:20Z', 'unknown', 'unknown')
    """
    import datetime

    try:
        moment = datetime.datetime.fromtimestamp(nanoseconds / 1e9, tz=datetime.timezone.utc)
    except (OverflowError, ValueError, OSError):
        return "unknown"
    return moment.isoformat(timespec="seconds").replace("+00:00", "Z")


def checkpoint_info(path: str | os.PathLike, step: int | None = None) -> InfoResult:
    """Steps (finished and unfinished), items and their kinds, storage, sizes, JSON items."""
    location = checkpoint.locate(os.fspath(path), step, allow_unfinished=True)
    summaries = []
    problems: list[str] = []
    for item in location.items:
        storage = arrays = count = content = metadata = None
        if item.kind != "damaged" and checkpoint.holds_arrays(item):
            stored = checkpoint.read_arrays(item, problems)
            described = checkpoint.describe(item)
            storage, metadata = described.get("storage"), described.get("metadata")
            arrays = len(stored)
            count = sum(math.prod(a.shape) for a in stored)
        else:
            content = item_content(item)
        summaries.append(
            ItemSummary(
                item.name,
                item.kind,
                storage,
                arrays,
                count,
                checkpoint.disk_usage(item),
                content,
                metadata,
                handler=item.handler,
            )
        )
    problems += [
        f"item {i.name!r} has no _METADATA (damaged or unfinished)"
        for i in location.items
        if i.kind == "damaged"
    ]
    return InfoResult(
        checkpoint=location.path,
        layout=location.kind,
        step=location.step.step if location.step else None,
        steps=location.steps,
        items=summaries,
        warnings=problems,
        shown=os.fspath(path),
        step_metadata=step_metadata(location),
    )
