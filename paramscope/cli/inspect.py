"""Commands that describe a checkpoint from its metadata: info, table, count, mask."""

from __future__ import annotations

from enum import Enum
from typing import Annotated

import typer

from paramscope.cli import common
from paramscope.cli.options import (
    OUTPUT,
    CkptArg,
    Cluster,
    DigestOpt,
    Layering,
    Output,
    Reading,
    Selection,
    StepOpt,
    TopOpt,
    sort_option,
    with_options,
)
from paramscope.output.reports import TABLE_SORT_KEYS


class InfoTable(str, Enum):
    items = "items"
    steps = "steps"


class CountTable(str, Enum):
    groups = "groups"
    dtypes = "dtypes"


@with_options(out=Output)
def info(
    ckpt: CkptArg,
    step: StepOpt = None,
    show: Annotated[
        InfoTable | None,
        typer.Option("--show", help="Only this table (CSV shows items unless told).", rich_help_panel=OUTPUT),
    ] = None,
    out: Output = None,
) -> None:
    """Steps, items, storage format, size on disk and array counts of a checkpoint.

    Examples:

    - `paramscope info ckpt`
    - `paramscope info ckpt --show steps`
    """
    from paramscope.io.inventory import checkpoint_info
    from paramscope.output.reports import info_report

    result = checkpoint_info(ckpt, step)
    for warning in result.warnings:
        common.warn(warning, out.quiet)
    common.emit(info_report(result), out, show.value if show else None)


@with_options(sel=Selection, out=Output, reading=Reading, cluster=Cluster, layering=Layering)
def table(
    ckpt: CkptArg,
    norms: Annotated[
        bool, typer.Option("--norms", help="Add each parameter's L2 norm (reads the data).")
    ] = False,
    stats: Annotated[
        bool, typer.Option("--stats", help="Add norm, mean, std, min, max, zeros, NaN, Inf (reads the data).")
    ] = False,
    wd_include: Annotated[
        list[str] | None,
        typer.Option(
            "--wd-include", metavar="REGEX", help="Weight decay only for paths matching (repeatable)."
        ),
    ] = None,
    wd_exclude: Annotated[
        list[str] | None,
        typer.Option(
            "--wd-exclude", metavar="REGEX", help="Weight decay for all but paths matching (repeatable)."
        ),
    ] = None,
    sort: Annotated[str, sort_option(TABLE_SORT_KEYS, "count, bytes, norm: largest first")] = "path",
    top: TopOpt = None,
    digest: DigestOpt = False,
    layering: Layering = None,
    sel: Selection = None,
    out: Output = None,
    reading: Reading = None,
    cluster: Cluster = None,
) -> None:
    """One row per parameter: path, shape, dtype, count, bytes, saved sharding.

    Examples:

    - `paramscope table ckpt --sort count`
    - `paramscope table ckpt --norms`
    - `paramscope table ckpt --top 20`
    """
    from paramscope.output.reports import table_report

    reads = norms or stats or digest or sort == "norm"
    joined = common.join(cluster) if reads else None
    quiet = out.quiet or (joined is not None and not joined.primary)
    inv, params = common.inventory(ckpt, sel, quiet, layering=layering, cluster=joined)
    mask = None
    if wd_include or wd_exclude:
        mask = common.weight_decay_mask(params, wd_include, wd_exclude, quiet)
    result = common.scan(inv, params, stats, reading, quiet, joined, digest) if reads else None
    from paramscope.api import scalar_values

    inv.values = inv.values + scalar_values(params)
    stacked = {v.info.path: f"axis {v.stack.axis}, {v.stack.rule}" for v in inv.views or () if v.stack}
    report = table_report(inv, params, mask, result, full=stats, sort=sort, top=top, stacked=stacked)
    common.emit(report, out)


@with_options(sel=Selection, out=Output, layering=Layering)
def count(
    ckpt: CkptArg,
    depth: Annotated[
        int, typer.Option("--depth", metavar="N", min=0, help="Group by this many leading path components.")
    ] = 1,
    show: Annotated[
        CountTable | None,
        typer.Option(
            "--show", help="Only this table (CSV shows groups unless told).", rich_help_panel=OUTPUT
        ),
    ] = None,
    layering: Layering = None,
    sel: Selection = None,
    out: Output = None,
) -> None:
    """Total parameters and bytes, by dtype and by path prefix.

    Examples:

    - `paramscope count ckpt --depth 2`
    - `paramscope count ckpt --show dtypes`
    """
    from paramscope.io.inventory import count_params
    from paramscope.output.reports import count_report

    inv, params = common.inventory(ckpt, sel, out.quiet, layering=layering)
    common.emit(count_report(inv, count_params(params, depth), depth), out, show.value if show else None)


@with_options(sel=Selection, out=Output)
def mask(
    ckpt: CkptArg,
    include: Annotated[
        list[str] | None,
        typer.Option("--include", metavar="REGEX", help="Decay only parameters matching (repeatable)."),
    ] = None,
    exclude: Annotated[
        list[str] | None,
        typer.Option("--exclude", metavar="REGEX", help="Decay all but parameters matching (repeatable)."),
    ] = None,
    sel: Selection = None,
    out: Output = None,
) -> None:
    """The weight-decay mask that include or exclude regexes give (as get_param_mask_fn).

    Examples:

    - `paramscope mask ckpt --exclude bias`
    - `paramscope mask ckpt -f json`
    """
    from paramscope.output.reports import mask_report

    inv, params = common.inventory(ckpt, sel, out.quiet)
    common.emit(mask_report(inv, common.weight_decay_mask(params, include, exclude, out.quiet)), out)
