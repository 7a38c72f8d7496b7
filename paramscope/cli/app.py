"""The paramscope command line: parses options, calls the core, hands a report to the renderer.

jax is imported only by the commands that compute on arrays, so ``--help`` stays instant.
"""

from __future__ import annotations

import functools
import os
import re
import sys
from enum import Enum
from typing import Annotated

import typer

from paramscope import errors
from paramscope.output.render import Format, render

app = typer.Typer(
    name="paramscope",
    help="Inspect sharded Orbax checkpoints of JAX models: parameters, counts, norms, weight-decay masks.",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)

CkptArg = Annotated[
    str,
    typer.Argument(
        metavar="CKPT",
        help="Checkpoint: a CheckpointManager root, a step folder or an item folder.",
        show_default=False,
    ),
]
FormatOpt = Annotated[Format, typer.Option("--format", "-f", help="Output format.", case_sensitive=False)]
StepOpt = Annotated[
    int | None, typer.Option("--step", help="Step to read (default: the latest finished step).")
]
ItemOpt = Annotated[
    str | None,
    typer.Option(
        "--item", help="Item to read (default: params, else the only pytree item, else all of them)."
    ),
]
SubtreeOpt = Annotated[
    str | None,
    typer.Option("--subtree", help="Keep one dotted subtree, e.g. params; paths become relative to it."),
]
FilterOpt = Annotated[
    str | None, typer.Option("--filter", help="Keep parameters whose path matches this regex.")
]
MeshOpt = Annotated[
    str | None,
    typer.Option(
        "--mesh",
        help="Device mesh AXIS=N[,AXIS=N...] (default: all local devices, shaped like the saved mesh).",
    ),
]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No warnings or progress on stderr.")]
BudgetOpt = Annotated[
    str | None,
    typer.Option(
        "--memory-budget", help="Array data held at once, e.g. 512MiB, 4GiB (default: 1/4 of free memory)."
    ),
]
EngineOpt = Annotated[
    str,
    typer.Option(
        "--engine", help="auto (mesh with an accelerator or --mesh, else host), host (numpy) or mesh (jax)."
    ),
]
DistributedOpt = Annotated[
    bool,
    typer.Option(
        "--distributed",
        help="Join the processes of a cluster launcher (SLURM, TPU pod) via jax.distributed.initialize().",
    ),
]
CoordinatorOpt = Annotated[
    str | None,
    typer.Option(
        "--coordinator",
        metavar="HOST:PORT",
        help="Coordinator of N processes started by hand (env PARAMSCOPE_COORDINATOR).",
    ),
]
NumProcessesOpt = Annotated[
    int | None, typer.Option("--num-processes", help="Number of processes (env PARAMSCOPE_NUM_PROCESSES).")
]
ProcessIdOpt = Annotated[
    int | None, typer.Option("--process-id", help="This process, 0..N-1 (env PARAMSCOPE_PROCESS_ID).")
]
TimeoutOpt = Annotated[
    float, typer.Option("--timeout", min=1, help="Seconds a process waits for the others before exit 3.")
]
FailOpt = Annotated[bool, typer.Option("--fail-on-nonfinite", help="Exit 1 if any value is NaN or Inf.")]


PROGRESS_MIN_BYTES = 64 << 20  # less data than this reads in a moment: no progress bar


class SortKey(str, Enum):
    path = "path"
    count = "count"
    bytes = "bytes"
    norm = "norm"


# ----------------------------------------------------------------------------------------------
# Plumbing


def _stderr(message: str, quiet: bool = False) -> None:
    if not quiet:
        print(message, file=sys.stderr)


def _fail(message: str, hint: str | None, code: int) -> typer.Exit:
    line = f"paramscope: error: {message}"
    if hint:
        line += f" (hint: {hint})"
    print(line, file=sys.stderr)
    return typer.Exit(code)


