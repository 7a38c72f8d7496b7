"""Commands over a whole run: history."""

from __future__ import annotations

from typing import Annotated

import typer

from paramscope import errors
from paramscope.cli import common
from paramscope.cli.options import (
    SELECTION,
    Cluster,
    FailOpt,
    Layering,
    Output,
    Reading,
    RunArg,
    Selection,
    TopOpt,
    sort_option,
    with_options,
)
from paramscope.output.reports import HISTORY_SORT_KEYS


@with_options(sel=Selection, out=Output, reading=Reading, layering=Layering, cluster=Cluster)
def history(
    ckpt: RunArg,
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
            help="Draw the series (.png, .svg, .pdf or any format matplotlib writes; needs "
            "paramscope[plot]); "
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
    sort: Annotated[str, sort_option(HISTORY_SORT_KEYS, "drift, change, norm: largest first")] = "path",
    top: TopOpt = None,
    fail_on_nonfinite: FailOpt = False,
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

    if sel.step is not None:  # it would do nothing: history reads every step
        raise errors.UsageError(
            f"history reads a run of steps; --step {sel.step} picks one",
            hint=f"use --steps {sel.step}:{sel.step} or --last K; for one step, norms or stats",
        )
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
        sort=sort,
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
    damaged = sorted(run.result.damaged)
    if damaged:  # every other step's numbers are above; the run still has a checkpoint problem
        raise common.fail(
            f"{len(damaged)} damaged step(s) left out of the history: {errors.few(damaged)}",
            "the warnings above say why; the other steps' numbers are complete",
            errors.EXIT_CHECKPOINT,
        )
    first_bad = run.result.first_nonfinite()
    if fail_on_nonfinite and first_bad is not None:
        raise common.fail(
            f"NaN/Inf in the run, first at step {first_bad[0]}: {errors.few(first_bad[1])}",
            "see the NaN/Inf column and the long form's nonfinite counts",
            errors.EXIT_CHECK_FAILED,
        )
