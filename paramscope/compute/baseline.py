"""Baselines for CI: pin a checkpoint's structure and numbers, then check others against them.

A baseline is the JSON of ``paramscope snapshot`` (``paramscope.snapshot/2``): every parameter's
path, shape, dtype, count, sharding and statistics. The JSON of ``table``, ``norms`` and ``stats``
is accepted too, for what it holds.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from paramscope.errors import EXIT_USAGE, ParamscopeError, UsageError
from paramscope.io.inventory import Inventory, ParamInfo, param_sharding_json, sharding_json
from paramscope.names import path_sort_key

SNAPSHOT_SCHEMA = "paramscope.snapshot/2"
STAT_NAMES = ("norm", "mean", "std", "min", "max", "max_abs", "zero_fraction", "nan", "inf")
EXACT_STATS = ("nan", "inf")
CATEGORIES = ("structure", "counts", "norms", "stats", "digests")
# What each accepted document can hold (per-parameter values only where its rows carry them).
# Version 2 of each writes a replicated array's sharding as [null, ...] (null: not stored); the
# fields a baseline is read for are otherwise the same, so both versions are read alike.
_ACCEPTED = {
    f"paramscope.{name}/{version}": categories
    for name, categories in (
        ("snapshot", set(CATEGORIES)),
        ("table", set(CATEGORIES)),
        ("stats", set(CATEGORIES)),
        ("norms", {"structure", "counts", "norms", "digests"}),
    )
    for version in (1, 2)
}
# Documents of numbers only: they list no typed PRNG keys (nor count them), so keys are not compared.
NUMBERS_ONLY = tuple(f"paramscope.{name}/{version}" for name in ("norms", "stats") for version in (1, 2))
REGENERATE = "regenerate it with `paramscope snapshot`"
# The fields each kind of document always carries (its JSON Schema requires them) and that a
# baseline is read for: without them a document compares nothing and would pass anything.
_REQUIRED = {"snapshot": ("params",), "table": ("params",), "stats": ("params",), "norms": ("global_norm",)}
NO_COMMON = "(none in common)"  # the violation of a checkpoint that shares no parameter with the baseline


class BaselineError(ParamscopeError):
    """The baseline file is missing, not JSON, or not a baseline this version reads: a bad input
    file given by the user, like a bad option (exit 2)."""

    exit_code = EXIT_USAGE


@dataclass
class Baseline:
    schema: str
    params: dict[str, dict[str, Any]]  # path -> what the document says of it
    total_count: int | None
    global_norm: float | None
    per_param: bool  # whether the document lists its parameters
    items: list[str] = field(default_factory=list)
    subtree: str | None = None
    step: int | None = None  # the step it was taken of, where the document says

    def as_params(self) -> list[ParamInfo]:
        """The parameters the baseline describes (structure only: nothing to read)."""
        out = []
        for path, row in self.params.items():
            shape = tuple(row.get("shape") or ())
            count = row.get("count") or 0
            itemsize = (row.get("bytes") or 0) // count if count else 0
            spec = row.get("sharding")
            sharding = (
                tuple(tuple(e) if isinstance(e, list) else e for e in spec) if partition(spec) else None
            )
            out.append(ParamInfo(path, shape, str(row.get("dtype")), itemsize, sharding, None))
        return out

    def digests(self) -> dict[str, str]:
        return {path: row["digest"] for path, row in self.params.items() if row.get("digest")}

    def digests_by_item(self) -> dict[tuple[str, str], str]:
        """The recorded digests keyed by (item, path inside the item), as verify meets arrays."""
        out = {}
        for path, row in self.params.items():
            if not row.get("digest"):
                continue
            full = f"{self.subtree}.{path}" if self.subtree else path
            if len(self.items) == 1:
                out[(self.items[0], full)] = row["digest"]
            elif "." in full:
                item, rest = full.split(".", 1)
                out[(item, rest)] = row["digest"]
        return out

    def holds(self, category: str) -> bool:
        if category not in _ACCEPTED[self.schema]:
            return False
        if category == "structure":
            return self.per_param
        if category == "counts":
            return self.total_count is not None or any("count" in p for p in self.params.values())
        if category == "norms":
            return self.global_norm is not None or any("norm" in p for p in self.params.values())
        if category == "digests":
            return any(p.get("digest") for p in self.params.values())
        return any("mean" in p for p in self.params.values())


def _jsonable(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else value


def snapshot(
    inventory: Inventory, scan_result, version: str, params: Sequence[ParamInfo] = ()
) -> dict[str, Any]:
    """The ``paramscope.snapshot/2`` document of a checkpoint: its full statistics and, when the
    scan computed them, its content digests. ``params`` (default: those scanned) are the rows; a
    typed PRNG key among them has its structure recorded, marked ``random_key``, but no numbers
    (random bits are not weights: ``check`` compares keys by structure alone, the same way)."""
    scanned = {entry.param.path: entry for entry in scan_result.params}
    rows = []
    for param in params or [entry.param for entry in scan_result.params]:
        entry = scanned.get(param.path)
        if entry is None and not param.random_key:
            continue
        row = {
            "path": param.path,
            "shape": list(param.shape),
            "dtype": param.dtype,
            "count": param.count,
            "bytes": param.nbytes,
            "sharding": param_sharding_json(param),
        }
        if entry is None:
            row["random_key"] = param.random_key
        else:
            row["stats"] = {name: _jsonable(value) for name, value in entry.moments.stats().items()}
            if entry.digest is not None:
                row["digest"] = entry.digest
        rows.append(row)
    document = {
        "schema": SNAPSHOT_SCHEMA,
        "paramscope": version,
        "checkpoint": inventory.checkpoint,
        "step": inventory.step,
        "items": inventory.items,
        "subtree": inventory.subtree,
        "total": {  # of the rows: the selection, one row per layer with --unstack, keys included
            "count": sum(r["count"] for r in rows),
            "bytes": sum(r["bytes"] for r in rows),
        },
        "global_norm": _jsonable(scan_result.global_norm),
        "nonfinite": scan_result.nonfinite,
        "params": rows,
    }
    if scan_result.digest is not None:
        document["digest"] = scan_result.digest
    return document


def read_document(path: str) -> Any:
    """A JSON file's content; :class:`BaselineError` when it is missing, not JSON, or nested too
    deeply to parse."""
    try:
        with open(path, "rb") as f:
            return json.loads(f.read())
    except FileNotFoundError:
        raise BaselineError(
            f"baseline {path} does not exist", hint="write one with `paramscope snapshot`"
        ) from None
    except RecursionError:
        raise BaselineError(
            f"baseline {path} is nested too deeply to be a baseline", hint=REGENERATE
        ) from None
    except (OSError, ValueError) as err:
        raise BaselineError(f"baseline {path} is not readable JSON: {err}", hint=REGENERATE) from None


def load_baseline(path: str) -> Baseline:
    """Reads a baseline; :class:`BaselineError` (exit 2) names what is wrong with it."""
    return validate(path, read_document(path))


def baseline_at(path: str) -> Baseline | None:
    """The baseline at a path given where a checkpoint may be, decided by content, not by name: a
    local file of JSON with a ``schema`` field (paramscope's documents carry one; a safetensors
    index is JSON without one, and a checkpoint). None for anything else. A file that starts like
    JSON but does not parse is a broken baseline (:class:`BaselineError`), unless it is named as
    a safetensors index is, whose reader then reports it."""
    from paramscope.io.safetensors import INDEX_SUFFIX

    if not os.path.isfile(path):
        return None
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
    except OSError:
        return None
    if head.lstrip()[:1] not in (b"{", b"[") or b"\0" in head:  # e.g. safetensors: a binary length first
        return None
    try:
        document = read_document(path)
    except BaselineError:
        if path.endswith(INDEX_SUFFIX):
            return None
        raise
    if not isinstance(document, dict) or "schema" not in document:
        return None
    return validate(path, document)


def _shown(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, str) else repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _is_number(value: Any) -> bool:
    """A finite JSON number (a bool is not one; an integer too large for a float is not finite)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:
        return False


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_spec_entry(entry: Any) -> bool:
    return (
        entry is None
        or isinstance(entry, str)
        or (isinstance(entry, list) and all(isinstance(e, str) for e in entry))
    )


