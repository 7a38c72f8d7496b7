"""Every field paramscope shows, declared once.

A field's key is its JSON key and its CSV column; its header is what a table shows; its kind says
how a cell is written (unit and number format, see :func:`paramscope.output.render.cell`); its
priority says when a table too narrow for the terminal leaves it out (0: never; larger numbers
first). Commands build their columns from here (:func:`columns`), so the same quantity carries the
same name, header and format in every command, and ``--columns`` and ``--sort`` accept the key or
the header as shown, in any case (:func:`resolve`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import replace

from paramscope.errors import UsageError
from paramscope.output.render import Column, column_names

# (key, header, kind, priority). Kinds: path (folds at dots), note (free text, folds at spaces),
# text, shape, sharding, bool, int, count (an int that may be abbreviated), bytes, float,
# number (a float or an int), value (a number or a digest), digest (hex, shown by its start).
_DECLARED = [
    # what a parameter is
    ("path", "path", "path", 0),
    ("shape", "shape", "shape", 1),
    ("dtype", "dtype", "text", 1),
    ("count", "count", "count", 0),  # elements (parameters), never arrays
    ("arrays", "arrays", "count", 1),  # arrays (leaves of the tree holding numbers)
    ("bytes", "bytes", "bytes", 3),
    ("sharding", "sharding", "sharding", 4),
    ("weight_decay", "decay", "bool", 0),
    ("stacked", "stacked", "text", 3),
    # statistics (stats, table --stats, snapshot)
    ("norm", "norm", "float", 0),
    ("mean", "mean", "float", 2),
    ("std", "std", "float", 2),
    ("min", "min", "float", 3),
    ("max", "max", "float", 3),
    ("max_abs", "max |x|", "float", 2),
    ("zero_fraction", "zeros", "float", 4),
    ("nan", "NaN", "int", 1),
    ("inf", "Inf", "int", 1),
    ("nonfinite", "NaN/Inf", "int", 1),
    ("digest", "digest", "digest", 5),
    # info
    ("name", "item", "path", 0),
    ("kind", "kind", "text", 2),
    ("storage", "storage", "text", 3),
    ("bytes_on_disk", "on disk", "bytes", 1),
    ("step", "step", "int", 0),
    ("finished", "finished", "bool", 0),
    ("saved", "saved", "text", 1),
    # values that are not arrays
    ("type", "type", "text", 1),
    ("value", "value", "note", 0),
    # show
    ("index", "index", "text", 0),
    ("rank", "rank", "int", 0),
    # verify
    ("item", "item", "text", 2),
    ("problem", "problem", "note", 0),
    # diff
    ("status", "status", "text", 0),
    ("changes", "structure", "note", 1),
    ("path_a", "A path", "path", 1),
    ("norm_a", "norm A", "float", 3),
    ("norm_b", "norm B", "float", 3),
    ("diff_norm", "||A-B||", "float", 2),
    ("rel_diff", "rel. diff", "float", 0),
    ("cosine", "cosine", "float", 1),
    ("max_abs_diff", "max |A-B|", "float", 2),
    ("digest_a", "digest A", "digest", 6),
    ("digest_b", "digest B", "digest", 6),
    # check
    ("metric", "metric", "text", 0),
    ("baseline", "baseline", "value", 0),
    ("actual", "actual", "value", 0),
    # layers
    ("stack", "stack", "path", 1),
    ("layer", "layer", "int", 0),
    # optim
    ("mu_norm", "||mu||", "float", 2),
    ("sqrt_nu_norm", "||sqrt(nu)||", "float", 2),
    ("max_sqrt_nu", "max sqrt(nu)", "float", 3),
    ("step_count", "step count", "int", 3),  # the optimizer's own step (optax's ``count``)
    ("update_norm", "||update||", "float", 1),
    ("ratio", "update/param", "float", 0),
    # history
    ("trend", "norm over steps", "text", 1),
    ("drift", "drift", "float", 1),
    ("change", "last change", "float", 0),
]
# Fields shown or hidden together: a minimum without its maximum reads as a range it is not.
_GROUPS = {"min": "range", "max": "range"}
FIELDS: dict[str, Column] = {
    key: Column(key, header, kind, priority, group=_GROUPS.get(key, ""))
    for key, header, kind, priority in _DECLARED
}


def field(
    key: str, header: str | None = None, priority: int | None = None, kind: str | None = None
) -> Column:
    """The column of a declared field; ``header`` only where a table names its rows otherwise
    (``group (depth 2)``), ``priority`` where a command ranks it otherwise; an undeclared key
    (a layer's array in ``layers``) is a float column of that name."""
    base = FIELDS.get(key) or Column(key, key, "float", 3)
    changes = {
        name: value
        for name, value in (("header", header), ("priority", priority), ("kind", kind))
        if value is not None
    }
    return replace(base, **changes) if changes else base


def columns(*keys: str, essential: Iterable[str] = (), **priorities: int) -> list[Column]:
    """The columns of a table: declared fields by key; ``essential`` ones (what the command
    exists for) stay however narrow the terminal, the path folding at dots instead."""
    essential = set(essential)
    out = []
    for key in keys:
        priority = 0 if key in essential else priorities.get(key)
        out.append(field(key, priority=priority))
    return out


def resolve(name: str, keys: Sequence[str], option: str = "--sort") -> str:
    """The key among ``keys`` that ``name`` means: the key or its header, in any case.

    >>> resolve("Max |X|", ["path", "max_abs"]), resolve("zeros", ["zero_fraction"])
    ('max_abs', 'zero_fraction')
    """
    wanted = name.strip().lower()
    for key in keys:
        header = FIELDS[key].header if key in FIELDS else key
        if wanted in (key.lower(), header.lower()):
            return key
    choices = column_names([field(key) for key in keys])
    raise UsageError(f"{option} {name!r}: no such column here", hint=f"choose one of: {choices}")
