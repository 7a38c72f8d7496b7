"""The Python API: what every command computes, for notebooks and scripts.

:func:`open` reads a checkpoint's metadata once (any format, local or in a bucket) and returns a
:class:`Checkpoint`; its methods read what they need and return a :class:`Result`, whose
:meth:`Result.to_dict` is exactly the document the command line prints with ``--format json``
(the same schema), :meth:`Result.to_pandas` a DataFrame of its rows, and which shows itself as a
table in Jupyter and in a rich terminal. Keyword arguments carry the command line's names and
units (``memory_budget="256MiB"`` or an int of bytes).

>>> import paramscope as ps
>>> ck = ps.open(demo_ckpt)                            # the latest finished step
>>> ck.step, len(ck.params)
(200, 14)
>>> ck.count().to_dict()["total"]["count"] == sum(p.count for p in ck.params)
True
>>> round(ck.norms().to_dict()["global_norm"], 3)
42.433
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from paramscope.errors import UsageError
from paramscope.io.inventory import Inventory, ParamInfo
from paramscope.output.render import Report

if TYPE_CHECKING:
    from paramscope.parallel.cluster import Cluster

__all__ = [
    "Array",
    "Checkpoint",
    "Result",
    "check",
    "diff",
    "history",
    "info",
    "open",
    "optim",
    "snapshot",
    "verify",
]


@dataclass(repr=False)
class Result:
    """One answer: the document the command line prints as JSON, and the same data as rows."""

    report: Report
    warnings: list[str] = field(default_factory=list)
    value: Any = field(default=None, repr=False)  # the computed object (ScanResult, VerifyResult...)
    notes: list[str] = field(default_factory=list)  # things worth knowing that are not problems

    def to_dict(self) -> dict[str, Any]:
        """Exactly what ``paramscope <command> --format json`` prints, as Python objects."""
        import json

        from paramscope.output.render import to_json

        return json.loads(to_json(self.report))

    def rows(self, table: str | None = None) -> list[dict[str, Any]]:
        """The rows of the first table (or of the section named ``table``), machine values."""
        return _section(self.report, table).rows

    def to_pandas(self, table: str | None = None):
        """The rows of a table as a DataFrame (columns as in ``--format csv``); needs pandas."""
        try:
            import pandas as pd
        except ImportError:
            raise UsageError(
                "to_pandas needs pandas, which is not installed", hint="pip install pandas"
            ) from None
        chosen = _section(self.report, table)
        return pd.DataFrame(chosen.rows, columns=[c.key for c in chosen.columns])

    def to_text(self, width: int | None = None) -> str:
        """The table the command line prints (``width``: fit it to this many columns)."""
        from paramscope.output.render import View, to_text

        lines, _ = to_text(self.report, View(width=width))
        return "".join(f"{line}\n" for line, _ in lines)

    def __str__(self) -> str:
        return self.to_text()

    def __repr__(self) -> str:
        """In a REPL, the command's table (not the dataclass's fields)."""
        import shutil

        return self.to_text(shutil.get_terminal_size((100, 24)).columns).rstrip("\n")

    def _repr_html_(self) -> str:
        import html

        from paramscope.output.render import cell

        parts = []
        for table in [self.report, *self.report.sections]:
            if table.hidden or not table.columns:
                continue
            if table.title:
                parts.append(f"<p><b>{html.escape(table.title)}</b></p>")
            head = "".join(f"<th>{html.escape(c.header)}</th>" for c in table.columns)
            body = "".join(
                "<tr>"
                + "".join(
                    f"<td>{html.escape(cell(row.get(c.key), c.kind, human=True))}</td>" for c in table.columns
                )
                + "</tr>"
                for row in table.rows
            )
            parts.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
        return "".join(parts)

    def __rich__(self):
        from rich.text import Text

        return Text(self.to_text(), no_wrap=True)


def _section(report: Report, name: str | None) -> Report:
    if name is None:
        return report
    for table in [report, *report.sections]:
        if table.name == name:
            return table
    names = [t.name for t in [report, *report.sections] if t.name]
    raise UsageError(f"no table {name!r} in this result", hint=f"tables: {', '.join(names)}")


def open(
    path: str | os.PathLike,
    *,
    step: int | None = None,
    item: str | None = None,
    subtree: str | None = None,
    filter: str | None = None,
    unstack: bool = False,
    layer_axis: Sequence[str] | None = None,
    cluster: Cluster | None = None,
) -> Checkpoint:
    """Opens a checkpoint from its metadata (no array data is read).

    Args:
        path: Any checkpoint paramscope reads: a manager root, a step, an item, a file, a URL.
        step: The step of a run (default: the latest finished one).
        item: The item (default: ``params``, else the only pytree item, else all).
        subtree: Keep one dotted subtree; paths are relative to it.
        filter: Keep the parameters whose path matches this regex.
        unstack: One parameter per layer of scanned stacks (as ``--unstack``).
        layer_axis: Where stacks are, as ``--layer-axis`` (``PATH_REGEX=AXIS``).
        cluster: The processes that share the reading (:func:`join_cluster`): process 0 alone
            reads the metadata, and every read of data is shared.

    Raises:
        ParamscopeError: The path is missing, not a checkpoint, or has no such step or item.
    """
    return Checkpoint(
        os.fspath(path), step, item, subtree, filter, unstack, list(layer_axis or ()), cluster=cluster
    )


class Checkpoint:
    """One step of a checkpoint, opened: its parameters, and every view of them.

    Attributes:
        inventory: What was read from the metadata (:class:`~paramscope.Inventory`).
        params: The selected parameters (:class:`~paramscope.ParamInfo`), in path order.
        warnings: What the command line would print as warnings while opening.
    """

    def __init__(self, path, step, item, subtree, filter, unstack, layer_axis, cluster=None):
        self.path = path
        self._item = item
        self._filter = filter
        self._unstack = unstack
        self._layer_axis = layer_axis
        self.cluster = cluster
        if cluster is not None and cluster.active:
            from paramscope.parallel.cluster import open_checkpoint
        else:
            from paramscope.io.inventory import open_checkpoint

            cluster = None
        chosen = dict(step=step, item=item, subtree=subtree)
        self.inventory: Inventory = (
            open_checkpoint(path, **chosen) if cluster is None else open_checkpoint(cluster, path, **chosen)
        )
        self.params, notes = select(self.inventory, filter, unstack, layer_axis)
        self.warnings: list[str] = [*self.inventory.warnings, *notes]

    def __repr__(self) -> str:
        step = f", step={self.step}" if self.step is not None else ""
        return f"paramscope.Checkpoint({self.path!r}{step}, {len(self.params)} parameters)"

    @property
    def step(self) -> int | None:
        return self.inventory.step

    def close(self) -> None:
        """Lets go of what reading held (:func:`release`); the checkpoint can still be read."""
        release()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- metadata ----------------------------------------------------------------------------------

    def table(
        self,
        *,
        norms: bool = False,
        stats: bool = False,
        digest: bool = False,
        wd_include: Sequence[str] | None = None,
        wd_exclude: Sequence[str] | None = None,
        sort: str = "path",
        top: int | None = None,
        memory_budget: int | str | None = None,
        engine: str = "auto",
        mesh: str | None = None,
        on_bytes: Callable[[int], Any] | None = None,
        on_total: Callable[[int], Any] | None = None,
    ) -> Result:
        """One row per parameter (as ``paramscope table``); ``norms``/``stats``/``digest`` read
        the data; ``wd_include``/``wd_exclude`` add the weight-decay mask of those regexes."""
        from paramscope.output.reports import table_report

        mask, notes = None, []
        if wd_include or wd_exclude:
            mask = _mask(self.params, wd_include, wd_exclude)
            notes = [f"pattern {p!r} matches no parameter" for p in mask.unmatched_patterns]
        reads = norms or stats or digest or sort == "norm"
        scanned = None
        if reads:
            scanned = self._scan(stats, digest, memory_budget, engine, on_bytes, mesh, on_total=on_total)
        inv = self.inventory
        saved_values = inv.values
        inv.values = inv.values + scalar_values(self.params)
        stacked = {v.info.path: f"axis {v.stack.axis}, {v.stack.rule}" for v in inv.views or () if v.stack}
        try:
            report = table_report(
                inv,
                self.params,
                mask,
                scanned,
                full=stats,
                sort=sort,
                top=top,
                stacked=stacked,
            )
        finally:
            inv.values = saved_values
        keys = self._key_note() if reads else []
        return Result(report, [*self.warnings, *notes, *keys], scanned)

    def count(self, depth: int = 1) -> Result:
        """Total parameters and bytes, by dtype and by the first ``depth`` path components."""
        from paramscope.io.inventory import count_params
        from paramscope.output.reports import count_report

        counted = count_params(self.params, depth)
        return Result(count_report(self.inventory, counted, depth), list(self.warnings), counted)

    def mask(self, include: Sequence[str] | None = None, exclude: Sequence[str] | None = None) -> Result:
        """The weight-decay mask of include or exclude regexes (as ``get_param_mask_fn``)."""
        from paramscope.output.reports import mask_report

        mask = _mask(self.params, include, exclude)
        notes = [f"pattern {p!r} matches no parameter" for p in mask.unmatched_patterns]
        return Result(mask_report(self.inventory, mask), self.warnings + notes, mask)

    def info(self) -> Result:
        """The checkpoint's steps, items, storage, sizes and array counts (:func:`info`)."""
        return info(self.path, self.step)

    # -- data ----------------------------------------------------------------------------------------

    def norms(
        self,
        per_param: bool = False,
        *,
        digest: bool = False,
        sort: str = "path",
        top: int | None = None,
        memory_budget: int | str | None = None,
        engine: str = "auto",
        mesh: str | None = None,
        on_bytes: Callable[[int], Any] | None = None,
        on_total: Callable[[int], Any] | None = None,
    ) -> Result:
        """Global (and per-parameter) L2 norms and NaN/Inf counts, in one streaming pass.

        ``engine``, ``mesh``: as ``--engine`` and ``--mesh``; ``on_bytes(n)`` is called as data
        is read, ``on_total(n)`` once before, with the bytes the pass reads (for a progress bar).
        """
        from paramscope.output.reports import norms_report

        scanned = self._scan(False, digest, memory_budget, engine, on_bytes, mesh, on_total=on_total)
        return self._numbers(
            norms_report(self.inventory, self.params, scanned, per_param, sort, top), scanned
        )

    def stats(
        self,
        *,
        digest: bool = False,
        histogram: str | None = None,
        sort: str = "path",
        top: int | None = None,
        memory_budget: int | str | None = None,
        engine: str = "auto",
        mesh: str | None = None,
        on_bytes: Callable[[int], Any] | None = None,
        on_total: Callable[[int], Any] | None = None,
    ) -> Result:
        """Per parameter: norm, mean, std, min, max, max |x|, zeros, NaN and Inf.

        ``histogram``: also a histogram of this parameter's values (``result.value.histogram``,
        and ``histogram`` in the document)."""
        from paramscope.output.reports import stats_report

        if histogram is not None and histogram not in {p.path for p in self.inventory.params}:
            raise UsageError(
                f"--hist {histogram!r} is not a parameter here", hint="give a path `paramscope table` shows"
            )
        scanned = self._scan(True, digest, memory_budget, engine, on_bytes, mesh, histogram, on_total)
        report = stats_report(self.inventory, self.params, scanned, sort, top)
        if scanned.histogram is not None:
            report.payload["histogram"] = {
                "path": histogram,
                "bins": [{"low": lo, "high": hi, "count": n} for lo, hi, n in scanned.histogram.bins()],
                "nan": scanned.histogram.nan,
                "inf": scanned.histogram.inf,
            }
        return self._numbers(report, scanned)

    def _numbers(self, report: Report, scanned) -> Result:
        return Result(report, self.warnings + self._key_note(), scanned)

    def layers(
        self,
        *,
        sort: str = "layer",
        top: int | None = None,
        memory_budget: int | str | None = None,
        engine: str = "auto",
        mesh: str | None = None,
        on_bytes: Callable[[int], Any] | None = None,
        on_total: Callable[[int], Any] | None = None,
    ) -> Result:
        """One row per layer of each scanned stack (``paramscope layers``): the layer's norm and
        the norm of each of its arrays, in one pass."""
        from dataclasses import replace

        from paramscope.compute.layers import layer_table
        from paramscope.output.reports import layers_report

        inv = replace(self.inventory)  # its views are this view's own
        _, notes = select(inv, self._filter, True, self._layer_axis)
        inv.views = [v for v in inv.views if v.stack is not None]
        params = [v.info for v in inv.views]
        scanned = read_numbers(
            inv,
            params,
            memory_budget=memory_budget,
            engine=engine,
            mesh=mesh,
            cluster=self.cluster,
            on_bytes=on_bytes,
            on_total=on_total,
        )
        note = key_note(params)
        report = layers_report(inv, layer_table(inv.views, scanned), sort, top)
        fresh = [n for n in notes if n not in self.warnings]
        return Result(report, [*self.warnings, *fresh, *([note] if note else [])], scanned)

    def optim(self, **options) -> Result:
        """Each parameter beside its Adam-family optimizer state (:func:`optim`), at this step,
        with this checkpoint's filter and layering."""
        options.setdefault("filter", self._filter)
        options.setdefault("unstack", self._unstack)
        options.setdefault("layer_axis", self._layer_axis)
        return optim(self.path, step=self.step, **options)

    def _key_note(self) -> list[str]:
        note = key_note(self.params)
        return [note] if note else []

    def _scan(
        self,
        full,
        digest,
        memory_budget,
        engine="auto",
        on_bytes=None,
        mesh=None,
        histogram=None,
        on_total=None,
    ):
        return read_numbers(
            self.inventory,
            self.params,
            full=full,
            digest=digest,
            memory_budget=memory_budget,
            engine=engine,
            mesh=mesh,
            cluster=self.cluster,
            histogram=histogram,
            on_bytes=on_bytes,
            on_total=on_total,
        )

    def snapshot(
        self,
        *,
        memory_budget: int | str | None = None,
        on_bytes: Callable[[int], Any] | None = None,
        on_total: Callable[[int], Any] | None = None,
    ) -> dict[str, Any]:
        """The baseline ``paramscope snapshot`` writes: structure, counts, every statistic and
        digest of the selected parameters (typed PRNG keys as structure)."""
        from paramscope import __version__
        from paramscope.compute.baseline import snapshot

        scanned = self._scan(True, True, memory_budget, on_bytes=on_bytes, on_total=on_total)
        return snapshot(self.inventory, scanned, __version__, self.params)

    def check(
        self,
        baseline: str | os.PathLike,
        *,
        rtol: float = 1e-5,
        atol: float = 0.0,
        ignore: Sequence[str] = (),
        only: Sequence[str] = (),
        allow_new: bool = False,
        allow_missing: bool = False,
        memory_budget: int | str | None = None,
        on_bytes: Callable[[int], Any] | None = None,
        on_total: Callable[[int], Any] | None = None,
    ) -> Result:
        """This checkpoint against a baseline file (``paramscope check``): ``result.value`` is the
        list of violations, empty when it passes (``to_dict()["passed"]``)."""
        from dataclasses import replace

        from paramscope.compute.baseline import (
            CheckOptions,
            categories,
            load_baseline,
            needs_data,
            needs_digests,
            other_step_note,
        )
        from paramscope.compute.baseline import check as run_check
        from paramscope.output.reports import check_report

        options = CheckOptions(
            rtol=rtol,
            atol=atol,
            ignore=tuple(ignore),
            only=tuple(only),
            allow_new=allow_new,
            allow_missing=allow_missing,
            filter=self._filter,
        )
        shown_file = os.fspath(baseline)
        recorded = load_baseline(shown_file)
        notes = list(self.warnings)
        note = other_step_note(shown_file, recorded.step, self.step)
        other_step = [note] if note else []
        for pattern in options.compiled:
            if not any(pattern.search(p.path) for p in self.params):
                notes.append(f"--ignore {pattern.pattern!r} matches no parameter")
        kept = [p for p in self.params if not options.ignored(p.path)]
        scan_kind = needs_data(recorded, options)
        scanned = None
        if scan_kind:
            scanned = read_numbers(
                self.inventory,
                kept,
                full=scan_kind == "stats",
                digest=needs_digests(recorded, options),
                memory_budget=memory_budget,
                cluster=self.cluster,
                on_bytes=on_bytes,
                on_total=on_total,
            )
            note = key_note(kept)
            if note:
                notes.append(note)
        inv = self.inventory
        shown = replace(inv, params=self.params, views=None) if inv.views is not None else inv
        violations = run_check(recorded, shown, scanned, options)
        report = check_report(
            inv, shown_file, recorded, categories(recorded, options), options, violations, len(kept)
        )
        return Result(report, notes, violations, other_step)

    # -- one array -------------------------------------------------------------------------------

    def array(self, path: str) -> Array:
        """One parameter's values, read lazily: ``ck.array("params.embed.embedding")[0, :8]`` is
        a numpy array, and only the chunks that slice touches are read.

        Raises:
            UsageError: No parameter has this path.
        """
        return Array(self, find_param(self.inventory, self.params, path, None))

    def show(
        self,
        path: str | None = None,
        *,
        index: str | tuple | None = None,
        filter: str | None = None,
        nonfinite: int | None = None,
        top: int | None = None,
        axis: Sequence[int] = (),
        exact: bool = False,
        out: str | os.PathLike | None = None,
        force: bool = False,
        memory_budget: int | str | None = None,
        on_bytes: Callable[[int], Any] | None = None,
    ) -> Result:
        """One parameter (``paramscope show``): where and how it is stored, its statistics (the
        numbers of ``stats``), its values as numpy prints them, and on request where its NaN/Inf
        are (the first ``nonfinite``), its ``top`` largest |x|, and per index of ``axis`` its
        norm, max |x|, mean and NaN/Inf count; all in one streaming pass.

        Args:
            path: The parameter's path, a slice may follow (``'params.w[0, :8]'``); or None and
                a ``filter`` (or the checkpoint's) that matches one parameter.
            index: A slice as text (``'[0, :8]'``) or a numpy index tuple.
            out: Also write the array or slice to this ``.npy``, ``.npz`` or ``.safetensors``
                file (``force``: over an existing one).
        """
        from paramscope.compute import values as core
        from paramscope.compute.plan import memory_budget_bytes
        from paramscope.output.reports import show_report

        param, selection, axes, plan_text = self.plan_show(path, index, filter, axis, out, force)
        limit = memory_budget_bytes(memory_budget)
        array = Array(self, param)
        writer = None

        def start_piece(piece):
            finish = array.start_read(piece)

            def values():
                out = finish()
                if writer is not None:
                    from paramscope.compute.digest import logical_bytes

                    writer.write(logical_bytes(out))
                if on_bytes is not None:
                    on_bytes(piece.box_count() * param.itemsize)
                return out

            return values

        def run():
            nonlocal writer
            if out is not None:
                from paramscope.io.writers import Entry, Writer

                writer = Writer(os.fspath(out), [Entry(param.path, param.dtype, selection.out_shape)], force)
                writer.begin(writer.entries[0])
            try:
                found = core.inspect(
                    start_piece,
                    selection,
                    param.itemsize,
                    limit,
                    param.stored.chunks if param.stored else (),
                    nonfinite=nonfinite,
                    top=top,
                    axes=axes,
                    dtype=array.dtype,
                )
            except BaseException:
                if writer is not None:
                    writer.abort()
                raise
            if writer is not None:
                writer.close()
            return found, found.corner

        found, shown = unchanged_after(self.inventory, run)
        text = core.summary(shown, selection.count, exact)
        small = shown if selection.count <= core.SUMMARY_THRESHOLD else None
        value = Shown(param, selection, found, text, small, plan_text, corner=shown, exact=exact)
        notes = list(self.warnings)
        if out is not None:
            notes.append(f"wrote {os.fspath(out)}" + _dtype_note(os.fspath(out), param.dtype))
        return Result(show_report(self.inventory, value, exact), notes, value)

    def plan_show(self, path, index, filter, axis, out=None, force=False):
        """The parameter, selection and axes of :meth:`show`, checked before any data is read."""
        from paramscope.compute import values as core

        written = None
        if path is not None:
            path, written = (
                core.split_path(path) if find_exact(self.inventory, path) is None else (path, None)
            )
        if written is not None and index is not None:
            raise UsageError("a slice is given twice (after the path and as --slice)", hint="give it once")
        index = written if index is None else index
        param = find_param(self.inventory, self.params, path, filter)
        parsed = core.parse_index(index) if isinstance(index, str) else index
        selection = core.select(param.shape, parsed, index if isinstance(index, str) else "")
        axes = core.check_axes(list(axis), selection)
        if out is not None:
            from paramscope.io.writers import Entry, check_entries, file_format

            target = os.fspath(out)
            check_entries(file_format(target), [Entry(param.path, param.dtype, selection.out_shape)])
            if os.path.exists(target) and not force:
                raise UsageError(f"{target} exists", hint="pass --force to write over it")
        return param, selection, axes, (core.index_text(parsed) if parsed is not None else None)

    def export(
        self,
        out: str | os.PathLike,
        *,
        force: bool = False,
        memory_budget: int | str | None = None,
        on_bytes: Callable[[int], Any] | None = None,
    ) -> Result:
        """Writes the selected parameters to one ``.safetensors`` or ``.npz`` file (names as
        paramscope shows them), streaming within the memory budget; before the file is put in
        place, every array's content digest, hashed again from the file's bytes, must equal the
        source's.

        Raises:
            UsageError: The file exists (without ``force``), or cannot hold these arrays.
            CorruptCheckpoint: The file read back differs from what was read.
        """
        from paramscope.compute.plan import memory_budget_bytes

        params = self.plan_export(out, force)
        digests = unchanged_after(
            self.inventory,
            lambda: write_arrays(params, os.fspath(out), force, memory_budget_bytes(memory_budget), on_bytes),
        )
        from paramscope.output.reports import export_report

        rows = [(p, digests[p.path]) for p in params]
        notes = [*self.warnings, *self._key_note()]
        return Result(export_report(self.inventory, os.fspath(out), rows), notes, digests)

    def plan_export(self, out, force: bool = False) -> list[ParamInfo]:
        """The parameters :meth:`export` writes, checked before any data is read."""
        from paramscope.io.writers import Entry, check_entries, file_format

        target = os.fspath(out)
        fmt = file_format(target)
        if fmt == "npy":
            raise UsageError(
                "export writes many arrays: a .npy file holds one", hint="name a .safetensors or .npz file"
            )
        params = [p for p in self.params if not p.random_key]
        if not params:
            raise UsageError("no parameter to export", hint="check --filter, --subtree and --item")
        check_entries(fmt, [Entry(p.path, p.dtype, p.shape) for p in params])
        if os.path.exists(target) and not force:
            raise UsageError(f"{target} exists", hint="pass --force to write over it")
        return params

    def verify(self, *, memory_budget: int | str | None = None, **options) -> Result:
        """Decodes every chunk of every array of the step; checks the metadata files agree
        (:func:`verify`)."""
        return verify(self.path, step=self.step, item=self._item, memory_budget=memory_budget, **options)


