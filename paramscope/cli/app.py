"""The paramscope command line: the app, its commands, and the way out (exit codes, closed pipes).

Each command parses its options, calls the core, and hands a report to the one output layer.
jax is imported only by the commands that compute on arrays, so ``--help`` stays instant.
"""

from __future__ import annotations

import os
import sys
from typing import Annotated

import typer
from typer.core import TyperCommand, TyperGroup

from paramscope import errors
from paramscope.cli import arrays, gates, inspect, interrupt, native_logs, numbers, views
from paramscope.cli.common import handle_errors, say, silence_stdout


class _PlainHelp:
    """Help in words: arguments in the usage line as the help lists them (``CKPT``, ``A [B]``;
    Typer writes a required one as ``{CKPT}``), and flags without a value type (Typer shows
    ``--norms <bool>``, though ``--norms`` takes no value)."""

    def collect_usage_pieces(self, ctx) -> list[str]:
        pieces = super().collect_usage_pieces(ctx)
        return [p[1:-1] if p.startswith("{") and p.endswith("}") else p for p in pieces]

    def get_params(self, ctx) -> list:
        params = super().get_params(ctx)
        for param in params:
            if getattr(param, "is_flag", False) and param.metavar is None:
                param.metavar = ""
        return params


class PlainHelpCommand(_PlainHelp, TyperCommand):
    pass


class PlainHelpGroup(_PlainHelp, TyperGroup):
    pass


app = typer.Typer(
    name="paramscope",
    cls=PlainHelpGroup,
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
    context_settings={"help_option_names": ["-h", "--help"]},
)

for family, commands in (
    ("Inspect", (inspect.info, inspect.table, inspect.count, inspect.mask)),
    ("Numbers", (numbers.norms, numbers.stats, numbers.layers, numbers.optim)),
    ("Arrays", (arrays.show, arrays.export)),
    ("Gates", (gates.verify, gates.diff, gates.snapshot, gates.check)),
    ("Runs", (views.history,)),
):
    for command in commands:
        app.command(rich_help_panel=family, cls=PlainHelpCommand)(handle_errors(command))


def _version_callback(value: bool) -> None:
    if value:
        from paramscope import __version__

        print(f"paramscope {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool,
        typer.Option(
            "--version", "-V", help="Show the version and exit.", callback=_version_callback, is_eager=True
        ),
    ] = False,
) -> None:
    """Inspect JAX checkpoints (Orbax, flax, safetensors, ...) without the model code.

    Start here: `paramscope table CKPT`, then `paramscope norms CKPT --per-param`.

    CKPT is a local folder or file, or a gs:// or s3:// URL, holding: an Orbax checkpoint (a
    CheckpointManager root of step folders, one step folder, or one item folder; Orbax v1 and
    0.4 too); flax msgpack (flax.training.checkpoints files, a Hugging Face flax_model.msgpack);
    safetensors (a .safetensors file, a sharded set or its index.json, a folder of them); a
    numpy .npz archive; an Equinox file; an EasyDeL checkpoint; a zarr tree or a Levanter run.

    Data goes to stdout, messages to stderr. Exit codes: 0 ok, 1 a check failed, 2 usage error,
    3 checkpoint problem, 4 internal error, 130 interrupted (Ctrl-C).
    """


def run(args: list[str] | None = None) -> int:
    """Runs the command line on ``args`` (default ``sys.argv[1:]``) and returns the exit code.

    Every way out is one line on stderr and a documented exit code: Typer's usage errors
    (unknown option, bad value) included. A reader that closes the pipe early (``| head``) is
    no error: exit 0, nothing on stderr.
    """
    args = sys.argv[1:] if args is None else list(args)
    _shell_named(args)
    try:
        code = app(args=args, prog_name="paramscope", standalone_mode=False)
        sys.stdout.flush()
    except BrokenPipeError:
        silence_stdout()
        return 0
    except SystemExit as exit_:  # completion and Typer's own exits; a closed pipe under help
        if isinstance(exit_.__context__, BrokenPipeError):
            silence_stdout()
            return 0
        return exit_.code if isinstance(exit_.code, int) else int(exit_.code is not None)
    except Exception as err:  # Typer's own usage errors carry an exit code and a message
        if not (hasattr(err, "exit_code") and hasattr(err, "format_message")):
            raise
        if type(err).__name__ == "NoArgsIsHelpError":  # `paramscope` alone: its help
            print(err.format_message())
            return 0
        command = getattr(getattr(err, "ctx", None), "command_path", "paramscope")
        message = err.format_message().replace("Value error, ", "").strip().rstrip(".")
        say(errors.error_line(message, f"see {command} --help"))
        return err.exit_code
    return code if isinstance(code, int) else 0


SHELLS = ("bash", "zsh", "fish", "powershell", "pwsh")


def _shell_named(args: list[str]) -> None:
    """``--show-completion zsh``: Typer takes a shell name only with its shell detection off."""
    for i, arg in enumerate(args[:-1]):
        if arg in ("--show-completion", "--install-completion") and args[i + 1] in SHELLS:
            os.environ["_TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION"] = "1"


def main() -> None:
    """Runs the command line and exits with its code; Ctrl-C at any moment is one line and 130."""
    interrupt.catch()
    native_logs.filter_stderr()
    try:
        code = run()
    except BaseException:
        if interrupt.interrupted():  # a KeyboardInterrupt, or what a library turned it into
            interrupt.leave()
        raise
    if code == interrupt.EXIT_INTERRUPTED or interrupt.interrupted():
        interrupt.leave()  # Typer turns an interrupt in its parsing into a silent 130
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        silence_stdout()
    interrupt.finishing()
    native_logs.restore()
    sys.exit(code)
