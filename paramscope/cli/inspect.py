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
    from paramscope.api import info as read_info

    result = read_info(ckpt, step)
    common.show(result, out.quiet)
    common.emit(result.report, out, show.value if show else None)


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
    reads = norms or stats or digest or sort.strip().lower() == "norm"
    joined = common.join(cluster) if reads else None
    quiet = out.quiet or (joined is not None and not joined.primary)
    ck = common.open_checkpoint(ckpt, sel, quiet, layering, joined)
    result = common.with_progress(
        quiet,
        lambda progress: ck.table(
            norms=norms,
            stats=stats,
            digest=digest,
            wd_include=wd_include,
            wd_exclude=wd_exclude,
            sort=sort,
            top=top,
            **common.reading_options(reading),
            **progress,
        ),
    )
    common.show(result, quiet, ck.warnings)
    common.emit(result.report, out)


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
    ck = common.open_checkpoint(ckpt, sel, out.quiet, layering)
    common.emit(ck.count(depth).report, out, show.value if show else None)


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
    ck = common.open_checkpoint(ckpt, sel, out.quiet)
    result = ck.mask(include, exclude)
    common.show(result, out.quiet, ck.warnings)
    common.emit(result.report, out)