class Array:
    """One parameter's values, read lazily (:meth:`Checkpoint.array`): indexing it with
    integers, slices and ``...`` returns a numpy array and reads only the box of the array that
    index spans (for zarr arrays through TensorStore's own indexing: only the chunks it touches).

    >>> import paramscope as ps
    >>> w = ps.open(demo_ckpt).array("Embed_0.embedding")
    >>> w.shape, w[0, :3].shape, w[-1].dtype.name
    ((1024, 64), (3,), 'float32')
    """

    def __init__(self, ck: Checkpoint, param: ParamInfo):
        self.param = param
        self._inventory = ck.inventory
        self._handle = None

    def __repr__(self) -> str:
        return f"paramscope.Array({self.path!r}, shape={self.shape}, dtype={self.dtype})"

    @property
    def path(self) -> str:
        return self.param.path

    @property
    def shape(self) -> tuple[int, ...]:
        return self.param.shape

    @property
    def dtype(self):
        from paramscope.io.records import numpy_dtype

        return numpy_dtype(self.param.dtype)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __len__(self) -> int:
        if not self.shape:
            raise TypeError("len() of a 0-d array")
        return self.shape[0]

    def _opened(self):
        if self._handle is None:
            from paramscope.io import checkpoint

            self._handle = checkpoint.open_array(self.param.stored)
        return self._handle

    def read(self, selection):
        """The values of a :class:`~paramscope.compute.values.Selection` of this array."""
        return self.start_read(selection)()

    def start_read(self, selection):
        """Starts reading a :class:`~paramscope.compute.values.Selection` of this array; returns
        the function that waits for its values."""
        from paramscope.compute.values import start_read

        return start_read(self._opened(), selection, self.path, self.param.index_in_store)

    def __getitem__(self, index):
        from paramscope.compute.values import select

        selection = select(self.shape, index if isinstance(index, tuple) else (index,))
        return unchanged_after(self._inventory, lambda: self.read(selection))

    def __array__(self, dtype=None, copy=None):
        values = self[...]
        return values if dtype is None else values.astype(dtype)


