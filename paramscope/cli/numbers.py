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
from paramscope.output.reports import (
    LAYERS_SORT_KEYS,
    NORMS_SORT_KEYS,
    OPTIM_SORT_KEYS,
    STATS_SORT_KEYS,
    optim_report,
)


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
    from paramscope.output.reports import norms_report

    joined = common.join(cluster)
    quiet = out.quiet or not joined.primary
    inv, params = common.inventory(ckpt, sel, quiet, layering=layering, cluster=joined)
    result = common.scan(inv, params, False, reading, quiet, joined, digest)
    common.emit(norms_report(inv, params, result, per_param, sort, top), out)
    common.report_nonfinite(result, fail_on_nonfinite, quiet)


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
    from paramscope.output.reports import stats_report

    if plot is not None:
        common.picture("--plot", plot, [ckpt])
    if hist is not None and plot is None and out.fmt.value != "json":  # it would do nothing
        raise errors.UsageError(
            "--hist draws its histogram with --plot (or lists its bins in JSON)",
            hint="add --plot FILE, or -f json",
        )
    joined = common.join(cluster)
    quiet = out.quiet or not joined.primary
    inv, params = common.inventory(ckpt, sel, quiet, layering=layering, cluster=joined)
    if hist is not None and hist not in {p.path for p in inv.params}:
        raise errors.UsageError(
            f"--hist {hist!r} is not a parameter here", hint="give a path `paramscope table` shows"
        )
    result = common.scan(inv, params, True, reading, quiet, joined, digest, histogram=hist)
    report = stats_report(inv, params, result, sort, top)
    if result.histogram is not None:
        report.payload["histogram"] = {
            "path": hist,
            "bins": [{"low": lo, "high": hi, "count": n} for lo, hi, n in result.histogram.bins()],
            "nan": result.histogram.nan,
            "inf": result.histogram.inf,
        }
    if plot is not None:
        from paramscope.output.plot import plot_stats

        rows = [(r.param.path, r.norm) for r in result.params]
        plot_stats(rows, plot, result.histogram, hist or "", title=f"{ckpt}: norms")
        common.warn(f"wrote {plot}", quiet, kind="note")
    common.emit(report, out)
    common.report_nonfinite(result, fail_on_nonfinite, quiet)


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
    from paramscope.compute.layers import layer_table
    from paramscope.output.reports import layers_report

    joined = common.join(cluster)
    quiet = out.quiet or not joined.primary
    layering.unstack = True
    inv, params = common.inventory(ckpt, sel, quiet, layering=layering, cluster=joined)
    inv.views = [v for v in inv.views if v.stack is not None]
    params = [v.info for v in inv.views]
    result = common.scan(inv, params, False, reading, quiet, joined)
    common.emit(layers_report(inv, layer_table(inv.views, result), sort, top), out)


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
    from paramscope.compute.optim import align, optimizer_pass, split_state
    from paramscope.io.inventory import filter_params, open_checkpoint

    def open_item(name):
        inv = open_checkpoint(ckpt, step=step, item=name)
        for warning in inv.warnings:
            common.warn(warning, out.quiet)
        return inv

    from paramscope.io import checkpoint

    items = [i.name for i in checkpoint.locate(ckpt, step).items]
    inv, params, opt = split_state(open_item, items, params_item, opt_item)
    alignment = align(params, opt)
    if layering.unstack or layering.layer_axis:  # per-layer update ratios of scanned stacks
        from paramscope.compute.layers import find_stacks, parse_layer_axes
        from paramscope.compute.optim import unstack_alignment

        stacks, notes = find_stacks(params, parse_layer_axes(layering.layer_axis), inv.custom)
        for note in notes:
            common.warn(note, out.quiet)
        alignment = unstack_alignment(alignment, stacks)
    if filter is not None:
        kept = {p.path for p in filter_params([e.param for e in alignment.entries], filter)}
        alignment.entries = [e for e in alignment.entries if e.path in kept]
    if eps is None:
        eps = 1e-7 if alignment.convention == "keras" else 1e-8
    total = sum(3 * e.param.nbytes for e in alignment.entries)
    common.with_progress(
        total,
        out.quiet,
        lambda on_bytes: optimizer_pass(
            alignment,
            b1=b1,
            b2=b2,
            eps=eps,
            lr=lr,
            memory_budget=common.memory_budget(reading),
            on_bytes=on_bytes,
        ),
    )
    hyper = {"b1": b1, "b2": b2, "eps": eps, "lr": lr, "convention": alignment.convention}
    common.emit(optim_report(inv, alignment, hyper, sort, top), out)
