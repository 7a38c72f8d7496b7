"""Hugging Face Flax model folders: ``FlaxPreTrainedModel.save_pretrained`` (transformers).

A folder holds ``config.json`` and the parameters as flax msgpack (read by
:mod:`paramscope.io.msgpack`): one ``flax_model.msgpack``, or, past ``max_shard_size``, shards
``flax_model-00001-of-00004.msgpack`` ... with ``flax_model.msgpack.index.json``, whose
``weight_map`` names the shard of each parameter by its ``/``-joined path
(``embeddings/word_embeddings/embedding``) and whose ``metadata`` has ``total_size``. Each shard
is a nested msgpack tree of its own parameters.

The folder, or its index file, is read as one item (named like the folder, or the index file),
the shards merged; a shard given alone is read alone, with a note naming the index. ``info``
shows ``config.json``'s ``architectures`` and ``model_type``. A folder that also holds
safetensors weights (the Hub often keeps both) has two items, named by their files: the Flax
one is read unless ``--item`` names the other.
"""

from __future__ import annotations

import re
from typing import Any

from paramscope.errors import CorruptCheckpoint, StepNotFound, few
from paramscope.io import msgpack, safetensors
from paramscope.io.records import Item, Location, StoredArray
from paramscope.io.storage import Tree

KIND = "hf_flax"
WEIGHTS = "flax_model.msgpack"
INDEX_SUFFIX = ".msgpack.index.json"
CONFIG_FILE = "config.json"
CONFIG_FIELDS = ("architectures", "model_type")
SHARD = re.compile(r"^(?P<base>.+)-(?P<index>\d+)-of-(?P<count>\d+)\.msgpack$")


def _base(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1]


def locate(tree: Tree, step: int | None) -> Location | None:
    """A folder with ``flax_model.msgpack`` or a ``*.msgpack.index.json``, or such an index file;
    None for anything else."""
    keys = tree.keys()
    if keys:
        top = sorted(k for k in keys if "/" not in k)
        indexes = [k for k in top if k.endswith(INDEX_SUFFIX)]
        rel = indexes[0] if indexes else WEIGHTS if WEIGHTS in top else None
        if rel is None:
            return None
        home = tree
        others = [k for k in top if k.endswith((safetensors.SUFFIX, safetensors.INDEX_SUFFIX))]
        if others:
            items = [Item(rel, tree.display, KIND, tree, rel), _safetensors_item(tree, others)]
        else:
            items = [Item(_base(tree.display) or tree.display, tree.display, KIND, tree, rel)]
    elif tree.root_is_file() and _base(tree.display).endswith(INDEX_SUFFIX):
        name = _base(tree.display)
        home = Tree(tree.display[: -len(name)].rstrip("/") or "/")
        items = [Item(name, tree.display, KIND, home, name)]
    else:
        return None
    if step is not None:
        raise StepNotFound(
            f"--step {step} given, but {tree.display} is a Hugging Face Flax checkpoint (no steps)",
            hint="leave out --step",
        )
    return Location(tree.display, "item", None, items, selected_item=items[0].name, tree=home)


def _safetensors_item(tree: Tree, files: list[str]) -> Item:
    """The safetensors weights beside the Flax ones, named by their index or file."""
    indexes = [f for f in files if f.endswith(safetensors.INDEX_SUFFIX)]
    if indexes:
        return Item(indexes[0], tree.display, safetensors.KIND, tree, indexes[0])
    name = files[0] if len(files) == 1 else "safetensors"
    return Item(name, tree.display, safetensors.KIND, tree, files[0] if len(files) == 1 else "")


def _files(item: Item) -> tuple[str | None, dict[str, str]]:
    """(index or None, weight name -> file) of an item; an empty map for one file."""
    if not item.rel.endswith(INDEX_SUFFIX):
        return None, {}
    listed = item.path == item.tree.display
    return item.rel, safetensors.read_index(item.tree, item.rel, listed)[0]


def _part(item: Item, rel: str) -> Item:
    return Item(item.name, item.tree.path(rel), msgpack.KIND, item.tree, rel)


def read_arrays(item: Item, problems: list[str], values: list | None = None) -> list[StoredArray]:
    """Every parameter of the folder: of its one file, or of every shard the index names (each
    checked to be in the shard the index says)."""
    index, weight_map = _files(item)
    if index is None:
        return msgpack.read_arrays(_part(item, item.rel), problems, values)
    arrays: list[StoredArray] = []
    owner: dict[str, str] = {}
    for shard in sorted(set(weight_map.values())):
        unplaced = []
        for array in msgpack.read_arrays(_part(item, shard), problems, values):
            name = "/".join(array.keys)
            if weight_map.get(name) != shard:
                unplaced.append(name)
                continue
            if name in owner:
                raise CorruptCheckpoint(
                    f"{name!r} is in both {owner[name]} and {shard}", hint="the shards do not belong together"
                )
            owner[name] = shard
            arrays.append(array)
        if unplaced:
            problems.append(f"{shard} holds {_some(unplaced)}, which {index} does not place there: not read")
    for name, shard in weight_map.items():
        if owner.get(name) != shard:
            raise CorruptCheckpoint(
                f"{item.tree.path(index)} places {name[:200]!r} in {shard}, which does not hold it",
                hint="the index and its shards do not belong together",
            )
    return arrays


def _some(names: list[str], shown: int = 3) -> str:
    return few([repr(n[:200]) for n in names], shown)


def notes(item: Item) -> list[str]:
    """In a folder with safetensors weights too: which ones are read, and how to read the others."""
    others = [k for k in item.tree.keys() if "/" not in k and k.endswith(safetensors.SUFFIX)]
    if item.path != item.tree.display or not others:
        return []
    return [
        f"{item.tree.display} also holds safetensors weights ({_some(sorted(others))}): reading "
        f"{item.rel}; --item names the other item (`paramscope info` lists both)"
    ]


def audit_item(item: Item, arrays: list[StoredArray]) -> list[tuple[str | None, str]]:
    """Shards beside the index that it does not name (their arrays are not read)."""
    index, weight_map = _files(item)
    problems = []
    if index is not None and item.path == item.tree.display:
        named = set(weight_map.values())
        for key in sorted(k for k in item.tree.keys() if "/" not in k and SHARD.match(k)):
            if key not in named:
                problems.append((None, f"{key} is beside {index}, which does not name it: not read"))
    return problems


def describe(item: Item) -> dict[str, Any]:
    """``storage`` "msgpack", and ``metadata``: ``config.json``'s architecture and model type,
    and the index's metadata."""
    metadata: dict[str, Any] = {}
    folder = item.rel.rpartition("/")[0]
    config_rel = f"{folder}/{CONFIG_FILE}" if folder else CONFIG_FILE
    if item.tree.is_file(config_rel):
        try:
            config = msgpack.orbax.read_json(item.tree, config_rel)
        except CorruptCheckpoint:
            config = None
        if isinstance(config, dict):
            metadata.update({k: config[k] for k in CONFIG_FIELDS if k in config})
    index, _ = _files(item)
    if index is not None:
        index_metadata = safetensors.read_index(item.tree, index, item.path == item.tree.display)[1]
        if index_metadata is not None:
            metadata[_base(index)] = index_metadata
    return {"storage": "msgpack", "metadata": metadata or None}


def disk_usage(item: Item) -> int | None:
    """Bytes of the index and the files it names, or of the one file; None in a bucket."""
    if item.tree.remote:
        return None
    index, weight_map = _files(item)
    files = [index, *sorted(set(weight_map.values()))] if index else [item.rel]
    return sum(item.tree.file_size(f) or 0 for f in files)