@dataclass
class Shown:
    """What :meth:`Checkpoint.show` found: the parameter, the selection, the
    :class:`~paramscope.compute.values.Inspection`, the values as numpy prints them, and the
    values themselves when there are at most 1,000 of them."""

    param: ParamInfo
    selection: Any
    inspection: Any
    text: str
    values: Any = None
    slice_text: str | None = None  # the slice as numpy writes it; None for the whole array
    corner: Any = None  # the values numpy's summary prints
    exact: bool = False

    def text_for(self, width: int | None) -> list[str]:
        """The values as numpy prints them in lines of at most ``width`` characters (None: 100),
        rows kept whole where numpy can."""
        from paramscope.compute import values as core

        if width is None or self.corner is None:
            return self.text.splitlines()
        text = core.summary(self.corner, self.selection.count, self.exact, linewidth=max(width, 20))
        return text.splitlines()

    def values_json(self) -> Any:
        """The values as nested lists of numbers (None beyond 1,000 values, or complex)."""
        import numpy as np

        if self.values is None or np.iscomplexobj(self.values):
            return None
        values = np.asarray(self.values)
        return values.astype(np.float64).tolist() if values.dtype.kind not in "iub" else values.tolist()


def find_exact(inv: Inventory, path: str) -> ParamInfo | None:
    return next((p for p in inv.params if p.path == path), None)


