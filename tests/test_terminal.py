"""What a person sees in a real terminal, at 60 to 200 columns: no line wider than the terminal
but a single unbreakable word, no number, name, digest or timestamp split, every hidden column
named; help that reads right; a progress bar in one family of units.

Every command runs in a real process whose stdout and stderr are two pseudo-terminals of the
given size (no ``COLUMNS``: the width comes from the terminal itself, as in tmux). One process
per width runs every command line in turn, so jax is imported five times, not once a command.
What each command shows is compared with what it writes to a pipe (nothing folded or hidden)
and with its JSON.
"""

import fcntl
import json
import os
import re
import select
import struct
import subprocess
import sys
import termios

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_cli import run

from paramscope.output.layout import compact_count, wrap

WIDTHS = (60, 80, 100, 120, 200)
MAXTEXT = os.path.join(os.path.dirname(__file__), "data", "maxtext", "scan", "checkpoints")
ESCAPE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
MARK = "@@paramscope-terminal-test@@"
PICKED = "path,dtype,count,norm,mean,std,min,max"

# Every command, as a person would type it; {root}: a manager root, {baseline}: its snapshot.
COMMAND_LINES = [
    ["info", "{root}"],
    ["info", MAXTEXT],
    ["table", "{root}"],
    ["table", "{root}", "--norms", "--digest"],
    ["table", "{root}", "--columns", "path,dtype,count,bytes,sharding"],
    ["count", "{root}", "--depth", "2"],
    ["norms", "{root}", "--per-param"],
    ["stats", "{root}", "--digest"],
    ["stats", "{root}", "--top", "2", "--columns", PICKED],
    ["stats", "{root}", "--top", "2", "--exact", "--columns", PICKED],
    ["layers", "{root}"],
    ["optim", "{root}"],
    ["mask", "{root}", "--exclude", "bias$"],
    ["verify", "{root}"],
    ["diff", "{root}", "--step-a", "100", "--step-b", "200"],
    ["check", "{root}", "--baseline", "{baseline}"],
    ["history", "{root}", "--no-cache"],
    ["snapshot", "{root}", "-o", "{other}"],  # notes on stderr only
    ["table", "{root}/no/such/step/folder/anywhere"],  # an error line
]

# The driver: one process, every command line in turn, a mark before each on both terminals.
DRIVER = f"""
import json, sys
from paramscope.cli.app import run
for i, args in enumerate(json.loads(sys.argv[1])):
    for stream in (sys.stdout, sys.stderr):
        stream.write("{MARK} %d\\n" % i)
        stream.flush()
    code = run(args)
    sys.stdout.flush()
    sys.stderr.write("{MARK} rc %d\\n" % code)
    sys.stderr.flush()
"""


def on_terminals(command_lines, width, timeout=600):
    """Each command line's (exit code, stdout, stderr), run in one process whose stdout and
    stderr are pseudo-terminals ``width`` columns wide; escape sequences (bold) removed."""
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES", "NO_COLOR")}
    env.update(TERM="xterm", NO_COLOR="1")
    masters, slaves = [], []
    for _ in range(2):
        master, slave = os.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, width, 0, 0))
        masters.append(master)
        slaves.append(slave)
    process = subprocess.Popen(
        [sys.executable, "-c", DRIVER, json.dumps(command_lines)],
        stdin=subprocess.DEVNULL,
        stdout=slaves[0],
        stderr=slaves[1],
        env=env,
    )
    for slave in slaves:
        os.close(slave)
    received = {m: [] for m in masters}
    open_ = list(masters)
    try:
        while open_:
            ready, _, _ = select.select(open_, [], [], timeout)
            if not ready:  # a harness bound, not a timing assertion
                process.kill()
                raise AssertionError(f"no output at {width} columns")
            for master in ready:
                try:
                    data = os.read(master, 1 << 16)
                except OSError:  # the process closed the terminal
                    data = b""
                if data:
                    received[master].append(data)
                else:
                    open_.remove(master)
    finally:
        for master in masters:
            os.close(master)
    process.wait(timeout=timeout)
    out, err = (ESCAPE.sub("", b"".join(received[m]).decode()).replace("\r\n", "\n") for m in masters)
    assert process.returncode == 0, err[-2000:]
    outs = re.split(rf"^{MARK} \d+\n", out, flags=re.M)[1:]
    errs = re.split(rf"^{MARK} \d+\n", err, flags=re.M)[1:]
    results = []
    for text, messages in zip(outs, errs):
        messages, code = re.split(rf"^{MARK} rc (\d+)\n", messages, flags=re.M)[:2]
        results.append((int(code), text, messages))
    assert len(results) == len(command_lines)
    return results


# ----------------------------------------------------------------------------------------------
# Reading a table back from its text


