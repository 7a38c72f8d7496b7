"""What each command shows: its JSON document and the same data as rows, from the core's results.

One builder per command; the CLI calls the core, hands the result here, and renders the
:class:`paramscope.output.render.Report` it gets back in the format asked for.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import replace
from typing import Any

from paramscope.errors import few
from paramscope.names import path_sort_key, split_path
from paramscope.output.fields import columns, field, resolve
from paramscope.output.render import Report, listed


def sharding_json(param) -> list | None:
    """:func:`paramscope.io.inventory.param_sharding_json`, imported when used: ``--help`` needs
    none of the checkpoint code."""
    from paramscope.io.inventory import param_sharding_json

    return param_sharding_json(param)


STAT_COLUMNS = columns("norm", "mean", "std", "min", "max", "max_abs", "zero_fraction", "nan", "inf")
STAT_KEYS = tuple(c.key for c in STAT_COLUMNS)
# Sort keys of the commands that sort: largest first, but for path (and cosine: smallest first).
TABLE_SORT_KEYS = ("path", "count", "bytes", "norm")
NORMS_SORT_KEYS = ("path", "count", "norm", "nonfinite")
STATS_SORT_KEYS = ("path", "count", *STAT_KEYS)
DIFF_SORT_KEYS = ("path", "rel_diff", "diff_norm", "max_abs_diff", "cosine", "norm_a", "norm_b")
ASCENDING = ("path", "cosine")


# Each document's schema version: raised when a field of it changes name, type or meaning.
SCHEMA_VERSIONS = {
    "info": 1,
    "table": 2,  # 2: a replicated array's sharding is [null, ...], null where the format stores none
    "count": 2,  # 2: "leaves" are "arrays"
    "mask": 2,  # 2: "leaves" are "arrays"
    "norms": 2,  # 2: "bytes_read" an integer ("bytes_read_by_process" the list), "arrays"
    "stats": 2,  # 2: as norms; the global row is "(global)"
    "verify": 1,
    "diff": 2,  # 2: sharding as in table
    "check": 1,
    "layers": 1,
    "optim": 2,  # 2: the optimizer's step is "step_count" (was "count")
    "history": 1,
}


def schema(command: str) -> str:
    """The ``schema`` field of a command's JSON document.

    >>> schema("count")
    'paramscope.count/2'
    """
    return f"paramscope.{command}/{SCHEMA_VERSIONS[command]}"


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


def _items_part(shown: str, items: list[str]) -> list[str]:
    """``item NAME`` (``items A,B``) for a title; nothing for the one item a path names itself
    (a file such as ``model.safetensors``, an item folder passed alone).

    >>> _items_part("ckpt", ["params"]), _items_part("out/model.npz", ["model.npz"])
    (['item params'], [])
    """
    if len(items) == 1 and items[0] == shown.rstrip("/").rsplit("/", 1)[-1]:
        return []
    return [("item " if len(items) == 1 else "items ") + ",".join(items)]


def where(inv) -> str:
    """The selection as the user would write it: path as typed, step, item(s), subtree."""
    parts = [inv.shown or inv.checkpoint]
    if inv.step is not None:
        parts.append(f"step {inv.step}")
    parts += _items_part(parts[0], inv.items)
    if inv.subtree:
        parts.append(f"subtree {inv.subtree}")
    return "  ".join(parts)


def _title(inv, arrays: int) -> str:
    return f"{where(inv)}  {plural(arrays, 'array')}"


def sort_rows(
    rows: list[dict], key: str, top: int | None = None, choices: tuple[str, ...] | None = None
) -> list[dict]:
    """Rows by ``key`` (largest first, but path and cosine ascending), missing values last;
    ``key`` may be named by its header too where ``choices`` lists the keys allowed."""
    if choices is not None:
        key = resolve(key, choices)

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


# --digest asks for the column: it stays however narrow the terminal (shown by its first digits)
DIGEST_COLUMN = field("digest", priority=0)


def _scan_header(result) -> dict[str, Any]:
    header = {
        "global_norm": result.global_norm,
        "nonfinite": result.nonfinite,
        "arrays": len(result.params),
        "count": sum(r.param.count for r in result.params),
        "engine": result.engine,
        "mesh": dict(result.mesh) if result.mesh is not None else None,
        "bytes_read": sum(result.bytes_read),
        "bytes_read_by_process": list(result.bytes_read),
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
        "schema": schema("info"),
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
        columns=columns("name", "kind", "storage", "arrays", "count", "bytes_on_disk"),
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
                    field("step"),
                    field("name", header="folder"),
                    field("finished"),
                    *([field("saved")] if any("saved" in s for s in steps) else []),
                ],
            )
        )
    return report


def _options_adding(scan, full: bool, masked: bool) -> dict[str, str]:
    """The columns ``table`` shows only when asked, which it lacks now, and the option adding each,
    by key and by header (as ``--columns`` names them)."""
    adding = {}
    if scan is None:
        adding["norm"] = "--norms (or --stats)"
    if not full:
        adding.update({c.key: "--stats" for c in STAT_COLUMNS[1:]})
    if scan is None or scan.digest is None:
        adding["digest"] = "--digest"
    if not masked:
        adding["weight_decay"] = "--wd-include or --wd-exclude"
    by_header = {field(key).header.lower(): option for key, option in adding.items()}
    return {**by_header, **adding}


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
            "sharding": sharding_json(p),
            **({"random_key": p.random_key} if p.random_key else {}),
            **({"stored_dtype": p.stored.stored_dtype} if getattr(p.stored, "stored_dtype", "") else {}),
        }
        for p in params
    }
    table_columns = columns("path", "shape", "dtype", "count", "bytes", "sharding")
    if mask is not None:
        for param, decayed in mask.decisions:
            rows[param.path]["weight_decay"] = decayed
        table_columns.append(field("weight_decay"))
    if stacked:
        for path, rule in stacked.items():
            if path in rows:
                rows[path]["stacked"] = rule
        table_columns.append(field("stacked"))
    if scan is not None:
        for entry in scan.params:
            row = rows[entry.param.path]
            row.update(entry.moments.stats() if full else {"norm": entry.norm})
            if full and _is_complex(entry.param.dtype):
                row["of_magnitude"] = True
            row["nonfinite"] = entry.nonfinite
            if entry.digest is not None:
                row["digest"] = entry.digest
        table_columns += STAT_COLUMNS if full else STAT_COLUMNS[:1]
        if scan.digest is not None:
            table_columns.append(DIGEST_COLUMN)
    ordered = sort_rows(list(rows.values()), sort, top, TABLE_SORT_KEYS)
    total = {"count": sum(p.count for p in params), "bytes": sum(p.nbytes for p in params)}
    payload = {"schema": schema("table"), **header(inv), "params": ordered, "total": total}
    if scan is not None and scan.digest is not None:
        payload["digest"] = scan.digest
    # shown: a dtype read as another than the file stores says so (``bfloat16 (from <V2)``)
    shown = [
        {**row, "dtype": f"{row['dtype']} (from {row['stored_dtype']})"} if "stored_dtype" in row else row
        for row in ordered
    ]
    report = Report(
        payload=payload,
        columns=table_columns,
        rows=shown,
        title=_title(inv, len(params)),
        footer={"path": f"total ({plural(len(params), 'array')})", **total},
        notes=_digest_note(scan) + (_complex_note(params) if full else []),
        empty="no arrays: the item holds only the values below"
        if inv.values and not inv.params
        else "no parameters match",
        options_adding=_options_adding(scan, full, mask is not None),
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
        columns=columns("path", "type", "value"),
        rows=[{**v, "value": _clip(v["value"])} for v in values],
    )


def _clip(value, limit: int = 80) -> str:
    """A value as one short line (a model's JSON config can be kilobytes)."""
    text = " ".join(str(value).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def count_report(inv, result, depth: int) -> Report:
    total = {"count": result.total_count, "bytes": result.total_bytes}
    groups = [{"path": g, "count": c, "bytes": b, "arrays": n} for g, c, b, n in result.groups]
    by_dtype = {d: {"count": c, "bytes": b} for d, (c, b) in result.by_dtype.items()}
    arrays = sum(g["arrays"] for g in groups)
    return Report(
        payload={
            "schema": schema("count"),
            **header(inv),
            "depth": depth,
            "total": total,
            "by_dtype": by_dtype,
            "groups": groups,
        },
        name="groups",
        title=_title(inv, arrays),
        columns=[
            field("path", header=f"group (depth {depth})"),
            *columns("arrays", "count", "bytes", bytes=1),
        ],
        rows=[{**g, "path": g["path"] or "(all)"} for g in groups],
        footer={"path": "total", "arrays": arrays, **total},
        empty="no parameters match",
        sections=[
            Report(
                payload={},
                name="dtypes",
                title="by dtype",
                columns=columns("dtype", "count", "bytes", dtype=0, bytes=1),
                rows=[{"dtype": d, **v} for d, v in by_dtype.items()],
                empty="no parameters match",
            )
        ],
    )


GLOBAL_ROW = "(global)"


def norms_report(inv, params, result, per_param: bool, sort: str = "path", top: int | None = None) -> Report:
    """The global norm as a row of its own (path ``(global)``), after the parameters when asked."""
    payload = {"schema": schema("norms"), **header(inv), **_scan_header(result)}
    overall = {
        "path": GLOBAL_ROW,
        "arrays": payload["arrays"],
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
            NORMS_SORT_KEYS,
        )
        payload["params"] = rows
    return Report(
        payload=payload,
        title=f"{_title(inv, len(params))}  {_engine_text(result)}",
        rows=[*rows, overall],
        columns=[
            *columns("path", "dtype", "arrays", "count", "norm", "nonfinite", dtype=3, arrays=2, nonfinite=0),
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
        STATS_SORT_KEYS,
    )
    payload = {"schema": schema("stats"), **header(inv), **_scan_header(result), "params": rows}
    return Report(
        payload=payload,
        title=f"{_title(inv, len(params))}  {_engine_text(result)}",
        rows=rows,
        columns=[
            *columns("path", "dtype", "count", dtype=3, count=2),
            *STAT_COLUMNS,
            *([DIGEST_COLUMN] if result.digest is not None else []),
        ],
        notes=_digest_note(result) + _complex_note(r.param for r in result.params),
        footer={
            "path": GLOBAL_ROW,
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
            "schema": schema("mask"),
            **header(inv),
            "include": result.include,
            "exclude": result.exclude,
            "params": rows,
            "decayed": {"count": decayed[0], "arrays": decayed[1]},
            "not_decayed": {"count": not_decayed[0], "arrays": not_decayed[1]},
            "unmatched_patterns": result.unmatched_patterns,
        },
        title=_title(inv, len(rows)),
        rows=rows,
        columns=columns("path", "count", "weight_decay", count=1),
        notes=[
            f"decayed: {decayed[0]:,} parameters in {plural(decayed[1], 'array')}; "
            f"not decayed: {not_decayed[0]:,} parameters in {plural(not_decayed[1], 'array')}"
        ],
    )


def verify_report(result, shown: str | None = None) -> Report:
    rows = [{"item": p.item, "path": p.path, "problem": p.problem} for p in result.problems]
    verdict = "OK" if result.ok else plural(len(rows), "problem")
    step_text = f"  step {result.step}" if result.step is not None else ""
    items = "".join(f"  {part}" for part in _items_part(shown or result.checkpoint, result.items))
    return Report(
        payload={
            "schema": schema("verify"),
            "checkpoint": result.checkpoint,
            "step": result.step,
            "items": result.items,
            "ok": result.ok,
            "arrays": result.arrays,
            "bytes_read": result.bytes_read,
            "digests_checked": result.digests_checked,
            "problems": rows,
            "notes": result.notes,
        },
        title=f"{shown or result.checkpoint}{step_text}{items}",
        columns=[field("item"), field("path", header="array"), field("problem")],
        rows=rows,
        notes=[
            f"verified {plural(result.arrays, 'array')}, decoded {result.bytes_read:,} bytes"
            + (f", compared {result.digests_checked:,} digests" if result.digests_checked else "")
            + f": {verdict}",
            *(f"note: {note}" for note in result.notes),
        ],
    )


def _diff_side(param) -> dict | None:
    if param is None:
        return None
    return {"shape": list(param.shape), "dtype": param.dtype, "sharding": sharding_json(param)}


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
    rows = sort_rows(rows, sort, choices=DIFF_SORT_KEYS)
    payload = {
        "schema": schema("diff"),
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
    shown = [r for r in rows if show_all or r["status"] != "identical"]
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
        # status and rel. diff are what diff exists for: they stay; the structure goes last of the rest;
        # A's path is shown only where it differs from the name the pair goes by; digests only
        # when they are what was compared (JSON: always)
        columns=[
            *columns("path", "status", "changes"),
            replace(field("path_a"), unless_equal="path"),
            *columns("norm_a", "norm_b", "diff_norm", "rel_diff", "cosine", "max_abs_diff"),
            *([] if values_compared else columns("digest_a", "digest_b")),
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
            "schema": schema("check"),
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
        # every column is what check is read for: kept, the path folds at dots instead
        columns=columns("path", "metric", "baseline", "actual", "rel_diff"),
        notes=[f"compared {', '.join(compared) or 'nothing'} of {plural(checked, 'parameter')}: {verdict}"],
    )


LAYERS_SORT_KEYS = ("layer", "norm")


def layers_report(inv, rows, sort: str = "layer", top: int | None = None) -> Report:
    """One row per layer of each stack: the layer's norm and the norm of each of its arrays."""
    sort = resolve(sort, LAYERS_SORT_KEYS)
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
        "schema": schema("layers"),
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
            *columns("stack", "layer", "norm", "nonfinite"),
            *[field(k, priority=2 if k.split(".")[-1] in weights else 3) for k in kinds],
        ],
        rows=table,
        empty="no stacked arrays (see --layer-axis)",
    )


OPTIM_COLUMNS = columns(
    "path", "norm", "mu_norm", "sqrt_nu_norm", "max_sqrt_nu", "step_count", "update_norm", "ratio", norm=1
)
OPTIM_ATTRIBUTES = {"step_count": "count"}  # fields named otherwise on the core's records
OPTIM_SORT_KEYS = ("path", "ratio", "update_norm", "norm", "mu_norm", "sqrt_nu_norm", "max_sqrt_nu")


def optim_report(inv, alignment, hyper: dict, sort: str = "path", top: int | None = None) -> Report:
    """Each parameter beside its optimizer state: moments, step, the update and its ratio."""
    stateful = [e for e in alignment.entries if e.mu or e.nu or e.factored]
    rows = sort_rows(
        [{c.key: getattr(e, OPTIM_ATTRIBUTES.get(c.key, c.key)) for c in OPTIM_COLUMNS} for e in stateful],
        sort,
        top,
        OPTIM_SORT_KEYS,
    )
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
            "schema": schema("optim"),
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


def _ranked_long_rows(long_rows: list[dict], ranked: list[str]) -> list[dict]:
    """The long form's rows of the series ``ranked`` (parameters, or groups of them), in their
    order within each step."""
    groups = [split_path(name) if name != "(all)" else [] for name in ranked]

    def rank(path: str) -> int | None:
        parts = split_path(path)
        return next((k for k, g in enumerate(groups) if parts[: len(g)] == g), None)

    ranks = {row["path"]: rank(row["path"]) for row in long_rows}
    kept = [row for row in long_rows if ranks[row["path"]] is not None]
    return sorted(kept, key=lambda row: (row["step"], ranks[row["path"]]))  # stable: metrics stay in order


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
    sort = resolve(sort, HISTORY_SORT_KEYS)
    rows = sort_rows(rows, sort)
    if sort == "drift":  # a series that became NaN moved most of all
        rows = [r for r in rows if math.isnan(r["drift"])] + [r for r in rows if not math.isnan(r["drift"])]
    rows = rows[:top] if top is not None else rows
    if top is not None or sort != "path":  # JSON and CSV hold the same series, in the same order
        long_rows = _ranked_long_rows(long_rows, [r["path"] for r in rows])
    steps = [r.step for r in result.steps]
    notes = [
        f"steps {', '.join(map(str, steps))}"
        if len(steps) <= 12
        else f"{len(steps)} steps, {steps[0]} to {steps[-1]}"
    ]
    first_bad = result.first_nonfinite()
    if first_bad is not None:
        notes.append(f"first NaN/Inf at step {first_bad[0]}: {few(first_bad[1])}")
    payload = {
        "schema": schema("history"),
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
        columns=columns("path", "norm", "trend", "drift", "change", "nonfinite", essential=("nonfinite",)),
        rows=rows,
        notes=notes,
        sections=[
            Report(
                payload={},
                name="long",
                columns=[*columns("step", "path", "metric"), field("value", kind="number")],
                rows=long_rows,
                title="long form",
                hidden=True,
            )
        ],
    )


# ----------------------------------------------------------------------------------------------
# One array: show and export


def _index_text(index) -> str:
    return "[" + ", ".join(str(i) for i in index) + "]"


def _number(value) -> float | int | None:
    return None if value is None else value


def show_report(inv, shown, exact: bool = False) -> Report:
    """``paramscope show``: one parameter (or a slice of it), its statistics, its values, and
    the views asked for (NaN/Inf, largest |x|, per-axis reductions) as sections."""
    from paramscope.compute.values import chunks_touched
    from paramscope.output.render import human_bytes, spec_text

    param, selection, found = shown.param, shown.selection, shown.inspection
    stored = param.stored
    chunks = tuple(stored.chunks) if stored is not None else ()
    touched, total = chunks_touched(selection, chunks)
    sliced = shown.slice_text
    stats = found.moments.stats()
    row = {
        "path": param.path + (sliced or ""),
        "shape": selection.out_shape,
        "dtype": param.dtype,
        "count": selection.count,
        **stats,
    }
    payload: dict[str, Any] = {
        "schema": "paramscope.show/1",
        **header(inv),
        "path": param.path,
        "slice": sliced,
        "shape": list(param.shape),
        "dtype": param.dtype,
        "sharding": sharding_json(param),
        "mesh": dict(inv.saved_mesh) if inv.saved_mesh else None,
        "chunks": list(chunks) if chunks else None,
        "selected_shape": list(selection.out_shape),
        "count": selection.count,
        "chunks_read": touched,
        "chunks_total": total,
        "bytes_read": found.bytes_read,
        "stats": stats,
        "values": shown.values_json(),
        "values_text": shown.text,
    }
    described = [
        param.path,
        param.dtype,
        "(" + ", ".join(map(str, param.shape)) + ("," if len(param.shape) == 1 else "") + ")",
        f"sharding {spec_text(sharding_json(param))}",
    ]
    if chunks:
        described.append("chunks (" + ", ".join(map(str, chunks)) + ("," if len(chunks) == 1 else "") + ")")
    read_line = f"read {human_bytes(found.bytes_read)}"
    if total > 1:
        read_line += f", {plural(touched, 'chunk')} of {total:,}"
    report = Report(
        payload=payload,
        name="stats",
        title=f"{where(inv)}\n{'  '.join(described)}",
        columns=[
            *columns("path", "shape", "dtype", "count", shape=2, dtype=3, count=2),
            *STAT_COLUMNS,
        ],
        rows=[row],
        notes=[read_line] + _complex_note([param]),
    )
    report.sections.append(
        Report(
            payload={},
            columns=[],
            rows=[],
            name="values",
            title=f"values{sliced or ''}",
            notes=shown.text.splitlines(),
            verbatim=shown.text_for,
        )
    )
    if found.requested_nonfinite is not None:
        count = found.moments.nonfinite
        first = [{"index": list(i), "value": v} for i, v in found.nonfinite]
        payload["nonfinite"] = {
            "count": count,
            "nan": found.moments.nan,
            "inf": found.moments.inf,
            "first": first,
        }
        shown_count = f"first {len(first)} of " if len(first) < count else ""
        report.sections.append(
            Report(
                payload={},
                name="nonfinite",
                title=(
                    f"NaN/Inf: {count:,} ({found.moments.nan:,} NaN, {found.moments.inf:,} Inf)"
                    + (f", {shown_count}{count:,} shown" if shown_count else "")
                    if count
                    else None
                ),
                columns=[field("index"), field("value", kind="float")],
                rows=[{"index": _index_text(i), "value": v} for i, v in found.nonfinite],
                empty="no NaN or Inf",
            )
        )
    if found.requested_top is not None:
        payload["top"] = [{"index": list(i), "value": v, "abs": abs(v)} for i, v in found.top]
        report.sections.append(
            Report(
                payload={},
                name="top",
                title=f"largest |x| (finite values), top {found.requested_top}",
                columns=[
                    *columns("rank", "index"),
                    field("value", kind="float"),
                ],
                rows=[
                    {"rank": k + 1, "index": _index_text(i), "value": v} for k, (i, v) in enumerate(found.top)
                ],
                empty="no finite values",
            )
        )
    if found.axis is not None:
        table = found.axis
        dims = [selection.kept[a] for a in table.axes]
        keys = [f"axis{d}" for d in dims]
        rows = [{**dict(zip(keys, label)), **values} for label, values in table.rows()]
        payload["axis"] = {
            "axes": table.axes,
            "array_axes": dims,
            "rows": [{"index": [r[k] for k in keys], **{c: r[c] for c in _AXIS_KEYS}} for r in rows],
        }
        report.sections.append(
            Report(
                payload={},
                name="axis",
                title="per index of " + ", ".join(f"axis {d}" for d in dims) + " (array axes)",
                columns=[
                    *(field(k, header=k.replace("axis", "axis "), kind="int", priority=0) for k in keys),
                    *columns("norm", "max_abs", "mean", "nan", "inf", max_abs=1, mean=1),
                ],
                rows=rows,
            )
        )
    return report


_AXIS_KEYS = ("norm", "max_abs", "mean", "nan", "inf")


def export_report(inv, out: str, rows) -> Report:
    """``paramscope export``: the arrays written, each with its digest (checked on the file)."""
    from paramscope.output.render import human_bytes

    table = [
        {
            "path": p.path,
            "dtype": p.dtype,
            "shape": p.shape,
            "bytes": p.nbytes,
            "digest": digest,
        }
        for p, digest in rows
    ]
    total = sum(r["bytes"] for r in table)
    payload = {
        "schema": "paramscope.export/1",
        **header(inv),
        "file": out,
        "format": out.rsplit(".", 1)[-1].lower(),
        "bytes": total,
        "digests_checked": True,
        "arrays": [{**r, "shape": list(r["shape"])} for r in table],
    }
    return Report(
        payload=payload,
        name="arrays",
        title=f"{where(inv)}\nwrote {out}: {plural(len(table), 'array')}, {human_bytes(total)}",
        columns=[
            *columns("path", "dtype", "shape", "bytes", dtype=2, bytes=1),
            DIGEST_COLUMN,
        ],
        rows=table,
        notes=["digests of the file read back equal those of the arrays read"],
        footer={"path": "total", "bytes": total},
        empty="no arrays written",
    )
