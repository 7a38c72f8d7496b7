"""Commands that read every value once: norms and stats."""

from __future__ import annotations

from typing import Annotated

import typer

from paramscope import errors
from paramscope.cli import common
from paramscope.cli.options import (
    SELECTION,
    CkptArg,
    Cluster,
    DigestOpt,
    FailOpt,
    FilterOpt,
    Layering,
    Output,
    Reading,
    Selection,
    StepOpt,
    TopOpt,
    sort_option,
    with_options,
)
from paramscope.output.reports import LAYERS_SORT_KEYS, NORMS_SORT_KEYS, OPTIM_SORT_KEYS, STATS_SORT_KEYS


@with_options(sel=Selection, out=Output, reading=Reading, cluster=Cluster, layering=Layering)
def norms(
    ckpt: CkptArg,
    per_param: Annotated[bool, typer.Option("--per-param", help="One row per parameter.")] = False,
    fail_on_nonfinite: FailOpt = False,
    sort: Annotated[str, sort_option(NORMS_SORT_KEYS, "of --per-param; path, others largest first")] = "path",
    top: TopOpt = None,
    digest: DigestOpt = False,
    layering: Layering = None,
    sel: Selection = None,
    out: Output = None,
    reading: Reading = None,
    cluster: Cluster = None,
) -> None:
    """Global L2 norm, and per-parameter norms, in one streaming pass (float64 on the host).

    Examples:

    - `paramscope norms ckpt --per-param`
    - `paramscope norms ckpt -f json`
    """
    joined = common.join(cluster)
    quiet = out.quiet or not joined.primary
    ck = common.open_checkpoint(ckpt, sel, quiet, layering, joined)
    result = common.with_progress(
        quiet,
        lambda progress: ck.norms(
            per_param, digest=digest, sort=sort, top=top, **common.reading_options(reading), **progress
        ),
    )
    common.show(result, quiet, ck.warnings)
    common.emit(result.report, out)
    common.report_nonfinite(result.value, fail_on_nonfinite, quiet)


@with_options(sel=Selection, out=Output, reading=Reading, cluster=Cluster, layering=Layering)
def stats(
    ckpt: CkptArg,
    fail_on_nonfinite: FailOpt = False,
    sort: Annotated[str, sort_option(STATS_SORT_KEYS, "path, others largest first")] = "path",
    top: TopOpt = None,
    digest: DigestOpt = False,
    plot: Annotated[
        str | None,
        typer.Option(
            "--plot",
            metavar="FILE",
            help="Draw each parameter's norm (.png, .svg, .pdf or any format matplotlib writes; "
            "paramscope[plot]); "
            "a local file outside the checkpoint.",
        ),
    ] = None,
    hist: Annotated[
        str | None,
        typer.Option(
            "--hist", metavar="PATH", help="With --plot: also a histogram of this parameter's values."
        ),
    ] = None,
    layering: Layering = None,
    sel: Selection = None,
    out: Output = None,
    reading: Reading = None,
    cluster: Cluster = None,
) -> None:
    """Per parameter, in one pass: norm, mean, std, min, max, max |x|, zero fraction, NaN and Inf.

    Mean, std, min and max are over the finite values; NaN and Inf are counted.

    Examples:

    - `paramscope stats ckpt --sort std`
    - `paramscope stats ckpt -f csv`
    """
    if plot is not None:
        common.picture("--plot", plot, [ckpt])
    if hist is not None and plot is None and out.fmt.value != "json":  # it would do nothing
        raise errors.UsageError(
            "--hist draws its histogram with --plot (or lists its bins in JSON)",
            hint="add --plot FILE, or -f json",
        )
    joined = common.join(cluster)
    quiet = out.quiet or not joined.primary
    ck = common.open_checkpoint(ckpt, sel, quiet, layering, joined)
    result = common.with_progress(
        quiet,
        lambda progress: ck.stats(
            digest=digest,
            histogram=hist,
            sort=sort,
            top=top,
            **common.reading_options(reading),
            **progress,
        ),
    )
    common.show(result, quiet, ck.warnings)
    scanned = result.value
    if plot is not None:
        from paramscope.output.plot import plot_stats

        rows = [(r.param.path, r.norm) for r in scanned.params]
        plot_stats(rows, plot, scanned.histogram, hist or "", title=f"{ckpt}: norms")
        common.warn(f"wrote {plot}", quiet, kind="note")
    common.emit(result.report, out)
    common.report_nonfinite(scanned, fail_on_nonfinite, quiet)


