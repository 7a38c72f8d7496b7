"""A run at a glance: every step of a CheckpointManager root, per parameter, in one process.

For each step: each parameter's norm (with ``full``, every statistic) and NaN/Inf count, and the
relative change from the step before, ||W_t - W_(t-1)|| / ||W_(t-1)||. Steps are read region by
region together: for each box of a parameter, the box of every step in turn, so each step is
read once and two consecutive steps' boxes are compared while both are in memory (memory stays
bounded by the budget, however many steps).

Results are cached per step in a JSON file outside the checkpoint, one file per root and
selection (item, subtree, filter, layering), each step keyed by what identifies its data
(:func:`paramscope.io.checkpoint.data_stamp`: the commit timestamp and each item's ``_METADATA``
and OCDBT manifest, or the files' sizes and mtimes where there is no commit time, a flax
``_gda`` folder included). A second run reads only the steps it has not seen (and the step
before each, for the change). An entry is invalid once its step's stamp changes (a step or item
rewritten in place), and a step's change once the stamp of the step before it does. A cache file
that cannot be read, and any entry in it of the wrong shape, is ignored with a warning, never
trusted.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import tempfile
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from paramscope.compute.moments import BLOCK, Accumulator
from paramscope.compute.plan import _boxes, memory_budget_bytes
from paramscope.io import checkpoint
from paramscope.io.inventory import Inventory, ParamInfo
from paramscope.names import path_sort_key, split_path

CACHE_VERSION = 2  # 1 keyed steps by commit timestamp alone


@dataclass
class StepResult:
    step: int
    stamp: str | None  # what identifies the step's data (None: unknown, never cached)
    stats: dict[str, dict[str, Any]]  # path -> {"norm", "nonfinite", and with full the others}
    change: dict[str, float] = field(default_factory=dict)  # path -> relative change from previous
    previous: int | None = None
    cached: bool = False
    previous_stamp: str | None = None  # the change is stale once the step before is rewritten


@dataclass
class History:
    steps: list[StepResult]
    bytes_read: int
    warnings: list[str] = field(default_factory=list)
    damaged: dict[int, str] = field(default_factory=dict)  # step -> why it could not be read

    @property
    def paths(self) -> list[str]:
        return sorted({p for s in self.steps for p in s.stats}, key=path_sort_key)

    def first_nonfinite(self) -> tuple[int, list[str]] | None:
        """The first step with a NaN or Inf, and the parameters that have one there."""
        for result in self.steps:
            bad = sorted(p for p, v in result.stats.items() if v.get("nonfinite"))
            if bad:
                return result.step, bad
        return None


def parse_steps(text: str | None, available: Sequence[int], last: int | None) -> list[int]:
    """The steps asked for: ``START:STOP[:STRIDE]`` (stop included) and/or the ``last`` K.

    >>> parse_steps("100:300:100", [100, 150, 200, 300, 400], None)
    [100, 200, 300]
    >>> parse_steps(None, [1, 2, 3, 4], 2)
    [3, 4]
    """
    from paramscope.errors import UsageError

    steps = sorted(available)
    if text:
        match = re.fullmatch(r"(\d*):(\d*)(?::(\d+))?", text.strip())
        if match is None:
            raise UsageError(
                f"malformed range of steps {text!r}", hint="write START:STOP[:STRIDE], e.g. 1000:5000:1000"
            )
        start, stop, stride = (int(g) if g else None for g in match.groups())
        if stride == 0:
            raise UsageError(
                f"the stride of --steps {text!r} is 0", hint="give a stride of 1 or more, e.g. 1000:5000:1000"
            )
        steps = [
            s
            for s in steps
            if (start is None or s >= start)
            and (stop is None or s <= stop)
            and (stride is None or (s - (start or 0)) % stride == 0)
        ]
    if last is not None:
        steps = steps[-last:]
    return steps


# ----------------------------------------------------------------------------------------------
# Cache


class HistoryCache:
    """Per-step results of one checkpoint root, in one JSON file under ``folder`` (see the module
    docstring for what each entry is keyed on and when it is invalidated)."""

    def __init__(self, folder: str, root: str, selection: dict[str, Any]):
        key = json.dumps({"root": root, **selection}, sort_keys=True)
        self.path = os.path.join(folder, hashlib.sha256(key.encode()).hexdigest()[:24] + ".json")
        self.warnings: list[str] = []
        self.entries: dict[str, Any] = {}
        try:
            with open(self.path) as f:
                document = json.load(f)
            if not isinstance(document, dict):
                raise ValueError("not an object")
            if document.get("version") != CACHE_VERSION or document.get("key") != key:
                raise ValueError("another version or key")
            if not isinstance(document.get("steps"), dict):
                raise ValueError("no steps")
            self.entries = document["steps"]
        except FileNotFoundError:
            pass
        except RecursionError:
            self.warnings.append(f"ignoring the unreadable history cache {self.path} (nested too deeply)")
        except (OSError, ValueError) as err:
            self.warnings.append(f"ignoring the unreadable history cache {self.path} ({err})")
        self.key = key

    def _entry(self, step: int) -> dict[str, Any] | None:
        """A step's entry when it has the shape this version writes; a damaged one is dropped,
        with a warning, and the step read again."""
        entry = self.entries.get(str(step))
        if entry is None or _valid_entry(entry):
            return entry
        self.warnings.append(f"ignoring the damaged entry of step {step} in the history cache {self.path}")
        del self.entries[str(step)]
        return None

    def get(self, step: int, stamp: str | None, full: bool) -> StepResult | None:
        """A step's results, if cached for this very data (the selection is part of the key)."""
        entry = self._entry(step)
        if entry is None or stamp is None or entry["stamp"] != stamp:
            return None
        stats = entry["stats"]
        if full and not all("mean" in v for v in stats.values()):
            return None
        return StepResult(
            step,
            stamp,
            {path: dict(values) for path, values in stats.items()},
            dict(entry.get("change") or {}),
            entry.get("previous"),
            True,
            entry.get("previous_stamp"),
        )

    def put(self, result: StepResult) -> None:
        if result.stamp is None:
            return  # a step whose data nothing identifies cannot be told apart from its rewrite
        entry = self._entry(result.step)
        if entry is None or entry["stamp"] != result.stamp:
            entry = {"stamp": result.stamp, "stats": {}, "change": {}, "previous": None}
        entry["stats"].update(result.stats)
        if result.previous is not None:
            if entry.get("previous") != result.previous:
                entry["change"] = {}
            entry.setdefault("change", {})
            entry["previous"] = result.previous
            entry["previous_stamp"] = result.previous_stamp
            entry["change"].update(result.change)
        self.entries[str(result.step)] = entry

    def save(self) -> None:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        document = {"version": CACHE_VERSION, "key": self.key, "steps": self.entries}
        handle, temporary = tempfile.mkstemp(dir=os.path.dirname(self.path), suffix=".tmp")
        with os.fdopen(handle, "w") as f:
            json.dump(document, f, allow_nan=True)
        os.replace(temporary, self.path)  # never a half-written cache