# What a baseline's fields may hold: (test, what it must be). None is allowed for all but these.
_NUMBER = (_is_number, "a finite number or null")
_FIELDS: dict[str, tuple[Any, str]] = {
    **{name: _NUMBER for name in STAT_NAMES if name not in EXACT_STATS},
    **{
        name: (_is_count, "a count (an integer >= 0)")
        for name in (*EXACT_STATS, "count", "bytes", "nonfinite")
    },
    "shape": (lambda v: isinstance(v, list) and all(_is_count(d) for d in v), "a list of sizes"),
    "dtype": (lambda v: isinstance(v, str), "a dtype name"),
    "digest": (
        lambda v: isinstance(v, str) and len(v) == 64 and all(c in "0123456789abcdef" for c in v),
        "a digest (64 hexadecimal digits)",
    ),
    "random_key": (lambda v: isinstance(v, str), "a key implementation's name"),
    "sharding": (lambda v: isinstance(v, list) and all(_is_spec_entry(e) for e in v), "a partition spec"),
    "global_norm": _NUMBER,
    "step": (lambda v: isinstance(v, int) and not isinstance(v, bool), "a step number"),
    "items": (lambda v: isinstance(v, list) and all(isinstance(i, str) for i in v), "a list of item names"),
    "item": (lambda v: isinstance(v, str), "an item name"),
    "subtree": (lambda v: isinstance(v, str), "a path"),
}