def find_param(
    inv: Inventory, params: Sequence[ParamInfo], path: str | None, filter: str | None
) -> ParamInfo:
    """The one parameter a path names, or that ``filter`` (else the selection ``params``) holds."""
    from paramscope.io.inventory import filter_params

    if path is not None:
        found = find_exact(inv, path)
        if found is not None:
            return found
        import difflib

        close = difflib.get_close_matches(path, [p.path for p in inv.params], n=3)
        raise UsageError(
            f"no parameter {path!r} here",
            hint=f"did you mean {', '.join(close)}?" if close else "see the paths with paramscope table",
        )
    candidates = filter_params(inv.params, filter) if filter is not None else list(params)
    what = f"--filter {filter!r}" if filter is not None else "the selection"
    if not candidates:
        raise UsageError(f"{what} matches no parameter", hint="see the paths with paramscope table")
    if len(candidates) > 1:
        from paramscope.output.render import listed

        raise UsageError(
            f"{what} matches {len(candidates)} parameters: {listed([p.path for p in candidates], 3)}",
            hint="show takes one: name its path, or narrow the regex",
        )
    return candidates[0]


def _dtype_note(out: str, dtype: str) -> str:
    from paramscope.io.records import numpy_dtype

    if out.lower().endswith((".npy", ".npz")) and numpy_dtype(dtype).type.__module__.startswith("ml_dtypes"):
        size = numpy_dtype(dtype).itemsize
        return (
            f" ({dtype} stored as |V{size}: numpy has no name for it; .view(ml_dtypes.{dtype}) after loading)"
        )
    return ""


