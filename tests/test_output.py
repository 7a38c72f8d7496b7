"""What a person and a pipe see: tables at every width, CSV, Markdown, closed pipes, completion."""

import csv
import io
import itertools
import json
import os
import re
import subprocess
import sys
from fractions import Fraction

import pytest
from conftest import f64_norm
from hypothesis import given, settings
from hypothesis import strategies as st
from test_cli import run

from paramscope import compute_stats, open_checkpoint
from paramscope.compute.diff import diff_params
from paramscope.output import layout
from paramscope.output import reports as R
from paramscope.output.render import Column, View, cell, shown, to_markdown, to_text

WIDTHS = (40, 60, 80, 100, 120, 200)
ANSI = re.compile(r"\x1b\[[0-9;]*m")

# Every tabular command, as a user would run it on a manager root (its name is {root}).
COMMAND_LINES = [
    ["info", "{root}"],
    ["table", "{root}"],
    ["table", "{root}", "--norms", "--wd-exclude", "bias$"],
    ["table", "{root}", "--stats"],
    ["count", "{root}", "--depth", "2"],
    ["norms", "{root}", "--per-param"],
    ["norms", "{root}"],
    ["stats", "{root}"],
    ["layers", "{root}"],
    ["optim", "{root}"],
    ["history", "{root}", "--no-cache"],
    ["table", "{root}", "--unstack"],
    ["mask", "{root}", "--exclude", "bias$"],
    ["verify", "{root}"],
    ["diff", "{root}", "--step-a", "100", "--step-b", "200"],
    # layers 0 and 1 of A swapped by renaming, the head compared transposed (a shape change)
    [
        "diff",
        "{root}",
        "--step-a",
        "100",
        "--unstack",
        "--all",
        *("--rename", r"^layers\.0\.=layers.swap.", "--rename", r"^layers\.1\.=layers.0."),
        *("--rename", r"^layers\.swap\.=layers.1.", "--transpose", r"^head\."),
    ],
    ["check", "{root}", "--baseline", "{baseline}"],
]


KNOWN_HEADERS = (
    {c.header for columns in (R.STAT_COLUMNS,) for c in columns}
    | {"path", "shape", "dtype", "count", "bytes", "sharding", "decay", "item", "kind", "storage", "arrays"}
    | {
        "on disk",
        "step",
        "folder",
        "finished",
        "group (depth 2)",
        "NaN/Inf",
        "status",
        "norm A",
        "norm B",
        "||A-B||",
        "cosine",
        "max |A-B|",
        "metric",
        "baseline",
        "actual",
        "rel. diff",
        "array",
        "problem",
        "structure",
        "A path",
        "stacked",
        "stack",
        "layer",
        "digest",
        "||mu||",
        "||sqrt(nu)||",
        "max sqrt(nu)",
        "step count",
        "||update||",
        "update/param",
        "norm over steps",
        "drift",
        "last change",
    }
    | {f"Block_0.{m}.{k}" for m in ("Dense_0", "Dense_1", "LayerNorm_0") for k in ("bias", "kernel", "scale")}
)


def terminal(width):
    return {"TTY_COMPATIBLE": "1", "COLUMNS": str(width), "NO_COLOR": "1"}


@pytest.fixture(scope="session")
def baseline_file(manager_ckpt, tmp_path_factory):
    path = tmp_path_factory.mktemp("baseline") / "baseline.json"
    assert run("snapshot", manager_ckpt.path, "-o", path, "-q").exit_code == 0
    return str(path)


def command_line(args, manager_ckpt, baseline_file):
    return [a.format(root=manager_ckpt.path, baseline=baseline_file) for a in args]


# ----------------------------------------------------------------------------------------------
# Tables at every width


def shown_headers(text: str) -> list[str]:
    """The header line's cells: the line above the first rule (headers have single spaces only)."""
    lines = text.splitlines()
    rule = next(i for i, line in enumerate(lines) if line.startswith("─"))
    return re.split(r"\s{2,}", lines[rule - 1].strip())