def validate(path: str, document: Any) -> Baseline:
    """The baseline a parsed document describes, every field it uses checked once, here: a value
    of the wrong type, a non-finite or overflowing number is a :class:`BaselineError` naming the
    field and the parameter, never a comparison that passes or fails by accident."""
    schema = document.get("schema") if isinstance(document, dict) else None
    if schema not in _ACCEPTED:
        known = ", ".join(sorted(_ACCEPTED))
        if isinstance(schema, str) and schema.split("/")[0] in {s.split("/")[0] for s in _ACCEPTED}:
            raise BaselineError(
                f"baseline {path} has schema {schema}, which this paramscope does not read",
                hint=f"it reads {known}; regenerate the baseline with this version",
            )
        raise BaselineError(
            f"{path} is not a paramscope baseline (schema {_shown(schema)})",
            hint=f"write one with `paramscope snapshot`; accepted: {known}",
        )

    def bad(where: str, value: Any, what: str) -> BaselineError:
        return BaselineError(f"baseline {path}: {where} is {_shown(value)}, not {what}", hint=REGENERATE)

    for name in _REQUIRED[schema.split(".", 1)[1].split("/")[0]]:
        if name not in document:
            raise BaselineError(
                f'baseline {path} has no "{name}": not a whole {schema} document', hint=REGENERATE
            )

    def check_fields(fields: dict[str, Any], where: str) -> None:
        for name, value in fields.items():
            rule = _FIELDS.get(name)
            if rule is not None and value is not None and not rule[0](value):
                raise bad(f'"{name}"{where}', value, rule[1])

    total = document.get("total")
    if total is not None and not isinstance(total, dict):
        raise bad('"total"', total, "an object")
    check_fields(
        {k: document.get(k) for k in ("global_norm", "step", "items", "item", "subtree", "count")}, ""
    )
    check_fields({k: v for k, v in (total or {}).items() if k in ("count", "bytes")}, " of the total")
    rows = document.get("params")
    if rows is not None and not isinstance(rows, list):
        raise bad('"params"', rows, "a list of parameters")
    params: dict[str, dict[str, Any]] = {}
    for index, row in enumerate(rows or []):
        if not isinstance(row, dict) or not isinstance(row.get("path"), str):
            raise BaselineError(
                f"baseline {path} is malformed: parameter {index} has no path", hint=REGENERATE
            )
        stats = row.get("stats")
        if stats is not None and not isinstance(stats, dict):
            raise bad(f'"stats" of {row["path"]}', stats, "an object")
        entry = {k: v for k, v in row.items() if k != "stats"}
        entry.update(stats or {})
        check_fields(entry, f" of {row['path']}")
        if row["path"] in params:  # which of the two would be compared is a guess: refuse
            raise BaselineError(f"baseline {path} lists parameter {row['path']!r} twice", hint=REGENERATE)
        params[row["path"]] = entry
    total_count = (total or {}).get("count")
    if total_count is None and schema in NUMBERS_ONLY:
        total_count = document.get("count")
    items = document.get("items") or ([document["item"]] if document.get("item") else [])
    return Baseline(
        schema,
        params,
        total_count,
        document.get("global_norm"),
        rows is not None,
        list(items),
        document.get("subtree"),
        document.get("step"),
    )


