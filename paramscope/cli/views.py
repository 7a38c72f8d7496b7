"""Commands over a whole run: history."""

from __future__ import annotations

from typing import Annotated

import typer

from paramscope.cli import common
from paramscope.cli.options import (
    OUTPUT,
    SELECTION,
    CkptArg,
    Cluster,
    Layering,
    Output,
    Reading,
    Selection,
    TopOpt,
    choices,
    with_options,
)
from paramscope.output.reports import HISTORY_SORT_KEYS

HistorySort = choices("HistorySort", HISTORY_SORT_KEYS)


@with_options(sel=Selection, out=Output, reading=Reading, layering=Layering, cluster=Cluster)
def history(
    ckpt: CkptArg,
    steps: Annotated[
        str | None,
        typer.Option(
            "--steps",
            metavar="START:STOP[:STRIDE]",
            help="Steps to read (stop included).",
            rich_help_panel=SELECTION,
        ),
    ] = None,
    last: Annotated[
        int | None,
        typer.Option("--last", metavar="K", min=1, help="The last K steps.", rich_help_panel=SELECTION),
    ] = None,
    depth: Annotated[
        int | None,
        typer.Option(
            "--depth", metavar="N", min=0, help="One series per group of N leading path components."
        ),
    ] = None,
    stats: Annotated[
        bool, typer.Option("--stats", help="Also every statistic of stats, per step (JSON, CSV).")
    ] = False,
    plot: Annotated[
        str | None,
        typer.Option(
            "--plot",
            metavar="FILE",
            help="Draw the series to a .png or .svg (needs paramscope[plot]); "
            "a local file outside the checkpoint.",
        ),
    ] = None,
    cache: Annotated[
        str | None,
        typer.Option(
            "--cache",
            metavar="DIR",
            help="Cache folder (default: the user's cache directory); a local folder outside the checkpoint.",
        ),
    ] = None,
    no_cache: Annotated[bool, typer.Option("--no-cache", help="Read every step, keep nothing.")] = False,
    sort: Annotated[
        HistorySort,
        typer.Option(
            "--sort", help="Row order (drift, change, norm: largest first).", rich_help_panel=OUTPUT
        ),
    ] = HistorySort.path,
    top: TopOpt = None,
    sel: Selection = None,
    out: Output = None,
    reading: Reading = None,
    layering: Layering = None,
    cluster: Cluster = None,
) -> None:
    """Every step of a run: each parameter's norm over steps, how much it moved, where NaNs began.

    Examples:

    - `paramscope history run --sort drift`
    - `paramscope history run --plot h.png`
    - `paramscope history run --last 10`
    """
    from paramscope.api import history as run_history

    if plot is not None:
        common.picture("--plot", plot, [ckpt])
    if cache is not None and not no_cache:
        common.writable("--cache", cache, [ckpt], folder=True)
    joined = common.join(cluster)
    result = run_history(
        ckpt,
        steps=steps,
        last=last,
        item=sel.item,
        subtree=sel.subtree,
        filter=sel.filter,
        unstack=layering.unstack,
        layer_axis=layering.layer_axis,
        depth=depth,
        stats=stats,
        sort=sort.value,
        top=top,
        memory_budget=common.memory_budget(reading),
        cache=False if no_cache else (cache or True),
        cluster=joined,
    )
    for warning in result.warnings:
        common.warn(warning, out.quiet or not joined.primary)
    run = result.value
    if plot is not None and run.unstacked:  # a heatmap of every layer of every stack over steps
        from paramscope.output.plot import plot_layer_heatmap

        plot_layer_heatmap(run.layer_rows(), [r.step for r in run.result.steps], plot)
        common.warn(f"wrote {plot}", out.quiet, kind="note")
    elif plot is not None:
        from paramscope.output.plot import plot_history

        plot_history(run.series, plot, top or 8, title=f"{ckpt}: norms over steps")
        common.warn(f"wrote {plot}", out.quiet, kind="note")
    table = "long" if out.fmt.value == "csv" else None
    common.emit(result.report, out, table)
