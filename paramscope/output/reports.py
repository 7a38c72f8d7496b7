"""What each command shows: its JSON document and the same data as rows, from the core's results.

One builder per command; the CLI calls the core, hands the result here, and renders the
:class:`paramscope.output.render.Report` it gets back in the format asked for.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

from paramscope.errors import few
from paramscope.names import path_sort_key
from paramscope.output.render import Column, Report, listed


def sharding_json(spec) -> list | None:
    """:func:`paramscope.io.inventory.sharding_json`, imported when used: ``--help`` needs none
    of the checkpoint code."""
    from paramscope.io.inventory import sharding_json

    return sharding_json(spec)


STAT_COLUMNS = [
    Column("norm", "norm", "float", priority=0),
    Column("mean", "mean", "float", priority=2),
    Column("std", "std", "float", priority=2),
    Column("min", "min", "float", priority=3),
    Column("max", "max", "float", priority=3),
    Column("max_abs", "max |x|", "float", priority=2),
    Column("zero_fraction", "zeros", "float", priority=4),
    Column("nan", "NaN", "int", priority=1),
    Column("inf", "Inf", "int", priority=1),
]
STAT_KEYS = tuple(c.key for c in STAT_COLUMNS)
# Sort keys of the commands that sort: largest first, but for path (and cosine: smallest first).
TABLE_SORT_KEYS = ("path", "count", "bytes", "norm")
NORMS_SORT_KEYS = ("path", "count", "norm", "nonfinite")
STATS_SORT_KEYS = ("path", "count", *STAT_KEYS)
DIFF_SORT_KEYS = ("path", "rel_diff", "diff_norm", "max_abs_diff", "cosine", "norm_a", "norm_b")
ASCENDING = ("path", "cosine")


def plural(n: int, noun: str) -> str:
    """``1 array``, ``2 arrays``, ``1,024 arrays``.

    >>> plural(1, "array"), plural(2000, "array")
    ('1 array', '2,000 arrays')
    """
    return f"{n:,} {noun}" + ("" if n == 1 else "s")


def header(inv) -> dict[str, Any]:
    """The selection every document starts with."""
    return {
        "checkpoint": inv.checkpoint,
        "step": inv.step,
        "item": inv.items[0] if len(inv.items) == 1 else None,
        "items": inv.items,
        "subtree": inv.subtree,
    }


def where(inv) -> str:
    """The selection as the user would write it: path as typed, step, item(s), subtree."""
    parts = [inv.shown or inv.checkpoint]
    if inv.step is not None:
        parts.append(f"step {inv.step}")
    parts.append(("item " if len(inv.items) == 1 else "items ") + ",".join(inv.items))
    if inv.subtree:
        parts.append(f"subtree {inv.subtree}")
    return "  ".join(parts)


def _title(inv, arrays: int) -> str:
    return f"{where(inv)}  {plural(arrays, 'array')}"


def sort_rows(rows: list[dict], key: str, top: int | None = None) -> list[dict]:
    """Rows by ``key`` (largest first, but path and cosine ascending), missing values last."""

    def value(row):
        v = row.get(key)
        missing = v is None or (isinstance(v, float) and math.isnan(v))
        if key in ASCENDING:
            return (missing, v if not missing else 0, path_sort_key(row["path"]))
        return (missing, -v if not missing else 0, path_sort_key(row["path"]))

    if key == "path":
        ordered = sorted(rows, key=lambda r: path_sort_key(r["path"]))
    else:
        ordered = sorted(rows, key=value)
    return ordered[:top] if top is not None else ordered


def _engine_text(result) -> str:
    if result.mesh is None:
        return "engine host"
    return "engine mesh " + ",".join(f"{n}={s}" for n, s in result.mesh)


DIGEST_COLUMN = Column("digest", "digest", priority=5)


def _scan_header(result) -> dict[str, Any]:
    header = {
        "global_norm": result.global_norm,
        "nonfinite": result.nonfinite,
        "count": sum(r.param.count for r in result.params),
        "engine": result.engine,
        "mesh": dict(result.mesh) if result.mesh is not None else None,
        "bytes_read": result.bytes_read,
    }
    if result.digest is not None:
        header["digest"] = result.digest
    return header


def _digest_note(result) -> list[str]:
    if result is None or result.digest is None:
        return []
    return [f"digest of the {plural(len(result.params), 'array')}: {result.digest}"]


def _short_json(value, limit: int = 200) -> str:
    """``value`` as JSON on one line, cut between whole values (see
    :func:`~paramscope.io.inventory.shown_content`)."""
    from paramscope.io.inventory import shown_content

    return shown_content(value, limit)


def _metadata_note(metadata: dict[str, Any]) -> str:
    """An item's metadata on one line: its non-empty fields, long values cut."""
    shown = []
    for key, value in metadata.items():
        if value in (None, "", [], {}):
            continue
        if isinstance(value, str):
            shown.append(f"{key}={value if len(value) <= 80 else value[:77] + '...'}")
        else:
            shown.append(f"{key}={_short_json(value, 80)}")
    return ", ".join(shown)


