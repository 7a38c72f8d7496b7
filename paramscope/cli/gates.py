"""Commands that judge a checkpoint: verify, diff, snapshot and check."""

from __future__ import annotations

import sys
from dataclasses import replace
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
    from paramscope.compute.plan import parse_size
    from paramscope.compute.verify import verify_checkpoint
    from paramscope.io import checkpoint
    from paramscope.output.reports import verify_report

    budget = parse_size(memory_budget) if memory_budget else None
    digests = None
    if baseline_file is not None:
        from paramscope.compute.baseline import load_baseline

        baseline = load_baseline(baseline_file)
        digests = baseline.digests_by_item()
        if not digests:
            raise errors.UsageError(
                f"baseline {baseline_file} records no digests",
                hint="write it with this `paramscope snapshot`",
            )
    result = common.with_progress(
        checkpoint.step_bytes(ckpt, step),
        out.quiet,
        lambda on_bytes: verify_checkpoint(ckpt, step, item, budget, on_bytes, digests),
    )
    if baseline_file is not None:
        _note_other_step(baseline_file, baseline.step, result.step, out.quiet)
    common.emit(verify_report(result, ckpt), out)
    if not result.ok:
        raise common.fail(
            f"{len(result.problems)} problem(s) in {ckpt}",
            "the report on stdout lists them by array",
            errors.EXIT_CHECKPOINT,
        )