@with_options(sel=Selection, out=Output, reading=Reading, cluster=Cluster, layering=Layering)
def layers(
    ckpt: CkptArg,
    sort: Annotated[str, sort_option(LAYERS_SORT_KEYS, "norm: largest first")] = "layer",
    top: TopOpt = None,
    sel: Selection = None,
    out: Output = None,
    reading: Reading = None,
    cluster: Cluster = None,
    layering: Layering = None,
) -> None:
    """One row per layer of every scanned stack: its norm and the norm of each of its arrays.

    Examples:

    - `paramscope layers ckpt --sort norm`
    - `paramscope layers ckpt -f csv`
    """
    joined = common.join(cluster)
    quiet = out.quiet or not joined.primary
    layering.unstack = True
    ck = common.open_checkpoint(ckpt, sel, quiet, layering, joined)
    result = common.with_progress(
        quiet,
        lambda progress: ck.layers(sort=sort, top=top, **common.reading_options(reading), **progress),
    )
    common.show(result, quiet, ck.warnings)
    common.emit(result.report, out)


@with_options(out=Output, reading=Reading, layering=Layering)
def optim(
    ckpt: CkptArg,
    step: StepOpt = None,
    params_item: Annotated[
        str | None,
        typer.Option(
            "--params-item", metavar="NAME", help="Item of the parameters.", rich_help_panel=SELECTION
        ),
    ] = None,
    opt_item: Annotated[
        str | None,
        typer.Option(
            "--opt-item", metavar="NAME", help="Item of the optimizer state.", rich_help_panel=SELECTION
        ),
    ] = None,
    filter: FilterOpt = None,
    b1: Annotated[float, typer.Option("--b1", metavar="X", help="Adam's b1 (optax default).")] = 0.9,
    b2: Annotated[float, typer.Option("--b2", metavar="X", help="Adam's b2 (optax default).")] = 0.999,
    eps: Annotated[
        float | None,
        typer.Option("--eps", metavar="X", help="Adam's eps (default: optax's 1e-8; Keras' 1e-7)."),
    ] = None,
    lr: Annotated[
        float | None,
        typer.Option("--lr", metavar="X", help="Learning rate: the ratio becomes lr*||update||/||param||."),
    ] = None,
    sort: Annotated[str, sort_option(OPTIM_SORT_KEYS, "path, others largest first")] = "path",
    top: TopOpt = None,
    layering: Layering = None,
    out: Output = None,
    reading: Reading = None,
) -> None:
    """Each parameter beside its Adam-family optimizer state: moments, step and the update it makes.

    Examples:

    - `paramscope optim ckpt --sort ratio`
    - `paramscope optim ckpt --lr 3e-4`
    """
    from paramscope.api import optim as run_optim

    result = common.with_progress(
        out.quiet,
        lambda progress: run_optim(
            ckpt,
            step=step,
            params_item=params_item,
            opt_item=opt_item,
            filter=filter,
            unstack=layering.unstack,
            layer_axis=layering.layer_axis,
            b1=b1,
            b2=b2,
            eps=eps,
            lr=lr,
            sort=sort,
            top=top,
            memory_budget=common.memory_budget(reading),
            **progress,
        ),
    )
    common.show(result, out.quiet)
    common.emit(result.report, out)
