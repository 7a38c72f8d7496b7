"""Options declared once: each group a dataclass, added to a command by :func:`with_options`.

A command names the groups it takes (``@with_options(sel=Selection, out=Output)``) and receives
one instance of each; Typer sees the group's options in the command's signature, in the help
panel the group names. Completion of ``--step`` and ``--item`` reads the checkpoint's folder
listing only (no jax, no TensorStore).
"""

from __future__ import annotations

import functools
import inspect
import typing
from dataclasses import dataclass, fields
from enum import Enum
from typing import Annotated

import typer

from paramscope.errors import UsageError
from paramscope.output.render import Format

SELECTION = "Selection"
OUTPUT = "Output"
READING = "Reading"
CLUSTER = "Cluster (jax.distributed)"
CHECKS = "Checks"
PAIRING = "Pairing (A's paths renamed to B's)"


# ----------------------------------------------------------------------------------------------
# Completion: cheap, from the folder listing


def _typed_checkpoint(ctx: typer.Context) -> str | None:
    """The checkpoint typed so far (while completing, click may leave it among the extra args)."""
    return ctx.params.get("ckpt") or ctx.params.get("ckpt_a") or next(iter(ctx.args), None)


def _complete_steps(ctx: typer.Context, incomplete: str) -> list[str]:
    from paramscope.api import steps as list_steps

    path = _typed_checkpoint(ctx)
    try:
        steps = list_steps(path) if path else []
    except Exception:  # completion never fails loudly
        return []
    return [str(s.step) for s in steps if s.finished and str(s.step).startswith(incomplete)]


def _complete_items(ctx: typer.Context, incomplete: str) -> list[str]:
    from paramscope.api import items

    path = _typed_checkpoint(ctx)
    step = ctx.params.get("step")
    try:
        found = items(path, step) if path else []
    except Exception:
        return []
    names = [i.name for i in found if i.kind != "json"]
    return [n for n in names if n.startswith(incomplete)]


# ----------------------------------------------------------------------------------------------
# Single options, shared by several commands

CkptArg = Annotated[
    str,
    typer.Argument(
        metavar="CKPT",
        help="Checkpoint: a local folder or file, or a gs:// or s3:// URL: a CheckpointManager root, a "
        "step or item folder, a .safetensors file or set, a flax .msgpack file, an .npz or Equinox file, "
        "a zarr tree (paramscope --help lists every kind).",
        show_default=False,
    ),
]
RunArg = Annotated[
    str,
    typer.Argument(
        metavar="ROOT",
        help="A run: a folder of steps, local or a gs:// or s3:// URL (a CheckpointManager root, a "
        "folder of flax checkpoint_N files, a Levanter run); not one step or item folder.",
        show_default=False,
    ),
]
StepOpt = Annotated[
    int | None,
    typer.Option(
        "--step",
        metavar="N",
        help="Step to read (default: the latest finished step).",
        autocompletion=_complete_steps,
        rich_help_panel=SELECTION,
    ),
]
ItemOpt = Annotated[
    str | None,
    typer.Option(
        "--item",
        metavar="NAME",
        help="Item to read (default: params, else the only pytree item, else all of them).",
        autocompletion=_complete_items,
        rich_help_panel=SELECTION,
    ),
]
SubtreeOpt = Annotated[
    str | None,
    typer.Option(
        "--subtree",
        metavar="PREFIX",
        help="Keep one dotted subtree, e.g. params; paths become relative to it.",
        rich_help_panel=SELECTION,
    ),
]
FilterOpt = Annotated[
    str | None,
    typer.Option(
        "--filter",
        metavar="REGEX",
        help="Keep parameters whose path matches this regex.",
        rich_help_panel=SELECTION,
    ),
]
QuietOpt = Annotated[
    bool, typer.Option("--quiet", "-q", help="No warnings or progress on stderr.", rich_help_panel=OUTPUT)
]
FailOpt = Annotated[
    bool,
    typer.Option("--fail-on-nonfinite", help="Exit 1 if any value is NaN or Inf.", rich_help_panel=CHECKS),
]
DigestOpt = Annotated[
    bool,
    typer.Option(
        "--digest",
        help="Add each parameter's content digest (BLAKE3 of its bytes), in the same pass.",
        rich_help_panel=CHECKS,
    ),
]
TopOpt = Annotated[
    int | None,
    typer.Option("--top", metavar="K", min=1, help="Show only the first K rows.", rich_help_panel=OUTPUT),
]
RtolOpt = Annotated[
    float,
    typer.Option(
        "--rtol",
        metavar="X",
        min=0,
        help="Relative tolerance: |a - b| <= atol + rtol * |a|.",
        rich_help_panel=CHECKS,
    ),
]
AtolOpt = Annotated[
    float, typer.Option("--atol", metavar="X", min=0, help="Absolute tolerance.", rich_help_panel=CHECKS)
]


