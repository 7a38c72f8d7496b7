"""The one output layer: a report goes to stdout as a table, JSON, CSV or Markdown.

Commands build a :class:`Report` (a JSON payload plus rows for the tabular formats) and never
branch on the format themselves. Tables never cut a number (see :mod:`paramscope.output.layout`);
CSV carries machine values, one table per output; Markdown is escaped GitHub tables. Names
and text from a checkpoint reach a terminal with their control characters escaped (see
:func:`paramscope.errors.printable`): JSON escapes them itself, the other formats through
:func:`cell` and the lines they write.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Any

from paramscope.errors import UsageError, printable
from paramscope.names import spec_text
from paramscope.output import layout


class Format(str, Enum):
    table = "table"
    json = "json"
    csv = "csv"
    markdown = "markdown"


# Column kinds: path (folds at dots), note (free text, folds at spaces), text, dtype, shape,
# sharding, bool, int, count (an int that may be abbreviated), bytes, float, number (float or
# int), value (a number or a digest), digest. Every field is declared in paramscope.output.fields.
NUMERIC_KINDS = ("int", "count", "bytes", "float", "number")
# Tables show a digest by its first digits (64 bits: enough to tell two apart by eye); --exact,
# JSON and CSV show it whole.
DIGEST_PREFIX = 16


@dataclass
class Column:
    key: str
    header: str
    kind: str = "text"
    priority: int = 1  # 0: always shown; on a narrow terminal larger numbers are hidden first
    # a table shows the cell empty where it equals this key's (path_a beside path)
    unless_equal: str | None = None
    group: str = ""  # columns of one group (min and max) are shown or hidden together

    @property
    def numeric(self) -> bool:
        return self.kind in NUMERIC_KINDS


@dataclass
class Report:
    """What a command shows: a JSON document, and the same data as rows (one or more tables)."""

    payload: dict[str, Any]
    columns: list[Column]
    rows: list[dict[str, Any]]
    footer: dict[str, Any] | None = None
    title: str | None = None
    notes: list[str] = field(default_factory=list)
    sections: list[Report] = field(default_factory=list)
    name: str = ""  # how --format csv and the table options pick this table among the sections
    empty: str = "nothing to show"  # the sentence shown instead of a table without rows
    hidden: bool = False  # a section shown only when asked for by name
    # lines laid out for a terminal width by their maker (numpy's printing of values), shown as
    # they come in place of the notes, never folded again
    verbatim: Callable[[int | None], list[str]] | None = None
    # columns this table can have but does not, and the option that adds each (key -> option)
    options_adding: dict[str, str] = field(default_factory=dict)


@dataclass
class View:
    """How to show a report: the terminal width (None off a terminal), exact digits, a column pick."""

    width: int | None = None
    exact: bool = False
    columns: Sequence[str] | None = None
    table: str | None = None  # the table (section name) to show; CSV shows one, default the first
    console: Any = None  # a rich Console on a terminal: titles and headers in bold


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


def cell(value: Any, kind: str, human: bool, exact: bool = False) -> str:
    """One cell: for people (``human``) or as a machine value (CSV); text with its control
    characters escaped.

    >>> cell(197504, "count", True), cell(197504, "count", False), cell(0.1 + 0.2, "float", False)
    ('197,504', '197504', '0.30000000000000004')
    >>> cell("ab" * 32, "digest", True), len(cell("ab" * 32, "digest", False))
    ('abababababababab...', 64)
    """
    if kind == "sharding":
        return printable(spec_text(value)) if human or value is not None else ""
    if value is None:
        return ""
    if isinstance(value, list) and kind == "note":  # diff's changes
        return printable("; ".join(map(str, value)))
    if kind == "shape":
        if not human:
            return "x".join(map(str, value))
        return "(" + ", ".join(map(str, value)) + (",)" if len(value) == 1 else ")")
    if kind == "bool":
        return ("yes" if value else "no") if human else ("true" if value else "false")
    if kind in ("int", "count"):
        return f"{value:,}" if human else str(value)
    if kind == "bytes":
        return human_bytes(value) if human else str(value)
    if kind == "float" or (kind == "number" and isinstance(value, float)):
        if not human or exact:
            return repr(float(value))
        return f"{value:.6g}"
    if kind == "number":  # an int among floats (a count in a column of values)
        return f"{value:,}" if human else str(value)
    if kind in ("digest", "value") and human and not exact and _DIGEST.fullmatch(str(value)):
        return f"{str(value)[:DIGEST_PREFIX]}..."  # people read its start
    return printable(str(value))


_DIGEST = re.compile(r"[0-9a-f]{64}")


def shown(row: dict[str, Any], column: Column) -> Any:
    """The value a table (text or Markdown) shows in a column: the row's, but nothing where it
    repeats the column named by ``unless_equal``."""
    value = row.get(column.key)
    if column.unless_equal is not None and value == row.get(column.unless_equal):
        return None
    return value


def listed(items, limit: int = 5) -> str:
    """The first few items, comma-separated, then how many more (:func:`paramscope.errors.few`,
    the one way every message and note shortens a list).

    >>> listed(["a", "b", "c"], 2), listed(["a"])
    ('a, b and 1 more', 'a')
    """
    from paramscope.errors import few

    return few(items, limit)


def column_names(columns: Sequence[Column]) -> str:
    """The names a user may type for ``columns``: each key, and its header where that differs.

    >>> column_names([Column("path", "path"), Column("max_abs", "max |x|")])
    "path, max_abs ('max |x|')"
    """
    return ", ".join(
        c.key if c.header.lower() == c.key.lower() else f"{c.key} ({c.header!r})" for c in columns
    )


def _empty_column(column: Column, report: Report) -> bool:
    values = [shown(row, column) for row in report.rows]
    if report.footer:
        values.append(report.footer.get(column.key))
    return column.kind != "sharding" and all(v is None or v == "" or v == [] for v in values)


def _choose_columns(report: Report, keys: Sequence[str] | None, hide_empty: bool) -> list[Column]:
    if keys:
        # a column is named by its key (as in JSON and CSV) or by its header as shown, in any case
        by_name = {c.header.lower(): c for c in report.columns}
        by_name.update({c.key.lower(): c for c in report.columns})
        unknown = [k for k in keys if k.strip().lower() not in by_name]
        if unknown:
            option = report.options_adding.get(unknown[0].strip().lower())
            hint = "columns: " + column_names(report.columns)
            raise UsageError(
                f"no column {unknown[0]!r} in this table",
                hint=f"{option} adds it; {hint}" if option else hint,
            )
        chosen = [by_name[k.strip().lower()] for k in keys]
        # on a narrow terminal the path folds first, then the columns named last go first
        kept = next((c for c in chosen if c.kind == "path"), chosen[0])
        return [replace(c, priority=0 if c is kept else 1 + i, group="") for i, c in enumerate(chosen)]
    if not hide_empty or not report.rows:
        return list(report.columns)
    return [c for c in report.columns if not _empty_column(c, report)]


def _tables(report: Report, view: View, one: bool) -> list[Report]:
    """The tables to show: all of them, the one named by ``view.table``, or (``one``) the first."""
    tables = [report, *report.sections]
    if view.table is not None:
        chosen = [t for t in tables if t.name == view.table]
        if not chosen:
            names = ", ".join(t.name for t in tables if t.name)
            raise UsageError(f"no table {view.table!r} in this report", hint=f"tables: {names}")
        return chosen
    return tables[:1] if one else [t for t in tables if not t.hidden]


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


def json_lines(document: dict[str, Any]) -> str:
    """A JSON object with one top-level key per line and one entry of each list per line, each
    in compact form: as readable in a diff as indented JSON (a changed parameter is a changed
    line), written by the C encoder (indenting makes ``json`` fall back to Python, seconds for
    20,000 parameters).

    >>> print(json_lines({"a": 1, "params": [{"p": "x"}, {"p": "y"}]}), end="")
    {
     "a": 1,
     "params": [
      {"p": "x"},
      {"p": "y"}
     ]
    }
    """
    encode = json.JSONEncoder(allow_nan=False, separators=(", ", ": ")).encode
    lines = []
    for key, value in json_ready(document).items():
        if isinstance(value, list) and value:
            items = ",\n".join("  " + encode(item) for item in value)
            lines.append(f" {encode(key)}: [\n{items}\n ]")
        else:
            lines.append(f" {encode(key)}: {encode(value)}")
    return "{\n" + ",\n".join(lines) + "\n}\n"


def to_json(report: Report) -> str:
    return json.dumps(json_ready(report.payload), indent=2, allow_nan=False) + "\n"


def to_csv(report: Report, view: View) -> str:
    """One table (the first, or the one ``view.table`` names), machine values, ``pandas``-ready."""
    (table,) = _tables(report, view, one=True)
    columns = _choose_columns(table, view.columns, hide_empty=False)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow([c.key for c in columns])
    for row in table.rows:
        writer.writerow([cell(row.get(c.key), c.kind, human=False) for c in columns])
    return buffer.getvalue()


def markdown_escape(text: str) -> str:
    """Text safe inside a GitHub table cell (and on a terminal).

    >>> markdown_escape("max |x|")
    'max \\\\|x\\\\|'
    """
    text = printable(text, keep="\n")
    for char in ("\\", "|", "*", "`", "<"):
        text = text.replace(char, "\\" + char)
    return text.replace("\n", " ")


def to_markdown(report: Report, view: View) -> str:
    parts = []
    for table in _tables(report, view, one=False):
        lines = []
        if table.title:
            lines += [f"**{markdown_escape(line)}**" for line in table.title.splitlines()] + [""]
        if table.rows:
            columns = _choose_columns(table, view.columns if table is report else None, hide_empty=True)
            lines.append("| " + " | ".join(markdown_escape(c.header) for c in columns) + " |")
            lines.append("|" + "|".join("---:" if c.numeric else "---" for c in columns) + "|")
            for row in table.rows:
                cells = [markdown_escape(cell(shown(row, c), c.kind, True, view.exact)) for c in columns]
                lines.append("| " + " | ".join(cells) + " |")
            if table.footer:  # as in the text table: a column the footer does not fill stays empty
                foot = table.footer
                cells = [
                    markdown_escape(cell(foot[c.key], c.kind, True, view.exact)) if c.key in foot else ""
                    for c in columns
                ]
                lines.append("| " + " | ".join(cells) + " |")
        elif not table.notes:
            lines.append(markdown_escape(table.empty))
        if table.notes:
            lines += ([""] if table.rows else []) + [markdown_escape(note) for note in table.notes]
        parts.append("\n".join(lines) + "\n")
    return "\n".join(parts)


def shorter(a: str, b: str) -> str:
    return a if len(a) < len(b) else b


def _text_columns(table: Report, columns: list[Column], view: View) -> list[layout.TextColumn]:
    out = []
    footer = table.footer or {}
    for column in columns:
        cells = [cell(shown(row, column), column.kind, True, view.exact) for row in table.rows]
        foot = cell(footer[column.key], column.kind, True, view.exact) if column.key in footer else ""
        compact = None
        if column.kind == "count" and not view.exact:
            values = [row.get(column.key) for row in table.rows] + [footer.get(column.key)]
            short = [
                shorter(layout.compact_count(v), c) if isinstance(v, int) else c
                for v, c in zip(values, [*cells, foot])
            ]
            compact = (short[:-1], short[-1])
        fold = "path" if column.kind == "path" else "text" if column.kind == "note" else None
        out.append(
            layout.TextColumn(
                column.header,
                cells,
                foot,
                column.numeric,
                fold,
                column.priority,
                compact=compact,
                group=column.group,
            )
        )
    return out


def to_text(report: Report, view: View) -> tuple[list[tuple[str, bool]], list[str]]:
    """The table format as (line, bold) pairs, and the notes for stderr about what was hidden."""
    out: list[tuple[str, bool]] = []
    hidden: list[str] = []
    abbreviated = False

    def prose(line: str, bold: bool = False) -> list[tuple[str, bool]]:  # folded at spaces, never mid-word
        return [(part, bold) for part in layout.wrap(printable(line), view.width)]

    for table in _tables(report, view, one=False):
        if out:
            out.append(("", False))
        if table.title:
            out += [part for line in table.title.splitlines() for part in prose(line, True)]
            out.append(("", False))
        if table.rows:
            picked = view.columns if table is report else None
            columns = _choose_columns(table, picked, hide_empty=True)
            fitted = layout.fit(_text_columns(table, columns, view), view.width)
            hidden += fitted.hidden
            abbreviated = abbreviated or fitted.abbreviated
            table_lines = layout.lines(fitted.columns, fitted.widths)
            out += [(printable(table_lines[0]), True)] + [
                (printable(line), False) for line in table_lines[1:]
            ]
        elif not table.notes:
            out += prose(table.empty)
        if table.verbatim is not None:
            out += [(printable(line), False) for line in table.verbatim(view.width)]
        elif table.notes:
            out += ([("", False)] if table.rows else []) + [
                line for note in table.notes for line in prose(note, False)
            ]
    messages = []
    if hidden:
        messages.append(
            f"{len(hidden)} column(s) hidden to fit {view.width} columns: {', '.join(hidden)} "
            "(see them in a wider terminal, pick columns with --columns, or use --format csv)"
        )
    if abbreviated:
        messages.append("counts abbreviated to fit (--exact shows every digit)")
    return out, messages


def render(report: Report, fmt: Format, file=None, view: View | None = None) -> list[str]:
    """Writes a report to ``file`` (default stdout); returns notes for stderr (hidden columns)."""
    import sys

    file = file if file is not None else sys.stdout
    view = view or View()
    if fmt == Format.json:
        file.write(to_json(report))
        return []
    if fmt == Format.csv:
        file.write(to_csv(report, view))
        return []
    if fmt == Format.markdown:
        file.write(to_markdown(report, view))
        return []
    text, messages = to_text(report, view)
    if view.console is None:
        file.write("".join(f"{line}\n" for line, _ in text))
        return messages
    for line, bold in text:
        if bold and line:
            view.console.print(line, style="bold", markup=False, highlight=False, soft_wrap=True)
        else:
            view.console.file.write(line + "\n")
    return messages
