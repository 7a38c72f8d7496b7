"""What every command does around the core: errors to exit codes, stderr, progress, rendering.

The one place that maps paramscope's errors to exit codes and formats stderr lines.
"""

from __future__ import annotations

import functools
import os
import sys

import typer

from paramscope import errors
from paramscope.cli import interrupt
from paramscope.cli.options import Cluster, Layering, Output, Reading, Selection
from paramscope.output.layout import wrap
from paramscope.output.render import Format, Report, View, listed, render

PROGRESS_MIN_BYTES = 64 << 20  # less data than this reads in a moment: no progress bar


def debugging() -> bool:
    return os.environ.get("PARAMSCOPE_DEBUG", "") not in ("", "0")


def stderr_width() -> int | None:
    """The width of the terminal stderr shows on (``COLUMNS`` first, as for tables); None when
    stderr is not a terminal."""
    try:
        if not sys.stderr.isatty():
            return None
        columns = os.environ.get("COLUMNS", "")
        width = int(columns) if columns.isdigit() else os.get_terminal_size(sys.stderr.fileno()).columns
    except (OSError, ValueError, AttributeError):
        return None
    return width if width > 0 else None


def say(line: str) -> None:
    """One message on stderr; on a terminal folded at spaces to its width, never inside a word
    (a terminal would cut it anywhere)."""
    for part in wrap(line, stderr_width()):
        print(part, file=sys.stderr)


def warn(message: str, quiet: bool = False, kind: str = "warning") -> None:
    if not quiet:
        say(errors.message_line(kind, message))


def fail(message: str, hint: str | None, code: int) -> typer.Exit:
    say(errors.error_line(message, hint))
    return typer.Exit(code)


def handle_errors(command):
    """Maps paramscope's errors to one-line messages and exit codes; tracebacks only when debugging.

    In a cluster of processes every process leaves together, with the same exit code
    (:func:`paramscope.api.leave_cluster`).
    """

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            _run(command, *args, **kwargs)
            code = 0
        except typer.Exit as exit_:
            code = exit_.exit_code
        from paramscope.api import leave_cluster, release

        release()  # one reading state per command, let go at its end
        leave_cluster(code)
        if code:
            raise typer.Exit(code)

    return wrapper


def _run(command, *args, **kwargs):
    try:
        return command(*args, **kwargs)
    except typer.Exit:
        raise
    except BaseException as err:
        if isinstance(err, KeyboardInterrupt) or interrupt.interrupted():
            # Ctrl-C, or what it became on its way up (an import that failed half-way)
            interrupt.say()
            raise typer.Exit(interrupt.EXIT_INTERRUPTED) from None
        if isinstance(err, BrokenPipeError):  # a reader that went away (`| head`): not an error
            silence_stdout()
            raise typer.Exit(0) from None
        if isinstance(err, errors.ParamscopeError):
            show_traceback()
            raise fail(err.message, err.hint, err.exit_code) from None
        if not isinstance(err, Exception):
            raise
        show_traceback()  # a bug: say so in one line, traceback on request
        raise fail(
            f"unexpected {type(err).__name__}: {err}",
            "set PARAMSCOPE_DEBUG=1 for a traceback and report it",
            errors.EXIT_INTERNAL,
        ) from None


def show_traceback() -> None:
    """With PARAMSCOPE_DEBUG set, the traceback of the error being handled, on stderr (escaped
    like every message); the exit code stays the documented one."""
    if debugging():
        import traceback

        text = errors.redacted(traceback.format_exc())
        print(errors.printable(text, keep="\n"), end="", file=sys.stderr)


def silence_stdout() -> None:
    """Points stdout at /dev/null, so that no later flush meets the closed pipe again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def quiet_libraries() -> None:
    """Keeps XLA's and absl's log noise off the terminal (set before jax loads)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("ABSL_MIN_LOG_LEVEL", "2")


# ----------------------------------------------------------------------------------------------
# Output