@dataclass(frozen=True)
class Violation:
    path: str
    metric: str
    baseline: Any
    actual: Any

    @property
    def rel_diff(self) -> float | None:
        if isinstance(self.baseline, (int, float)) and isinstance(self.actual, (int, float)):
            if self.baseline == 0:
                return 0.0 if self.actual == 0 else math.inf
            return abs(self.actual - self.baseline) / abs(self.baseline)
        return None


@dataclass
class CheckOptions:
    rtol: float = 1e-5
    atol: float = 0.0
    ignore: Sequence[str] = ()
    only: Sequence[str] = ()
    allow_new: bool = False
    allow_missing: bool = False
    filter: str | None = None  # compare only the paths this regex matches
    compiled: list[re.Pattern] = field(default_factory=list)
    kept: re.Pattern | None = None

    def __post_init__(self):
        for pattern in self.ignore:
            try:
                self.compiled.append(re.compile(pattern))
            except re.error as err:
                raise UsageError(
                    f"invalid --ignore regex {pattern!r}: {err}", hint="use a Python regex"
                ) from None
        if self.filter is not None:
            try:
                self.kept = re.compile(self.filter)
            except re.error as err:
                raise UsageError(
                    f"invalid --filter regex {self.filter!r}: {err}", hint="use a Python regex"
                ) from None
        unknown = [c for c in self.only if c not in CATEGORIES]
        if unknown:
            raise UsageError(f"unknown --only {unknown[0]!r}", hint=f"choose from {', '.join(CATEGORIES)}")

    def ignored(self, path: str) -> bool:
        if self.kept is not None and not self.kept.search(path):
            return True
        return any(p.search(path) for p in self.compiled)

    @property
    def partial(self) -> bool:
        """Whether only some parameters are compared (totals then cannot be)."""
        return bool(self.ignore) or self.filter is not None


def categories(baseline: Baseline, options: CheckOptions) -> list[str]:
    """What will be compared: ``--only`` if given, else everything the baseline holds."""
    wanted = list(options.only) or list(CATEGORIES)
    return [c for c in wanted if baseline.holds(c)]


def _close(actual: Any, expected: Any, options: CheckOptions, exact: bool = False) -> bool:
    """Within ``atol + rtol * |expected|``. A baseline's null (NaN, Inf, undefined) matches only a
    value that is itself NaN, Inf or undefined."""
    unset = actual is None or (isinstance(actual, float) and not math.isfinite(actual))
    if expected is None or unset:
        return expected is None and unset
    if exact:
        return actual == expected
    return abs(actual - expected) <= options.atol + options.rtol * abs(expected)