def handle_errors(command):
    """Maps paramscope's errors to one-line messages and exit codes; tracebacks only when debugging.

    In a cluster of processes every process leaves through :func:`paramscope.parallel.cluster.finish`,
    with the same exit code.
    """

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            _run(command, *args, **kwargs)
            code = 0
        except typer.Exit as exit_:
            code = exit_.exit_code
        from paramscope.parallel import cluster as distributed

        if distributed.CURRENT is not None:
            distributed.finish(distributed.CURRENT, code)
        if code:
            raise typer.Exit(code)

    return wrapper


def _run(command, *args, **kwargs):
    debug = os.environ.get("PARAMSCOPE_DEBUG", "") not in ("", "0")
    try:
        return command(*args, **kwargs)
    except typer.Exit:
        raise
    except errors.ParamscopeError as err:
        if debug:
            raise
        raise _fail(err.message, err.hint, err.exit_code) from None
    except KeyboardInterrupt:
        raise _fail("interrupted", None, 130) from None
    except Exception as err:  # a bug: say so in one line, traceback on request
        if debug:
            raise
        raise _fail(
            f"unexpected {type(err).__name__}: {err}",
            "set PARAMSCOPE_DEBUG=1 for a traceback and report it",
            errors.EXIT_INTERNAL,
        ) from None


def _version_callback(value: bool) -> None:
    if value:
        from paramscope import __version__

        print(f"paramscope {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool,
        typer.Option(
            "--version", help="Show the version and exit.", callback=_version_callback, is_eager=True
        ),
    ] = False,
) -> None:
    """Inspect sharded Orbax checkpoints of JAX models without the model code.

    Data goes to stdout, messages to stderr. Exit codes: 0 ok, 1 a check failed, 2 usage error,
    3 checkpoint problem, 4 internal error.
    """


def _quiet_libraries() -> None:
    """Keeps XLA's and absl's log noise off the terminal (set before jax loads)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("ABSL_MIN_LOG_LEVEL", "2")


def _inventory(ckpt: str, step: int | None, item: str | None, subtree: str | None, quiet: bool):
    from paramscope.io.inventory import open_checkpoint

    inventory = open_checkpoint(ckpt, step=step, item=item, subtree=subtree)
    for warning in inventory.warnings:
        _stderr(f"paramscope: warning: {warning}", quiet)
    return inventory


def parse_size(text: str) -> int:
    """Bytes from ``512MiB``, ``4GiB``, ``1.5GB``, ``1000000`` (binary and decimal units).

    >>> parse_size("512MiB"), parse_size("2GB"), parse_size("4096")
    (536870912, 2000000000, 4096)
    """
    units = {
        "": 1,
        "b": 1,
        "k": 1000,
        "kb": 1000,
        "kib": 1 << 10,
        "m": 1000**2,
        "mb": 1000**2,
        "mib": 1 << 20,
        "g": 1000**3,
        "gb": 1000**3,
        "gib": 1 << 30,
        "t": 1000**4,
        "tb": 1000**4,
        "tib": 1 << 40,
    }
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", text)
    if not match or match.group(2).lower() not in units or float(match.group(1)) <= 0:
        raise errors.UsageError(f"malformed size {text!r}", hint="write e.g. 512MiB, 4GiB or 2GB")
    return max(1, int(float(match.group(1)) * units[match.group(2).lower()]))


def _join(distributed: bool, coordinator, num_processes, process_id, timeout: float):
    """This process's cluster: alone, or joined with the others through jax.distributed."""
    from paramscope.parallel.cluster import LOCAL, join, settings_from

    settings = settings_from(coordinator, num_processes, process_id, distributed)
    if settings is None:
        return LOCAL
    _quiet_libraries()
    debug = os.environ.get("PARAMSCOPE_DEBUG", "") not in ("", "0")
    return join(settings if any(v is not None for v in settings.values()) else None, timeout, debug)