def check_fitted(report, width):
    """Every shown cell is whole on one line (paths: folded at dots), lines fit, headers whole."""
    texts = []
    for table in [report, *report.sections]:
        lines, notes = to_text(report, View(width=width, table=table.name if report.sections else None))
        text = "\n".join(line for line, _ in lines)
        texts.append(text)
        if not table.rows:
            continue
        headers = [c.header for c in table.columns]
        present = [h for h in headers if re.search(rf"(^|  ){re.escape(h)}(  |$)", text, re.M)]
        for column in table.columns:
            if column.header not in present:
                continue
            for row in table.rows:
                value = cell(shown(row, column), column.kind, True)
                if column.kind == "path":
                    for piece in re.findall(r"[^.]*\.|[^.]+$", value):  # each name whole, at any width
                        assert any(piece in line for line, _ in lines), (piece, width)
                elif column.kind == "note":
                    assert all(word in text for word in value.split()), value
                elif column.kind == "count" and any("abbreviated" in n for n in notes):
                    assert layout.compact_count(row[column.key]) in text or value in text
                else:
                    assert value in text, (column.header, value, width)
        empty = {c.header for c in table.columns if all(shown(r, c) in (None, "", []) for r in table.rows)}
        hidden = [h for h in headers if h not in present and h not in empty]
        if hidden:
            assert notes and all(h in notes[0] for h in hidden), (hidden, notes)
        for line, _ in lines:  # prose folds at spaces: a longer line is one word
            assert len(line) <= width or width < 60 or " " not in line.strip(), (line, width)
            assert line == line.rstrip()
    return "\n".join(texts)


@pytest.fixture(scope="session")
def reports(manager_ckpt, special_ckpt):
    """The report of every command, from real checkpoints, as the CLI builds them."""
    from paramscope.compute.pairing import command_line_rules
    from paramscope.io.inventory import checkpoint_info, count_params, weight_decay_mask

    inv = open_checkpoint(manager_ckpt.path)
    result = compute_stats(inv.params, engine="host")
    old = open_checkpoint(manager_ckpt.path, step=100)
    special = open_checkpoint(special_ckpt.path)
    special_result = compute_stats(special.params, engine="host")
    mask = weight_decay_mask(inv.params, exclude=["bias$"])
    rules = command_line_rules([r"^Embed_0\.=token_embedding."], [r"^head\."])
    return {
        "info": R.info_report(checkpoint_info(manager_ckpt.path)),
        "table": R.table_report(inv, inv.params, mask, result, full=False),
        "table --stats": R.table_report(inv, inv.params, None, result, full=True),
        "count": R.count_report(inv, count_params(inv.params, 2), 2),
        "norms": R.norms_report(inv, inv.params, result, True),
        "stats": R.stats_report(inv, inv.params, result),
        "stats nonfinite": R.stats_report(special, special.params, special_result),
        "mask": R.mask_report(inv, mask),
        "diff": R.diff_report(old, inv, diff_params(old.params, inv.params), True, False),
        "diff --rename": R.diff_report(
            old, inv, diff_params(old.params, inv.params, rules=rules), True, True
        ),
    }


@pytest.mark.parametrize("width", WIDTHS)
def test_every_report_fits_without_cutting_a_number(reports, width):
    for name, report in reports.items():
        assert check_fitted(report, width), name


@pytest.mark.parametrize("width", WIDTHS)
def test_every_command_at_every_width(manager_ckpt, baseline_file, width):
    for args in COMMAND_LINES:
        result = run(*command_line(args, manager_ckpt, baseline_file), env=terminal(width))
        assert result.exit_code in (0, 1), (args, result.stderr)
        text = ANSI.sub("", result.stdout)
        if "─" in text:
            assert set(shown_headers(text)) <= KNOWN_HEADERS, shown_headers(text)  # none cut
        if width >= 60:
            below_title = text.split("\n\n", 1)[-1].splitlines()  # notes are prose: a terminal wraps them
            table_lines = [line for line in below_title if "  " in line or "─" in line]
            assert max(map(len, table_lines), default=0) <= width, (args, width)
        for line in result.stderr.splitlines():
            assert line.startswith("paramscope: "), line