def sort_option(keys: tuple[str, ...], order: str):
    """``--sort COLUMN``: one of ``keys``, named by its key or its header as a table shows it (in
    any case); ``order`` says which way rows go. The command gets the key."""
    from paramscope.output.fields import field, resolve
    from paramscope.output.render import column_names

    def to_key(value: str) -> str:
        try:
            return resolve(value, keys)
        except UsageError as err:
            raise typer.BadParameter(f"{value!r}: {err.hint}") from None

    return typer.Option(
        "--sort",
        metavar="COLUMN",
        callback=to_key,
        help=f"Row order ({order}): {column_names([field(k) for k in keys])}.",
        rich_help_panel=OUTPUT,
    )


class Engine(str, Enum):
    auto = "auto"
    host = "host"
    mesh = "mesh"


# ----------------------------------------------------------------------------------------------
# Groups


@dataclass
class Selection:
    """Which step, item, subtree and parameters a command reads."""

    step: StepOpt = None
    item: ItemOpt = None
    subtree: SubtreeOpt = None
    filter: FilterOpt = None


@dataclass
class Output:
    """How the report is shown."""

    fmt: Annotated[
        Format,
        typer.Option("--format", "-f", help="Output format.", case_sensitive=False, rich_help_panel=OUTPUT),
    ] = Format.table
    columns: Annotated[
        str | None,
        typer.Option(
            "--columns",
            metavar="COL,COL...",
            help="Show these columns, in this order (names as in --format csv, or headers as shown); on a "
            "narrow terminal the path folds first, then the last named are hidden.",
            rich_help_panel=OUTPUT,
        ),
    ] = None
    exact: Annotated[
        bool,
        typer.Option(
            "--exact", help="Every digit: no abbreviated counts, floats in full.", rich_help_panel=OUTPUT
        ),
    ] = False
    quiet: QuietOpt = False

    @property
    def column_keys(self) -> list[str] | None:
        return [c.strip() for c in self.columns.split(",") if c.strip()] if self.columns else None


@dataclass
class Reading:
    """How array data is read and reduced."""

    mesh: Annotated[
        str | None,
        typer.Option(
            "--mesh",
            metavar="AXIS=N,...",
            help="Device mesh (default: all local devices, shaped like the saved mesh).",
            rich_help_panel=READING,
        ),
    ] = None
    engine: Annotated[
        Engine,
        typer.Option(
            "--engine",
            help="auto: mesh with an accelerator or --mesh, else host; host: numpy in float64; "
            "mesh: jax on the device mesh.",
            case_sensitive=False,
            rich_help_panel=READING,
        ),
    ] = Engine.auto
    memory_budget: Annotated[
        str | None,
        typer.Option(
            "--memory-budget",
            metavar="SIZE",
            help="Array data held at once, e.g. 512MiB, 4GiB (default: 1/4 of free memory).",
            rich_help_panel=READING,
        ),
    ] = None


