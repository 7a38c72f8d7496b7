"""Commands that look inside arrays: show (one array, or a slice of it) and export."""

from __future__ import annotations

from typing import Annotated

import typer

from paramscope import errors
from paramscope.cli import common
from paramscope.cli.options import OUTPUT, READING, CkptArg, Output, Selection, with_options

MemoryBudgetOpt = Annotated[
    str | None,
    typer.Option(
        "--memory-budget",
        metavar="SIZE",
        help="Array data held at once, e.g. 512MiB, 4GiB (default: 1/4 of free memory).",
        rich_help_panel=READING,
    ),
]
ForceOpt = Annotated[
    bool, typer.Option("--force", help="Write over an existing file.", rich_help_panel=OUTPUT)
]


@with_options(sel=Selection, out=Output)
def show(
    ckpt: CkptArg,
    path: Annotated[
        str | None,
        typer.Argument(
            metavar="PATH",
            help="The parameter, as `paramscope table` shows it; a numpy slice may follow: 'w[0, :8]'. "
            "Without it, --filter must match one parameter.",
            show_default=False,
        ),
    ] = None,
    slice_text: Annotated[
        str | None,
        typer.Option(
            "--slice", metavar="'[I, J:K, ...]'", help="A numpy slice: integers, start:stop:step, ..."
        ),
    ] = None,
    nonfinite: Annotated[
        bool,
        typer.Option("--nonfinite", help="Where the NaN and Inf are: their count and the first --limit."),
    ] = False,
    limit: Annotated[
        int, typer.Option("--limit", metavar="K", min=1, help="How many NaN/Inf --nonfinite lists.")
    ] = 20,
    top: Annotated[
        int | None,
        typer.Option("--top", metavar="K", min=1, help="The K largest |x| (finite), with their indices."),
    ] = None,
    axis: Annotated[
        list[int] | None,
        typer.Option(
            "--axis",
            metavar="N",
            help="Per index of this axis: norm, max |x|, mean, NaN, Inf (repeatable: per pair of indices).",
        ),
    ] = None,
    plot: Annotated[
        str | None,
        typer.Option(
            "--plot",
            metavar="FILE",
            help="With --axis: bars of the norms (a heatmap for two axes), .png or .svg.",
        ),
    ] = None,
    out_file: Annotated[
        str | None,
        typer.Option(
            "--out",
            metavar="FILE",
            help="Write the array or slice, exact, to a .npy, .npz or .safetensors file.",
            rich_help_panel=OUTPUT,
        ),
    ] = None,
    force: ForceOpt = False,
    memory_budget: MemoryBudgetOpt = None,
    sel: Selection = None,
    out: Output = None,
) -> None:
    """One parameter, or a slice of it: storage, statistics, values; where its NaN/Inf and outliers are.

    Reads only what it shows: a slice reads the chunks it touches; the rest streams the array
    within the memory budget, in one pass.

    Examples:

    - `paramscope show ckpt head.kernel`
    - `paramscope show ckpt 'w[0, :8]'` (a slice)
    - `paramscope show ckpt w --top 5` (largest |x|)
    - `paramscope show ckpt w --axis 0` (per row)
    - `paramscope show ckpt w --nonfinite`
    - `paramscope show ckpt w --out w.npy`
    """
    axes = list(axis or [])
    if plot is not None:
        if not axes or len(axes) > 2:
            raise errors.UsageError("--plot draws --axis: give one axis (bars) or two (a heatmap)")
        common.picture("--plot", plot, [ckpt])
    if out_file is not None:
        common.writable("--out", out_file, [ckpt])
    budget = _budget(memory_budget)
    ck = common.open_checkpoint(ckpt, _unfiltered(sel), out.quiet)
    param, selection, _, _ = ck.plan_show(path, slice_text, sel.filter, axes, out_file, force)
    common.quiet_libraries()
    result = common.with_progress(
        out.quiet,
        lambda progress: (
            _counted(progress, selection.box_count() * param.itemsize)
            and ck.show(
                path,
                index=slice_text,
                filter=sel.filter,
                nonfinite=limit if nonfinite else None,
                top=top,
                axis=axes,
                exact=out.exact,
                out=out_file,
                force=force,
                memory_budget=budget,
                on_bytes=progress.get("on_bytes"),
            )
        ),
    )
    for note in result.warnings[len(ck.warnings) :]:
        common.warn(note, out.quiet, kind="note")
    found = result.value.inspection
    if plot is not None:
        from paramscope.output.plot import plot_axis

        dims = [selection.kept[a] for a in found.axis.axes]
        plot_axis(
            found.axis, dims, plot, title=f"{param.path}{result.value.slice_text or ''}: norm per index"
        )
        common.warn(f"wrote {plot}", out.quiet, kind="note")
    # CSV holds one table: the one the options asked for
    table = "axis" if axes else "top" if top else "nonfinite" if nonfinite else None
    common.emit(result.report, out, table if out.fmt.value == "csv" else None)


@with_options(sel=Selection, out=Output)
def export(
    ckpt: CkptArg,
    target: Annotated[
        str,
        typer.Argument(metavar="OUT", help="The file to write: .safetensors or .npz.", show_default=False),
    ],
    force: ForceOpt = False,
    memory_budget: MemoryBudgetOpt = None,
    sel: Selection = None,
    out: Output = None,
) -> None:
    """Write the selected parameters to one safetensors or npz file, exact; then check its digests.

    Names are the paths paramscope shows. Arrays stream within the memory budget; the file is
    read back and every array's content digest compared with the source's.

    Examples:

    - `paramscope export ckpt w.npz`

    OUT ends in `.npz` or `.safetensors`; `--filter REGEX` exports only the arrays whose path
    matches.
    """
    common.writable("OUT", target, [ckpt])
    budget = _budget(memory_budget)
    ck = common.open_checkpoint(ckpt, sel, out.quiet)
    params = ck.plan_export(target, force)
    common.quiet_libraries()
    result = common.with_progress(
        out.quiet,
        lambda progress: (
            _counted(progress, sum(p.nbytes for p in params))
            and ck.export(target, force=force, memory_budget=budget, on_bytes=progress.get("on_bytes"))
        ),
    )
    for note in result.warnings[len(ck.warnings) :]:
        common.warn(note, out.quiet)
    common.emit(result.report, out)


def _counted(progress: dict, total: int) -> bool:
    """Tells the progress bar how many bytes the command reads; True, to chain a call after it."""
    if progress.get("on_total") is not None:
        progress["on_total"](total)
    return True


def _budget(text: str | None) -> int | None:
    from paramscope.api import parse_size

    return parse_size(text) if text else None


def _unfiltered(sel: Selection) -> Selection:
    """``show`` applies --filter itself (it must match one parameter): the checkpoint is opened
    without it, so that no 'matches no parameter' warning precedes the error saying so."""
    from dataclasses import replace

    return replace(sel, filter=None)