def test_narrow_tables_hide_whole_columns_and_say_which(manager_ckpt):
    wide = run("table", manager_ckpt.path, "--norms", env=terminal(200))
    narrow = run("table", manager_ckpt.path, "--norms", env=terminal(80))
    assert "sharding" in shown_headers(ANSI.sub("", wide.stdout)) and wide.stderr == ""
    headers = shown_headers(ANSI.sub("", narrow.stdout))
    assert "norm" in headers and "path" in headers  # asked for: kept
    hidden = [h for h in ("bytes", "sharding") if h not in headers]
    assert hidden and all(h in narrow.stderr for h in hidden) and "--format csv" in narrow.stderr
    assert run("table", manager_ckpt.path, "--norms", "-q", env=terminal(80)).stderr == ""
    picked = run("table", manager_ckpt.path, "--columns", "path,sharding", env=terminal(60))
    assert shown_headers(ANSI.sub("", picked.stdout)) == ["path", "sharding"]
    bad = run("table", manager_ckpt.path, "--columns", "path,colour")
    assert bad.exit_code == 2 and "no column 'colour'" in bad.stderr and "sharding" in bad.stderr
    # a column the table shows when asked: the hint names the option that adds it
    for columns, extra, option in (
        ("path,sharding,norm", [], "--norms (or --stats) adds it"),
        ("path,zeros", ["--norms"], "--stats adds it"),
        ("path,digest", ["--stats"], "--digest adds it"),
    ):
        missing = run("table", manager_ckpt.path, "--columns", columns, *extra)
        assert missing.exit_code == 2 and missing.stderr.count("\n") == 1 and option in missing.stderr
    assert "adds it" not in bad.stderr


def test_empty_columns_are_not_shown(manager_ckpt):
    text = run("diff", manager_ckpt.path, "--step-a", "100", "--step-b", "200").stdout
    assert "structure" not in text and "cosine" in text
    csv_text = run("diff", manager_ckpt.path, "--step-a", "100", "--step-b", "200", "-f", "csv").stdout
    assert csv_text.splitlines()[0].split(",")[:5] == ["path", "status", "changes", "path_a", "norm_a"]


def test_counts_abbreviate_only_to_fit_and_exact_shows_every_digit():
    big = [{"path": f"layer_{i}.weight", "count": 277_123_456_789 + i, "bytes": 10**12} for i in range(3)]
    report = R.Report(
        payload={},
        columns=[
            Column("path", "path", "path", priority=0),
            Column("count", "count", "count", priority=0),
            Column("bytes", "bytes", "bytes", priority=1),
        ],
        rows=big,
    )
    lines, notes = to_text(report, View(width=40))
    text = "\n".join(line for line, _ in lines)
    assert "277B" in text and notes == ["counts abbreviated to fit (--exact shows every digit)"]
    lines, notes = to_text(report, View(width=40, exact=True))
    text = "\n".join(line for line, _ in lines)
    assert "277,123,456,789" in text and "abbreviated" not in " ".join(notes)
    lines, notes = to_text(report, View(width=None))
    assert "277,123,456,789" in "\n".join(line for line, _ in lines) and notes == []


@settings(max_examples=500, deadline=None)
@given(
    value=st.one_of(
        st.integers(-(10**16), 10**16),
        st.integers(1, 15).flatmap(lambda k: st.integers(10**k - 10 ** max(0, k - 4), 10**k + 10)),
    )
)
def test_compact_counts_round_into_the_next_unit(value):
    """Three significant digits of the exact count, the mantissa under 1000 (but in T)."""
    text = layout.compact_count(value)
    if abs(value) < 1000:
        assert text == str(value)
        return
    assert "e" not in text and text.lstrip("-")[-1] in "KMBT"
    mantissa, unit = Fraction(text[:-1]), 1000 ** (1 + "KMBT".index(text[-1]))
    assert (mantissa < 0) == (value < 0) and 1 <= abs(mantissa) and (abs(mantissa) < 1000 or unit == 1000**4)
    digits = len(text.lstrip("-")[:-1].replace(".", "").lstrip("0"))
    assert digits <= 3 or (unit == 1000**4 and "." not in text)
    # within half a unit in the last digit shown of the exact value
    last = Fraction(10) ** (len(str(int(abs(mantissa)))) - 3) if abs(mantissa) < 1000 else Fraction(1)
    assert abs(mantissa * unit - value) <= last * unit / 2 * (1 + Fraction(1, 10**9))