def _metadata_notes(metadata: dict[str, Any]) -> list[str]:
    """One line per distinct metadata: files with the same (shards' ``{"format": "pt"}``) share it."""
    files: dict[str, list[str]] = {}
    for name, value in metadata.items():
        files.setdefault(json.dumps(value, sort_keys=True), []).append(name)
    notes = []
    for text, names in files.items():
        where = names[0] if len(names) == 1 else f"{names[0]} and {plural(len(names) - 1, 'other file')}"
        notes.append(f"metadata of {where}: {_short_json(json.loads(text))}")
    return notes


def info_report(result) -> Report:
    from paramscope.io.inventory import item_kind_text, shown_content

    steps = [
        {"step": s.step, "name": s.name, "finished": s.finished}
        | ({"saved": s.timestamp} if s.timestamp else {})
        for s in result.steps
    ]
    items = [
        {
            "name": i.name,
            "kind": i.kind,
            "storage": i.storage,
            "arrays": i.arrays,
            "count": i.count,
            "bytes_on_disk": i.bytes_on_disk,
        }
        for i in result.items
    ]
    payload = {
        "schema": "paramscope.info/1",
        "checkpoint": result.checkpoint,
        "layout": result.layout,
        "step": result.step,
        "steps": steps,
        "items": [
            {
                **row,
                **({"content": i.content} if i.kind in ("json", "iterator") else {}),
                **({"handler": i.handler} if i.handler else {}),
                **({"metadata": i.metadata} if i.metadata is not None else {}),
            }
            for row, i in zip(items, result.items)
        ],
    }
    if result.step_metadata:
        payload["step_metadata"] = result.step_metadata
    notes = [f"{i.name}: {shown_content(i.content, 200)}" for i in result.items if i.kind == "json"]
    notes += [
        f"{i.name}: {item_kind_text(i)}" + (f": {shown_content(i.content, 200)}" if i.content else "")
        for i in result.items
        if i.kind in ("iterator", "unknown")
    ]
    meta = result.step_metadata
    if meta:
        saved = ", ".join(f"{k} {meta[k]}" for k in ("started", "committed") if k in meta)
        notes.append(f"written by {meta['writer']}" + (f"; {saved}" if saved else ""))
        notes += [
            f"{key.replace('_', ' ')}: {_short_json(meta[key])}"
            for key in ("custom_metadata", "metrics")
            if key in meta
        ]
    for i in result.items:
        if i.metadata and all(isinstance(v, dict) for v in i.metadata.values()):
            notes += _metadata_notes(i.metadata)  # by file (safetensors)
        elif i.metadata:
            notes.append(f"{i.name}: {_metadata_note(i.metadata)}")
    unfinished = [s for s in result.steps if not s.finished]
    if unfinished:
        notes.append(
            f"{plural(len(unfinished), 'unfinished step')}, skipped: {', '.join(s.name for s in unfinished)}"
        )
    if result.step is not None:
        step_text = f"step {result.step}"
    elif result.layout == "root":
        step_text = "no finished step"
    else:
        step_text = "single item" if result.layout == "item" else "single step"
    report = Report(
        payload=payload,
        name="items",
        title=f"{result.shown or result.checkpoint}  ({result.layout}, {step_text})",
        columns=[
            Column("name", "item", "path", priority=0),
            Column("kind", "kind", priority=2),
            Column("storage", "storage", priority=3),
            Column("arrays", "arrays", "count", priority=1),
            Column("count", "parameters", "count", priority=0),
            Column("bytes_on_disk", "on disk", "bytes", priority=1),
        ],
        rows=items,
        notes=notes,
        empty="no items in this step",
    )
    if steps:
        report.sections.append(
            Report(
                payload={},
                name="steps",
                title="steps",
                rows=steps,
                columns=[
                    Column("step", "step", "int", priority=0),
                    Column("name", "folder", "path", priority=0),
                    Column("finished", "finished", "bool", priority=0),
                    *([Column("saved", "saved", priority=1)] if any("saved" in s for s in steps) else []),
                ],
            )
        )
    return report