def _scan(
    inv,
    params,
    full: bool,
    mesh: str | None,
    engine: str,
    memory_budget: str | None,
    quiet: bool,
    cluster=None,
):
    """Reads the parameters once (norms, or all statistics), with a progress bar on a terminal."""
    from paramscope.parallel.mesh import parse_mesh

    _quiet_libraries()
    axes = parse_mesh(mesh) if mesh else None
    if axes is not None:
        _check_mesh(axes, inv, params, engine)
    budget = parse_size(memory_budget) if memory_budget else None
    from paramscope.compute.engines import scan

    options = dict(full=full, engine=engine, mesh_axes=axes, saved_mesh=inv.saved_mesh, memory_budget=budget)
    if cluster is not None:
        options["cluster"] = cluster
    total = sum(p.nbytes for p in params)
    return _with_progress(total, quiet, lambda on_bytes: scan(params, **options, on_bytes=on_bytes))


def _check_mesh(axes, inv, params, engine: str) -> None:
    from paramscope.parallel.mesh import build_mesh, idle_axes

    if engine == "host":
        raise errors.UsageError(
            "--mesh given with --engine host", hint="the mesh is for --engine mesh (or auto)"
        )
    import jax

    build_mesh(axes, jax.devices())  # enough devices (of every process, in a cluster)?
    idle = idle_axes(axes, params)
    if idle:
        saved = ",".join(f"{n}={s}" for n, s in inv.saved_mesh) if inv.saved_mesh else "none"
        raise errors.UsageError(
            f"mesh axis {idle[0]!r} divides no dimension of any parameter's saved sharding",
            hint=f"use the checkpoint's axis names, with sizes that divide its dimensions (saved: {saved})",
        )


def _with_progress(total: int, quiet: bool, run):
    """``run(on_bytes)``, with a progress bar on stderr when it is a terminal and the read is large."""
    if quiet or not sys.stderr.isatty() or total < PROGRESS_MIN_BYTES:
        return run(None)
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn, TransferSpeedColumn

    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        DownloadColumn(binary_units=True),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        transient=True,
    ) as progress:
        task = progress.add_task("reading", total=total)
        return run(lambda n: progress.advance(task, n))


def _report_nonfinite(result, fail: bool, quiet: bool) -> None:
    """Warns about NaN/Inf on stderr, and exits 1 when asked to fail on them."""
    if not result.nonfinite:
        return
    bad = [r.param.path for r in result.params if r.nonfinite]
    _stderr(
        f"paramscope: warning: {result.nonfinite} NaN/Inf value(s) in {len(bad)} parameter(s): "
        + ", ".join(bad[:5])
        + (" ..." if len(bad) > 5 else ""),
        quiet,
    )
    if fail:
        raise typer.Exit(errors.EXIT_CHECK_FAILED)


def _warn_unmatched(mask, quiet: bool) -> None:
    for pattern in mask.unmatched_patterns:
        _stderr(f"paramscope: warning: pattern {pattern!r} matches no parameter", quiet)


def _mask_options(include: list[str] | None, exclude: list[str] | None):
    if include and exclude:
        raise errors.UsageError(
            "include and exclude patterns given together",
            hint="a weight-decay mask takes include or exclude regexes, as get_param_mask_fn does",
        )


# ----------------------------------------------------------------------------------------------
# Commands


@app.command()
@handle_errors
def info(ckpt: CkptArg, step: StepOpt = None, fmt: FormatOpt = Format.table, quiet: QuietOpt = False) -> None:
    """Steps, items, storage format, size on disk and array counts of a checkpoint.

    Example: paramscope info checkpoints/
    """
    from paramscope.io.inventory import checkpoint_info
    from paramscope.output.reports import info_report

    result = checkpoint_info(ckpt, step)
    for warning in result.warnings:
        _stderr(f"paramscope: warning: {warning}", quiet)
    render(info_report(result), fmt)