def test_piped_output_is_never_folded_or_padded(manager_ckpt):
    result = run("stats", manager_ckpt.path, env={"COLUMNS": "40"})  # not a terminal: width ignored
    lines = result.stdout.splitlines()
    assert max(map(len, lines)) > 100 and all(line == line.rstrip() for line in lines)
    assert "\x1b[" not in result.stdout and result.stderr == ""
    for path in manager_ckpt.values[200]["params"]:
        assert any(line.startswith(path + " ") for line in lines)


@settings(max_examples=60, deadline=None)
@given(
    paths=st.lists(
        st.lists(st.text("abcdefghijk_0123", min_size=1, max_size=14), min_size=1, max_size=5).map(".".join),
        min_size=1,
        max_size=6,
    ),
    numbers=st.lists(st.floats(allow_nan=False, allow_infinity=False, width=32), min_size=6, max_size=6),
    width=st.integers(20, 160),
)
def test_layout_never_cuts_a_number(paths, numbers, width):
    rows = [
        {"path": p, "x": numbers[i], "y": numbers[-1 - i], "n": 10 ** (i * 3) + i}
        for i, p in enumerate(paths)
    ]
    columns = [
        Column("path", "path", "path", priority=0),
        Column("x", "value x", "float", priority=0),
        Column("y", "value y", "float", priority=2),
        Column("n", "count", "count", priority=1),
    ]
    lines, notes = to_text(R.Report(payload={}, columns=columns, rows=rows), View(width=width))
    text = "\n".join(line for line, _ in lines)
    shown = shown_headers(text)
    assert shown[0] == "path" and "value x" in shown
    for row in rows:
        assert cell(row["x"], "float", True) in text
        folded = "".join(line.split("  ")[0].strip() for line, _ in lines)
        assert row["path"].replace(".", "") in folded.replace(".", "") or len(row["path"]) > width
    for header in ("value y", "count"):
        if header not in shown:
            assert header in notes[0]


JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(10**12), 10**12)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=30,
)
NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:e[-+]?\d+)?")


@settings(max_examples=200, deadline=None)
@given(value=JSON_VALUES, limit=st.integers(10, 120))
def test_metadata_is_shown_whole_or_cut_between_tokens(value, limit):
    """A note from metadata shows each number exactly, or not at all, and says where it is cut."""

    def printable(text):
        return "".join(c if c.isprintable() else f"\\u{ord(c):04x}" for c in text)

    full = printable(json.dumps(value, ensure_ascii=False))
    shown = R._short_json(value, limit)
    if len(full) <= limit:
        assert shown == full
        return
    assert shown.endswith("...") and len(shown) <= limit and full.startswith(shown[:-3])
    tokens = json.JSONEncoder(ensure_ascii=False).iterencode(value)
    boundaries = set(itertools.accumulate(len(printable(t)) for t in tokens))
    assert len(shown) - 3 in boundaries | {0}  # cut between whole tokens (numbers, strings)


def test_info_shows_metadata_numbers_exactly_or_not_at_all():
    """Kauldron's timer item holds 1.134999911300838e-05: never shown as 1.134999911300."""
    path = os.path.join(os.path.dirname(__file__), "data", "kauldron", "checkpoints")
    result = run("info", path)
    assert result.exit_code == 0, result.stderr
    note = next(line for line in result.stdout.splitlines() if line.startswith("timer: "))
    with open(os.path.join(path, "ckpt_2", "timer", "metadata")) as f:
        content = f.read()
    wanted = set(NUMBER.findall(content))
    assert "1.134999911300838e-05" in wanted
    assert set(NUMBER.findall(note)) <= wanted and note.endswith("...")