@dataclass
class Cluster:
    """How this process joins others through jax.distributed."""

    distributed: Annotated[
        bool,
        typer.Option(
            "--distributed",
            help="Join the processes of a cluster launcher (SLURM, TPU pod) via jax.distributed.",
            rich_help_panel=CLUSTER,
        ),
    ] = False
    coordinator: Annotated[
        str | None,
        typer.Option(
            "--coordinator",
            metavar="HOST:PORT",
            help="Coordinator of N processes started by hand (env PARAMSCOPE_COORDINATOR).",
            rich_help_panel=CLUSTER,
        ),
    ] = None
    num_processes: Annotated[
        int | None,
        typer.Option(
            "--num-processes",
            metavar="N",
            help="Number of processes (env PARAMSCOPE_NUM_PROCESSES).",
            rich_help_panel=CLUSTER,
        ),
    ] = None
    process_id: Annotated[
        int | None,
        typer.Option(
            "--process-id",
            metavar="I",
            help="This process, 0..N-1 (env PARAMSCOPE_PROCESS_ID).",
            rich_help_panel=CLUSTER,
        ),
    ] = None
    timeout: Annotated[
        float,
        typer.Option(
            "--timeout",
            metavar="SECONDS",
            min=1,
            help="Seconds a process waits for the others before exit 3.",
            rich_help_panel=CLUSTER,
        ),
    ] = 300


@dataclass
class Layering:
    """Whether stacked (scanned) layers are shown one row per layer."""

    unstack: Annotated[
        bool,
        typer.Option(
            "--unstack",
            help="One row per layer of scanned (stacked) arrays, the layer index a path component.",
            rich_help_panel=SELECTION,
        ),
    ] = False
    layer_axis: Annotated[
        list[str] | None,
        typer.Option(
            "--layer-axis",
            metavar="REGEX=AXIS",
            help="The layer axis of arrays whose path matches (repeatable; settles --unstack's guesses).",
            rich_help_panel=SELECTION,
        ),
    ] = None


@dataclass
class Pairing:
    """How the arrays of two checkpoints saved under different names are paired."""

    rename: Annotated[
        list[str] | None,
        typer.Option(
            "--rename",
            metavar="REGEX=REPL",
            help="Rename A's paths with re.sub before pairing (repeatable, in order; `\\1`, `\\g<name>`; "
            "a literal `=` in REGEX: `\\=`).",
            rich_help_panel=PAIRING,
        ),
    ] = None
    transpose: Annotated[
        list[str] | None,
        typer.Option(
            "--transpose",
            metavar="REGEX",
            help="Compare A's arrays whose renamed path matches transposed, A.T (repeatable).",
            rich_help_panel=PAIRING,
        ),
    ] = None
    map_file: Annotated[
        str | None,
        typer.Option(
            "--map",
            metavar="FILE",
            help="JSON or TOML (*.toml) file of rules: `rename = [[REGEX, REPL], ...]`, "
            "`transpose = [REGEX, ...]`, `unstack = true`; --rename and --transpose apply after it.",
            rich_help_panel=PAIRING,
        ),
    ] = None


def with_options(**groups: type) -> typing.Callable:
    """Adds the options of each group (a dataclass) to a command; it receives one instance each.

    ``@with_options(out=Output)`` on ``def cmd(ckpt, out: Output)``: Typer sees ``--format``,
    ``--columns``, ... in place of ``out``, and the command gets ``Output(fmt=..., ...)``.
    """

    def decorate(command):
        signature = inspect.signature(command)
        params = [p for p in signature.parameters.values() if p.name not in groups]
        hints = typing.get_type_hints(command, include_extras=True)
        params = [p.replace(annotation=hints.get(p.name, p.annotation)) for p in params]
        members = {}
        for name, group in groups.items():
            group_hints = typing.get_type_hints(group, include_extras=True)
            members[name] = [f.name for f in fields(group)]
            params += [
                inspect.Parameter(
                    f.name, inspect.Parameter.KEYWORD_ONLY, annotation=group_hints[f.name], default=f.default
                )
                for f in fields(group)
            ]

        @functools.wraps(command)
        def wrapper(*args, **kwargs):
            for name, group in groups.items():
                kwargs[name] = group(**{key: kwargs.pop(key) for key in members[name]})
            return command(*args, **kwargs)

        del wrapper.__wrapped__  # Typer must read the new signature, not the command's
        wrapper.__signature__ = signature.replace(parameters=params)
        wrapper.__annotations__ = {p.name: p.annotation for p in params}
        return wrapper

    return decorate