@app.command()
@handle_errors
def table(
    ckpt: CkptArg,
    filter: FilterOpt = None,
    sort: Annotated[
        SortKey, typer.Option("--sort", help="Row order (count, bytes, norm: largest first).")
    ] = SortKey.path,
    wd_include: Annotated[
        list[str] | None,
        typer.Option("--wd-include", help="Weight decay only for paths matching (repeatable)."),
    ] = None,
    wd_exclude: Annotated[
        list[str] | None,
        typer.Option("--wd-exclude", help="Weight decay for all but paths matching (repeatable)."),
    ] = None,
    norms: Annotated[
        bool, typer.Option("--norms", help="Add each parameter's L2 norm (reads the data).")
    ] = False,
    stats: Annotated[
        bool, typer.Option("--stats", help="Add norm, mean, std, min, max, zeros, NaN, Inf (reads the data).")
    ] = False,
    step: StepOpt = None,
    item: ItemOpt = None,
    subtree: SubtreeOpt = None,
    mesh: MeshOpt = None,
    engine: EngineOpt = "auto",
    memory_budget: BudgetOpt = None,
    fmt: FormatOpt = Format.table,
    quiet: QuietOpt = False,
    distributed: DistributedOpt = False,
    coordinator: CoordinatorOpt = None,
    num_processes: NumProcessesOpt = None,
    process_id: ProcessIdOpt = None,
    timeout: TimeoutOpt = 300,
) -> None:
    """One row per parameter: path, shape, dtype, count, bytes, saved sharding.

    Example: paramscope table checkpoints/ --filter 'kernel$' --sort count --wd-exclude 'bias$|scale$'
    """
    from paramscope.io.inventory import filter_params, weight_decay_mask
    from paramscope.output.reports import table_report

    _mask_options(wd_include, wd_exclude)
    reads = norms or stats or sort == SortKey.norm
    cluster = _join(distributed, coordinator, num_processes, process_id, timeout) if reads else None
    quiet = quiet or (cluster is not None and not cluster.primary)
    inv = _inventory(ckpt, step, item, subtree, quiet)
    params = filter_params(inv.params, filter)
    mask = None
    if wd_include or wd_exclude:
        mask = weight_decay_mask(params, include=wd_include, exclude=wd_exclude)
        _warn_unmatched(mask, quiet)
    result = _scan(inv, params, stats, mesh, engine, memory_budget, quiet, cluster) if reads else None
    render(table_report(inv, params, mask, result, full=stats, sort=sort.value), fmt)


@app.command()
@handle_errors
def count(
    ckpt: CkptArg,
    depth: Annotated[
        int, typer.Option("--depth", min=0, help="Group by this many leading path components.")
    ] = 1,
    filter: FilterOpt = None,
    step: StepOpt = None,
    item: ItemOpt = None,
    subtree: SubtreeOpt = None,
    fmt: FormatOpt = Format.table,
    quiet: QuietOpt = False,
) -> None:
    """Total parameters and bytes, by dtype and by path prefix.

    Example: paramscope count checkpoints/ --depth 2
    """
    from paramscope.io.inventory import count_params, filter_params
    from paramscope.output.reports import count_report

    inv = _inventory(ckpt, step, item, subtree, quiet)
    render(count_report(inv, count_params(filter_params(inv.params, filter), depth), depth), fmt)


@app.command()
@handle_errors
def norms(
    ckpt: CkptArg,
    per_param: Annotated[bool, typer.Option("--per-param", help="One row per parameter.")] = False,
    fail_on_nonfinite: FailOpt = False,
    filter: FilterOpt = None,
    step: StepOpt = None,
    item: ItemOpt = None,
    subtree: SubtreeOpt = None,
    mesh: MeshOpt = None,
    engine: EngineOpt = "auto",
    memory_budget: BudgetOpt = None,
    fmt: FormatOpt = Format.table,
    quiet: QuietOpt = False,
    distributed: DistributedOpt = False,
    coordinator: CoordinatorOpt = None,
    num_processes: NumProcessesOpt = None,
    process_id: ProcessIdOpt = None,
    timeout: TimeoutOpt = 300,
) -> None:
    """Global L2 norm (and per-parameter norms), streamed in float32 or wider.

    Example: paramscope norms checkpoints/ --per-param --format json | jq .global_norm
    """
    from paramscope.io.inventory import filter_params
    from paramscope.output.reports import norms_report

    cluster = _join(distributed, coordinator, num_processes, process_id, timeout)
    quiet = quiet or not cluster.primary
    inv = _inventory(ckpt, step, item, subtree, quiet)
    params = filter_params(inv.params, filter)
    result = _scan(inv, params, False, mesh, engine, memory_budget, quiet, cluster)
    render(norms_report(inv, params, result, per_param), fmt)
    _report_nonfinite(result, fail_on_nonfinite, quiet)