# ----------------------------------------------------------------------------------------------
# CSV and Markdown


@pytest.mark.parametrize("args", COMMAND_LINES, ids=lambda a: " ".join(a[:1] + a[2:]))
def test_csv_loads_with_pandas_and_markdown_parses(manager_ckpt, baseline_file, args):
    pandas = pytest.importorskip("pandas")
    line = command_line(args, manager_ckpt, baseline_file)
    result = run(*line, "-f", "csv")
    assert result.exit_code in (0, 1), result.stderr
    rows = list(csv.reader(io.StringIO(result.stdout)))
    assert len({len(r) for r in rows}) == 1  # one table
    if len(rows) > 1:
        frame = pandas.read_csv(io.StringIO(result.stdout))
        assert list(frame.columns) == rows[0] and len(frame) == len(rows) - 1
        for column in ("count", "bytes", "arrays"):
            if column in frame.columns:  # raw integers (empty where there is none), never "197,504"
                values = frame[column].dropna()
                assert frame[column].dtype.kind in "if" and (values == values.round()).all(), column
                assert all("," not in row[rows[0].index(column)] for row in rows[1:]), column
    markdown = run(*line, "-f", "markdown").stdout
    for block in markdown.split("\n\n"):
        rows = [row for row in block.splitlines() if row.startswith("|")]
        cells = {len(re.split(r"(?<!\\)\|", row)) for row in rows}
        assert len(cells) <= 1, block  # every row has the header's cell count
        if rows:
            assert re.fullmatch(r"\|(---:?\|)+", rows[1]) and len(rows) == len(block.splitlines())
    assert markdown.strip()  # an empty result is a sentence, not an empty table


def test_csv_numbers_are_machine_values(manager_ckpt):
    values = manager_ckpt.values[200]["params"]
    frame = list(
        csv.DictReader(io.StringIO(run("norms", manager_ckpt.path, "--per-param", "-f", "csv").stdout))
    )
    by_path = {row["path"]: row for row in frame}
    assert by_path["(global)"]["arrays"] == str(len(values))
    for path, value in values.items():
        assert float(by_path[path]["norm"]) == pytest.approx(f64_norm(value), rel=1e-6)
        assert by_path[path]["count"] == str(value.size)
    doc = json.loads(run("norms", manager_ckpt.path, "--per-param", "-f", "json").stdout)
    assert float(by_path["(global)"]["norm"]) == doc["global_norm"]  # full precision
    groups = run("count", manager_ckpt.path, "-f", "csv").stdout.splitlines()
    dtypes = run("count", manager_ckpt.path, "-f", "csv", "--show", "dtypes").stdout.splitlines()
    assert groups[0] == "path,arrays,count,bytes" and dtypes[0] == "dtype,count,bytes"
    steps = run("info", manager_ckpt.path, "-f", "csv", "--show", "steps").stdout.splitlines()
    assert steps[0] == "step,name,finished" and steps[1].startswith("100,")


def test_markdown_escapes_headers_and_cells(manager_ckpt):
    text = run("stats", manager_ckpt.path, "-f", "markdown").stdout
    assert "max \\|x\\|" in text and "| max |x| |" not in text
    empty = run("table", manager_ckpt.path, "--filter", "nomatch", "-f", "markdown")
    assert "no parameters match" in empty.stdout and "|" not in empty.stdout
    assert empty.stderr == "paramscope: warning: --filter 'nomatch' matches no parameter\n"
    assert (
        to_markdown(R.Report(payload={}, columns=[], rows=[], empty="nothing"), View()).strip() == "nothing"
    )


# ----------------------------------------------------------------------------------------------
# Headers, selections, sorting


