"""Text tables that never cut a number: column widths for a terminal, folding, dropped columns.

A table is laid out from whole cells. Numbers, dtypes, shapes, shardings and headers are never
cut or wrapped, and no name or word is ever split: paths fold at dots, free text at spaces (a
word longer than the terminal at path separators), and a piece that still does not fit
overflows whole. When the table is wider than the terminal, in this order: the folding columns
(paths, free text) shrink to their longest unbreakable piece; large counts are abbreviated
(``277M``, unless exact digits are asked for); whole columns are hidden, lowest priority first.
Off a terminal (``width`` None) nothing is folded or hidden. Lines of prose (titles, notes,
messages) are wrapped the same way by :func:`wrap`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

GAP = 2  # spaces between columns
RULE = "─"
COMFORTABLE = 28  # columns are hidden before a path column gets narrower than this


@dataclass
class TextColumn:
    """One column of a laid-out table: its header, cells (already text) and how it may give way."""

    header: str
    cells: list[str]
    footer: str = ""
    right: bool = False  # right-justified (numbers)
    fold: str | None = None  # "path" (fold at dots), "text" (at spaces) or None (never)
    priority: int = 1  # 0: always shown; larger numbers are hidden first
    compact: tuple[list[str], str] | None = None  # shorter cells and footer, for when it does not fit
    group: str = ""  # columns of one group are hidden together

    def natural(self) -> int:
        return max([len(self.header), len(self.footer), *map(len, self.cells)])

    def unbreakable(self) -> int:
        """The narrowest the column can be: its longest name (path) or word (text), or its header."""
        if self.fold is None:
            return self.natural()
        pieces = [len(p) for cell in self.cells for p in _pieces(cell, self.fold)]
        pieces += [len(p.rstrip()) for p in _pieces(self.footer, "text")]
        return max([len(self.header), *pieces, 1])


def _pieces(text: str, fold: str) -> list[str]:
    """The parts a cell may break between: ``a.b.c`` -> ``a.``, ``b.``, ``c``; words for text."""
    if fold == "path":
        return re.findall(r"[^.]*\.|[^.]+$", text) or [text]
    return re.findall(r"\S+\s*", text) or [text]


def _prose_pieces(text: str, width: int) -> list[str]:
    """The parts a line of prose may break between: groups of words set apart by two spaces
    (``step 200  item params``) while a group fits a line; words; and in a word longer than a
    line, the places after its path separators (``/tmp/run/ckpt`` -> ``/tmp/``, ``run/``, ``ckpt``)."""
    pieces = []
    for group in re.findall(r"\S.*?(?:\s{2,}|\s*$)", text):
        if len(group.rstrip()) <= width:
            pieces.append(group)
            continue
        for word in re.findall(r"\S+\s*", group):
            bare = word.rstrip()
            if len(bare) <= width:
                pieces.append(word)
                continue
            parts = re.findall(r"[^/]*/+|[^/]+$", bare) or [bare]
            parts[-1] += word[len(bare) :]  # the space after the word stays after its last part
            pieces += parts
    return pieces or [text]


def fold_cell(text: str, width: int, fold: str | None) -> list[str]:
    """Lines of at most ``width`` characters, broken between pieces; a piece is never split, and
    one longer than ``width`` has a line of its own (free text: broken after path separators
    first).

    >>> fold_cell("block_0.LayerNorm_0.scale", 12, "path")
    ['block_0.', 'LayerNorm_0.', 'scale']
    >>> fold_cell("encoder.layers_10.attention", 20, "path")
    ['encoder.layers_10.', 'attention']
    >>> fold_cell("averyveryverylongname.x", 8, "path")
    ['averyveryverylongname.', 'x']
    >>> fold_cell("wrote /tmp/some/picture.png", 12, "text")
    ['wrote /tmp/', 'some/', 'picture.png']
    """
    if fold is None or len(text) <= width:
        return [text]
    pieces = _prose_pieces(text, width) if fold == "text" else _pieces(text, fold)
    lines: list[str] = []
    line = ""
    for piece in pieces:
        if not line or len(line) + len(piece.rstrip()) <= width:
            line += piece
            continue
        lines.append(line.rstrip())
        line = piece
    if line.strip() or not lines:
        lines.append(line.rstrip())
    return lines


def wrap(text: str, width: int | None) -> list[str]:
    """A line of prose as lines of at most ``width`` characters, broken at spaces (a word longer
    than that after its path separators); a word is never split, and one that is longer than
    ``width`` overflows whole. ``width`` None: the line as it is.

    >>> wrap("committed 2026-11-25T16:41:37Z", 20)
    ['committed', '2026-11-25T16:41:37Z']
    >>> wrap("run  step 200  item params", 16)
    ['run  step 200', 'item params']
    >>> wrap("digest " + "ab" * 12, 10)
    ['digest', 'abababababababababababab']
    """
    if width is None:
        return [text]
    return fold_cell(text, width, "text")


@dataclass
class Fitted:
    columns: list[TextColumn]
    widths: list[int]
    hidden: list[str]  # headers of the columns left out to fit
    abbreviated: bool  # counts shown as 277M


def fit(columns: Sequence[TextColumn], width: int | None) -> Fitted:
    """The columns to show and their widths, so the table fits ``width`` (None: no limit).

    In order, until the table fits: counts are abbreviated if that and folding alone suffice;
    folding columns fold, down to their longest piece (a path at dots); whole columns are
    hidden, lowest priority first (a group, such as min and max, together); counts are
    abbreviated. A name is never broken: a table of columns that cannot be hidden and pieces
    that cannot break may stay wider than ``width``. Spare room goes back to the first folding
    column (the path).
    """
    shown = list(columns)
    if width is None:
        return Fitted(shown, [c.natural() for c in shown], [], False)

    def needed(widths):
        return sum(widths) + GAP * (len(widths) - 1)

    def widths_for(floor):
        return [floor(c) if c.fold else c.natural() for c in shown]

    def comfortable(c):
        return min(c.natural(), max(c.unbreakable(), COMFORTABLE))

    def tightest(c):
        return c.unbreakable()

    def abbreviate() -> bool:
        """Swaps in the compact cells; whether any of them is shorter (else nothing was)."""
        changed = False
        for column in shown:
            if column.compact is not None:
                cells, footer = column.compact
                changed = changed or cells != column.cells or footer != column.footer
                column.cells, column.footer, column.compact = cells, footer, None
        return changed

    abbreviated = False
    if needed(widths_for(TextColumn.natural)) > width:
        compact = [c for c in shown if c.compact is not None]
        saving = sum(
            c.natural() - max(len(c.header), len(c.compact[1]), *map(len, c.compact[0])) for c in compact
        )
        if saving and needed(widths_for(comfortable)) - saving <= width:
            abbreviated = abbreviate()
    hidden: list[str] = []
    # the path folds at dots (to its longest piece) before any column is hidden
    while needed(widths_for(tightest)) > width:
        droppable = [i for i, c in enumerate(shown) if c.priority > 0]
        if not droppable:
            break
        victim = shown[max(droppable, key=lambda i: (shown[i].priority, i))]
        for column in [c for c in shown if c is victim or (victim.group and c.group == victim.group)]:
            hidden.append(column.header)
            shown.remove(column)
    if needed(widths_for(tightest)) > width and any(c.compact for c in shown):
        abbreviated = abbreviate() or abbreviated
    widths = widths_for(tightest)
    spare = width - needed(widths)
    for i in [i for i, c in enumerate(shown) if c.fold]:  # room back to the path first
        extra = max(0, min(spare, shown[i].natural() - widths[i]))
        widths[i] += extra
        spare -= extra
    return Fitted(shown, widths, hidden, abbreviated)


def lines(columns: Sequence[TextColumn], widths: Sequence[int], rule: str = RULE) -> list[str]:
    """The table as lines: header, rule, rows (folded), and a rule and footer when there is one."""

    def row(cells: Sequence[str], footer: bool = False) -> list[str]:
        folded = [
            fold_cell(cell, w, "text" if (footer and c.fold) else c.fold)
            for cell, w, c in zip(cells, widths, columns)
        ]
        out = []
        for k in range(max(map(len, folded))):
            parts = []
            for part, w, c in zip(folded, widths, columns):
                text = part[k] if k < len(part) else ""
                parts.append(text.rjust(w) if c.right else text.ljust(w))
            out.append((" " * GAP).join(parts).rstrip())
        return out

    total = sum(widths) + GAP * (len(widths) - 1)
    out = row([c.header for c in columns]) + [rule * total]
    for k in range(len(columns[0].cells) if columns else 0):
        out += row([c.cells[k] for c in columns])
    if any(c.footer for c in columns):
        out += [rule * total] + row([c.footer for c in columns], footer=True)
    return out


def compact_count(value: int) -> str:
    """A count in three significant digits with a unit: 277M, 1.5B, 12.3K.

    Rounding carries into the next unit: 999,500 is 1M, not 1e+03K.

    >>> compact_count(277_000_001), compact_count(1_536_000_000), compact_count(999), compact_count(999_500)
    ('277M', '1.54B', '999', '1M')
    """
    magnitude = abs(int(value))
    if magnitude < 1000:
        return str(value)
    sign = "-" if value < 0 else ""
    exponent = min((len(str(magnitude)) - 1) // 3, 4)
    scaled = magnitude / 1000**exponent
    if exponent < 4 and float(f"{scaled:.3g}") >= 1000:  # 999.5K rounds to 1000K: that is 1M
        exponent += 1
        scaled = magnitude / 1000**exponent
    digits = f"{scaled:.3g}" if scaled < 999.5 else f"{scaled:.0f}"
    return sign + digits + "KMBT"[exponent - 1]