def tables(text: str) -> list[tuple[list[str], list[str]]]:
    """Each table's header line and its other lines (rows, rules, footer), in order: a table is
    a block (between blank lines) whose second line is a rule."""
    found = []
    for block in re.split(r"\n\s*\n", text):
        lines = block.splitlines()
        if len(lines) > 1 and set(lines[1]) == {"─"}:
            found.append((lines[0], lines[1:]))
    return found


def columns_of(header: str, lines: list[str]) -> dict[str, list[str]]:
    """The cells of an unfolded table by header: columns are parted by runs of two or more
    positions that are blank on every line."""
    lines = [header, *[line for line in lines if set(line) != {"─"}]]
    width = max(map(len, lines))
    blank = [all(i >= len(line) or line[i] == " " for line in lines) for i in range(width)] + [True, True]
    spans, start, i = [], 0, 0
    while i < width:
        if blank[i] and blank[i + 1]:
            j = i
            while j < width and blank[j]:
                j += 1
            if i > start:
                spans.append((start, i))
            start = i = j
        else:
            i += 1
    if start < width:
        spans.append((start, width))
    return {header[a:b].strip(): [line[a:b].strip() for line in lines[1:]] for a, b in spans}


def headers(header_line: str) -> list[str]:
    return re.split(r"\s{2,}", header_line.strip())


NUMBER = re.compile(r"[-+]?[\d,.]+(e[-+]?\d+)?( ?[KMBT]|( [KMGT]i)?B)?|[-+]?(nan|inf)|\d+(\.\d+)?%")


def shown_whole(cell: str, lines: list[str], abbreviated: bool) -> bool:
    """A number on one line, exactly (or abbreviated, when the note says so); a name or words on
    one line, or folded between whole pieces (at dots, at spaces)."""
    if any(cell in line for line in lines):
        return True
    if NUMBER.fullmatch(cell):
        if abbreviated and re.fullmatch(r"-?[\d,]+", cell):
            return any(compact_count(int(cell.replace(",", ""))) in line for line in lines)
        return False
    for pieces in (re.findall(r"[^.]*\.|[^.]+$", cell), cell.split()):
        if len(pieces) > 1 and all(any(p in line for line in lines) for p in pieces):
            return True
    return False


def check_screen(args, width, code, text, messages, piped, document):
    """The promises of a terminal ``width`` columns wide, for one command."""
    where = (" ".join(args), width)
    for line in [*text.splitlines(), *messages.splitlines()]:
        assert len(line) <= width or " " not in line.strip(), (where, line)  # or one word
    assert "Traceback" not in messages, where
    for line in messages.splitlines():  # wrapped messages: only the first line says who speaks
        assert not line.startswith(" "), (where, line)
    lines = text.splitlines()
    abbreviated = "counts abbreviated" in messages
    hidden_note = " ".join(messages.split())
    # tables: every cell of every shown column whole, every hidden column named
    shown_tables, piped_tables = tables(text), tables(piped)
    assert len(shown_tables) == len(piped_tables), where
    for (shown_header, _), (piped_header, piped_lines) in zip(shown_tables, piped_tables):
        shown = headers(shown_header)
        assert set(shown) <= set(headers(piped_header)), (where, shown_header)  # no header cut
        for header, cells in columns_of(piped_header, piped_lines).items():
            if header not in shown:
                named = re.search(rf"hidden to fit {width} columns: (.*?) \(see them", hidden_note)
                assert named and header in named.group(1).split(", "), (where, header, hidden_note)
                continue
            for cell in filter(None, cells):
                assert shown_whole(cell, lines, abbreviated), (where, header, cell)
    # prose (titles, notes): every word whole on one line
    table_lines = {line for _, body in tables(piped) for line in body} | {h for h, _ in tables(piped)}
    prose = [line for line in piped.splitlines() if line not in table_lines]
    for word in " ".join(prose).split():
        assert any(word in shown for shown in lines), (where, word)
    # what the JSON holds, digests and timestamps: whole on one line wherever the prose has them
    for value in re.findall(r'"([0-9a-f]{64}|\d{4}-\d\d-\d\dT[\d:.]+Z?)"', document):
        if any(value in line for line in prose):
            assert any(value in line for line in lines), (where, value)
    if code == 0 and not messages.strip():
        assert "hidden" not in messages


@pytest.fixture(scope="module")
def command_lines(manager_ckpt, tmp_path_factory):
    folder = tmp_path_factory.mktemp("terminal")
    baseline = str(folder / "baseline.json")
    assert run("snapshot", manager_ckpt.path, "-o", baseline, "-q").exit_code == 0
    other = str(folder / "other.json")
    return [
        [a.format(root=manager_ckpt.path, baseline=baseline, other=other) for a in args]
        for args in COMMAND_LINES
    ]


@pytest.fixture(scope="module")
def piped(command_lines):
    """What each command writes to a pipe (nothing folded, nothing hidden), and its JSON."""
    out = []
    for args in command_lines:
        text = run(*args).stdout
        document = run(*args, "-f", "json").stdout if "--columns" not in args else ""
        out.append((text, document))
    return out


