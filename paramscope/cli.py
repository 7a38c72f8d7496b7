"""The paramscope command line: parses options, calls the core, hands a report to the renderer.

jax is imported only by the commands that compute on arrays, so ``--help`` stays instant.
"""

from __future__ import annotations

import functools
import os
import re
import sys
from enum import Enum
from typing import Annotated, Any

import typer

from paramscope import errors
from paramscope.render import Column, Format, Report, render

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

    In a cluster of processes every process leaves through :func:`paramscope.distributed.finish`,
    with the same exit code.
    """

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            _run(command, *args, **kwargs)
            code = 0
        except typer.Exit as exit_:
            code = exit_.exit_code
        from paramscope import distributed

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
    from paramscope.inventory import open_checkpoint

    inventory = open_checkpoint(ckpt, step=step, item=item, subtree=subtree)
    for warning in inventory.warnings:
        _stderr(f"paramscope: warning: {warning}", quiet)
    return inventory


def _header(inv) -> dict[str, Any]:
    return {
        "checkpoint": inv.checkpoint,
        "step": inv.step,
        "item": inv.items[0] if len(inv.items) == 1 else None,
        "items": inv.items,
        "subtree": inv.subtree,
    }


def _title(inv, count: int) -> str:
    step = f"step {inv.step}" if inv.step is not None else "no step"
    return f"{inv.checkpoint}  {step}  item {','.join(inv.items)}  {count:,} arrays"


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
    from paramscope.distributed import LOCAL, join, settings_from

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
    from paramscope.mesh import parse_mesh

    _quiet_libraries()
    axes = parse_mesh(mesh) if mesh else None
    if axes is not None:
        _check_mesh(axes, inv, params, engine)
    budget = parse_size(memory_budget) if memory_budget else None
    from paramscope.stats import scan

    options = dict(full=full, engine=engine, mesh_axes=axes, saved_mesh=inv.saved_mesh, memory_budget=budget)
    if cluster is not None:
        options["cluster"] = cluster
    total = sum(p.nbytes for p in params)
    return _with_progress(total, quiet, lambda on_bytes: scan(params, **options, on_bytes=on_bytes))


def _check_mesh(axes, inv, params, engine: str) -> None:
    from paramscope.mesh import build_mesh, idle_axes

    if engine == "host":
        raise errors.UsageError(
            "--mesh given with --engine host", hint="the mesh is for --engine mesh (or auto)"
        )
    build_mesh(axes)  # enough devices?
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


def _engine_text(result) -> str:
    if result.mesh is None:
        return "engine host"
    return "engine mesh " + ",".join(f"{n}={s}" for n, s in result.mesh)


def _scan_header(result) -> dict[str, Any]:
    return {
        "global_norm": result.global_norm,
        "nonfinite": result.nonfinite,
        "count": sum(r.param.count for r in result.params),
        "engine": result.engine,
        "mesh": dict(result.mesh) if result.mesh is not None else None,
        "bytes_read": result.bytes_read,
    }


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


STAT_COLUMNS = [
    Column("norm", "norm", "float"),
    Column("mean", "mean", "float"),
    Column("std", "std", "float"),
    Column("min", "min", "float"),
    Column("max", "max", "float"),
    Column("max_abs", "max |x|", "float"),
    Column("zero_fraction", "zeros", "float"),
    Column("nan", "NaN", "int"),
    Column("inf", "Inf", "int"),
]


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
    from paramscope.inventory import checkpoint_info

    result = checkpoint_info(ckpt, step)
    for warning in result.warnings:
        _stderr(f"paramscope: warning: {warning}", quiet)
    steps = [{"step": s.step, "name": s.name, "finished": s.finished} for s in result.steps]
    items = [
        {
            "name": i.name,
            "kind": i.kind,
            "storage": i.storage,
            "arrays": i.arrays,
            "count": i.count,
            "bytes_on_disk": i.bytes_on_disk,
        }
        for i in result.items
    ]
    payload = {
        "schema": "paramscope.info/1",
        "checkpoint": result.checkpoint,
        "layout": result.layout,
        "step": result.step,
        "steps": steps,
        "items": [
            {**row, **({"content": i.content} if i.kind == "json" else {})}
            for row, i in zip(items, result.items)
        ],
    }
    import json

    notes = [f"{i.name}: {json.dumps(i.content)[:200]}" for i in result.items if i.kind == "json"]
    unfinished = [s for s in result.steps if not s.finished]
    if unfinished:
        notes.append(
            f"{len(unfinished)} unfinished step(s), skipped: {', '.join(s.name for s in unfinished)}"
        )
    step_text = f"step {result.step}" if result.step is not None else "single item"
    items_report = Report(
        payload=payload,
        title=f"{result.checkpoint}  ({result.layout}, {step_text})",
        columns=[
            Column("name", "item"),
            Column("kind", "kind"),
            Column("storage", "storage"),
            Column("arrays", "arrays", "int"),
            Column("count", "parameters", "int"),
            Column("bytes_on_disk", "on disk", "bytes"),
        ],
        rows=items,
        notes=notes,
    )
    if steps:
        items_report.sections.append(
            Report(
                payload={},
                title="steps",
                rows=steps,
                columns=[
                    Column("step", "step", "int"),
                    Column("name", "folder"),
                    Column("finished", "finished", "bool"),
                ],
            )
        )
    render(items_report, fmt)


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
    from paramscope.inventory import filter_params, sharding_json, weight_decay_mask

    _mask_options(wd_include, wd_exclude)
    reads = norms or stats or sort == SortKey.norm
    cluster = _join(distributed, coordinator, num_processes, process_id, timeout) if reads else None
    quiet = quiet or (cluster is not None and not cluster.primary)
    inv = _inventory(ckpt, step, item, subtree, quiet)
    params = filter_params(inv.params, filter)
    rows = {
        p.path: {
            "path": p.path,
            "shape": list(p.shape),
            "dtype": p.dtype,
            "count": p.count,
            "bytes": p.nbytes,
            "sharding": sharding_json(p.sharding),
        }
        for p in params
    }
    columns = [
        Column("path", "path"),
        Column("shape", "shape", "shape"),
        Column("dtype", "dtype"),
        Column("count", "count", "int"),
        Column("bytes", "bytes", "bytes"),
        Column("sharding", "sharding", "sharding"),
    ]
    if wd_include or wd_exclude:
        mask = weight_decay_mask(params, include=wd_include, exclude=wd_exclude)
        for pattern in mask.unmatched_patterns:
            _stderr(f"paramscope: warning: pattern {pattern!r} matches no parameter", quiet)
        for param, decayed in mask.decisions:
            rows[param.path]["weight_decay"] = decayed
        columns.append(Column("weight_decay", "weight decay", "bool"))
    if reads:
        result = _scan(inv, params, stats, mesh, engine, memory_budget, quiet, cluster)
        for entry in result.params:
            row = rows[entry.param.path]
            row.update(entry.moments.stats() if stats else {"norm": entry.norm})
            row["nonfinite"] = entry.nonfinite
        columns += STAT_COLUMNS if stats else STAT_COLUMNS[:1]
    ordered = _sorted_rows(list(rows.values()), sort)
    total = {"count": sum(p.count for p in params), "bytes": sum(p.nbytes for p in params)}
    payload = {"schema": "paramscope.table/1", **_header(inv), "params": ordered, "total": total}
    report = Report(
        payload=payload,
        columns=columns,
        rows=ordered,
        title=_title(inv, len(params)),
        footer={"path": f"total ({len(params):,} arrays)", **total},
    )
    render(report, fmt)


def _sorted_rows(rows: list[dict], key: SortKey) -> list[dict]:
    if key == SortKey.path:
        return sorted(rows, key=lambda r: r["path"])
    import math

    def value(row):
        v = row.get(key.value)
        return -math.inf if v is None or (isinstance(v, float) and math.isnan(v)) else v

    return sorted(rows, key=lambda r: (-value(r), r["path"]))


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
    from paramscope.inventory import count_params, filter_params

    inv = _inventory(ckpt, step, item, subtree, quiet)
    result = count_params(filter_params(inv.params, filter), depth)
    total = {"count": result.total_count, "bytes": result.total_bytes}
    groups = [{"path": g, "count": c, "bytes": b, "leaves": n} for g, c, b, n in result.groups]
    by_dtype = {d: {"count": c, "bytes": b} for d, (c, b) in result.by_dtype.items()}
    payload = {
        "schema": "paramscope.count/1",
        **_header(inv),
        "depth": depth,
        "total": total,
        "by_dtype": by_dtype,
        "groups": groups,
    }
    report = Report(
        payload=payload,
        title=_title(inv, sum(g["leaves"] for g in groups)),
        columns=[
            Column("path", f"group (depth {depth})"),
            Column("leaves", "arrays", "int"),
            Column("count", "count", "int"),
            Column("bytes", "bytes", "bytes"),
        ],
        rows=[{**g, "path": g["path"] or "(all)"} for g in groups],
        footer={"path": "total", "leaves": sum(g["leaves"] for g in groups), **total},
        sections=[
            Report(
                payload={},
                title="by dtype",
                columns=[
                    Column("dtype", "dtype"),
                    Column("count", "count", "int"),
                    Column("bytes", "bytes", "bytes"),
                ],
                rows=[{"dtype": d, **v} for d, v in by_dtype.items()],
            )
        ],
    )
    render(report, fmt)


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
    from paramscope.inventory import filter_params

    cluster = _join(distributed, coordinator, num_processes, process_id, timeout)
    quiet = quiet or not cluster.primary
    inv = _inventory(ckpt, step, item, subtree, quiet)
    params = filter_params(inv.params, filter)
    result = _scan(inv, params, False, mesh, engine, memory_budget, quiet, cluster)
    payload = {"schema": "paramscope.norms/1", **_header(inv), **_scan_header(result)}
    title = f"{_title(inv, len(params))}  {_engine_text(result)}"
    if per_param:
        rows = [
            {
                "path": r.param.path,
                "norm": r.norm,
                "nonfinite": r.nonfinite,
                "count": r.param.count,
                "dtype": r.param.dtype,
            }
            for r in result.params
        ]
        payload["params"] = rows
        report = Report(
            payload=payload,
            title=title,
            rows=rows,
            columns=[
                Column("path", "path"),
                Column("dtype", "dtype"),
                Column("count", "count", "int"),
                Column("norm", "norm", "float"),
                Column("nonfinite", "NaN/Inf", "int"),
            ],
            footer={
                "path": "global",
                "count": payload["count"],
                "norm": result.global_norm,
                "nonfinite": result.nonfinite,
            },
        )
    else:
        rows = [
            {"metric": "global_norm", "value": f"{result.global_norm:.9g}"},
            {"metric": "nonfinite", "value": f"{result.nonfinite:,}"},
            {"metric": "count", "value": f"{payload['count']:,}"},
            {"metric": "arrays", "value": f"{len(params):,}"},
        ]
        report = Report(
            payload=payload,
            title=title,
            rows=rows,
            columns=[Column("metric", "metric"), Column("value", "value")],
        )
    render(report, fmt)
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
    from paramscope.inventory import filter_params

    cluster = _join(distributed, coordinator, num_processes, process_id, timeout)
    quiet = quiet or not cluster.primary
    inv = _inventory(ckpt, step, item, subtree, quiet)
    params = filter_params(inv.params, filter)
    result = _scan(inv, params, True, mesh, engine, memory_budget, quiet, cluster)
    rows = [
        {"path": r.param.path, "dtype": r.param.dtype, "count": r.param.count, **r.moments.stats()}
        for r in result.params
    ]
    payload = {"schema": "paramscope.stats/1", **_header(inv), **_scan_header(result), "params": rows}
    report = Report(
        payload=payload,
        title=f"{_title(inv, len(params))}  {_engine_text(result)}",
        rows=rows,
        columns=[
            Column("path", "path"),
            Column("dtype", "dtype"),
            Column("count", "count", "int"),
            *STAT_COLUMNS,
        ],
        footer={
            "path": "global",
            "count": payload["count"],
            "norm": result.global_norm,
            "nan": sum(r["nan"] for r in rows),
            "inf": sum(r["inf"] for r in rows),
        },
    )
    render(report, fmt)
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
    from paramscope.inventory import weight_decay_mask

    _mask_options(include, exclude)
    inv = _inventory(ckpt, step, item, subtree, quiet)
    result = weight_decay_mask(inv.params, include=include, exclude=exclude)
    for pattern in result.unmatched_patterns:
        _stderr(f"paramscope: warning: pattern {pattern!r} matches no parameter", quiet)
    rows = [{"path": p.path, "count": p.count, "weight_decay": flag} for p, flag in result.decisions]
    decayed, not_decayed = result.totals(True), result.totals(False)
    payload = {
        "schema": "paramscope.mask/1",
        **_header(inv),
        "include": result.include,
        "exclude": result.exclude,
        "params": rows,
        "decayed": {"count": decayed[0], "leaves": decayed[1]},
        "not_decayed": {"count": not_decayed[0], "leaves": not_decayed[1]},
        "unmatched_patterns": result.unmatched_patterns,
    }
    report = Report(
        payload=payload,
        title=_title(inv, len(rows)),
        rows=rows,
        columns=[
            Column("path", "path"),
            Column("count", "count", "int"),
            Column("weight_decay", "weight decay", "bool"),
        ],
        notes=[
            f"decayed: {decayed[0]:,} parameters in {decayed[1]} arrays; "
            f"not decayed: {not_decayed[0]:,} parameters in {not_decayed[1]} arrays"
        ],
    )
    render(report, fmt)


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
    from paramscope.verify import verify_checkpoint

    budget = parse_size(memory_budget) if memory_budget else None
    result = _with_progress(
        _bytes_on_disk(ckpt, step),
        quiet,
        lambda on_bytes: verify_checkpoint(ckpt, step, item, budget, on_bytes),
    )
    rows = [{"item": p.item, "path": p.path, "problem": p.problem} for p in result.problems]
    payload = {
        "schema": "paramscope.verify/1",
        "checkpoint": result.checkpoint,
        "step": result.step,
        "items": result.items,
        "ok": result.ok,
        "arrays": result.arrays,
        "bytes_read": result.bytes_read,
        "problems": rows,
    }
    verdict = "OK" if result.ok else f"{len(rows)} problem(s)"
    step_text = f"step {result.step}" if result.step is not None else "no step"
    report = Report(
        payload=payload,
        title=f"{result.checkpoint}  {step_text}  items {','.join(result.items)}",
        columns=[Column("item", "item"), Column("path", "array"), Column("problem", "problem")],
        rows=rows,
        notes=[f"verified {result.arrays:,} arrays, decoded {result.bytes_read:,} bytes: {verdict}"],
    )
    render(report, fmt)
    if not result.ok:
        raise _fail(
            f"{len(rows)} problem(s) in {result.checkpoint}",
            "the report on stdout lists them by array",
            errors.EXIT_CHECKPOINT,
        )


def _bytes_on_disk(ckpt: str, step: int | None) -> int:
    """Size of the step's files, for the progress bar; 0 when it cannot be told."""
    from paramscope import checkpoint

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
    from paramscope.compare import diff_params
    from paramscope.inventory import filter_params

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
    rows = []
    for entry in result.params:
        row = {
            "path": entry.path,
            "status": entry.status,
            "changes": entry.changes,
            "a": _diff_side(entry.a),
            "b": _diff_side(entry.b),
        }
        if entry.values is not None:
            v = entry.values
            row.update(
                norm_a=v.norm_a,
                norm_b=v.norm_b,
                diff_norm=v.diff_norm,
                rel_diff=v.rel_diff,
                cosine=v.cosine,
                max_abs_diff=v.max_abs_diff,
                beyond_tolerance=v.beyond_tolerance,
                identical=v.identical,
            )
        rows.append(row)
    counts = result.counts()
    payload = {
        "schema": "paramscope.diff/1",
        "a": _header(inv_a),
        "b": _header(inv_b),
        "rtol": rtol,
        "atol": atol,
        "values_compared": not structure_only,
        "summary": counts,
        "params": rows,
    }
    summary = ", ".join(f"{n} {status}" for status, n in counts.items())
    shown = [r for r in rows if show_all or r["status"] != "identical"]
    for row in shown:
        row["detail"] = "; ".join(row["changes"])
    report = Report(
        payload=payload,
        title=f"A {_where(inv_a)}\nB {_where(inv_b)}",
        rows=shown,
        columns=[
            Column("path", "path"),
            Column("status", "status"),
            Column("detail", "structure"),
            Column("norm_a", "norm A", "float"),
            Column("norm_b", "norm B", "float"),
            Column("diff_norm", "||A-B||", "float"),
            Column("rel_diff", "||A-B||/||A||", "float"),
            Column("cosine", "cosine", "float"),
            Column("max_abs_diff", "max |A-B|", "float"),
        ],
        notes=[summary],
    )
    render(report, fmt)
    if fail_on_change and result.differs:
        raise _fail(
            f"the checkpoints differ: {summary}", "see the report on stdout", errors.EXIT_CHECK_FAILED
        )