def write_arrays(
    params: Sequence[ParamInfo], out: str, force: bool, limit: int, on_bytes=None
) -> dict[str, str]:
    """Writes whole arrays to ``out`` within ``limit`` bytes, read in bands of whole chunks
    (:func:`~paramscope.compute.plan.stream_regions`); returns their digests, of the bytes read.

    Each band is written to the file on its own thread while it is hashed on the others. Before
    the file is put in place its arrays are hashed again, straight from the file's bytes where
    its headers place them, while the file is synced to the disk; a difference is refused.

    Raises:
        CorruptCheckpoint: The file does not hold what was read.
    """
    import struct
    import zipfile
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    from paramscope.compute.digest import DigestState, file_digests, logical_bytes
    from paramscope.compute.plan import decode_once_limit, stream_regions
    from paramscope.errors import CorruptCheckpoint
    from paramscope.io import checkpoint
    from paramscope.io.writers import Entry, Writer, stored_spans

    entries = [Entry(p.path, p.dtype, p.shape) for p in params]
    states = [DigestState(p.dtype, p.shape, p.itemsize) for p in params]
    offsets = [0] * len(params)
    group_limit, ahead = decode_once_limit(params, limit)

    def start(param, handle, region):
        return checkpoint.start_read(handle, param.index_in_store(region.read_index), param.path)

    writer = Writer(out, entries, force)
    pool = ThreadPoolExecutor(max_workers=os.cpu_count() or 1)
    file_thread = ThreadPoolExecutor(max_workers=1)
    current = None
    try:
        for region, pending in stream_regions(params, group_limit, start, ahead=ahead):
            i = region.param
            if i != current:
                writer.begin(entries[i])
                current = i
            data = logical_bytes(np.asarray(checkpoint.finish_read(pending, params[i].path)))
            writing = file_thread.submit(writer.write, data)
            try:
                states[i].feed(offsets[i], data, pool)
            finally:
                writing.result()
            offsets[i] += len(data)
            if on_bytes is not None:
                on_bytes(len(data))
        writer.finish()
        digests = {p.path: state.hexdigest() for p, state in zip(params, states)}
        syncing = file_thread.submit(writer.sync)
        try:
            try:
                spans = stored_spans(writer.partial, entries, writer.format)
            except (ValueError, KeyError, struct.error, zipfile.BadZipFile):  # headers unreadable
                spans = [None] * len(entries)
            placed = [(p, span) for p, span in zip(params, spans) if span is not None]
            found = file_digests(
                writer.partial, [(p.dtype, p.shape, p.itemsize, span[0]) for p, span in placed], pool
            )
            same = {p.path for (p, _), digest in zip(placed, found) if digest == digests[p.path]}
        finally:
            syncing.result()
        bad = [p.path for p in params if p.path not in same]
        if bad:
            raise CorruptCheckpoint(
                f"{out} does not hold what was read: {', '.join(bad[:3])} differ",
                hint="the disk may be failing; write it again",
            )
        writer.commit(synced=True)
    except BaseException:
        writer.abort()
        raise
    finally:
        pool.shutdown(wait=False)
        file_thread.shutdown(wait=False)
    return digests


def scalar_values(params: Sequence[ParamInfo]) -> list[dict]:
    """The values of the Python numbers among ``params`` (stored as 0-d arrays: ``step``, a
    learning rate), read for the table: a few bytes each."""
    from paramscope import errors
    from paramscope.io import checkpoint

    scalars = [p for p in params if p.stored is not None and p.stored.value_type == "scalar" and not p.shape]
    out = []
    for param, handle in zip(scalars, checkpoint.open_arrays([p.stored for p in scalars])):
        if isinstance(handle, errors.ParamscopeError):
            continue  # the row is still listed; verify names the damage
        try:
            value = checkpoint.finish_read(checkpoint.start_read(handle, None, param.path), param.path).item()
        except errors.ParamscopeError:
            continue
        kind = type(value).__name__
        out.append({"path": param.path, "type": kind, "value": str(value) if kind == "complex" else value})
    return out


def info(path: str | os.PathLike, step: int | None = None) -> Result:
    """Steps (finished and unfinished), items and their kinds, storage, sizes on disk and array
    counts (``paramscope info``); ``result.value`` is the :class:`~paramscope.io.inventory.InfoResult`.
    """
    from paramscope.io.inventory import checkpoint_info
    from paramscope.output.reports import info_report

    found = checkpoint_info(path, step)
    return Result(info_report(found), list(found.warnings), found)


def verify(
    path: str | os.PathLike,
    *,
    step: int | None = None,
    item: str | None = None,
    memory_budget: int | str | None = None,
    baseline: str | os.PathLike | None = None,
    on_bytes: Callable[[int], Any] | None = None,
    on_total: Callable[[int], Any] | None = None,
) -> Result:
    """Decodes every chunk of every array of a step and checks the metadata files agree
    (``paramscope verify``); with ``baseline``, also every array's content against the digests
    a snapshot recorded. ``result.value.ok`` says whether it is sound."""
    from paramscope.compute.verify import verify_checkpoint
    from paramscope.io import checkpoint
    from paramscope.output.reports import verify_report

    shown = os.fspath(path)
    digests = recorded = None
    if baseline is not None:
        from paramscope.compute.baseline import load_baseline

        recorded = load_baseline(os.fspath(baseline))
        digests = recorded.digests_by_item()
        if not digests:
            raise UsageError(
                f"baseline {os.fspath(baseline)} records no digests",
                hint="write it with this `paramscope snapshot`",
            )
    if on_total is not None:
        on_total(checkpoint.step_bytes(shown, step))
    found = verify_checkpoint(
        shown, step, item, memory_budget, on_bytes, digests, recorded.step if recorded is not None else None
    )
    notes = []
    if recorded is not None:
        from paramscope.compute.baseline import other_step_note

        note = other_step_note(os.fspath(baseline), recorded.step, found.step)
        notes += [note] if note else []
    return Result(verify_report(found, shown), [], found, notes)


def snapshot(ck: Checkpoint, **options) -> dict[str, Any]:
    """The baseline ``paramscope snapshot`` writes of ``ck`` (:meth:`Checkpoint.snapshot`)."""
    return ck.snapshot(**options)


def check(ck: Checkpoint, baseline: str | os.PathLike, **options) -> Result:
    """``ck`` against a baseline file, as ``paramscope check`` (:meth:`Checkpoint.check`)."""
    return ck.check(baseline, **options)


