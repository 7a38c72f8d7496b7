"""Commands that judge a checkpoint: verify, diff, snapshot and check."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from paramscope import errors
from paramscope.cli import common
from paramscope.cli.options import (
    CHECKS,
    OUTPUT,
    SELECTION,
    AtolOpt,
    CkptArg,
    Cluster,
    FilterOpt,
    ItemOpt,
    Layering,
    Output,
    Pairing,
    QuietOpt,
    Reading,
    RtolOpt,
    Selection,
    StepOpt,
    SubtreeOpt,
    TopOpt,
    sort_option,
    with_options,
)
from paramscope.output.reports import DIFF_SORT_KEYS


@with_options(out=Output)
def verify(
    ckpt: CkptArg,
    step: StepOpt = None,
    item: Annotated[
        str | None, typer.Option("--item", metavar="NAME", help="Check only this item (default: all).")
    ] = None,
    memory_budget: Annotated[
        str | None,
        typer.Option("--memory-budget", metavar="SIZE", help="Array data held at once, e.g. 512MiB."),
    ] = None,
    baseline_file: Annotated[
        str | None,
        typer.Option(
            "--baseline",
            "-b",
            metavar="FILE",
            help="Also compare every array's content with the digests a snapshot recorded.",
            rich_help_panel=CHECKS,
        ),
    ] = None,
    out: Output = None,
) -> None:
    """Decode every chunk of every array; check arrays, _METADATA and _sharding agree. Exit 3 on damage.

    Examples:

    - `paramscope verify ckpt --step 400`
    """
    from paramscope.api import verify as run_verify

    budget = common.memory_budget(Reading(memory_budget=memory_budget))
    result = common.with_progress(
        out.quiet,
        lambda progress: run_verify(
            ckpt, step=step, item=item, memory_budget=budget, baseline=baseline_file, **progress
        ),
    )
    common.show(result, out.quiet)
    common.emit(result.report, out)
    found = result.value
    if not found.ok:
        raise common.fail(
            f"{len(found.problems)} problem(s) in {ckpt}",
            "the report on stdout lists them by array"
            + (
                f"; the baseline is of step {found.baseline_step}, not {found.step}"
                if found.baseline_step not in (None, found.step)
                else ""
            ),
            errors.EXIT_CHECKPOINT,
        )


@with_options(out=Output, reading=Reading, cluster=Cluster, layering=Layering, pairing=Pairing)
def diff(
    ckpt_a: Annotated[str, typer.Argument(metavar="A", help="The reference checkpoint.", show_default=False)],
    ckpt_b: Annotated[
        str | None,
        typer.Argument(
            metavar="B",
            help="The checkpoint compared with it (default: A, at another step).",
            show_default=False,
        ),
    ] = None,
    step_a: Annotated[
        int | None,
        typer.Option(
            "--step-a", metavar="N", help="Step of A (default: latest finished).", rich_help_panel=SELECTION
        ),
    ] = None,
    step_b: Annotated[
        int | None,
        typer.Option(
            "--step-b", metavar="N", help="Step of B (default: latest finished).", rich_help_panel=SELECTION
        ),
    ] = None,
    item: ItemOpt = None,
    subtree: SubtreeOpt = None,
    filter: FilterOpt = None,
    rtol: RtolOpt = 0.0,
    atol: AtolOpt = 0.0,
    structure_only: Annotated[
        bool,
        typer.Option(
            "--structure-only",
            help="Compare paths, shapes, dtypes, shardings; read no data.",
            rich_help_panel=CHECKS,
        ),
    ] = False,
    digest_only: Annotated[
        bool,
        typer.Option(
            "--digest-only",
            help="Compare content digests only: each side read once, alone, no statistics.",
            rich_help_panel=CHECKS,
        ),
    ] = False,
    fail_on_change: Annotated[
        bool,
        typer.Option(
            "--fail-on-change",
            help="Exit 1 when anything differs beyond the tolerances.",
            rich_help_panel=CHECKS,
        ),
    ] = False,
    show_all: Annotated[
        bool, typer.Option("--all", help="List identical parameters too.", rich_help_panel=OUTPUT)
    ] = False,
    sort: Annotated[
        str, sort_option(DIFF_SORT_KEYS, "path, cosine: smallest first; others largest first")
    ] = "path",
    top: TopOpt = None,
    layering: Layering = None,
    pairing: Pairing = None,
    out: Output = None,
    reading: Reading = None,
    cluster: Cluster = None,
) -> None:
    """Compare two checkpoints, or two steps of one: added, removed, reshaped, and how values moved.

    Examples:

    - `paramscope diff run --step-a 100`
    - `paramscope diff old new --rtol 1e-3`
    - `paramscope diff a b --map m.toml`
    """
    from paramscope.api import diff as run_diff
    from paramscope.output.reports import diff_summary

    joined = common.join(cluster)
    quiet = out.quiet or not joined.primary
    result = common.with_progress(
        quiet,
        lambda progress: run_diff(
            ckpt_a,
            ckpt_b,
            step_a=step_a,
            step_b=step_b,
            item=item,
            subtree=subtree,
            filter=filter,
            unstack=layering.unstack,
            layer_axis=layering.layer_axis,
            rtol=rtol,
            atol=atol,
            structure_only=structure_only,
            digest_only=digest_only,
            rename=pairing.rename or (),
            transpose=pairing.transpose or (),
            map_file=pairing.map_file,
            show_all=show_all,
            sort=sort,
            top=top,
            cluster=joined,
            **common.reading_options(reading),
            **progress,
        ),
    )
    common.show(result, quiet)
    common.emit(result.report, out)
    if fail_on_change and result.value.differs:
        raise common.fail(
            f"the checkpoints differ: {diff_summary(result.value)}",
            "see the report on stdout",
            errors.EXIT_CHECK_FAILED,
        )


@with_options(sel=Selection, reading=Reading, layering=Layering)
def snapshot(
    ckpt: CkptArg,
    output: Annotated[
        str,
        typer.Option(
            "--output",
            "-o",
            metavar="FILE",
            help="File to write the baseline to ('-': stdout).",
            rich_help_panel=OUTPUT,
        ),
    ] = "-",
    quiet: QuietOpt = False,
    layering: Layering = None,
    sel: Selection = None,
    reading: Reading = None,
) -> None:
    """Write a JSON baseline: structure, counts and every parameter's statistics.

    Examples:

    - `paramscope snapshot ckpt -o b.json`
    """

    from paramscope.output.render import json_lines

    if output != "-":
        common.writable("--output", output, [ckpt])
    ck = common.open_checkpoint(ckpt, sel, quiet, layering)
    if output != "-":
        common.writable("--output", output, [ck.inventory.checkpoint])
    from paramscope.api import key_note

    params = ck.params
    note = key_note(params)
    if note:  # random bits are not numbers: recorded as structure
        common.warn(note, quiet)
    budget = common.memory_budget(reading)
    document = common.with_progress(quiet, lambda progress: ck.snapshot(memory_budget=budget, **progress))
    text = json_lines(document)
    if output == "-":
        sys.stdout.write(text)
        return
    try:
        with open(output, "w") as f:
            f.write(text)
    except OSError as err:
        raise errors.UsageError(
            f"cannot write {output}: {err.strerror}", hint="choose a writable path"
        ) from None
    common.warn(f"wrote {output} ({len(params):,} parameters)", quiet, kind="note")


@with_options(sel=Selection, out=Output, reading=Reading, layering=Layering)
def check(
    ckpt: CkptArg,
    baseline_file: Annotated[
        str,
        typer.Option(
            "--baseline",
            "-b",
            metavar="FILE",
            help="Baseline JSON (snapshot, or table/norms/stats JSON).",
            rich_help_panel=CHECKS,
        ),
    ],
    rtol: RtolOpt = 1e-5,
    atol: AtolOpt = 0.0,
    ignore: Annotated[
        list[str] | None,
        typer.Option(
            "--ignore",
            metavar="REGEX",
            help="Leave out parameters matching (repeatable).",
            rich_help_panel=SELECTION,
        ),
    ] = None,
    only: Annotated[
        list[str] | None,
        typer.Option(
            "--only",
            metavar="WHAT",
            help="Compare only: structure, counts, norms, stats, digests (repeatable).",
            rich_help_panel=CHECKS,
        ),
    ] = None,
    allow_new: Annotated[
        bool,
        typer.Option("--allow-new", help="Parameters absent from the baseline pass.", rich_help_panel=CHECKS),
    ] = False,
    allow_missing: Annotated[
        bool,
        typer.Option("--allow-missing", help="Baseline parameters absent here pass.", rich_help_panel=CHECKS),
    ] = False,
    layering: Layering = None,
    sel: Selection = None,
    out: Output = None,
    reading: Reading = None,
) -> None:
    """Check a checkpoint against a baseline: exit 0 pass, 1 regression, 3 unreadable.

    Examples:

    - `paramscope check ckpt -b b.json`
    """
    from paramscope.api import load_baseline, no_common

    baseline = load_baseline(baseline_file)  # a bad baseline is refused before the checkpoint is read
    ck = common.open_checkpoint(ckpt, sel, out.quiet, layering)
    other = None not in (baseline.step, ck.inventory.step) and baseline.step != ck.inventory.step
    common.quiet_libraries()
    result = common.with_progress(
        out.quiet,
        lambda progress: ck.check(
            baseline_file,
            rtol=rtol,
            atol=atol,
            ignore=ignore or (),
            only=only or (),
            allow_new=allow_new,
            allow_missing=allow_missing,
            memory_budget=common.memory_budget(reading),
            **progress,
        ),
    )
    for note in result.notes:
        common.warn(note, out.quiet, "note")
    for warning in result.warnings:
        if warning not in ck.warnings:
            common.warn(warning, out.quiet)
    violations = result.value
    common.emit(result.report, out)
    if no_common(violations):
        raise common.fail(
            f"no parameter of {ckpt} is in common with {baseline_file}",
            "is it the baseline of another model? see the report on stdout",
            errors.EXIT_CHECK_FAILED,
        )
    if violations:
        raise common.fail(
            f"{len(violations)} regression(s) against {baseline_file}",
            "see the report on stdout"
            + (f"; the baseline is of step {baseline.step}, not {ck.inventory.step}" if other else ""),
            errors.EXIT_CHECK_FAILED,
        )