def _diff_side(param) -> dict | None:
    from paramscope.inventory import sharding_json

    if param is None:
        return None
    return {"shape": list(param.shape), "dtype": param.dtype, "sharding": sharding_json(param.sharding)}


def _where(inv) -> str:
    step = f"step {inv.step}" if inv.step is not None else "no step"
    return f"{inv.checkpoint}  {step}  item {','.join(inv.items)}"


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
    from paramscope.baseline import snapshot as make_snapshot
    from paramscope.render import json_ready

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
    from paramscope.baseline import CheckOptions, categories, load_baseline, needs_data
    from paramscope.baseline import check as run_check

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
    rows = [
        {
            "path": v.path,
            "metric": v.metric,
            "baseline": v.baseline,
            "actual": v.actual,
            "rel_diff": v.rel_diff,
        }
        for v in violations
    ]
    compared = categories(baseline, options)
    payload = {
        "schema": "paramscope.check/1",
        **_header(inv),
        "baseline": os.path.abspath(baseline_file),
        "baseline_schema": baseline.schema,
        "compared": compared,
        "rtol": rtol,
        "atol": atol,
        "passed": not violations,
        "violations": rows,
    }
    verdict = "pass" if not violations else f"{len(violations)} violation(s)"
    report = Report(
        payload=payload,
        title=f"{_where(inv)}  vs  {baseline_file}",
        rows=[{**r, "baseline": _text(r["baseline"]), "actual": _text(r["actual"])} for r in rows],
        columns=[
            Column("path", "path"),
            Column("metric", "metric"),
            Column("baseline", "baseline"),
            Column("actual", "actual"),
            Column("rel_diff", "rel. diff", "float"),
        ],
        notes=[f"compared {', '.join(compared) or 'nothing'} of {len(params):,} parameters: {verdict}"],
    )
    render(report, fmt)
    if violations:
        raise _fail(
            f"{len(violations)} regression(s) against {baseline_file}",
            "see the report on stdout",
            errors.EXIT_CHECK_FAILED,
        )


def _text(value) -> str:
    return f"{value:.9g}" if isinstance(value, float) else str(value)


def main() -> None:
    app(prog_name="paramscope")


if __name__ == "__main__":
    main()