def optim(
    path: str | os.PathLike,
    *,
    step: int | None = None,
    params_item: str | None = None,
    opt_item: str | None = None,
    filter: str | None = None,
    unstack: bool = False,
    layer_axis: Sequence[str] | None = None,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float | None = None,
    lr: float | None = None,
    sort: str = "path",
    top: int | None = None,
    memory_budget: int | str | None = None,
    on_bytes: Callable[[int], Any] | None = None,
    on_total: Callable[[int], Any] | None = None,
) -> Result:
    """Each parameter beside its Adam-family optimizer state (``paramscope optim``): moments,
    step, and the update they make relative to the parameter.

    The parameters and the optimizer state are two items (``params_item``, ``opt_item``; found
    by name by default) or one train-state item. ``eps`` defaults to optax's 1e-8 (Keras' 1e-7
    for a Keras checkpoint); with ``lr`` the ratio is lr*||update||/||param||.
    """
    from paramscope.compute.optim import align, optimizer_pass, split_state
    from paramscope.io import checkpoint
    from paramscope.io.inventory import filter_params, open_checkpoint
    from paramscope.output.reports import optim_report

    shown = os.fspath(path)
    warnings: list[str] = []

    def open_item(name):
        inv = open_checkpoint(shown, step=step, item=name)
        warnings.extend(w for w in inv.warnings if w not in warnings)
        return inv

    items = [i.name for i in checkpoint.locate(shown, step).items]
    inv, params, opt = split_state(open_item, items, params_item, opt_item)
    alignment = align(params, opt)
    if unstack or layer_axis:  # per-layer update ratios of scanned stacks
        from paramscope.compute.optim import unstack_alignment

        stacks, found = stacks_of(params, layer_axis, inv.custom)
        warnings += found
        alignment = unstack_alignment(alignment, stacks)
    if filter is not None:
        kept = {p.path for p in filter_params([e.param for e in alignment.entries], filter)}
        alignment.entries = [e for e in alignment.entries if e.path in kept]
    if eps is None:
        eps = 1e-7 if alignment.convention == "keras" else 1e-8
    if on_total is not None:
        on_total(sum(3 * e.param.nbytes for e in alignment.entries))
    optimizer_pass(alignment, b1=b1, b2=b2, eps=eps, lr=lr, memory_budget=memory_budget, on_bytes=on_bytes)
    hyper = {"b1": b1, "b2": b2, "eps": eps, "lr": lr, "convention": alignment.convention}
    return Result(optim_report(inv, alignment, hyper, sort, top), warnings, alignment)


def _mask(params: Sequence[ParamInfo], include: Sequence[str] | None, exclude: Sequence[str] | None):
    from paramscope.io.inventory import weight_decay_mask

    if include and exclude:
        raise UsageError(
            "include and exclude patterns given together",
            hint="a weight-decay mask takes include or exclude regexes, as get_param_mask_fn does",
        )
    return weight_decay_mask(params, include=list(include or ()), exclude=list(exclude or ()))


# ------------------------------------------------------------------------------------------------
# What a front end needs before and after the reading: sizes, places, steps, the cluster


def parse_size(text: str) -> int:
    """Bytes of a size as the command line writes it (``512MiB``, ``2G``, ``1000``)."""
    from paramscope.compute.plan import parse_size as parse

    return parse(text)


def is_url(path: str) -> bool:
    """Whether ``path`` names a bucket or a server (``gs://``, ``s3://``, ``https://``...)."""
    from paramscope.io.storage import is_url as url

    return url(path)


def inside(target: str, folder: str) -> bool:
    """Whether the local path ``target`` lies inside ``folder`` (symlinks resolved)."""
    from paramscope.io.storage import inside as within

    return within(target, folder)


def steps(path: str | os.PathLike) -> list:
    """The steps of a run (finished and unfinished), from one listing."""
    from paramscope.io import checkpoint

    return checkpoint.list_steps(path)


def items(path: str | os.PathLike, step: int | None = None) -> list:
    """The items of a step (``params``, ``opt_state``, JSON items...), from its listing."""
    from paramscope.io import checkpoint

    return checkpoint.locate(os.fspath(path), step).items


def load_baseline(path: str | os.PathLike):
    """A baseline file, validated (:class:`~paramscope.compute.baseline.BaselineError`, exit 2,
    names what is wrong with it)."""
    from paramscope.compute.baseline import load_baseline as load

    return load(os.fspath(path))


def no_common(violations: Sequence) -> bool:
    """Whether a check found no parameter in common with its baseline (another model's)."""
    from paramscope.compute.baseline import NO_COMMON

    return any(v.path == NO_COMMON for v in violations)


def join_cluster(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    distributed: bool = False,
    timeout: float = 300,
    debug: bool = False,
):
    """This process's cluster: alone (nothing set), or joined with the other processes through
    ``jax.distributed`` (the coordinator's address, or the environment with ``distributed``)."""
    from paramscope.parallel.cluster import LOCAL, join, settings_from

    settings = settings_from(coordinator, num_processes, process_id, distributed)
    if settings is None:
        return LOCAL
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("ABSL_MIN_LOG_LEVEL", "2")
    explicit = settings if any(v is not None for v in settings.values()) else None
    return join(explicit, timeout, debug)


def release() -> None:
    """Lets go of what reading holds (TensorStore's context and its pools, opened stores, b-trees
    read whole, the read threads: :class:`paramscope.io.session.Session`); what is read next
    opens what it needs anew. The command line calls it when a command ends."""
    import sys

    session = sys.modules.get("paramscope.io.session")
    if session is not None:
        session.SESSION.close()


def leave_cluster(code: int) -> None:
    """In a cluster, every process leaves together with the highest exit code (it does not
    return); alone, nothing happens."""
    import sys

    cluster = sys.modules.get("paramscope.parallel.cluster")
    if cluster is not None and cluster.CURRENT is not None:
        cluster.finish(cluster.CURRENT, code)


# ------------------------------------------------------------------------------------------------
# What every command does between opening a checkpoint and showing what it found


def select(
    inv: Inventory,
    filter: str | None = None,
    unstack: bool = False,
    layer_axis: Sequence[str] | None = None,
) -> tuple[list[ParamInfo], list[str]]:
    """The parameters of an opened checkpoint that ``filter`` keeps (one per layer of stacked
    arrays with ``unstack`` or ``layer_axis``: ``inv.views`` then says where each comes from),
    and notes on what matched nothing."""
    from paramscope.io.inventory import filter_params

    notes: list[str] = []
    candidates = inv.params
    inv.views = None
    if unstack or layer_axis:
        from paramscope.compute.layers import unstack as unstack_views

        stacks, found = stacks_of(inv.params, layer_axis, inv.custom)
        notes += found
        inv.views = unstack_views(inv.params, stacks)
        candidates = [v.info for v in inv.views]
    params = filter_params(candidates, filter)
    if filter is not None and candidates and not params:
        notes.append(f"--filter {filter!r} matches no parameter")
    if inv.views is not None:
        kept = {p.path for p in params}
        inv.views = [v for v in inv.views if v.info.path in kept]
    return params, notes