@pytest.mark.parametrize("width", WIDTHS)
def test_every_command_fits_a_real_terminal_without_splitting_a_word(command_lines, piped, width):
    results = on_terminals(command_lines, width)
    for args, (code, text, messages), (pipe_text, document) in zip(command_lines, results, piped):
        assert code == 3 if "/no/such/" in args[1] else code in (0, 1), (args, messages)
        check_screen(args, width, code, text, messages, pipe_text, document)


def test_picked_columns_fold_the_path_first_then_drop_the_last_named(command_lines):
    args = command_lines[COMMAND_LINES.index(["stats", "{root}", "--top", "2", "--columns", PICKED])]
    wide, narrow = on_terminals([args], 200)[0], on_terminals([args], 60)[0]
    picked = PICKED.split(",")
    assert headers(tables(wide[1])[0][0]) == picked and wide[2] == ""
    shown = headers(tables(narrow[1])[0][0])
    assert narrow[0] == 0 and shown == picked[: len(shown)] and len(shown) < len(picked)
    note = " ".join(narrow[2].split())
    assert f"hidden to fit 60 columns: {', '.join(reversed(picked[len(shown) :]))} (see" in note
    path_width = max(len(line.split("  ")[0]) for line in tables(narrow[1])[0][1][1:])
    assert path_width < max(len(line.split("  ")[0]) for line in tables(wide[1])[0][1][1:])  # folded


def test_counts_are_called_abbreviated_only_when_one_was():
    keras = os.path.join(os.path.dirname(__file__), "data", "keras_orbax", "checkpoints")
    ((code, text, messages),) = on_terminals([["table", keras]], 80)
    assert code == 0 and "abbreviated" not in messages
    assert "trainable_variables.tiny." in text


@settings(max_examples=300, deadline=None)
@given(
    words=st.lists(st.text("abc/.:-_0123456789", min_size=1, max_size=30), min_size=1, max_size=12),
    gaps=st.lists(st.sampled_from([" ", "  "]), min_size=12, max_size=12),
    width=st.integers(10, 120),
)
def test_prose_folds_between_words_or_after_a_slash(words, gaps, width):
    """Lines fit or are one piece that cannot break; read back in order they give the words."""
    text = "".join(word + gap for word, gap in zip(words, gaps)).rstrip()
    lines = wrap(text, width)
    for line in lines:
        assert line == line.strip() and line
        assert len(line) <= width or (" " not in line and "/" not in line.rstrip("/")), (line, width)
    pieces = iter(piece for line in lines for piece in line.split())
    for word in words:  # in order, each whole, or (longer than a line) in parts that end in "/"
        parts = [next(pieces)]
        while "".join(parts) != word:
            assert word.startswith("".join(parts)), (word, parts)
            parts.append(next(pieces))
        assert len(parts) == 1 or (len(word) > width and all(p.endswith("/") for p in parts[:-1])), parts
    assert next(pieces, None) is None


# ----------------------------------------------------------------------------------------------
# Help and progress


def test_help_reads_right():
    top = run("--help").stdout
    for kind in ("CheckpointManager", "gs://", "s3://", "safetensors", "msgpack", ".npz", "Equinox", "zarr"):
        assert kind in top, kind
    for command in ("table", "stats", "diff", "history", "check", "norms"):
        text = run(command, "--help").stdout
        usage = next(line for line in text.splitlines() if "Usage:" in line)
        assert "<bool>" not in text and "{" not in usage and "[[" not in usage, command
        expected = {"diff": "A [B]", "history": "ROOT"}.get(command, "CKPT")
        assert usage.split("[OPTIONS]")[1].split() == expected.split(), usage
    assert "gs://" in run("table", "--help").stdout and "s3://" in run("table", "--help").stdout
    assert "not one step" in " ".join(run("history", "--help").stdout.split())


def test_flags_still_take_no_value(manager_ckpt):
    result = run("table", manager_ckpt.path, "--norms", "true")
    assert result.exit_code == 2 and "unexpected extra argument" in result.stderr
    assert run("table", manager_ckpt.path, "--norms", "-q").exit_code == 0


def test_the_progress_bar_counts_in_binary_units():
    """The bar's columns, drawn by rich on a console of its own: amounts and speed in MiB."""
    import io

    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress

    from paramscope.cli.common import _binary_speed_column

    screen = io.StringIO()
    console = Console(file=screen, force_terminal=True, width=120, no_color=True)
    columns = (BarColumn(), DownloadColumn(binary_units=True), _binary_speed_column())
    with Progress(*columns, console=console, auto_refresh=False) as bar:
        task = bar.add_task("reading", total=512 << 20)
        for _ in range(3):
            bar.advance(task, 128 << 20)
        bar.refresh()
    shown = ESCAPE.sub("", screen.getvalue())
    assert "384.0/512.0 MiB" in shown and re.search(r"\d MiB/s", shown)
    assert not re.search(r"[KMGT]B/s|[KGT]iB/s", shown)
