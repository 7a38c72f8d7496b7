"""What every command does around the core: errors to exit codes, stderr, progress, rendering.

The one place that maps paramscope's errors to exit codes and formats stderr lines.
"""

from __future__ import annotations

import functools
import os
import sys

import typer

from paramscope import errors
from paramscope.cli.options import Cluster, Layering, Output, Reading, Selection
from paramscope.output.render import Format, Report, View, listed, render

PROGRESS_MIN_BYTES = 64 << 20  # less data than this reads in a moment: no progress bar


def debugging() -> bool:
    return os.environ.get("PARAMSCOPE_DEBUG", "") not in ("", "0")


def warn(message: str, quiet: bool = False, kind: str = "warning") -> None:
    if not quiet:
        print(errors.message_line(kind, message), file=sys.stderr)


def fail(message: str, hint: str | None, code: int) -> typer.Exit:
    print(errors.error_line(message, hint), file=sys.stderr)
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
    except BrokenPipeError:  # a reader that went away (`| head`): not an error
        silence_stdout()
        raise typer.Exit(0) from None
    except errors.ParamscopeError as err:
        show_traceback()
        raise fail(err.message, err.hint, err.exit_code) from None
    except KeyboardInterrupt:
        raise fail("interrupted", None, 130) from None
    except Exception as err:  # a bug: say so in one line, traceback on request
        show_traceback()
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
    if not os.access(path, os.W_OK) if existing else not os.access(parent, os.W_OK | os.X_OK):
        raise errors.UsageError(
            f"cannot write {option} {target}: {path if existing else parent} is not writable",
            hint="choose a writable path",
        )


def picture(option: str, target: str, checkpoints: list[str]) -> None:
    """Refuses, before anything is read, a picture that could not be drawn or written."""
    import importlib.util

    writable(option, target, checkpoints)
    if not target.lower().endswith((".png", ".svg")):
        raise errors.UsageError(
            f"cannot tell the picture format of {target!r}", hint="name a .png or .svg file"
        )
    if importlib.util.find_spec("matplotlib") is None:
        raise errors.UsageError(
            "plotting needs matplotlib", hint="install the extra: pip install 'paramscope[plot]'"
        )


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
            from rich.progress import (
                BarColumn,
                DownloadColumn,
                Progress,
                TimeRemainingColumn,
                TransferSpeedColumn,
            )

            self.progress = Progress(
                "[progress.description]{task.description}",
                BarColumn(),
                DownloadColumn(binary_units=True),
                TransferSpeedColumn(),
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
