"""Baselines for CI: pin a checkpoint's structure and numbers, then check others against them.

A baseline is the JSON of ``paramscope snapshot`` (``paramscope.snapshot/1``): every parameter's
path, shape, dtype, count, sharding and statistics. The JSON of ``table``, ``norms`` and ``stats``
is accepted too, for what it holds.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from paramscope.errors import ParamscopeError, UsageError
from paramscope.io.inventory import Inventory, ParamInfo, sharding_json
from paramscope.names import path_sort_key

SNAPSHOT_SCHEMA = "paramscope.snapshot/1"
STAT_NAMES = ("norm", "mean", "std", "min", "max", "max_abs", "zero_fraction", "nan", "inf")
EXACT_STATS = ("nan", "inf")
CATEGORIES = ("structure", "counts", "norms", "stats", "digests")
# What each accepted document can hold (per-parameter values only where its rows carry them).
_ACCEPTED = {
    SNAPSHOT_SCHEMA: set(CATEGORIES),
    "paramscope.table/1": set(CATEGORIES),
    "paramscope.stats/1": set(CATEGORIES),
    "paramscope.norms/1": {"structure", "counts", "norms", "digests"},
}


class BaselineError(ParamscopeError):
    """The baseline file is missing, not JSON, or not a baseline this version reads."""


@dataclass
class Baseline:
    schema: str
    params: dict[str, dict[str, Any]]  # path -> what the document says of it
    total_count: int | None
    global_norm: float | None
    per_param: bool  # whether the document lists its parameters
    items: list[str] = field(default_factory=list)
    subtree: str | None = None

    def as_params(self) -> list[ParamInfo]:
        """The parameters the baseline describes (structure only: nothing to read)."""
        out = []
        for path, row in self.params.items():
            shape = tuple(row.get("shape") or ())
            count = row.get("count") or 0
            itemsize = (row.get("bytes") or 0) // count if count else 0
            spec = row.get("sharding")
            sharding = tuple(tuple(e) if isinstance(e, list) else e for e in spec) if spec else None
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


def snapshot(inventory: Inventory, scan_result, version: str) -> dict[str, Any]:
    """The ``paramscope.snapshot/1`` document of a checkpoint: its full statistics and, when the
    scan computed them, its content digests."""
    params = []
    for entry in scan_result.params:
        param = entry.param
        row = {
            "path": param.path,
            "shape": list(param.shape),
            "dtype": param.dtype,
            "count": param.count,
            "bytes": param.nbytes,
            "sharding": sharding_json(param.sharding),
            "stats": {name: _jsonable(value) for name, value in entry.moments.stats().items()},
        }
        if entry.digest is not None:
            row["digest"] = entry.digest
        params.append(row)
    document = {
        "schema": SNAPSHOT_SCHEMA,
        "paramscope": version,
        "checkpoint": inventory.checkpoint,
        "step": inventory.step,
        "items": inventory.items,
        "subtree": inventory.subtree,
        "total": {  # of what was read: the selection, one row per layer with --unstack
            "count": sum(r.param.count for r in scan_result.params),
            "bytes": sum(r.param.nbytes for r in scan_result.params),
        },
        "global_norm": _jsonable(scan_result.global_norm),
        "nonfinite": scan_result.nonfinite,
        "params": params,
    }
    if scan_result.digest is not None:
        document["digest"] = scan_result.digest
    return document


def load_baseline(path: str) -> Baseline:
    """Reads a baseline; :class:`BaselineError` (exit 3) names what is wrong with it."""
    try:
        with open(path, "rb") as f:
            document = json.loads(f.read())
    except FileNotFoundError:
        raise BaselineError(
            f"baseline {path} does not exist", hint="write one with `paramscope snapshot`"
        ) from None
    except (OSError, ValueError) as err:
        raise BaselineError(f"baseline {path} is not readable JSON: {err}", hint="regenerate it") from None
    schema = document.get("schema") if isinstance(document, dict) else None
    if schema not in _ACCEPTED:
        known = ", ".join(sorted(_ACCEPTED))
        if isinstance(schema, str) and schema.split("/")[0] in {s.split("/")[0] for s in _ACCEPTED}:
            raise BaselineError(
                f"baseline {path} has schema {schema}, which this paramscope does not read",
                hint=f"it reads {known}; regenerate the baseline with this version",
            )
        raise BaselineError(
            f"{path} is not a paramscope baseline (schema {schema!r})",
            hint=f"write one with `paramscope snapshot`; accepted: {known}",
        )
    try:
        rows = document.get("params")
        params = {}
        for row in rows or []:
            entry = {k: v for k, v in row.items() if k != "stats"}
            entry.update(row.get("stats") or {})
            params[str(row["path"])] = entry
        total = document.get("total") or {}
        total_count = total.get("count") if isinstance(total, dict) else None
        if total_count is None and schema in ("paramscope.norms/1", "paramscope.stats/1"):
            total_count = document.get("count")
        global_norm = document.get("global_norm")
        items = document.get("items") or ([document["item"]] if document.get("item") else [])
        return Baseline(
            schema, params, total_count, global_norm, rows is not None, list(items), document.get("subtree")
        )
    except (AttributeError, KeyError, TypeError) as err:
        raise BaselineError(
            f"baseline {path} is malformed ({type(err).__name__}: {err})",
            hint="regenerate it with `paramscope snapshot`",
        ) from None


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
    actual: dict[str, ParamInfo] = {p.path: p for p in inventory.params if not options.ignored(p.path)}
    expected = {path: row for path, row in baseline.params.items() if not options.ignored(path)}
    numbers = {r.param.path: r.moments.stats() for r in scan_result.params} if scan_result is not None else {}
    violations: list[Violation] = []
    complete = not options.partial and not options.allow_new and not options.allow_missing
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
                if metric in row and row[metric] != value:
                    violations.append(Violation(path, metric, row[metric], value))
    if "counts" in chosen:
        for path in sorted(set(actual) & set(expected), key=path_sort_key):
            if "count" in expected[path] and expected[path]["count"] != actual[path].count:
                violations.append(Violation(path, "count", expected[path]["count"], actual[path].count))
        if complete and baseline.total_count is not None and baseline.total_count != inventory.total_count:
            violations.append(Violation("(total)", "count", baseline.total_count, inventory.total_count))
    for category, names in (("norms", ("norm",)), ("stats", STAT_NAMES[1:])):
        if category not in chosen or scan_result is None:
            continue
        for path in sorted(set(actual) & set(expected), key=path_sort_key):
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