def writable(option: str, target: str, checkpoints: list[str], folder: bool = False) -> None:
    """Refuses, before anything is read, a place an option would write that paramscope must not
    or cannot write: a URL (it writes local files only), a place inside a checkpoint being read
    (it never writes into one; symlinks resolved), a missing or read-only folder. ``folder``: the
    target is a folder, made if missing; its nearest existing parent must be writable."""
    from paramscope.api import inside, is_url

    if is_url(target):
        raise errors.UsageError(
            f"{option} {target} is a URL", hint="paramscope writes local files only; give a local path"
        )
    for ckpt in checkpoints:
        if ckpt.endswith(".index.json"):  # a sharded safetensors set: its folder is the checkpoint
            ckpt = os.path.dirname(os.path.abspath(ckpt))
        if inside(target, ckpt):
            raise errors.UsageError(
                f"{option} {target} is inside the checkpoint {ckpt}",
                hint="paramscope never writes into a checkpoint folder; write elsewhere",
            )
    path = os.path.abspath(target)
    if folder:
        if os.path.exists(path) and not os.path.isdir(path):
            raise errors.UsageError(f"{option} {target} is not a folder", hint="name a folder")
        parent = path
        while not os.path.lexists(parent):
            parent = os.path.dirname(parent)
    else:
        if os.path.isdir(path):
            raise errors.UsageError(f"{option} {target} is a folder", hint="name a file to write")
        parent = os.path.dirname(path)
    if not os.path.isdir(parent):
        raise errors.UsageError(
            f"cannot write {option} {target}: no folder {parent}",
            hint="make the folder first, or write elsewhere",
        )
    existing = not folder and os.path.exists(path)  # a file written over (/dev/null too)
    if not (_can_open_to_write(path) if existing else _can_create_in(parent)):
        raise errors.UsageError(
            f"cannot write {option} {target}: {path if existing else parent} is not writable",
            hint="choose a writable path",
        )


def _can_open_to_write(path: str) -> bool:
    """Whether ``path`` opens for writing (its content untouched): permission bits say nothing
    for root, nor of a read-only mount or a special file system."""
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_APPEND))
    except OSError:
        return False
    return True


def _can_create_in(folder: str) -> bool:
    """Whether a file can be made in ``folder``: an unnamed temporary one is, and is gone at once."""
    import tempfile

    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError:
        return False
    return True


def picture(option: str, target: str, checkpoints: list[str]) -> None:
    """Refuses, before anything is read, a picture that could not be drawn or written: a place
    that cannot be written, a format matplotlib does not write, matplotlib missing."""
    from paramscope.output.plot import check_format

    writable(option, target, checkpoints)
    check_format(target)


def emit(report: Report, out: Output, table: str | None = None) -> None:
    """Renders a report to stdout as ``out`` says; hidden columns are named on stderr.

    On a terminal tables fit its width; anywhere else (a pipe, a file) nothing is cut or folded.
    """
    keys = out.column_keys
    if keys and out.fmt == Format.json:
        raise errors.UsageError(
            "--columns picks columns of a table", hint="use it with -f table, csv or markdown"
        )
    view = View(exact=out.exact, columns=keys, table=table)
    if out.fmt == Format.table:
        from rich.console import Console

        console = Console(file=sys.stdout, highlight=False)
        if console.is_terminal:
            view.width = console.width
            view.console = console
    for message in render(report, out.fmt, sys.stdout, view):
        warn(message, out.quiet, kind="note")


# ----------------------------------------------------------------------------------------------
# Reading


def open_checkpoint(
    ckpt: str,
    sel: Selection,
    quiet: bool,
    layering: Layering | None = None,
    cluster=None,
    step: int | None = None,
):
    """The API's :class:`~paramscope.api.Checkpoint` as ``sel`` and ``layering`` select it (at
    ``step`` when given, else ``sel.step``); what matched nothing is warned about. In a
    ``cluster`` of processes, process 0 alone reads the metadata and shares it with the others.
    """
    from paramscope.api import open as open_api

    ck = open_api(
        ckpt,
        step=sel.step if step is None else step,
        item=sel.item,
        subtree=sel.subtree,
        filter=sel.filter,
        unstack=bool(layering is not None and layering.unstack),
        layer_axis=layering.layer_axis if layering is not None else None,
        cluster=cluster,
    )
    for warning in ck.warnings:
        warn(warning, quiet)
    return ck