def test_header_shows_the_path_as_typed_and_the_subtree(standard_ckpt, monkeypatch):
    parent, name = os.path.split(standard_ckpt.path)
    monkeypatch.chdir(parent)
    text = run("table", name, "--subtree", "params", "--filter", "bias").stdout
    first = text.splitlines()[0]
    assert first.startswith(f"{name}  ") and "subtree params" in first and parent not in first
    one = run("table", name, "--filter", "^params.head.kernel$").stdout
    assert "1 array" in one.splitlines()[0] and "1 arrays" not in one


def test_filters_that_match_nothing_are_warned_about(manager_ckpt, baseline_file):
    result = run("norms", manager_ckpt.path, "--filter", "nomatch", "--fail-on-nonfinite")
    assert result.exit_code == 0 and "--filter 'nomatch' matches no parameter" in result.stderr
    result = run("table", manager_ckpt.path, "--subtree", "nope")
    assert result.exit_code == 0 and "subtree 'nope' matches no parameter" in result.stderr
    result = run("check", manager_ckpt.path, "-b", baseline_file, "--ignore", "zzz", "--only", "structure")
    assert "--ignore 'zzz' matches no parameter" in result.stderr


def test_norms_stats_and_diff_sort_and_top(manager_ckpt):
    values = manager_ckpt.values[200]["params"]
    doc = json.loads(
        run("norms", manager_ckpt.path, "--per-param", "--sort", "norm", "--top", "3", "-f", "json").stdout
    )
    expected = sorted(values, key=lambda p: -f64_norm(values[p]))[:3]
    assert [p["path"] for p in doc["params"]] == expected
    doc = json.loads(run("stats", manager_ckpt.path, "--sort", "std", "-f", "json").stdout)
    stds = [p["std"] for p in doc["params"]]
    assert stds == sorted(stds, reverse=True)
    doc = json.loads(
        run("diff", manager_ckpt.path, "--step-a", "100", "--sort", "rel_diff", "-f", "json").stdout
    )
    assert doc["a"]["step"] == 100 and doc["b"]["step"] == 200  # B defaults to A, latest step
    rel = [p["rel_diff"] for p in doc["params"]]
    assert rel == sorted(rel, reverse=True)
    text = run("diff", manager_ckpt.path, "--step-a", "100", "--sort", "rel_diff", "--top", "2").stdout
    assert sum(1 for line in text.splitlines() if " changed " in line) == 2


# ----------------------------------------------------------------------------------------------
# Processes: pipes, help


def _paramscope(*args, env=None):
    return [sys.executable, "-m", "paramscope", *map(str, args)]


@pytest.mark.parametrize(
    "args",
    [
        ["table", "{root}"],
        ["info", "{root}"],
        ["count", "{root}", "-f", "json"],
        ["mask", "{root}", "-f", "csv"],
        ["norms", "{root}", "--per-param", "-f", "json"],
        ["stats", "{root}", "-f", "markdown"],
        ["verify", "{root}"],
        ["diff", "{root}", "--step-a", "100", "--all"],
        ["snapshot", "{root}"],
        ["check", "{root}", "-b", "{baseline}"],
        ["--help"],
    ],
    ids=lambda a: a[0],
)
def test_a_closed_pipe_is_not_an_error(manager_ckpt, baseline_file, args):
    line = " ".join(_paramscope(*command_line(args, manager_ckpt, baseline_file)))
    for reader in ("head -1", "true"):
        result = subprocess.run(
            ["bash", "-c", f"set -o pipefail; {line} | {reader}"], capture_output=True, text=True, timeout=300
        )
        assert result.returncode == 0, (reader, result.stderr)
        assert result.stderr == "", result.stderr