def table_report(
    inv,
    params,
    mask=None,
    scan=None,
    full: bool = False,
    sort: str = "path",
    top: int | None = None,
    stacked: dict[str, str] | None = None,
) -> Report:
    """``mask``: a weight-decay MaskResult; ``scan``: norms (or, ``full``, all statistics);
    ``stacked``: for the rows of unstacked layers, the layer axis and the rule that decided it."""
    rows = {
        p.path: {
            "path": p.path,
            "shape": list(p.shape),
            "dtype": p.dtype,
            "count": p.count,
            "bytes": p.nbytes,
            "sharding": sharding_json(p.sharding),
            **({"random_key": p.random_key} if p.random_key else {}),
            **({"stored_dtype": p.stored.stored_dtype} if getattr(p.stored, "stored_dtype", "") else {}),
        }
        for p in params
    }
    columns = [
        Column("path", "path", "path", priority=0),
        Column("shape", "shape", "shape", priority=1),
        Column("dtype", "dtype", priority=1),
        Column("count", "count", "count", priority=0),
        Column("bytes", "bytes", "bytes", priority=3),
        Column("sharding", "sharding", "sharding", priority=4),
    ]
    if mask is not None:
        for param, decayed in mask.decisions:
            rows[param.path]["weight_decay"] = decayed
        columns.append(Column("weight_decay", "decay", "bool", priority=0))
    if stacked:
        for path, rule in stacked.items():
            if path in rows:
                rows[path]["stacked"] = rule
        columns.append(Column("stacked", "stacked", priority=3))
    if scan is not None:
        for entry in scan.params:
            row = rows[entry.param.path]
            row.update(entry.moments.stats() if full else {"norm": entry.norm})
            if full and _is_complex(entry.param.dtype):
                row["of_magnitude"] = True
            row["nonfinite"] = entry.nonfinite
            if entry.digest is not None:
                row["digest"] = entry.digest
        columns += STAT_COLUMNS if full else STAT_COLUMNS[:1]
        if scan.digest is not None:
            columns.append(DIGEST_COLUMN)
    ordered = sort_rows(list(rows.values()), sort, top)
    total = {"count": sum(p.count for p in params), "bytes": sum(p.nbytes for p in params)}
    payload = {"schema": "paramscope.table/1", **header(inv), "params": ordered, "total": total}
    if scan is not None and scan.digest is not None:
        payload["digest"] = scan.digest
    # shown: a dtype read as another than the file stores says so (``bfloat16 (from <V2)``)
    shown = [
        {**row, "dtype": f"{row['dtype']} (from {row['stored_dtype']})"} if "stored_dtype" in row else row
        for row in ordered
    ]
    report = Report(
        payload=payload,
        columns=columns,
        rows=shown,
        title=_title(inv, len(params)),
        footer={"path": f"total ({plural(len(params), 'array')})", **total},
        notes=_digest_note(scan) + (_complex_note(params) if full else []),
        empty="no arrays: the item holds only the values below"
        if inv.values and not inv.params
        else "no parameters match",
    )
    if inv.values:
        payload["values"] = inv.values
        report.sections.append(values_section(inv.values))
    return report