@app.command()
@handle_errors
def stats(
    ckpt: CkptArg,
    fail_on_nonfinite: FailOpt = False,
    filter: FilterOpt = None,
    step: StepOpt = None,
    item: ItemOpt = None,
    subtree: SubtreeOpt = None,
    mesh: MeshOpt = None,
    engine: EngineOpt = "auto",
    memory_budget: BudgetOpt = None,
    fmt: FormatOpt = Format.table,
    quiet: QuietOpt = False,
    distributed: DistributedOpt = False,
    coordinator: CoordinatorOpt = None,
    num_processes: NumProcessesOpt = None,
    process_id: ProcessIdOpt = None,
    timeout: TimeoutOpt = 300,
) -> None:
    """Per parameter, in one pass: norm, mean, std, min, max, max |x|, zero fraction, NaN and Inf.

    Mean, std, min and max are over the finite values; NaN and Inf are counted.

    Example: paramscope stats checkpoints/ --memory-budget 1GiB --fail-on-nonfinite
    """
    from paramscope.io.inventory import filter_params
    from paramscope.output.reports import stats_report

    cluster = _join(distributed, coordinator, num_processes, process_id, timeout)
    quiet = quiet or not cluster.primary
    inv = _inventory(ckpt, step, item, subtree, quiet)
    params = filter_params(inv.params, filter)
    result = _scan(inv, params, True, mesh, engine, memory_budget, quiet, cluster)
    render(stats_report(inv, params, result), fmt)
    _report_nonfinite(result, fail_on_nonfinite, quiet)


@app.command()
@handle_errors
def mask(
    ckpt: CkptArg,
    include: Annotated[
        list[str] | None, typer.Option("--include", help="Decay only parameters matching (repeatable).")
    ] = None,
    exclude: Annotated[
        list[str] | None, typer.Option("--exclude", help="Decay all but parameters matching (repeatable).")
    ] = None,
    step: StepOpt = None,
    item: ItemOpt = None,
    subtree: SubtreeOpt = None,
    fmt: FormatOpt = Format.table,
    quiet: QuietOpt = False,
) -> None:
    """The weight-decay mask that include or exclude regexes give (as get_param_mask_fn).

    Example: paramscope mask checkpoints/ --exclude 'bias$' --exclude 'LayerNorm'
    """
    from paramscope.io.inventory import weight_decay_mask
    from paramscope.output.reports import mask_report

    _mask_options(include, exclude)
    inv = _inventory(ckpt, step, item, subtree, quiet)
    result = weight_decay_mask(inv.params, include=include, exclude=exclude)
    _warn_unmatched(result, quiet)
    render(mask_report(inv, result), fmt)


@app.command()
@handle_errors
def verify(
    ckpt: CkptArg,
    step: StepOpt = None,
    item: Annotated[str | None, typer.Option("--item", help="Check only this item (default: all).")] = None,
    memory_budget: BudgetOpt = None,
    fmt: FormatOpt = Format.table,
    quiet: QuietOpt = False,
) -> None:
    """Decode every chunk of every array; check arrays, _METADATA and _sharding agree. Exit 3 on damage.

    Example: paramscope verify checkpoints/ --step 400
    """
    from paramscope.compute.verify import verify_checkpoint
    from paramscope.output.reports import verify_report

    budget = parse_size(memory_budget) if memory_budget else None
    result = _with_progress(
        _bytes_on_disk(ckpt, step),
        quiet,
        lambda on_bytes: verify_checkpoint(ckpt, step, item, budget, on_bytes),
    )
    render(verify_report(result), fmt)
    if not result.ok:
        raise _fail(
            f"{len(result.problems)} problem(s) in {result.checkpoint}",
            "the report on stdout lists them by array",
            errors.EXIT_CHECKPOINT,
        )


