"""Commands over a whole run: history."""

from __future__ import annotations

from typing import Annotated

import typer

from paramscope import errors
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
    import os

    from paramscope.compute.history import HistoryCache, history, parse_steps, series
    from paramscope.io import checkpoint
    from paramscope.io.inventory import filter_params, open_checkpoint
    from paramscope.io.storage import Tree
    from paramscope.output.reports import history_report

    if plot is not None:
        common.picture("--plot", plot, [ckpt])
    if cache is not None and not no_cache:
        common.writable("--cache", cache, [ckpt], folder=True)
    root = Tree(ckpt)  # listed once, each step's metadata read once, for every step
    location = checkpoint.locate(root, None, allow_unfinished=True)
    if location.kind != "root":
        raise common.fail(
            f"{ckpt} is a single checkpoint, not a run of steps",
            "history reads a manager root (a folder of steps); for one checkpoint use norms or stats",
            3,
        )
    available = [s.step for s in location.steps if s.finished]
    chosen = parse_steps(steps, available, last)
    if not chosen:
        hint = f"finished steps: {errors.few(available)}"
        raise common.fail(f"no finished step of {ckpt} is selected", hint, 3)

    def open_step(step):
        inv = open_checkpoint(ckpt, step=step, item=sel.item, subtree=sel.subtree, tree=root)
        params = inv.params
        if layering.unstack or layering.layer_axis:  # one series per layer of stacked arrays
            from paramscope.compute.layers import find_stacks, parse_layer_axes, unstack

            stacks, _ = find_stacks(params, parse_layer_axes(layering.layer_axis), inv.custom)
            params = [view.info for view in unstack(params, stacks)]
        return inv, filter_params(params, sel.filter)

    def stamp_of(step):
        return checkpoint.data_stamp(checkpoint.locate(root, step))

    joined = common.join(cluster)
    if joined.active and not no_cache:
        # the processes must agree on which steps to read: none keeps a cache of its own
        common.warn("the history cache is not used under --distributed", out.quiet or not joined.primary)
    keeper = None
    if not no_cache and not joined.active:
        import platformdirs

        folder = cache or os.path.join(platformdirs.user_cache_dir("paramscope"), "history")
        keeper = HistoryCache(
            folder,
            location.path,
            {
                "item": sel.item,
                "subtree": sel.subtree,
                "filter": sel.filter,
                "unstack": bool(layering.unstack or layering.layer_axis),
                "layer_axis": layering.layer_axis,
            },
        )
    budget = common.memory_budget(reading)
    result = history(chosen, stamp_of, open_step, stats, budget, keeper, cluster=joined)
    for warning in result.warnings:
        common.warn(warning, out.quiet)
    inv = open_checkpoint(ckpt, step=chosen[-1], item=sel.item, subtree=sel.subtree, tree=root)
    runs = series(result, depth)
    first_bad = result.first_nonfinite()
    if first_bad is not None:
        common.warn(f"NaN/Inf first at step {first_bad[0]}: {', '.join(first_bad[1][:5])}", out.quiet)
    unstacked = [p for p in open_step(chosen[-1])[1] if p.layer is not None]
    if plot is not None and unstacked:  # a heatmap of every layer of every stack over steps
        from paramscope.compute.history import layer_rows
        from paramscope.output.plot import plot_layer_heatmap

        plot_layer_heatmap(layer_rows(result, unstacked), [r.step for r in result.steps], plot)
        common.warn(f"wrote {plot}", out.quiet, kind="note")
    elif plot is not None:
        from paramscope.output.plot import plot_history

        plot_history(runs, plot, top or 8, title=f"{ckpt}: norms over steps")
        common.warn(f"wrote {plot}", out.quiet, kind="note")
    table = "long" if out.fmt.value == "csv" else None
    common.emit(history_report(inv, result, runs, stats, sort.value, top), out, table)