def values_section(values: list[dict]) -> Report:
    """Values shown after the arrays: strings (not arrays) and Python numbers (0-d arrays)."""
    return Report(
        payload={},
        name="values",
        title="values (strings; Python numbers, also counted above as 0-d arrays)",
        columns=[
            Column("path", "path", "path", priority=0),
            Column("type", "type", priority=1),
            Column("value", "value", "note", priority=0),
        ],
        rows=[{**v, "value": _clip(v["value"])} for v in values],
    )


def _clip(value, limit: int = 80) -> str:
    """A value as one short line (a model's JSON config can be kilobytes)."""
    text = " ".join(str(value).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def count_report(inv, result, depth: int) -> Report:
    total = {"count": result.total_count, "bytes": result.total_bytes}
    groups = [{"path": g, "count": c, "bytes": b, "leaves": n} for g, c, b, n in result.groups]
    by_dtype = {d: {"count": c, "bytes": b} for d, (c, b) in result.by_dtype.items()}
    leaves = sum(g["leaves"] for g in groups)
    return Report(
        payload={
            "schema": "paramscope.count/1",
            **header(inv),
            "depth": depth,
            "total": total,
            "by_dtype": by_dtype,
            "groups": groups,
        },
        name="groups",
        title=_title(inv, leaves),
        columns=[
            Column("path", f"group (depth {depth})", "path", priority=0),
            Column("leaves", "arrays", "count", priority=1),
            Column("count", "count", "count", priority=0),
            Column("bytes", "bytes", "bytes", priority=1),
        ],
        rows=[{**g, "path": g["path"] or "(all)"} for g in groups],
        footer={"path": "total", "leaves": leaves, **total},
        empty="no parameters match",
        sections=[
            Report(
                payload={},
                name="dtypes",
                title="by dtype",
                columns=[
                    Column("dtype", "dtype", priority=0),
                    Column("count", "count", "count", priority=0),
                    Column("bytes", "bytes", "bytes", priority=1),
                ],
                rows=[{"dtype": d, **v} for d, v in by_dtype.items()],
                empty="no parameters match",
            )
        ],
    )


GLOBAL_ROW = "(global)"


def norms_report(inv, params, result, per_param: bool, sort: str = "path", top: int | None = None) -> Report:
    """The global norm as a row of its own (path ``(global)``), after the parameters when asked."""
    payload = {"schema": "paramscope.norms/1", **header(inv), **_scan_header(result)}
    overall = {
        "path": GLOBAL_ROW,
        "arrays": len(params),
        "count": payload["count"],
        "norm": result.global_norm,
        "nonfinite": result.nonfinite,
        "digest": result.digest,
    }
    rows = []
    if per_param:
        rows = sort_rows(
            [
                {
                    "path": r.param.path,
                    "dtype": r.param.dtype,
                    "count": r.param.count,
                    "norm": r.norm,
                    "nonfinite": r.nonfinite,
                    **({"digest": r.digest} if r.digest is not None else {}),
                }
                for r in result.params
            ],
            sort,
            top,
        )
        payload["params"] = rows
    return Report(
        payload=payload,
        title=f"{_title(inv, len(params))}  {_engine_text(result)}",
        rows=[*rows, overall],
        columns=[
            Column("path", "path", "path", priority=0),
            Column("dtype", "dtype", priority=3),
            Column("arrays", "arrays", "count", priority=2),
            Column("count", "count", "count", priority=1),
            Column("norm", "norm", "float", priority=0),
            Column("nonfinite", "NaN/Inf", "int", priority=0),
            *([DIGEST_COLUMN] if result.digest is not None else []),
        ],
    )


def stats_report(inv, params, result, sort: str = "path", top: int | None = None) -> Report:
    rows = sort_rows(
        [
            {
                "path": r.param.path,
                "dtype": r.param.dtype,
                "count": r.param.count,
                **r.moments.stats(),
                **({"digest": r.digest} if r.digest is not None else {}),
                **({"of_magnitude": True} if _is_complex(r.param.dtype) else {}),
            }
            for r in result.params
        ],
        sort,
        top,
    )
    payload = {"schema": "paramscope.stats/1", **header(inv), **_scan_header(result), "params": rows}
    return Report(
        payload=payload,
        title=f"{_title(inv, len(params))}  {_engine_text(result)}",
        rows=rows,
        columns=[
            Column("path", "path", "path", priority=0),
            Column("dtype", "dtype", priority=3),
            Column("count", "count", "count", priority=2),
            *STAT_COLUMNS,
            *([DIGEST_COLUMN] if result.digest is not None else []),
        ],
        notes=_digest_note(result) + _complex_note(r.param for r in result.params),
        footer={
            "path": "global",
            "count": payload["count"],
            "norm": result.global_norm,
            "nan": sum(r.moments.nan for r in result.params),
            "inf": sum(r.moments.inf for r in result.params),
        },
        empty="no parameters match",
    )


def _is_complex(dtype: str) -> bool:
    return dtype.startswith("complex")


def _complex_note(params) -> list[str]:
    """Statistics of complex arrays are of their magnitudes |z|: said, not left to guess."""
    names = [p.path for p in params if _is_complex(p.dtype)]
    if not names:
        return []
    shown = few(names, 3)
    return [f"complex arrays ({shown}): mean, std, min, max and zeros are of the magnitudes |z|"]


def mask_report(inv, result) -> Report:
    rows = [{"path": p.path, "count": p.count, "weight_decay": flag} for p, flag in result.decisions]
    decayed, not_decayed = result.totals(True), result.totals(False)
    return Report(
        payload={
            "schema": "paramscope.mask/1",
            **header(inv),
            "include": result.include,
            "exclude": result.exclude,
            "params": rows,
            "decayed": {"count": decayed[0], "leaves": decayed[1]},
            "not_decayed": {"count": not_decayed[0], "leaves": not_decayed[1]},
            "unmatched_patterns": result.unmatched_patterns,
        },
        title=_title(inv, len(rows)),
        rows=rows,
        columns=[
            Column("path", "path", "path", priority=0),
            Column("count", "count", "count", priority=1),
            Column("weight_decay", "decay", "bool", priority=0),
        ],
        notes=[
            f"decayed: {decayed[0]:,} parameters in {plural(decayed[1], 'array')}; "
            f"not decayed: {not_decayed[0]:,} parameters in {plural(not_decayed[1], 'array')}"
        ],
    )


def verify_report(result, shown: str | None = None) -> Report:
    rows = [{"item": p.item, "path": p.path, "problem": p.problem} for p in result.problems]
    verdict = "OK" if result.ok else plural(len(rows), "problem")
    step_text = f"  step {result.step}" if result.step is not None else ""
    items = ("item " if len(result.items) == 1 else "items ") + ",".join(result.items)
    return Report(
        payload={
            "schema": "paramscope.verify/1",
            "checkpoint": result.checkpoint,
            "step": result.step,
            "items": result.items,
            "ok": result.ok,
            "arrays": result.arrays,
            "bytes_read": result.bytes_read,
            "digests_checked": result.digests_checked,
            "problems": rows,
        },
        title=f"{shown or result.checkpoint}{step_text}  {items}",
        columns=[
            Column("item", "item", priority=2),
            Column("path", "array", "path", priority=0),
            Column("problem", "problem", "note", priority=0),
        ],
        rows=rows,
        notes=[
            f"verified {plural(result.arrays, 'array')}, decoded {result.bytes_read:,} bytes"
            + (f", compared {result.digests_checked:,} digests" if result.digests_checked else "")
            + f": {verdict}"
        ],
    )


def _diff_side(param) -> dict | None:
    if param is None:
        return None
    return {"shape": list(param.shape), "dtype": param.dtype, "sharding": sharding_json(param.sharding)}


def diff_summary(result) -> str:
    return ", ".join(f"{n} {status}" for status, n in result.counts().items())


def diff_report(
    inv_a,
    inv_b,
    result,
    values_compared: bool,
    show_all: bool,
    sort: str = "path",
    top: int | None = None,
) -> Report:
    rows = []
    for entry in result.params:
        row = {
            "path": entry.path,
            "path_a": entry.path_a,
            "transposed": entry.transposed,
            "status": entry.status,
            "changes": entry.changes,
            "a": _diff_side(entry.a),
            "b": _diff_side(entry.b),
        }
        if entry.digest_a is not None or entry.digest_b is not None:
            row.update(digest_a=entry.digest_a, digest_b=entry.digest_b)
        if entry.values is not None:
            v = entry.values
            row.update(
                norm_a=v.norm_a,
                norm_b=v.norm_b,
                diff_norm=v.diff_norm,
                rel_diff=v.rel_diff,
                cosine=v.cosine,
                max_abs_diff=v.max_abs_diff,
                beyond_tolerance=v.beyond_tolerance,
                identical=v.identical,
            )
        rows.append(row)
    rows = sort_rows(rows, sort)
    payload = {
        "schema": "paramscope.diff/1",
        "a": header(inv_a),
        "b": header(inv_b),
        "rtol": result.rtol,
        "atol": result.atol,
        "values_compared": values_compared,
        "summary": result.counts(),
        "pairing": {
            **result.rules.as_json(),
            "a_only": sorted((r["path_a"] for r in rows if r["status"] == "removed"), key=path_sort_key),
            "b_only": sorted((r["path"] for r in rows if r["status"] == "added"), key=path_sort_key),
        },
        "params": rows,
    }
    shown = [
        {
            **r,
            # the table names A's own path only where it differs from the name it is paired under
            "renamed_from": r["path_a"] if r["path_a"] not in (None, r["path"]) else None,
            "detail": "; ".join(r["changes"]),
        }
        for r in rows
        if show_all or r["status"] != "identical"
    ]
    if top is not None:
        shown = shown[:top]
    notes = [diff_summary(result)]
    if result.rules.active:
        renamed = sum(r["path_a"] not in (None, r["path"]) for r in rows)
        flipped = sum(r["transposed"] and r["status"] != "removed" for r in rows)
        notes.append(
            f"{plural(renamed, 'path')} of A renamed by {plural(len(result.rules.rename), 'rule')}, "
            f"{plural(flipped, 'pair')} compared transposed"
        )
    return Report(
        payload=payload,
        title=f"A {where(inv_a)}\nB {where(inv_b)}",
        rows=shown,
        columns=[
            Column("path", "path", "path", priority=0),
            Column("status", "status", priority=0),
            Column("detail", "structure", "note", priority=1),
            # after the structure: on a narrow terminal the reason a pair differs stays longest
            Column("renamed_from", "A path", "path", priority=1),
            Column("norm_a", "norm A", "float", priority=3),
            Column("norm_b", "norm B", "float", priority=3),
            Column("diff_norm", "||A-B||", "float", priority=2),
            Column("rel_diff", "||A-B||/||A||", "float", priority=0),
            Column("cosine", "cosine", "float", priority=1),
            Column("max_abs_diff", "max |A-B|", "float", priority=2),
            # digests in the table only when they are what was compared (JSON: always)
            *(
                []
                if values_compared
                else [Column("digest_a", "digest A", priority=6), Column("digest_b", "digest B", priority=6)]
            ),
        ],
        notes=notes,
        empty="no differences",
    )


def _text(value) -> str:
    return f"{value:.9g}" if isinstance(value, float) else str(value)


def check_report(inv, baseline_file: str, baseline, compared, options, violations, checked: int) -> Report:
    rows = [
        {
            "path": v.path,
            "metric": v.metric,
            "baseline": v.baseline,
            "actual": v.actual,
            "rel_diff": v.rel_diff,
        }
        for v in violations
    ]
    verdict = "pass" if not violations else plural(len(violations), "violation")
    return Report(
        payload={
            "schema": "paramscope.check/1",
            **header(inv),
            "baseline": os.path.abspath(baseline_file),
            "baseline_schema": baseline.schema,
            "compared": compared,
            "rtol": options.rtol,
            "atol": options.atol,
            "passed": not violations,
            "violations": rows,
        },
        title=f"{where(inv)}  vs  {baseline_file}",
        rows=[{**r, "baseline": _text(r["baseline"]), "actual": _text(r["actual"])} for r in rows],
        columns=[
            Column("path", "path", "path", priority=0),
            Column("metric", "metric", priority=0),
            Column("baseline", "baseline", "value", priority=0),  # what check is read for: kept,
            Column("actual", "actual", "value", priority=0),  # the path folds at dots instead
            Column("rel_diff", "rel. diff", "float", priority=0),
        ],
        notes=[f"compared {', '.join(compared) or 'nothing'} of {plural(checked, 'parameter')}: {verdict}"],
    )


def layers_report(inv, rows, sort: str = "layer", top: int | None = None) -> Report:
    """One row per layer of each stack: the layer's norm and the norm of each of its arrays."""
    kinds = sorted({kind for row in rows for kind in row.norms})
    table = [
        {"stack": r.stack, "layer": r.layer, "norm": r.norm, "nonfinite": r.nonfinite, **r.norms}
        for r in rows
    ]
    if sort == "norm":
        table.sort(key=lambda r: (-r["norm"] if r["norm"] == r["norm"] else math.inf, r["stack"], r["layer"]))
    if top is not None:
        table = table[:top]
    payload = {
        "schema": "paramscope.layers/1",
        **header(inv),
        "layers": [
            {
                "stack": r["stack"],
                "layer": r["layer"],
                "norm": r["norm"],
                "nonfinite": r["nonfinite"],
                "norms": {k: r[k] for k in kinds if k in r},
            }
            for r in table
        ],
    }
    weights = ("kernel", "weight", "embedding", "w")
    return Report(
        payload=payload,
        title=f"{where(inv)}  {plural(len({r.stack for r in rows}), 'stack')}, {plural(len(rows), 'layer')}",
        columns=[
            Column("stack", "stack", "path", priority=1),
            Column("layer", "layer", "int", priority=0),
            Column("norm", "norm", "float", priority=0),
            Column("nonfinite", "NaN/Inf", "int", priority=1),
            *[Column(k, k, "float", priority=2 if k.split(".")[-1] in weights else 3) for k in kinds],
        ],
        rows=table,
        empty="no stacked arrays (see --layer-axis)",
    )


OPTIM_COLUMNS = [
    Column("path", "path", "path", priority=0),
    Column("norm", "norm", "float", priority=1),
    Column("mu_norm", "||mu||", "float", priority=2),
    Column("sqrt_nu_norm", "||sqrt(nu)||", "float", priority=2),
    Column("max_sqrt_nu", "max sqrt(nu)", "float", priority=3),
    Column("count", "step", "int", priority=3),
    Column("update_norm", "||update||", "float", priority=1),
    Column("ratio", "update/param", "float", priority=0),
]
OPTIM_SORT_KEYS = ("path", "ratio", "update_norm", "norm", "mu_norm", "sqrt_nu_norm", "max_sqrt_nu")


def optim_report(inv, alignment, hyper: dict, sort: str = "path", top: int | None = None) -> Report:
    """Each parameter beside its optimizer state: moments, step, the update and its ratio."""
    stateful = [e for e in alignment.entries if e.mu or e.nu or e.factored]
    rows = sort_rows([{c.key: getattr(e, c.key) for c in OPTIM_COLUMNS} for e in stateful], sort, top)
    notes = []
    if alignment.stateless:
        notes.append(
            f"{plural(len(alignment.stateless), 'parameter')} without optimizer state: "
            + listed(alignment.stateless)
        )
    if alignment.unmatched:
        notes.append(
            f"{plural(len(alignment.unmatched), 'optimizer leaf')} matching no parameter: "
            + listed(alignment.unmatched)
        )
    for problem in alignment.mismatched:
        notes.append(f"shape differs, left out: {problem}")
    return Report(
        payload={
            "schema": "paramscope.optim/1",
            **header(inv),
            **hyper,
            "params": rows,
            "stateless": alignment.stateless,
            "unmatched": alignment.unmatched,
            "mismatched": alignment.mismatched,
        },
        title=f"{where(inv)}  {plural(len(stateful), 'parameter')} with optimizer state",
        columns=OPTIM_COLUMNS,
        rows=rows,
        notes=notes,
        empty="no optimizer state aligned with the parameters",
    )


SPARKS = "▁▂▃▄▅▆▇█"


def sparkline(values) -> str:
    """The values as Unicode block characters, lowest to highest; ``·`` where there is none.

    >>> sparkline([1, 2, 3, 4, 5, 6, 7, 8]), sparkline([2, 2, None])
    ('▁▂▃▄▅▆▇█', '▁▁·')
    """
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return "·" * len(values)
    low, high = min(finite), max(finite)
    out = []
    for v in values:
        if v is None or not math.isfinite(v):
            out.append("·")
        else:
            out.append(
                SPARKS[0] if high == low else SPARKS[round((v - low) / (high - low) * (len(SPARKS) - 1))]
            )
    return "".join(out)


HISTORY_SORT_KEYS = ("path", "drift", "change", "norm")


def history_report(inv, result, series, full: bool, sort: str = "path", top: int | None = None) -> Report:
    """One row per parameter (or group): the latest values and a sparkline of the norm; the JSON
    and CSV in long form (step, path, metric, value)."""
    long_rows = []
    for step in result.steps:
        for path, stats in sorted(step.stats.items(), key=lambda entry: path_sort_key(entry[0])):
            for metric, value in stats.items():
                long_rows.append({"step": step.step, "path": path, "metric": metric, "value": value})
            if path in step.change:
                long_rows.append(
                    {"step": step.step, "path": path, "metric": "change", "value": step.change[path]}
                )
    rows = [
        {
            "path": s.path,
            "norm": s.norms[-1],
            "trend": sparkline(s.norms),
            "drift": s.drift,
            "change": s.changes[-1],
            "nonfinite": s.nonfinite[-1],
        }
        for s in series
    ]
    rows = sort_rows(rows, sort, top)
    steps = [r.step for r in result.steps]
    notes = [
        f"steps {', '.join(map(str, steps))}"
        if len(steps) <= 12
        else f"{len(steps)} steps, {steps[0]} to {steps[-1]}"
    ]
    first_bad = result.first_nonfinite()
    if first_bad is not None:
        notes.append(f"first NaN/Inf at step {first_bad[0]}: {', '.join(first_bad[1][:5])}")
    payload = {
        "schema": "paramscope.history/1",
        **header(inv),
        "step": None,
        "steps": steps,
        "cached_steps": [r.step for r in result.steps if r.cached],
        "bytes_read": result.bytes_read,
        "first_nonfinite_step": first_bad[0] if first_bad else None,
        "series": long_rows,
    }
    return Report(
        payload=payload,
        title=f"{inv.shown or inv.checkpoint}  {plural(len(steps), 'step')}  {len(series):,} series",
        columns=[
            Column("path", "path", "path", priority=0),
            Column("norm", "norm", "float", priority=0),
            Column("trend", "norm over steps", priority=1),
            Column("drift", "drift", "float", priority=1),
            Column("change", "last change", "float", priority=0),
            Column("nonfinite", "NaN/Inf", "int", priority=1),
        ],
        rows=rows,
        notes=notes,
        sections=[
            Report(
                payload={},
                name="long",
                columns=[
                    Column("step", "step", "int", priority=0),
                    Column("path", "path", "path", priority=0),
                    Column("metric", "metric", priority=0),
                    Column("value", "value", "number", priority=0),
                ],
                rows=long_rows,
                title="long form",
                hidden=True,
            )
        ],
    )