def _bytes_on_disk(ckpt: str, step: int | None) -> int:
    """Size of the step's files, for the progress bar; 0 when it cannot be told."""
    from paramscope.io import orbax as checkpoint

    try:
        location = checkpoint.locate(ckpt, step)
    except errors.ParamscopeError:
        return 0
    return sum(checkpoint.disk_usage(i.path) for i in location.items)


RtolOpt = Annotated[
    float, typer.Option("--rtol", min=0, help="Relative tolerance: |a - b| <= atol + rtol * |a|.")
]
AtolOpt = Annotated[float, typer.Option("--atol", min=0, help="Absolute tolerance.")]


@app.command()
@handle_errors
def diff(
    ckpt_a: Annotated[str, typer.Argument(metavar="A", help="The reference checkpoint.", show_default=False)],
    ckpt_b: Annotated[
        str, typer.Argument(metavar="B", help="The checkpoint compared with it.", show_default=False)
    ],
    step_a: Annotated[
        int | None, typer.Option("--step-a", help="Step of A (default: latest finished).")
    ] = None,
    step_b: Annotated[
        int | None, typer.Option("--step-b", help="Step of B (default: latest finished).")
    ] = None,
    item: ItemOpt = None,
    subtree: SubtreeOpt = None,
    filter: FilterOpt = None,
    rtol: RtolOpt = 0.0,
    atol: AtolOpt = 0.0,
    structure_only: Annotated[
        bool, typer.Option("--structure-only", help="Compare paths, shapes, dtypes, shardings; read no data.")
    ] = False,
    show_all: Annotated[bool, typer.Option("--all", help="List identical parameters too.")] = False,
    fail_on_change: Annotated[
        bool, typer.Option("--fail-on-change", help="Exit 1 when anything differs beyond the tolerances.")
    ] = False,
    memory_budget: BudgetOpt = None,
    fmt: FormatOpt = Format.table,
    quiet: QuietOpt = False,
    distributed: DistributedOpt = False,
    coordinator: CoordinatorOpt = None,
    num_processes: NumProcessesOpt = None,
    process_id: ProcessIdOpt = None,
    timeout: TimeoutOpt = 300,
) -> None:
    """Compare two checkpoints: added, removed and reshaped parameters, and how values moved.

    Example: paramscope diff run/checkpoint_100 run/checkpoint_200 --rtol 1e-3 --fail-on-change
    """
    from paramscope.compute.diff import diff_params
    from paramscope.io.inventory import filter_params
    from paramscope.output.reports import diff_report, diff_summary

    cluster = _join(distributed, coordinator, num_processes, process_id, timeout)
    quiet = quiet or not cluster.primary
    inv_a = _inventory(ckpt_a, step_a, item, subtree, quiet)
    inv_b = _inventory(ckpt_b, step_b, item, subtree, quiet)
    params_a, params_b = filter_params(inv_a.params, filter), filter_params(inv_b.params, filter)
    budget = parse_size(memory_budget) if memory_budget else None
    total = 2 * sum(p.nbytes for p in params_a) if not structure_only else 0
    result = _with_progress(
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
            cluster=cluster,
        ),
    )
    render(diff_report(inv_a, inv_b, result, not structure_only, show_all), fmt)
    if fail_on_change and result.differs:
        raise _fail(
            f"the checkpoints differ: {diff_summary(result)}",
            "see the report on stdout",
            errors.EXIT_CHECK_FAILED,
        )