def join(options: Cluster):
    """This process's cluster: alone, or joined with the others through jax.distributed."""
    from paramscope.api import join_cluster

    return join_cluster(
        options.coordinator,
        options.num_processes,
        options.process_id,
        options.distributed,
        options.timeout,
        debugging(),
    )


def memory_budget(reading: Reading) -> int | None:
    from paramscope.api import parse_size

    return parse_size(reading.memory_budget) if reading.memory_budget else None


def reading_options(reading: Reading) -> dict:
    """The API's keyword arguments for ``--memory-budget``, ``--engine`` and ``--mesh``."""
    return dict(memory_budget=memory_budget(reading), engine=reading.engine.value, mesh=reading.mesh)


def show(result, quiet: bool, shown: list[str] | tuple = ()) -> None:
    """An API result's warnings (those not already ``shown``) and notes, on stderr."""
    for message in result.warnings:
        if message not in shown:
            warn(message, quiet)
    for message in result.notes:
        warn(message, quiet, kind="note")


class _Bar:
    """A progress bar on stderr, started once the bytes to read are known to be many."""

    def __init__(self) -> None:
        self.total = 0
        self.progress = None
        self.task = None

    def on_total(self, n: int) -> None:
        self.total += n
        if self.progress is not None:
            self.progress.update(self.task, total=self.total)
        elif self.total >= PROGRESS_MIN_BYTES:
            from rich.console import Console
            from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn

            self.progress = Progress(
                "[progress.description]{task.description}",
                BarColumn(),
                DownloadColumn(binary_units=True),
                _binary_speed_column(),
                TimeRemainingColumn(),
                console=Console(stderr=True),
                transient=True,
            )
            self.progress.start()
            self.task = self.progress.add_task("reading", total=self.total)

    def on_bytes(self, n: int) -> None:
        if self.progress is not None:
            self.progress.advance(self.task, n)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()


def with_progress(quiet: bool, run):
    """``run(progress)``, where ``progress`` holds the API's ``on_total``/``on_bytes`` keyword
    arguments: a progress bar on stderr when it is a terminal and the read is large."""
    quiet_libraries()
    if quiet or not sys.stderr.isatty():
        return run({})
    bar = _Bar()
    try:
        return run({"on_total": bar.on_total, "on_bytes": bar.on_bytes})
    finally:
        bar.close()


def _binary_speed_column():
    """The reading speed in the unit of the amounts beside it (``384.0/512.0 MiB 159.9 MiB/s``):
    rich's own speed column counts in decimal units (MB/s) and picks its own unit."""
    from rich.filesize import pick_unit_and_suffix
    from rich.progress import ProgressColumn
    from rich.text import Text

    suffixes = ["bytes", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB", "ZiB", "YiB"]  # DownloadColumn's

    class BinarySpeedColumn(ProgressColumn):
        def render(self, task) -> Text:
            speed = task.finished_speed or task.speed
            if speed is None or not task.total:
                return Text("?", style="progress.data.speed")
            unit, suffix = pick_unit_and_suffix(int(task.total), suffixes, 1024)
            return Text(f"{speed / unit:,.1f} {suffix}/s", style="progress.data.speed")

    return BinarySpeedColumn()


def report_nonfinite(result, fail_on_it: bool, quiet: bool) -> None:
    """Warns about NaN/Inf on stderr, and exits 1 when asked to fail on them."""
    if not result.nonfinite:
        return
    bad = [r.param.path for r in result.params if r.nonfinite]
    warn(
        f"{result.nonfinite} NaN/Inf value(s) in {len(bad)} parameter(s): {listed(bad)}",
        quiet,
    )
    if fail_on_it:
        raise typer.Exit(errors.EXIT_CHECK_FAILED)