def stacks_of(params: Sequence[ParamInfo], layer_axis: Sequence[str] | None, custom=None):
    """The scanned stacks among ``params`` (found, or where ``layer_axis`` says), and the notes
    on what was found or matched nothing: what every view of layers starts from."""
    from paramscope.compute.layers import find_stacks, parse_layer_axes

    return find_stacks(params, parse_layer_axes(list(layer_axis or ()) or None), custom)


def key_note(params: Sequence[ParamInfo]) -> str | None:
    """The note that typed PRNG keys among ``params`` are left out of the numbers."""
    keys = [p.path for p in params if p.random_key]
    if not keys:
        return None
    from paramscope.errors import few

    shown = few(keys, 3)
    return f"typed PRNG keys left out of the numbers: {shown}"


def read_numbers(
    inv: Inventory,
    params: Sequence[ParamInfo],
    *,
    full: bool = False,
    digest: bool = False,
    memory_budget: int | str | None = None,
    engine: str = "auto",
    mesh: str | None = None,
    cluster=None,
    histogram: str | None = None,
    on_bytes: Callable[[int], Any] | None = None,
    on_total: Callable[[int], Any] | None = None,
):
    """Reads ``params`` once (norms, or every statistic with ``full``), typed PRNG keys left out,
    and proves that the step was not deleted or saved again meanwhile (:func:`unchanged_after`).

    ``mesh``: the device mesh of the mesh engine as ``--mesh`` writes it (``data:4,model:2``);
    ``cluster``: the processes that share the reading (:mod:`paramscope.parallel.cluster`);
    ``on_total(n)``: called first with the bytes to read, ``on_bytes(n)`` as they are read."""
    from paramscope.compute.engines import scan
    from paramscope.parallel.mesh import check_mesh, parse_mesh

    params = [p for p in params if not p.random_key]
    if on_total is not None:
        on_total(sum(p.nbytes for p in params))
    axes = parse_mesh(mesh) if mesh else None
    if axes is not None:
        check_mesh(axes, engine, params, inv.saved_mesh)
    options: dict[str, Any] = dict(
        full=full,
        engine=engine,
        mesh_axes=axes,
        saved_mesh=inv.saved_mesh,
        memory_budget=memory_budget,
        digest=digest,
        on_bytes=on_bytes,
    )
    if histogram is not None:
        options["histogram"] = histogram
    if cluster is not None:
        options["cluster"] = cluster
    if inv.views is not None:
        from paramscope.compute.layers import scan_views

        views = [v for v in inv.views if not inv.params[v.source].random_key]
        return unchanged_after(inv, lambda: scan_views(views, inv.params, **options))
    return unchanged_after(inv, lambda: scan(params, **options))


def unchanged_after(inv: Inventory, read: Callable[[], Any]):
    """``read()``, then proof that the step was not deleted or saved again meanwhile: a read that
    failed because of it, or numbers it may have mixed, are reported as that
    (:class:`~paramscope.errors.CheckpointChanged`)."""
    from paramscope.errors import ParamscopeError

    inv.begin_read()
    try:
        result = read()
    except ParamscopeError:
        inv.check_unchanged()
        raise
    inv.check_unchanged()
    return result


def history(
    path: str | os.PathLike,
    *,
    steps: str | None = None,
    last: int | None = None,
    item: str | None = None,
    subtree: str | None = None,
    filter: str | None = None,
    unstack: bool = False,
    layer_axis: Sequence[str] | None = None,
    depth: int | None = None,
    stats: bool = False,
    sort: str = "path",
    top: int | None = None,
    memory_budget: int | str | None = None,
    cache: str | os.PathLike | bool = True,
    cluster=None,
    on_bytes: Callable[[int], Any] | None = None,
) -> Result:
    """Every step of a run (``paramscope history``): each parameter's norm over the steps, how
    much it moved from the step before, where NaN/Inf began.

    Args:
        path: A run: a folder of steps (a ``CheckpointManager`` root, ...), local or in a bucket.
        steps: ``START:STOP[:STRIDE]`` (stop included); ``last``: the last K steps.
        depth: One series per group of this many leading path components.
        stats: Also every statistic of ``stats``, per step.
        cache: Keep each step's numbers in this folder (True: the user's cache directory;
            False: keep nothing), so that a second run reads only new steps.

    ``result.value`` is a :class:`HistoryRun` (the steps' numbers, the series, for plots).
    """
    from paramscope.compute.history import HistoryCache, parse_steps, series
    from paramscope.compute.history import history as read_history
    from paramscope.errors import CheckpointChanged, NotACheckpoint, StepNotFound, few
    from paramscope.io import checkpoint
    from paramscope.io.inventory import open_checkpoint
    from paramscope.io.storage import Tree
    from paramscope.output.reports import history_report

    shown = os.fspath(path)
    root = Tree(shown)  # listed once, each step's metadata read once, for every step
    location = checkpoint.locate(root, None, allow_unfinished=True)
    if location.kind != "root":
        raise NotACheckpoint(
            f"{shown} is a single checkpoint, not a run of steps",
            hint="history reads a manager root (a folder of steps); for one checkpoint use norms or stats",
        )
    available = [s.step for s in location.steps if s.finished]
    chosen = parse_steps(steps, available, last)
    if not chosen:
        raise StepNotFound(
            f"no finished step of {shown} is selected", hint=f"finished steps: {few(available)}"
        )

    def open_step(step):
        try:
            inv = open_checkpoint(shown, step=step, item=item, subtree=subtree, tree=root)
        except StepNotFound:  # it was listed as finished when the run began
            raise CheckpointChanged(
                f"{shown}: step {step} was deleted while the run was read",
                hint="a trainer removed it (e.g. max_to_keep); read the run again, or pass --steps",
            ) from None
        params, _ = select(inv, filter, unstack, layer_axis)
        return inv, params

    def stamp_of(step):
        return checkpoint.data_stamp(checkpoint.locate(root, step))

    notes: list[str] = []
    shared = cluster is not None and cluster.active
    if shared and cache is not False:
        # the processes must agree on which steps to read: none keeps a cache of its own
        notes.append("the history cache is not used under --distributed")
    keeper = None
    if cache is not False and not shared:
        if cache is True:
            import platformdirs

            folder = os.path.join(platformdirs.user_cache_dir("paramscope"), "history")
        else:
            folder = os.fspath(cache)
        selection = {
            "item": item,
            "subtree": subtree,
            "filter": filter,
            "unstack": bool(unstack or layer_axis),
            "layer_axis": list(layer_axis) if layer_axis is not None else None,
        }
        keeper = HistoryCache(folder, location.path, selection)
    found = read_history(
        chosen, stamp_of, open_step, stats, memory_budget, keeper, on_bytes=on_bytes, cluster=cluster
    )
    notes += found.warnings
    notes += [f"step {step} left out: {why}" for step, why in found.damaged.items()]
    inv, latest = open_step(found.steps[-1].step)
    runs = series(found, depth)
    first_bad = found.first_nonfinite()
    if first_bad is not None:
        notes.append(f"NaN/Inf first at step {first_bad[0]}: {few(first_bad[1])}")
    report = history_report(inv, found, runs, stats, sort, top)
    unstacked = [p for p in latest if p.layer is not None]
    return Result(report, notes, HistoryRun(found, runs, unstacked))


