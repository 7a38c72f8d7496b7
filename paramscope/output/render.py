"""The one output layer: a report goes to stdout as a table, JSON, CSV or Markdown.

Commands build a :class:`Report` (a JSON payload plus rows for the tabular formats) and never
branch on the format themselves.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import sys
from dataclasses import dataclass, field
from enum import Enum
from typing import Any


class Format(str, Enum):
    table = "table"
    json = "json"
    csv = "csv"
    markdown = "markdown"


@dataclass
class Column:
    key: str
    header: str
    kind: str = "text"  # text, int, bytes, float, shape, sharding, bool

    @property
    def numeric(self) -> bool:
        return self.kind in ("int", "bytes", "float")


@dataclass
class Report:
    """What a command shows: a JSON document, and the same data as rows."""

    payload: dict[str, Any]
    columns: list[Column]
    rows: list[dict[str, Any]]
    footer: dict[str, Any] | None = None
    title: str | None = None
    notes: list[str] = field(default_factory=list)
    sections: list[Report] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------
# Cells


def human_bytes(n: int) -> str:
    """Bytes in binary units.

    >>> human_bytes(1536), human_bytes(12)
    ('1.5 KiB', '12 B')
    """
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def spec_text(spec: Any) -> str:
    """A partition spec the way JAX prints one; None is replicated.

    >>> spec_text((None, "model")), spec_text((("data", "fsdp"), None)), spec_text(None)
    ("P(None, 'model')", "P(('data', 'fsdp'), None)", 'replicated')
    """
    if spec is None:
        return "replicated"
    return "P(" + ", ".join(repr(tuple(e)) if isinstance(e, (list, tuple)) else repr(e) for e in spec) + ")"


def _cell(value: Any, kind: str, human: bool) -> str:
    if kind == "sharding":
        return spec_text(value)
    if value is None:
        return "" if not human else "-"
    if kind == "shape":
        return (
            ("(" + ", ".join(map(str, value)) + (",)" if len(value) == 1 else ")"))
            if human
            else "x".join(map(str, value))
        )
    if kind == "bool":
        return ("yes" if value else "no") if human else ("true" if value else "false")
    if kind == "int":
        return f"{value:,}" if human else str(value)
    if kind == "bytes":
        return human_bytes(value) if human else str(value)
    if kind == "float":
        return f"{value:.6g}" if human else repr(float(value))
    return str(value)


# ----------------------------------------------------------------------------------------------
# Formats


def json_ready(value: Any) -> Any:
    """Replaces non-finite floats (not valid JSON) by None, and tuples by lists."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    return value


def _csv(report: Report) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow([c.key for c in report.columns])
    for row in report.rows:
        writer.writerow([_cell(row.get(c.key), c.kind, human=False) for c in report.columns])
    return buffer.getvalue()


def _markdown(report: Report) -> str:
    def escape(text: str) -> str:
        return text.replace("|", "\\|")

    lines = []
    if report.title:
        lines += [f"**{escape(report.title)}**", ""]
    lines.append("| " + " | ".join(c.header for c in report.columns) + " |")
    lines.append("|" + "|".join("---:" if c.numeric else "---" for c in report.columns) + "|")
    rows = list(report.rows) + ([report.footer] if report.footer else [])
    for row in rows:
        cells = [
            escape(_cell(row.get(c.key), c.kind, human=True)) if c.key in row else "" for c in report.columns
        ]
        lines.append("| " + " | ".join(cells) + " |")
    if report.notes:
        lines += [""] + [escape(note) for note in report.notes]
    return "\n".join(lines) + "\n"


def _rich_table(report: Report):
    from rich import box
    from rich.table import Table

    table = Table(
        box=box.SIMPLE_HEAD,
        show_footer=report.footer is not None,
        highlight=False,
    )
    for i, column in enumerate(report.columns):
        footer = ""
        if report.footer and column.key in report.footer:
            footer = _cell(report.footer[column.key], column.kind, human=True)
        if i == 0:
            longest = max([len(str(r.get(column.key, ""))) for r in report.rows] + [len(column.header)])
            # The path column folds rather than shrinks away; the others give way first.
            table.add_column(column.header, footer=footer, overflow="fold", min_width=min(longest, 24))
        else:
            table.add_column(
                column.header, footer=footer, justify="right" if column.numeric else "left", overflow="fold"
            )
    for row in report.rows:
        table.add_row(*[_cell(row.get(c.key), c.kind, human=True) for c in report.columns])
    return table


def render(report: Report, fmt: Format, file=None) -> None:
    """Writes a report to ``file`` (default stdout) in the given format."""
    file = file if file is not None else sys.stdout
    if fmt == Format.json:
        file.write(json.dumps(json_ready(report.payload), indent=2, allow_nan=False) + "\n")
        return
    reports = [report, *report.sections]
    if fmt == Format.csv:
        file.write("\n".join(_csv(r) for r in reports))
        return
    if fmt == Format.markdown:
        file.write("\n".join(_markdown(r) for r in reports))
        return
    from rich.console import Console

    width = None if file.isatty() or "COLUMNS" in os.environ else 160
    console = Console(file=file, highlight=False, soft_wrap=False, width=width)
    for i, part in enumerate(reports):
        if i:
            console.print()
        if part.title:
            console.print(part.title, markup=False, style="bold")
        if part.rows or not part.notes:  # an empty table says nothing its notes do not
            console.print(_rich_table(part))
        for note in part.notes:
            console.print(note, markup=False)