def _is_number(value: Any) -> bool:
    """None, or a JSON number a float holds (NaN and Inf included: they are results too)."""
    if value is None:
        return True
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        float(value)
    except OverflowError:
        return False
    return True


def _valid_entry(entry: Any) -> bool:
    """Whether a cache entry has the shape :meth:`HistoryCache.put` writes (numbers may be NaN)."""
    if not isinstance(entry, dict) or not isinstance(entry.get("stamp"), str):
        return False
    stats, change = entry.get("stats"), entry.get("change", {})
    if not isinstance(stats, dict) or not isinstance(change, dict):
        return False
    if not all(
        isinstance(values, dict) and all(isinstance(k, str) and _is_number(v) for k, v in values.items())
        for values in stats.values()
    ):
        return False
    if not all(_is_number(v) for v in change.values()):
        return False
    previous, previous_stamp = entry.get("previous"), entry.get("previous_stamp")
    return (previous is None or (isinstance(previous, int) and not isinstance(previous, bool))) and (
        previous_stamp is None or isinstance(previous_stamp, str)
    )


# ----------------------------------------------------------------------------------------------
# The pass


def _stats(acc: Accumulator, full: bool) -> dict[str, Any]:
    moments = acc.result()
    if full:
        return {**moments.stats(), "nonfinite": moments.nonfinite}
    return {"norm": moments.norm, "nonfinite": moments.nonfinite}