def test_help_examples_are_never_broken(monkeypatch):
    from paramscope.cli.app import app

    commands = [c.callback for c in __import__("typer").main.get_command(app).commands.values()]
    examples = [e for c in commands for e in re.findall(r"- `(paramscope [^`]+)`", c.__doc__ or "")]
    assert len(examples) >= 10
    for width in (40, 80, 200):
        for command in {e.split()[1] for e in examples}:
            text = run(command, "--help", env={"COLUMNS": str(width)}).stdout
            for example in (e for e in examples if e.split()[1] == command):
                assert example in text, (example, width)
    top = run("--help", env={"COLUMNS": "80"}).stdout
    assert "Start here" in top and "Selection" not in top
    table_help = run("table", "--help", env={"COLUMNS": "100"}).stdout
    for panel in ("Selection", "Output", "Reading", "Cluster"):
        assert f"─ {panel}" in table_help
    for metavar in ("REGEX", "SIZE", "AXIS=N,...", "<auto|host|mesh>"):
        assert metavar in table_help


def test_completion_offers_steps_and_items(manager_ckpt):
    def complete(words, cword):
        env = {"_PARAMSCOPE_COMPLETE": "complete_bash", "COMP_WORDS": words, "COMP_CWORD": str(cword)}
        return run(env=env).stdout.split()

    root = manager_ckpt.path
    assert complete(f"paramscope norms {root} --step ", 4) == ["100", "200"]  # 300 is unfinished
    assert complete(f"paramscope table {root} --step 1", 4) == ["100"]
    assert complete(f"paramscope table {root} --item ", 4) == ["opt_state", "params", "step"]
    assert complete("paramscope table /nowhere --step ", 4) == []
    zsh = run("--show-completion", "zsh")
    assert zsh.exit_code == 0 and "#compdef paramscope" in zsh.stdout


def test_columns_are_named_by_key_or_by_header_as_shown(manager_ckpt):
    by_key = run("stats", manager_ckpt.path, "--columns", "path,max_abs,zero_fraction", "-f", "csv")
    by_header = run("stats", manager_ckpt.path, "--columns", "path,max |x|,Zeros", "-f", "csv")
    assert by_key.exit_code == by_header.exit_code == 0, by_header.stderr
    assert by_key.stdout == by_header.stdout
    assert by_key.stdout.splitlines()[0] == "path,max_abs,zero_fraction"
    unknown = run("stats", manager_ckpt.path, "--columns", "path,biggest")
    assert unknown.exit_code == 2 and "no column 'biggest'" in unknown.stderr


def test_markdown_total_row_fills_only_what_the_text_total_fills(manager_ckpt):
    markdown = run("table", manager_ckpt.path, "-f", "markdown").stdout
    total = next(line for line in markdown.splitlines() if line.startswith("| total"))
    assert "replicated" not in total and total.rstrip().endswith("|  |")
    text = run("table", manager_ckpt.path, "-f", "table").stdout
    text_total = next(line for line in text.splitlines() if line.startswith("total"))
    assert "replicated" not in text_total


# ----------------------------------------------------------------------------------------------
# One vocabulary; the columns a command exists for


@pytest.mark.parametrize("width", (80, 120))
def test_the_columns_a_command_exists_for_stay(manager_ckpt, tmp_path, width):
    def headers(*args):
        result = run(*args, env=terminal(width))
        assert result.exit_code in (0, 1), result.stderr
        return shown_headers(ANSI.sub("", result.stdout)), result

    stats, _ = headers("stats", manager_ckpt.path)
    assert ("min" in stats) == ("max" in stats), stats  # a range, never half of one
    history, _ = headers("history", manager_ckpt.path, "--no-cache")
    assert "NaN/Inf" in history
    table, result = headers("table", manager_ckpt.path, "--digest")
    assert "digest" in table  # asked for: kept, by its first 16 digits
    digests = json.loads(run("table", manager_ckpt.path, "--digest", "-f", "json").stdout)["params"]
    assert all(
        p["digest"][:16] + "..." in result.stdout and p["digest"] not in result.stdout for p in digests
    )
    diff, _ = headers("diff", manager_ckpt.path, "--step-a", "100", "--step-b", "200")
    assert {"path", "status", "rel. diff"} <= set(diff)
    baseline = tmp_path / "step100.json"
    assert run("snapshot", manager_ckpt.path, "--step", "100", "-o", baseline).exit_code == 0
    check, result = headers("check", manager_ckpt.path, "--baseline", baseline)
    assert result.exit_code == 1 and {"baseline", "actual"} <= set(check)
    wanted = ["path", "dtype", "count", "norm", "mean", "std", "min", "max"]
    picked, result = headers("stats", manager_ckpt.path, "--columns", ",".join(wanted))
    # picked columns keep their order; those named last give way first, named in the note
    assert picked == wanted[: len(picked)] and len(picked) >= 4, picked
    assert all(name in result.stderr for name in wanted[len(picked) :])


