"""What each command shows: its JSON document and the same data as rows, from the core's results.

One builder per command; the CLI calls the core, hands the result here, and renders the
:class:`paramscope.output.render.Report` it gets back in the format asked for.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

from paramscope.io.inventory import sharding_json
from paramscope.output.render import Column, Report

STAT_COLUMNS = [
    Column("norm", "norm", "float"),
    Column("mean", "mean", "float"),
    Column("std", "std", "float"),
    Column("min", "min", "float"),
    Column("max", "max", "float"),
    Column("max_abs", "max |x|", "float"),
    Column("zero_fraction", "zeros", "float"),
    Column("nan", "NaN", "int"),
    Column("inf", "Inf", "int"),
]
SORT_KEYS = ("path", "count", "bytes", "norm")


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
    step = f"step {inv.step}" if inv.step is not None else "no step"
    return f"{inv.checkpoint}  {step}  item {','.join(inv.items)}"


def _title(inv, arrays: int) -> str:
    return f"{where(inv)}  {arrays:,} arrays"


def _engine_text(result) -> str:
    if result.mesh is None:
        return "engine host"
    return "engine mesh " + ",".join(f"{n}={s}" for n, s in result.mesh)


def _scan_header(result) -> dict[str, Any]:
    return {
        "global_norm": result.global_norm,
        "nonfinite": result.nonfinite,
        "count": sum(r.param.count for r in result.params),
        "engine": result.engine,
        "mesh": dict(result.mesh) if result.mesh is not None else None,
        "bytes_read": result.bytes_read,
    }


def info_report(result) -> Report:
    steps = [{"step": s.step, "name": s.name, "finished": s.finished} for s in result.steps]
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
            {**row, **({"content": i.content} if i.kind == "json" else {})}
            for row, i in zip(items, result.items)
        ],
    }
    notes = [f"{i.name}: {json.dumps(i.content)[:200]}" for i in result.items if i.kind == "json"]
    unfinished = [s for s in result.steps if not s.finished]
    if unfinished:
        notes.append(
            f"{len(unfinished)} unfinished step(s), skipped: {', '.join(s.name for s in unfinished)}"
        )
    step_text = f"step {result.step}" if result.step is not None else "single item"
    report = Report(
        payload=payload,
        title=f"{result.checkpoint}  ({result.layout}, {step_text})",
        columns=[
            Column("name", "item"),
            Column("kind", "kind"),
            Column("storage", "storage"),
            Column("arrays", "arrays", "int"),
            Column("count", "parameters", "int"),
            Column("bytes_on_disk", "on disk", "bytes"),
        ],
        rows=items,
        notes=notes,
    )
    if steps:
        report.sections.append(
            Report(
                payload={},
                title="steps",
                rows=steps,
                columns=[
                    Column("step", "step", "int"),
                    Column("name", "folder"),
                    Column("finished", "finished", "bool"),
                ],
            )
        )
    return report


def _sorted_rows(rows: list[dict], key: str) -> list[dict]:
    if key == "path":
        return sorted(rows, key=lambda r: r["path"])

    def value(row):
        v = row.get(key)
        return -math.inf if v is None or (isinstance(v, float) and math.isnan(v)) else v

    return sorted(rows, key=lambda r: (-value(r), r["path"]))


def table_report(inv, params, mask=None, scan=None, full: bool = False, sort: str = "path") -> Report:
    """``mask``: a weight-decay MaskResult; ``scan``: norms (or, ``full``, all statistics)."""
    rows = {
        p.path: {
            "path": p.path,
            "shape": list(p.shape),
            "dtype": p.dtype,
            "count": p.count,
            "bytes": p.nbytes,
            "sharding": sharding_json(p.sharding),
        }
        for p in params
    }
    columns = [
        Column("path", "path"),
        Column("shape", "shape", "shape"),
        Column("dtype", "dtype"),
        Column("count", "count", "int"),
        Column("bytes", "bytes", "bytes"),
        Column("sharding", "sharding", "sharding"),
    ]
    if mask is not None:
        for param, decayed in mask.decisions:
            rows[param.path]["weight_decay"] = decayed
        columns.append(Column("weight_decay", "weight decay", "bool"))
    if scan is not None:
        for entry in scan.params:
            row = rows[entry.param.path]
            row.update(entry.moments.stats() if full else {"norm": entry.norm})
            row["nonfinite"] = entry.nonfinite
        columns += STAT_COLUMNS if full else STAT_COLUMNS[:1]
    ordered = _sorted_rows(list(rows.values()), sort)
    total = {"count": sum(p.count for p in params), "bytes": sum(p.nbytes for p in params)}
    return Report(
        payload={"schema": "paramscope.table/1", **header(inv), "params": ordered, "total": total},
        columns=columns,
        rows=ordered,
        title=_title(inv, len(params)),
        footer={"path": f"total ({len(params):,} arrays)", **total},
    )


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
        title=_title(inv, leaves),
        columns=[
            Column("path", f"group (depth {depth})"),
            Column("leaves", "arrays", "int"),
            Column("count", "count", "int"),
            Column("bytes", "bytes", "bytes"),
        ],
        rows=[{**g, "path": g["path"] or "(all)"} for g in groups],
        footer={"path": "total", "leaves": leaves, **total},
        sections=[
            Report(
                payload={},
                title="by dtype",
                columns=[
                    Column("dtype", "dtype"),
                    Column("count", "count", "int"),
                    Column("bytes", "bytes", "bytes"),
                ],
                rows=[{"dtype": d, **v} for d, v in by_dtype.items()],
            )
        ],
    )


def norms_report(inv, params, result, per_param: bool) -> Report:
    payload = {"schema": "paramscope.norms/1", **header(inv), **_scan_header(result)}
    title = f"{_title(inv, len(params))}  {_engine_text(result)}"
    if not per_param:
        rows = [
            {"metric": "global_norm", "value": f"{result.global_norm:.9g}"},
            {"metric": "nonfinite", "value": f"{result.nonfinite:,}"},
            {"metric": "count", "value": f"{payload['count']:,}"},
            {"metric": "arrays", "value": f"{len(params):,}"},
        ]
        return Report(
            payload=payload,
            title=title,
            rows=rows,
            columns=[Column("metric", "metric"), Column("value", "value")],
        )
    rows = [
        {
            "path": r.param.path,
            "norm": r.norm,
            "nonfinite": r.nonfinite,
            "count": r.param.count,
            "dtype": r.param.dtype,
        }
        for r in result.params
    ]
    payload["params"] = rows
    return Report(
        payload=payload,
        title=title,
        rows=rows,
        columns=[
            Column("path", "path"),
            Column("dtype", "dtype"),
            Column("count", "count", "int"),
            Column("norm", "norm", "float"),
            Column("nonfinite", "NaN/Inf", "int"),
        ],
        footer={
            "path": "global",
            "count": payload["count"],
            "norm": result.global_norm,
            "nonfinite": result.nonfinite,
        },
    )


def stats_report(inv, params, result) -> Report:
    rows = [
        {"path": r.param.path, "dtype": r.param.dtype, "count": r.param.count, **r.moments.stats()}
        for r in result.params
    ]
    payload = {"schema": "paramscope.stats/1", **header(inv), **_scan_header(result), "params": rows}
    return Report(
        payload=payload,
        title=f"{_title(inv, len(params))}  {_engine_text(result)}",
        rows=rows,
        columns=[
            Column("path", "path"),
            Column("dtype", "dtype"),
            Column("count", "count", "int"),
            *STAT_COLUMNS,
        ],
        footer={
            "path": "global",
            "count": payload["count"],
            "norm": result.global_norm,
            "nan": sum(r["nan"] for r in rows),
            "inf": sum(r["inf"] for r in rows),
        },
    )


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
            Column("path", "path"),
            Column("count", "count", "int"),
            Column("weight_decay", "weight decay", "bool"),
        ],
        notes=[
            f"decayed: {decayed[0]:,} parameters in {decayed[1]} arrays; "
            f"not decayed: {not_decayed[0]:,} parameters in {not_decayed[1]} arrays"
        ],
    )


def verify_report(result) -> Report:
    rows = [{"item": p.item, "path": p.path, "problem": p.problem} for p in result.problems]
    verdict = "OK" if result.ok else f"{len(rows)} problem(s)"
    step_text = f"step {result.step}" if result.step is not None else "no step"
    return Report(
        payload={
            "schema": "paramscope.verify/1",
            "checkpoint": result.checkpoint,
            "step": result.step,
            "items": result.items,
            "ok": result.ok,
            "arrays": result.arrays,
            "bytes_read": result.bytes_read,
            "problems": rows,
        },
        title=f"{result.checkpoint}  {step_text}  items {','.join(result.items)}",
        columns=[Column("item", "item"), Column("path", "array"), Column("problem", "problem")],
        rows=rows,
        notes=[f"verified {result.arrays:,} arrays, decoded {result.bytes_read:,} bytes: {verdict}"],
    )


def _diff_side(param) -> dict | None:
    if param is None:
        return None
    return {"shape": list(param.shape), "dtype": param.dtype, "sharding": sharding_json(param.sharding)}


def diff_summary(result) -> str:
    return ", ".join(f"{n} {status}" for status, n in result.counts().items())


def diff_report(inv_a, inv_b, result, values_compared: bool, show_all: bool) -> Report:
    rows = []
    for entry in result.params:
        row = {
            "path": entry.path,
            "status": entry.status,
            "changes": entry.changes,
            "a": _diff_side(entry.a),
            "b": _diff_side(entry.b),
        }
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
    payload = {
        "schema": "paramscope.diff/1",
        "a": header(inv_a),
        "b": header(inv_b),
        "rtol": result.rtol,
        "atol": result.atol,
        "values_compared": values_compared,
        "summary": result.counts(),
        "params": rows,
    }
    shown = [{**r, "detail": "; ".join(r["changes"])} for r in rows if show_all or r["status"] != "identical"]
    return Report(
        payload=payload,
        title=f"A {where(inv_a)}\nB {where(inv_b)}",
        rows=shown,
        columns=[
            Column("path", "path"),
            Column("status", "status"),
            Column("detail", "structure"),
            Column("norm_a", "norm A", "float"),
            Column("norm_b", "norm B", "float"),
            Column("diff_norm", "||A-B||", "float"),
            Column("rel_diff", "||A-B||/||A||", "float"),
            Column("cosine", "cosine", "float"),
            Column("max_abs_diff", "max |A-B|", "float"),
        ],
        notes=[diff_summary(result)],
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
    verdict = "pass" if not violations else f"{len(violations)} violation(s)"
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
            Column("path", "path"),
            Column("metric", "metric"),
            Column("baseline", "baseline"),
            Column("actual", "actual"),
            Column("rel_diff", "rel. diff", "float"),
        ],
        notes=[f"compared {', '.join(compared) or 'nothing'} of {checked:,} parameters: {verdict}"],
    )
