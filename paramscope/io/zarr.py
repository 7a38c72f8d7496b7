"""The generic zarr layer: zarr (v2, v3) arrays in any kvstore, opened and read with TensorStore.

Orbax items (:mod:`~paramscope.io.orbax`), flax msgpack multi-host saves
(:mod:`~paramscope.io.msgpack`) and plain zarr trees (:mod:`~paramscope.io.tstree`) store their
arrays so: this module finds them from their metadata files, reads many keys of a kvstore at
once (an OCDBT database's b-tree whole, :mod:`~paramscope.io.btree`), and opens the arrays
read-only through TensorStore's public spec API, so the rest of paramscope never sees a
TensorStore type. Nothing here writes, creates or deletes.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from typing import Any

from paramscope.errors import CorruptCheckpoint, StorageError
from paramscope.io import btree, storage
from paramscope.io.records import ArrayReadError, SavedSharding, StoredArray, dtype_info
from paramscope.io.session import SESSION
from paramscope.io.storage import load_json, short_error
from paramscope.names import BOX_VALUE_KEY


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


def _metadata_template(meta: dict[str, Any]) -> str:
    """The metadata without shape and chunk shape, as one shared string per distinct template."""
    meta = dict(meta)
    meta.pop("shape")
    if meta.get("zarr_format") == 3:
        meta["chunk_grid"] = {**meta["chunk_grid"], "configuration": {}}
    else:
        meta.pop("chunks")
    text = json.dumps(meta, sort_keys=True)
    return SESSION.templates.setdefault(text, text)


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


def _open_store(store: str, context):
    """The opened kvstore of an item (JSON spec ``store``), once per session and context."""
    return SESSION.kvstore(store, context)


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