def check(baseline: Baseline, inventory: Inventory, scan_result, options: CheckOptions) -> list[Violation]:
    """Every way the checkpoint departs from the baseline (``scan_result`` None: no numbers)."""
    chosen = categories(baseline, options)
    listed_keys = baseline.schema not in NUMBERS_ONLY
    actual: dict[str, ParamInfo] = {
        p.path: p
        for p in inventory.params
        if not options.ignored(p.path) and (listed_keys or not p.random_key)
    }
    expected = {path: row for path, row in baseline.params.items() if not options.ignored(path)}
    numbers = {r.param.path: r.moments.stats() for r in scan_result.params} if scan_result is not None else {}
    violations: list[Violation] = []
    complete = not options.partial and not options.allow_new and not options.allow_missing
    if baseline.per_param and (actual or expected) and not set(actual) & set(expected):
        # nothing compared is no pass, whatever --allow-new / --allow-missing let through
        violations.append(Violation(NO_COMMON, "in common", f"{len(expected)} listed", f"{len(actual)} here"))
    if "structure" in chosen:
        if not options.allow_missing:
            violations += [
                Violation(path, "missing", "present", "absent") for path in expected if path not in actual
            ]
        if not options.allow_new:
            violations += [
                Violation(path, "new", "absent", "present") for path in actual if path not in expected
            ]
        for path in sorted(set(actual) & set(expected), key=path_sort_key):
            row, param = expected[path], actual[path]
            for metric, value in (
                ("shape", list(param.shape)),
                ("dtype", param.dtype),
                ("sharding", sharding_json(param.sharding)),
            ):
                # replicated ([null, ...]) and unknown (null) both split nothing: no violation
                if (
                    metric in row
                    and (partition(row[metric]) if metric == "sharding" else row[metric]) != value
                ):
                    violations.append(Violation(path, metric, row[metric], value))
            if row.get("random_key") != param.random_key:  # a key where a weight was, or back
                violations.append(Violation(path, "random_key", row.get("random_key"), param.random_key))
    if "counts" in chosen:
        for path in sorted(set(actual) & set(expected), key=path_sort_key):
            if "count" in expected[path] and expected[path]["count"] != actual[path].count:
                violations.append(Violation(path, "count", expected[path]["count"], actual[path].count))
        total = sum(p.count for p in actual.values())
        if complete and baseline.total_count is not None and baseline.total_count != total:
            violations.append(Violation("(total)", "count", baseline.total_count, total))
    for category, names in (("norms", ("norm",)), ("stats", STAT_NAMES[1:])):
        if category not in chosen or scan_result is None:
            continue
        for path in sorted(
            set(actual) & set(expected) & set(numbers), key=path_sort_key
        ):  # keys have no numbers
            for name in names:
                if name in expected[path] and not _close(
                    numbers[path][name], expected[path][name], options, exact=name in EXACT_STATS
                ):
                    violations.append(
                        Violation(path, name, expected[path][name], _jsonable(numbers[path][name]))
                    )
        if category == "norms" and complete and baseline.global_norm is not None:
            if not _close(scan_result.global_norm, baseline.global_norm, options):
                violations.append(
                    Violation("(global)", "norm", baseline.global_norm, _jsonable(scan_result.global_norm))
                )
    if "digests" in chosen and scan_result is not None:
        digests = {r.param.path: r.digest for r in scan_result.params}
        for path in sorted(set(actual) & set(expected), key=path_sort_key):
            wanted = expected[path].get("digest")
            if wanted and digests.get(path) is not None and digests[path] != wanted:
                violations.append(Violation(path, "digest", wanted, digests[path]))
    return violations


def needs_data(baseline: Baseline, options: CheckOptions) -> str | None:
    """None when metadata suffices, else "norms" or "stats" (the scan to run)."""
    chosen = categories(baseline, options)
    if "stats" in chosen:
        return "stats"
    if "norms" in chosen or "digests" in chosen:
        return "norms"
    return None


def needs_digests(baseline: Baseline, options: CheckOptions) -> bool:
    return "digests" in categories(baseline, options)


def partition(spec: list | None) -> list | None:
    """A saved sharding as JSON with replicated (every entry null) and unknown (null) alike: None.

    >>> partition([None, None]), partition(None), partition(["model", None])
    (None, None, ['model', None])
    """
    return spec if spec and any(e is not None for e in spec) else None


def other_step_note(baseline_file: str, recorded: int | None, step: int | None) -> str | None:
    """The note for a baseline of another step than the one compared with it: values that
    training changed differ from it without any damage.

    >>> other_step_note("b.json", 100, 200)
    'baseline is of step 100, checkpoint step 200 (b.json): values training changed differ from it'
    """
    if recorded is None or step is None or recorded == step:
        return None
    return (
        f"baseline is of step {recorded}, checkpoint step {step} ({baseline_file}): "
        "values training changed differ from it"
    )