@app.command()
@handle_errors
def snapshot(
    ckpt: CkptArg,
    output: Annotated[
        str, typer.Option("--output", "-o", help="File to write the baseline to ('-': stdout).")
    ] = "-",
    step: StepOpt = None,
    item: ItemOpt = None,
    subtree: SubtreeOpt = None,
    mesh: MeshOpt = None,
    engine: EngineOpt = "auto",
    memory_budget: BudgetOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Write a JSON baseline: structure, counts and every parameter's statistics.

    Example: paramscope snapshot checkpoints/ -o baseline.json
    """
    import json

    from paramscope import __version__
    from paramscope.compute.baseline import snapshot as make_snapshot
    from paramscope.output.render import json_ready

    inv = _inventory(ckpt, step, item, subtree, quiet)
    if output != "-":
        target = os.path.realpath(output)
        if target == inv.checkpoint or target.startswith(inv.checkpoint + os.sep):
            raise errors.UsageError(
                f"--output {output} is inside the checkpoint",
                hint="paramscope never writes into a checkpoint folder; write elsewhere",
            )
    result = _scan(inv, inv.params, True, mesh, engine, memory_budget, quiet)
    text = json.dumps(json_ready(make_snapshot(inv, result, __version__)), indent=1, allow_nan=False) + "\n"
    if output == "-":
        sys.stdout.write(text)
    else:
        try:
            with open(output, "w") as f:
                f.write(text)
        except OSError as err:
            raise errors.UsageError(
                f"cannot write {output}: {err.strerror}", hint="choose a writable path"
            ) from None
        _stderr(f"paramscope: wrote {output} ({len(inv.params):,} parameters)", quiet)


@app.command()
@handle_errors
def check(
    ckpt: CkptArg,
    baseline_file: Annotated[
        str, typer.Option("--baseline", "-b", help="Baseline JSON (snapshot, or table/norms/stats JSON).")
    ],
    rtol: RtolOpt = 1e-5,
    atol: AtolOpt = 0.0,
    ignore: Annotated[
        list[str] | None, typer.Option("--ignore", help="Leave out parameters matching (repeatable).")
    ] = None,
    only: Annotated[
        list[str] | None,
        typer.Option("--only", help="Compare only: structure, counts, norms, stats (repeatable)."),
    ] = None,
    allow_new: Annotated[
        bool, typer.Option("--allow-new", help="Parameters absent from the baseline pass.")
    ] = False,
    allow_missing: Annotated[
        bool, typer.Option("--allow-missing", help="Baseline parameters absent here pass.")
    ] = False,
    step: StepOpt = None,
    item: ItemOpt = None,
    subtree: SubtreeOpt = None,
    mesh: MeshOpt = None,
    engine: EngineOpt = "auto",
    memory_budget: BudgetOpt = None,
    fmt: FormatOpt = Format.table,
    quiet: QuietOpt = False,
) -> None:
    """Check a checkpoint against a baseline: exit 0 pass, 1 regression, 3 unreadable.

    Example: paramscope check checkpoints/ --baseline baseline.json --rtol 1e-4 --ignore 'opt_state'
    """
    from paramscope.compute.baseline import CheckOptions, categories, load_baseline, needs_data
    from paramscope.compute.baseline import check as run_check
    from paramscope.output.reports import check_report

    options = CheckOptions(
        rtol=rtol,
        atol=atol,
        ignore=ignore or (),
        only=only or (),
        allow_new=allow_new,
        allow_missing=allow_missing,
    )
    baseline = load_baseline(baseline_file)
    inv = _inventory(ckpt, step, item, subtree, quiet)
    scan_kind = needs_data(baseline, options)
    params = [p for p in inv.params if not options.ignored(p.path)]
    result = (
        _scan(inv, params, scan_kind == "stats", mesh, engine, memory_budget, quiet) if scan_kind else None
    )
    violations = run_check(baseline, inv, result, options)
    render(
        check_report(
            inv, baseline_file, baseline, categories(baseline, options), options, violations, len(params)
        ),
        fmt,
    )
    if violations:
        raise _fail(
            f"{len(violations)} regression(s) against {baseline_file}",
            "see the report on stdout",
            errors.EXIT_CHECK_FAILED,
        )


def main() -> None:
    app(prog_name="paramscope")


if __name__ == "__main__":
    main()