def test_columns_and_sort_take_keys_or_headers(manager_ckpt):
    by_key = run(
        "stats", manager_ckpt.path, "--sort", "zero_fraction", "--columns", "path,max_abs", "-f", "csv"
    )
    by_header = run("stats", manager_ckpt.path, "--sort", "ZEROS", "--columns", "PATH,Max |x|", "-f", "csv")
    assert by_key.exit_code == 0 and by_key.stdout == by_header.stdout
    assert by_key.stdout.splitlines()[0] == "path,max_abs"
    info = run("info", manager_ckpt.path, "--columns", "item,on disk", "-f", "csv")
    assert info.exit_code == 0 and info.stdout.splitlines()[0] == "name,bytes_on_disk"
    norms = run("norms", manager_ckpt.path, "--per-param", "--sort", "NaN/Inf", "-f", "json")
    assert norms.exit_code == 0
    for args in (("stats", "--sort", "colour"), ("stats", "--columns", "path,colour")):
        bad = run(args[0], manager_ckpt.path, *args[1:])
        assert bad.exit_code == 2 and "colour" in bad.stderr and "max_abs ('max |x|')" in bad.stderr
        assert len(bad.stderr.strip().splitlines()) <= 2 and "Traceback" not in bad.stderr


def test_one_name_for_one_quantity(manager_ckpt):
    path = manager_ckpt.path
    count = json.loads(run("count", path, "-f", "json").stdout)
    assert all("arrays" in g and "leaves" not in g for g in count["groups"])
    assert run("count", path, "-f", "csv").stdout.splitlines()[0] == "path,arrays,count,bytes"
    mask = json.loads(run("mask", path, "-f", "json").stdout)
    assert set(mask["decayed"]) == {"count", "arrays"}
    for command in ("norms", "stats"):
        doc = json.loads(run(command, path, "-f", "json").stdout)
        assert isinstance(doc["bytes_read"], int) and doc["bytes_read"] == sum(doc["bytes_read_by_process"])
    verify = json.loads(run("verify", path, "-f", "json").stdout)
    assert isinstance(verify["bytes_read"], int)
    stats = run("stats", path).stdout
    norms = run("norms", path).stdout
    assert any(line.startswith("(global) ") for line in stats.splitlines())
    assert any(line.startswith("(global) ") for line in norms.splitlines())
    optim = json.loads(run("optim", path, "-f", "json").stdout)["params"]
    assert optim and all("step_count" in row and "count" not in row for row in optim)
    assert "step count" in run("optim", path).stdout


def test_sharding_reads_alike_everywhere(manager_ckpt, tmp_path):
    """P(...) in every table, one JSON structure; diff's structure change in the same notation."""
    table = json.loads(run("table", manager_ckpt.path, "-f", "json").stdout)["params"]
    split = [p for p in table if p["sharding"] and any(e is not None for e in p["sharding"])]
    assert split
    text = run("table", manager_ckpt.path).stdout
    for row in split:
        entries = ", ".join(repr(tuple(e)) if isinstance(e, list) else repr(e) for e in row["sharding"])
        assert f"P({entries})" in text
    baseline = tmp_path / "snap.json"
    assert run("snapshot", manager_ckpt.path, "-o", baseline).exit_code == 0
    snap = {p["path"]: p["sharding"] for p in json.loads(baseline.read_text())["params"]}
    assert snap == {p["path"]: p["sharding"] for p in table if p["path"] in snap}