def _note_other_step(baseline_file: str, recorded: int | None, step: int | None, quiet: bool) -> None:
    """A baseline of another step than the one read differs in content without any damage: say so."""
    if recorded is not None and step is not None and recorded != step:
        common.warn(
            f"{baseline_file} is a baseline of step {recorded}; step {step} is compared with it",
            quiet,
            "note",
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
    from paramscope.compute.baseline import baseline_at
    from paramscope.output.reports import diff_report, diff_summary

    rules = _pairing_rules(pairing)
    if ckpt_b is None and step_a is None and step_b is None:  # a run: its two latest steps
        from paramscope.api import last_two_steps

        step_a, step_b = last_two_steps(ckpt_a)
        common.warn(f"comparing step {step_a} with step {step_b}, the latest two", out.quiet, "note")
    baseline = baseline_at(ckpt_b) if ckpt_b is not None else None  # by content: an index is JSON too
    against_baseline = baseline is not None
    if rules.transpose and (digest_only or against_baseline):
        raise errors.UsageError(
            "--transpose needs the values of both sides: "
            + ("--digest-only" if digest_only else "a baseline")
            + " compares digests of bytes in stored order",
            hint="compare two checkpoints without --digest-only; that diff reports both digests too",
        )
    if rules.unstack and not layering.unstack:
        layering = replace(layering, unstack=True)
    joined = common.join(cluster)
    quiet = out.quiet or not joined.primary
    sel = Selection(item=item, subtree=subtree, filter=filter)
    inv_a, params_a = common.inventory(ckpt_a, sel, quiet, step=step_a, layering=layering, cluster=joined)
    inv_a.views = None  # a diff reads each (layer) parameter by itself, on both sides alike
    if rules.active:
        from paramscope.compute.pairing import unused_rules

        for note in unused_rules([p.path for p in params_a], rules):
            common.warn(note, quiet)
    if against_baseline:
        inv_b, result = _against_baseline(
            inv_a, params_a, ckpt_b, baseline, sel, reading, quiet, joined, rules
        )
    else:
        inv_b, params_b = common.inventory(
            ckpt_b or ckpt_a, sel, quiet, step=step_b, layering=layering, cluster=joined
        )
        inv_b.views = None
        if digest_only:
            result = _by_digest(inv_a, params_a, inv_b, params_b, reading, quiet, joined, rules)
        else:
            from paramscope.api import unchanged_after

            result = unchanged_after(
                inv_a,
                lambda: unchanged_after(
                    inv_b,
                    lambda: _by_value(
                        params_a, params_b, rtol, atol, structure_only, reading, quiet, joined, rules
                    ),
                ),
            )
    values = not (structure_only or digest_only or against_baseline)
    common.emit(diff_report(inv_a, inv_b, result, values, show_all, sort, top), out)
    if fail_on_change and result.differs:
        raise common.fail(
            f"the checkpoints differ: {diff_summary(result)}",
            "see the report on stdout",
            errors.EXIT_CHECK_FAILED,
        )


def _pairing_rules(pairing: Pairing):
    """The rules of ``--map``, then those of ``--rename`` and ``--transpose``."""
    from paramscope.compute.pairing import NO_RULES, command_line_rules, load_map

    from_file = load_map(pairing.map_file) if pairing.map_file is not None else NO_RULES
    return from_file.then(command_line_rules(pairing.rename, pairing.transpose))


def _by_value(params_a, params_b, rtol, atol, structure_only, reading, quiet, joined, rules):
    """Both sides read together, region by region: how every value moved."""
    from paramscope.compute.diff import diff_params

    budget = common.memory_budget(reading)
    total = 2 * sum(p.nbytes for p in params_a) if not structure_only else 0
    return common.with_progress(
        total,
        quiet,
        lambda on_bytes: diff_params(
            params_a,
            params_b,
            rtol=rtol,
            atol=atol,
            values=not structure_only,
            memory_budget=budget,
            on_bytes=on_bytes,
            cluster=joined,
            rules=rules,
        ),
    )


def _digests(inv, params, reading, quiet, joined) -> dict[str, str]:
    result = common.scan(inv, params, False, reading, quiet, joined, digest=True)
    return {r.param.path: r.digest for r in result.params}


def _by_digest(inv_a, params_a, inv_b, params_b, reading, quiet, joined, rules):
    """Each side read once, alone: identical where the content digests agree."""
    from paramscope.compute.diff import diff_digests

    digests_a = _digests(inv_a, params_a, reading, quiet, joined)
    digests_b = _digests(inv_b, params_b, reading, quiet, joined)
    return diff_digests(params_a, digests_a, params_b, digests_b, rules)


def _against_baseline(inv_a, params_a, baseline_file, baseline, sel, reading, quiet, joined, rules):
    """A checkpoint against the digests a snapshot recorded, without the original at hand."""
    from paramscope.compute.diff import diff_digests
    from paramscope.io.inventory import filter_params

    recorded = baseline.digests()
    if not recorded:
        raise errors.UsageError(
            f"baseline {baseline_file} records no digests", hint="write it with this `paramscope snapshot`"
        )
    side_b = filter_params(baseline.as_params(), sel.filter)
    result = diff_digests(
        params_a, _digests(inv_a, params_a, reading, quiet, joined), side_b, recorded, rules
    )
    return replace(inv_a, checkpoint=baseline_file, shown=baseline_file, params=side_b, step=None), result


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

    from paramscope.api import key_note
    from paramscope.output.render import json_lines

    if output != "-":
        common.writable("--output", output, [ckpt])
    ck = common.open_checkpoint(ckpt, sel, quiet, layering)
    if output != "-":
        common.writable("--output", output, [ck.inventory.checkpoint])
    params = ck.params
    common.quiet_libraries()
    note = key_note(params)
    if note:
        common.warn(note, quiet)
    total = sum(p.nbytes for p in params if not p.random_key)
    budget = common.memory_budget(reading)
    document = common.with_progress(
        total, quiet, lambda on_bytes: ck.snapshot(memory_budget=budget, on_bytes=on_bytes)
    )
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
    from paramscope.compute.baseline import NO_COMMON, load_baseline

    load_baseline(baseline_file)  # a bad baseline is refused before the checkpoint is read
    ck = common.open_checkpoint(ckpt, sel, out.quiet, layering)
    common.quiet_libraries()
    total = sum(p.nbytes for p in ck.params if not p.random_key)
    result = common.with_progress(
        total,
        out.quiet,
        lambda on_bytes: ck.check(
            baseline_file,
            rtol=rtol,
            atol=atol,
            ignore=ignore or (),
            only=only or (),
            allow_new=allow_new,
            allow_missing=allow_missing,
            memory_budget=common.memory_budget(reading),
            on_bytes=on_bytes,
        ),
    )
    for note in result.notes:
        common.warn(note, out.quiet, "note")
    for warning in result.warnings:
        common.warn(warning, out.quiet)
    violations = result.value
    common.emit(result.report, out)
    if any(v.path == NO_COMMON for v in violations):
        raise common.fail(
            f"no parameter of {ckpt} is in common with {baseline_file}",
            "is it the baseline of another model? see the report on stdout",
            errors.EXIT_CHECK_FAILED,
        )
    if violations:
        raise common.fail(
            f"{len(violations)} regression(s) against {baseline_file}",
            "see the report on stdout",
            errors.EXIT_CHECK_FAILED,
        )