LOOKAHEAD = 3  # steps whose box is being read while one is reduced


def read_steps(
    inventories: Sequence[Inventory],
    params: Sequence[Sequence[ParamInfo]],
    full: bool,
    memory_budget: int | str | None = None,
    on_bytes: Callable[[int], Any] | None = None,
    cluster=None,
    known_first: StepResult | None = None,
) -> tuple[list[StepResult], int]:
    """Norms (or statistics) of every parameter of consecutive steps, and each step's change from
    the one before, every step read once, box by box across the steps.

    ``known_first``: what is already known of the first step (cached): it is read only for the
    change of the step after it, and its known numbers are neither computed again nor replaced.

    With a joined ``cluster`` the parameters are dealt out among the processes (a parameter's
    series is read whole by one of them) and the results shared, so every process returns all.
    """
    budget = memory_budget_bytes(memory_budget)
    results = [StepResult(inv.step, None, {}) for inv in inventories]
    for k in range(1, len(results)):
        results[k].previous = results[k - 1].step
    by_path = [{p.path: p for p in step_params} for step_params in params]
    paths = sorted(set().union(*by_path), key=path_sort_key) if by_path else []
    shared = cluster is not None and cluster.active
    if shared:
        paths = paths[cluster.process_id :: cluster.num_processes]
    pool = ThreadPoolExecutor(max_workers=os.cpu_count() or 1)
    # a box of two steps and their float64 difference in memory, the next LOOKAHEAD being read
    limit = max(1, budget // (4 + LOOKAHEAD + 1))
    jobs: list[_Run] = []
    for path in paths:
        present = [k for k, found in enumerate(by_path) if path in found]
        # runs of consecutive steps of one shape: a change is measured within a run only
        runs: list[list[int]] = []
        for k in present:
            if runs and runs[-1][-1] == k - 1 and by_path[k - 1][path].shape == by_path[k][path].shape:
                runs[-1].append(k)
            else:
                runs.append([k])
        for run in runs:
            known = known_first.stats.get(path) if known_first is not None and run[0] == 0 else None
            if not (isinstance(known, dict) and isinstance(known.get("norm"), (int, float))):
                known = None  # not known (or not readable from the cache): computed again
            jobs.append(_Run(path, [by_path[k][path] for k in run], run, known, full, limit))
    bytes_read = _read_runs(jobs, results, on_bytes, pool)
    pool.shutdown(wait=False)
    if shared:
        bytes_read = _share(cluster, results, bytes_read)
    return results, bytes_read


def _share(cluster, results: list[StepResult], bytes_read: int) -> int:
    """Every process's per-parameter results merged into ``results``; the bytes all of them read."""
    from paramscope.parallel.cluster import gather_bytes

    mine = {"bytes": bytes_read, "steps": [[r.stats, r.change] for r in results]}
    total = 0
    for data in gather_bytes(cluster, json.dumps(mine, allow_nan=True).encode(), "history"):
        theirs = json.loads(data)
        total += theirs["bytes"]
        for result, (stats, change) in zip(results, theirs["steps"]):
            result.stats.update(stats)
            result.change.update(change)
    for result in results:  # in path order, whichever process read them
        result.stats = {p: result.stats[p] for p in sorted(result.stats, key=path_sort_key)}
        result.change = {p: result.change[p] for p in sorted(result.change, key=path_sort_key)}
    return total


SPAN = 1 << 22  # elements of one task of the thread pool


def difference_sum_sq(a: np.ndarray, b: np.ndarray, pool=None) -> list[float]:
    """The sums of (a - b)^2 by blocks of :data:`~paramscope.compute.moments.BLOCK` elements, the
    difference taken in float64 (exact for every dtype up to 32 bits; |a - b|^2 for complex) one
    block at a time, never as a whole float64 array."""
    flat_a, flat_b = np.ascontiguousarray(a).reshape(-1), np.ascontiguousarray(b).reshape(-1)
    wide = np.complex128 if np.iscomplexobj(flat_a) else np.float64

    def span(start: int, stop: int) -> list[float]:
        buffer = np.empty(min(BLOCK, stop - start), wide)
        sums = []
        for lo in range(start, stop, BLOCK):
            hi = min(lo + BLOCK, stop)
            d = buffer[: hi - lo]
            np.subtract(flat_a[lo:hi], flat_b[lo:hi], out=d, dtype=wide)
            sums.append(
                float(np.vdot(d, d).real) if wide is np.complex128 else float(np.einsum("i,i->", d, d))
            )
        return sums

    spans = [(lo, min(lo + SPAN, flat_a.size)) for lo in range(0, flat_a.size, SPAN)]
    mapper = pool.map if pool is not None and len(spans) > 1 else map
    return [total for part in mapper(lambda bounds: span(*bounds), spans) for total in part]


class _Run:
    """One parameter over consecutive steps of one shape, read box by box, each step's box once.
    ``known``: the first step's numbers, already known (it is read for the next one's change)."""

    def __init__(self, path, arrays, run, known, full, limit):
        self.path, self.arrays, self.run, self.known, self.full = path, arrays, run, known, full
        first = arrays[0]
        self.boxes = list(
            _boxes(first.shape, first.stored.chunks if first.stored else (), first.itemsize, limit)
        )
        self.whole = math.prod(first.shape)
        self.values = [Accumulator(full) for _ in arrays]
        self.deltas: list[list[float]] = [[] for _ in arrays[1:]]  # sums of (W_t - W_t-1)^2, by block
        self.handles: list[Any] | None = None
        self.previous = None

    def reads(self):
        """(box index, step index) in the order they are reduced."""
        return [(b, k) for b in range(len(self.boxes)) for k in range(len(self.arrays))]

    def start(self, b: int, k: int):
        if self.handles is None:
            self.handles = [checkpoint.open_array(a.stored) for a in self.arrays]
        array = self.arrays[k]
        return checkpoint.start_read(self.handles[k], array.index_in_store(self.boxes[b]), self.path)

    def reduce(self, k: int, value, pool) -> None:
        previous = self.previous if k else None
        fused = None
        if previous is not None and value.size == self.whole:
            fused = self.values[k].feed_difference(value, previous, pool)  # one upcast for both
        if fused is not None:
            self.deltas[k - 1] += fused
        else:
            if k or self.known is None:
                self.values[k].feed(value, pool)
            if previous is not None:
                self.deltas[k - 1] += difference_sum_sq(value, previous, pool)
        self.previous = value

    def finish(self, results: list[StepResult]) -> None:
        self.handles = self.previous = None
        path, run, known = self.path, self.run, self.known
        for k, step in enumerate(run):
            results[step].stats[path] = (
                known if not k and known is not None else _stats(self.values[k], self.full)
            )
        for k, delta in enumerate(self.deltas, start=1):
            norm_before = results[run[k - 1]].stats[path]["norm"]
            norm_delta = math.sqrt(math.fsum(delta))
            change = norm_delta / norm_before if norm_before else (0.0 if not norm_delta else math.inf)
            results[run[k]].change[path] = change


def _read_runs(jobs: list[_Run], results: list[StepResult], on_bytes, pool) -> int:
    """Reads every run's boxes in order, the next LOOKAHEAD + 1 reads always on their way (decoded
    on every core while one is reduced), across boxes and runs alike: the decoding never waits
    for the end of a parameter. Returns the bytes read."""
    order = [(job, b, k) for job in jobs for b, k in job.reads()]
    pending: dict[int, Any] = {}
    nbytes = 0
    for i, (job, _, k) in enumerate(order):
        for ahead in range(i, min(i + 1 + LOOKAHEAD, len(order))):
            if ahead not in pending:
                other, b, step = order[ahead]
                pending[ahead] = other.start(b, step)
        value = checkpoint.finish_read(pending.pop(i), job.path)
        nbytes += value.nbytes
        job.reduce(k, value, pool)
        if on_bytes is not None:
            on_bytes(value.nbytes)
        if i + 1 == len(order) or order[i + 1][0] is not job:
            job.finish(results)
    return nbytes


class _Damaged(Exception):
    def __init__(self, step: int, error: Exception):
        super().__init__(step, error)
        self.step, self.error = step, error


def history(
    steps: Sequence[int],
    stamp_of: Callable[[int], int | None],
    open_step: Callable[[int], tuple[Inventory, list[ParamInfo]]],
    full: bool = False,
    memory_budget: int | str | None = None,
    cache: HistoryCache | None = None,
    on_bytes: Callable[[int], Any] | None = None,
    cluster=None,
) -> History:
    """The history of the given steps; cached steps are neither read nor even opened (see the
    module docstring). ``stamp_of(step)`` is what identifies the step's data (cheap: a few small
    metadata files); ``open_step(step)`` its inventory and selected parameters. With a joined
    ``cluster``, each process reads its share of the parameters and all end with every series.

    A step that cannot be opened or read (a checkpoint problem: damaged, deleted meanwhile) is
    left out and named in ``damaged``; every other step keeps its numbers, the change of the step
    after it measured from the step before it. Raises the first step's error when none is left.
    """
    from paramscope.errors import ParamscopeError

    damaged: dict[int, str] = {}
    first_error = None
    while True:
        kept = [s for s in steps if s not in damaged]
        if not kept:
            raise first_error
        try:
            found = _history(kept, stamp_of, open_step, full, memory_budget, cache, on_bytes, cluster)
        except _Damaged as err:
            shared = cluster is not None and cluster.active  # the processes must agree on the steps
            if shared or not isinstance(err.error, ParamscopeError) or err.error.exit_code != 3:
                raise err.error from None
            first_error = first_error or err.error
            damaged[err.step] = err.error.message
            continue
        found.damaged = damaged
        return found


def _open(step: int, open_step):
    try:
        return open_step(step)
    except Exception as err:
        raise _Damaged(step, err) from None


def _history(steps, stamp_of, open_step, full, memory_budget, cache, on_bytes, cluster) -> History:
    # what identifies each step's data, for the cache alone (reading every item's metadata for it)
    stamps = [_stamp(s, stamp_of) for s in steps] if cache is not None else [None] * len(steps)
    results: list[StepResult | None] = []
    for k, step in enumerate(steps):
        hit = cache.get(step, stamps[k], full) if cache else None
        if hit is not None and k and (hit.previous, hit.previous_stamp) != (steps[k - 1], stamps[k - 1]):
            hit = None  # its change was from another step (or another save of it) than the one before
        results.append(hit)
    bytes_read = 0
    k = 0
    while k < len(steps):  # runs of steps to read; each with the step before it, for the change
        if results[k] is not None:
            k += 1
            continue
        start = k - 1 if k else 0
        end = k
        while end + 1 < len(steps) and results[end + 1] is None:
            end += 1
        run = list(range(start, end + 1))
        opened = [_open(steps[i], open_step) for i in run]
        known_first = results[start] if start < k else None
        try:
            read, nbytes = _read(opened, full, memory_budget, on_bytes, cluster, known_first)
        except Exception as err:
            if len(run) == 1 or cluster is not None and cluster.active:
                raise _Damaged(steps[run[0]], err) from None
            for i, one in zip(run, opened):  # which step it was: each read alone
                try:
                    _read([one], full, memory_budget, None, None, None)
                except Exception as alone:
                    raise _Damaged(steps[i], alone) from None
            raise
        bytes_read += nbytes
        for i, result in zip(run, read):
            result.stamp = stamps[i]
            result.previous_stamp = stamps[i - 1] if i else None
            if i == start and start < k:  # read again only for the change: keep what was known
                continue
            if i == 0:
                result.previous, result.change = None, {}
            results[i] = result
        k = end + 1
    final = [r for r in results if r is not None]
    if cache is not None:
        for result in final:
            if not result.cached:
                cache.put(result)
        try:
            cache.save()
        except OSError as err:
            cache.warnings.append(f"could not write the history cache {cache.path} ({err.strerror})")
    return History(final, bytes_read, list(cache.warnings) if cache else [])


def _stamp(step: int, stamp_of):
    try:
        return stamp_of(step)
    except Exception as err:
        raise _Damaged(step, err) from None


def _read(opened, full, memory_budget, on_bytes, cluster, known_first):
    for inv, _ in opened:
        inv.begin_read()
    try:
        return read_steps(
            [o[0] for o in opened],
            [o[1] for o in opened],
            full,
            memory_budget,
            on_bytes,
            cluster,
            known_first=known_first,
        )
    finally:  # a step deleted or saved again meanwhile is named, whatever its reads gave
        for inv, _ in opened:
            inv.check_unchanged()


# ----------------------------------------------------------------------------------------------
# Series


@dataclass
class Series:
    """One parameter (or group of parameters) across the steps."""

    path: str
    steps: list[int]
    norms: list[float]
    changes: list[float | None]  # relative change from the step before (None: first, or unknown)
    nonfinite: list[int]

    @property
    def drift(self) -> float:
        """How far the norm moved from the first step to the last, relative to the first."""
        first, last = self.norms[0], self.norms[-1]
        if math.isnan(first) or math.isnan(last):
            return math.nan  # a norm that became NaN has no distance to measure
        if math.isinf(first) or math.isinf(last):
            return math.inf
        return abs(last - first) / first if first else (0.0 if not last else math.inf)


def series(result: History, depth: int | None = None) -> list[Series]:
    """Per parameter (``depth`` None) or per group of the first ``depth`` path components: the
    group's norm is over all its arrays, its change ||sum of their updates|| / ||group before||."""
    steps = [r.step for r in result.steps]

    def group_of(path: str) -> str:
        return path if depth is None else ".".join(split_path(path)[:depth]) or "(all)"

    groups: dict[str, list[str]] = {}
    for path in result.paths:
        groups.setdefault(group_of(path), []).append(path)
    out = []
    for name, members in sorted(groups.items(), key=lambda entry: path_sort_key(entry[0])):
        norms, changes, nonfinite = [], [], []
        for k, step in enumerate(result.steps):
            squares = [step.stats[p]["norm"] ** 2 for p in members if p in step.stats]
            norms.append(math.sqrt(math.fsum(squares)) if squares else math.nan)
            nonfinite.append(sum(step.stats[p].get("nonfinite", 0) for p in members if p in step.stats))
            if k == 0 or not any(p in step.change for p in members):
                changes.append(None)
                continue
            before = result.steps[k - 1].stats
            moved = [(step.change[p] * before[p]["norm"]) ** 2 for p in members if p in step.change]
            base = [before[p]["norm"] ** 2 for p in members if p in step.change]
            total = math.sqrt(math.fsum(base))
            changes.append(math.sqrt(math.fsum(moved)) / total if total else None)
        out.append(Series(name, steps, norms, changes, nonfinite))
    return out


def layer_rows(result: History, layers: Sequence[ParamInfo]) -> dict[str, list[list[float]]]:
    """Per stack (the path up to the layer index), per layer, the layer's norm at each step: the
    norm over all the arrays of that layer (``layers``: the unstacked parameters, ``layer`` set)."""

    members: dict[tuple[str, int], list[str]] = {}
    for param in layers:
        parts = split_path(param.path)
        index = str(param.layer[1])
        at = next(k for k in range(len(parts)) if parts[k] == index and k > 0)
        members.setdefault((".".join(parts[:at]), param.layer[1]), []).append(param.path)
    stacks: dict[str, list[list[float]]] = {}
    for (stack, _layer), paths in sorted(members.items()):  # layers in order, one row each
        row = []
        for step in result.steps:
            squares = [step.stats[p]["norm"] ** 2 for p in paths if p in step.stats]
            row.append(math.sqrt(math.fsum(squares)) if squares else math.nan)
        stacks.setdefault(stack, []).append(row)
    return stacks