@dataclass
class HistoryRun:
    """What :func:`history` computed: ``steps`` (each step's numbers), ``series`` (per parameter
    or group, over the steps), and the layers of stacked arrays when unstacked (for heatmaps)."""

    result: Any
    series: list
    unstacked: list[ParamInfo]

    def layer_rows(self):
        """The norm of every layer of every stack at every step (the rows of a heatmap)."""
        from paramscope.compute.history import layer_rows

        return layer_rows(self.result, self.unstacked)


def diff(
    a: str | os.PathLike | Checkpoint,
    b: str | os.PathLike | Checkpoint | None = None,
    *,
    step_a: int | None = None,
    step_b: int | None = None,
    item: str | None = None,
    subtree: str | None = None,
    filter: str | None = None,
    unstack: bool = False,
    layer_axis: Sequence[str] | None = None,
    rtol: float = 0.0,
    atol: float = 0.0,
    structure_only: bool = False,
    digest_only: bool = False,
    rename: Sequence[str] = (),
    transpose: Sequence[str] = (),
    map_file: str | os.PathLike | None = None,
    show_all: bool = False,
    sort: str = "path",
    top: int | None = None,
    memory_budget: int | str | None = None,
    engine: str = "auto",
    mesh: str | None = None,
    cluster=None,
    on_bytes: Callable[[int], Any] | None = None,
    on_total: Callable[[int], Any] | None = None,
) -> Result:
    """Two checkpoints, or two steps of one (``b`` None), compared as ``paramscope diff``
    compares them: added, removed, reshaped, and how every value moved.

    ``a`` and ``b`` are paths (opened with ``step_a``/``step_b``, ``item``, ``subtree``,
    ``filter``) or opened :class:`Checkpoint` s; ``b`` may be a baseline a snapshot wrote (then
    ``a`` is compared with the digests it recorded). ``rename``/``transpose``/``map_file`` pair
    differently named arrays (``--rename REGEX=REPLACEMENT``, ``--transpose REGEX``, ``--map``).
    ``result.value.differs`` says whether anything differs.
    """
    from paramscope.compute.baseline import baseline_at
    from paramscope.compute.diff import diff_digests, diff_params
    from paramscope.compute.pairing import NO_RULES, command_line_rules, load_map
    from paramscope.output.reports import diff_report

    rules = load_map(os.fspath(map_file)) if map_file is not None else NO_RULES
    rules = rules.then(command_line_rules(list(rename) or None, list(transpose) or None))
    notes: list[str] = []  # things worth knowing that are not problems
    if b is None and step_a is None and step_b is None and not isinstance(a, Checkpoint):
        step_a, step_b = last_two_steps(a)
        notes.append(f"comparing step {step_a} with step {step_b}, the latest two")
    baseline = None
    if b is not None and not isinstance(b, Checkpoint):
        baseline = baseline_at(os.fspath(b))  # by content: a safetensors index is JSON too
    if rules.transpose and (digest_only or baseline is not None):
        raise UsageError(
            "--transpose needs the values of both sides: "
            + ("--digest-only" if digest_only else "a baseline")
            + " compares digests of bytes in stored order",
            hint="compare two checkpoints without --digest-only; that diff reports both digests too",
        )
    layered = dict(unstack=unstack or rules.unstack, layer_axis=layer_axis, cluster=cluster)

    def opened(side, step) -> Checkpoint:
        if isinstance(side, Checkpoint):
            return side
        return open(side, step=step, item=item, subtree=subtree, filter=filter, **layered)

    ck_a = opened(a, step_a)
    warnings = list(ck_a.warnings)
    if rules.active:
        from paramscope.compute.pairing import unused_rules

        warnings += unused_rules([p.path for p in ck_a.params], rules)
    inv_a = replace_views(ck_a.inventory)  # a diff reads each (layer) parameter by itself

    def digests_of(inv, params) -> dict[str, str]:
        note = key_note(params)
        if note and note not in warnings:
            warnings.append(note)
        scanned = read_numbers(
            inv,
            params,
            digest=True,
            memory_budget=memory_budget,
            engine=engine,
            mesh=mesh,
            cluster=cluster,
            on_bytes=on_bytes,
            on_total=on_total,
        )
        return {r.param.path: r.digest for r in scanned.params}

    if baseline is not None:
        from dataclasses import replace

        from paramscope.io.inventory import filter_params

        shown = os.fspath(b)
        recorded = baseline.digests()
        if not recorded:
            raise UsageError(
                f"baseline {shown} records no digests", hint="write it with this `paramscope snapshot`"
            )
        side_b = filter_params(baseline.as_params(), filter)
        result = diff_digests(ck_a.params, digests_of(inv_a, ck_a.params), side_b, recorded, rules)
        inv_b = replace(inv_a, checkpoint=shown, shown=shown, params=side_b, step=None)
    else:
        ck_b = opened(b if b is not None else (a if not isinstance(a, Checkpoint) else a.path), step_b)
        warnings += [w for w in ck_b.warnings if w not in warnings]
        inv_b = replace_views(ck_b.inventory)
        if digest_only:
            digests_a = digests_of(inv_a, ck_a.params)
            digests_b = digests_of(inv_b, ck_b.params)
            result = diff_digests(ck_a.params, digests_a, ck_b.params, digests_b, rules)
        else:
            if on_total is not None and not structure_only:
                on_total(2 * sum(p.nbytes for p in ck_a.params))

            def compare():
                return diff_params(
                    ck_a.params,
                    ck_b.params,
                    rtol=rtol,
                    atol=atol,
                    values=not structure_only,
                    memory_budget=memory_budget,
                    on_bytes=on_bytes,
                    rules=rules,
                    **({"cluster": cluster} if cluster is not None else {}),
                )

            result = unchanged_after(inv_a, lambda: unchanged_after(inv_b, compare))
    values = not (structure_only or digest_only or baseline is not None)
    report = diff_report(inv_a, inv_b, result, values, show_all, sort, top)
    return Result(report, warnings, result, notes)


def replace_views(inv: Inventory) -> Inventory:
    """The inventory without its views: a diff reads each (layer) parameter by itself."""
    from dataclasses import replace

    return replace(inv, views=None)


def last_two_steps(path: str | os.PathLike) -> tuple[int, int]:
    """The two latest finished steps of a run: what ``diff RUN`` compares when no step is named
    (a step compared with itself says nothing)."""
    from paramscope.io import checkpoint

    location = checkpoint.locate(os.fspath(path))
    finished = sorted(s.step for s in location.steps if s.finished and s.step is not None)
    if location.kind != "root" or len(finished) < 2:
        raise UsageError(
            f"diff of {os.fspath(path)} alone needs a run of two finished steps or more",
            hint="name the other checkpoint (diff A B), or the steps (--step-a N, --step-b M)",
        )
    return finished[-2], finished[-1]
