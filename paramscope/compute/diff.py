"""Comparing two checkpoints, parameter by parameter: structure, and values in one streaming pass.

Parameters are matched by path. Those in both with the same shape are read region by region from
both checkpoints at once (under the memory budget, each region's two reads in flight together)
and reduced in float64 blocks: the norms of A, B and A - B, their inner product, the largest
absolute difference, how many elements differ beyond ``atol + rtol * |a|`` (numpy's ``isclose``
with A as the reference), and whether the two are bit-identical.

Across naming schemes (a converted checkpoint) :class:`~paramscope.compute.pairing.PairingRules`
rename A's paths before pairing, and some of A's arrays are compared transposed: the region of B
at index ``(i, j, ...)`` is compared with A's region at the reversed index, read as such and
transposed in memory, so the reads stay as bounded as any other.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from paramscope.compute.digest import DigestState, feed_box, merge_digests
from paramscope.compute.moments import BLOCK
from paramscope.compute.pairing import NO_RULES, PairingRules, renamed_paths
from paramscope.compute.plan import memory_budget_bytes, stream_regions
from paramscope.errors import ParamscopeError
from paramscope.io import checkpoint
from paramscope.io.inventory import ParamInfo, param_sharding_json, sharding_json
from paramscope.names import path_sort_key, spec_text
from paramscope.parallel.cluster import LOCAL, Cluster, agree_on_failure, gather_float64, share

STATUSES = ("identical", "close", "changed", "added", "removed")


@dataclass
class ValueDiff:
    norm_a: float
    norm_b: float
    diff_norm: float
    cosine: float
    max_abs_diff: float
    beyond_tolerance: int
    identical: bool

    @property
    def rel_diff(self) -> float:
        if self.norm_a:
            return self.diff_norm / self.norm_a
        return 0.0 if self.diff_norm == 0 else math.inf


@dataclass
class ParamDiff:
    path: str  # the name A and B are paired under (A's path after renaming)
    status: str
    a: ParamInfo | None
    b: ParamInfo | None
    changes: list[str] = field(default_factory=list)  # structure: "shape (2, 3) -> (3, 2)", ...
    values: ValueDiff | None = None
    digest_a: str | None = None  # content digests, when compared by digest
    digest_b: str | None = None
    transposed: bool = False  # A's array compared transposed

    @property
    def path_a(self) -> str | None:
        """A's own path (before renaming); None for an array only in B."""
        return self.a.path if self.a is not None else None


@dataclass
class DiffResult:
    params: list[ParamDiff]
    rtol: float
    atol: float
    rules: PairingRules = NO_RULES

    def counts(self) -> dict[str, int]:
        return {status: sum(p.status == status for p in self.params) for status in STATUSES}

    @property
    def differs(self) -> bool:
        return any(p.status in ("changed", "added", "removed") for p in self.params)


class _PairSums:
    """Float64 block sums of one parameter's two versions, fed region by region."""

    def __init__(self, rtol: float, atol: float):
        self.rtol, self.atol = rtol, atol
        self.aa: list[float] = []
        self.bb: list[float] = []
        self.dd: list[float] = []
        self.ab: list[float] = []
        self.max_abs = 0.0
        self.beyond = 0
        self.identical = True

    def feed(self, a: np.ndarray, b: np.ndarray) -> None:
        same = self.identical and a.dtype == b.dtype and _same_bytes(a, b)
        self.identical = same
        a, b = a.reshape(-1), b.reshape(-1)
        for start in range(0, a.size, BLOCK):
            x = a[start : start + BLOCK].astype(np.float64)
            if same:  # the same bits (an unchanged parameter): B's sums are A's, the difference 0
                xx = float(np.einsum("i,i->", x, x))
                if math.isfinite(xx):
                    self.aa.append(xx)
                    self.bb.append(xx)
                    self.ab.append(xx)
                    self.dd.append(0.0)
                    continue
            y = b[start : start + BLOCK].astype(np.float64)
            d = x - y
            dd = float(np.einsum("i,i->", d, d))
            if not math.isfinite(dd):  # NaN or Inf somewhere: look for them in both
                equal = (x == y) | (np.isnan(x) & np.isnan(y))
                if equal.any():  # the same Inf, or a NaN, in both is no difference (inf - inf is NaN)
                    d[equal] = 0.0
                    dd = float(np.einsum("i,i->", d, d))
            self.aa.append(float(np.einsum("i,i->", x, x)))
            self.bb.append(float(np.einsum("i,i->", y, y)))
            self.dd.append(dd)
            self.ab.append(float(np.einsum("i,i->", x, y)))
            magnitude = np.abs(d)
            if magnitude.size:
                self.max_abs = max(self.max_abs, float(magnitude.max()))
            with np.errstate(invalid="ignore"):
                self.beyond += int(
                    magnitude.size
                    - np.count_nonzero((magnitude == 0) | (magnitude <= self.atol + self.rtol * np.abs(x)))
                )

    def summary(self) -> list[float]:
        """What another process needs to merge these sums: exact sums, extremes and counts."""
        return [
            math.fsum(self.aa),
            math.fsum(self.bb),
            math.fsum(self.dd),
            math.fsum(self.ab),
            self.max_abs,
            self.beyond,
            float(self.identical),
        ]

    def merge_summary(self, summary) -> None:
        aa, bb, dd, ab, max_abs, beyond, identical = (float(v) for v in summary)
        self.aa.append(aa)
        self.bb.append(bb)
        self.dd.append(dd)
        self.ab.append(ab)
        self.max_abs = max(self.max_abs, max_abs)
        self.beyond += int(beyond)
        self.identical = self.identical and bool(identical)

    def result(self) -> ValueDiff:
        aa, bb = math.fsum(self.aa), math.fsum(self.bb)
        denominator = math.sqrt(aa) * math.sqrt(bb)
        cosine = math.fsum(self.ab) / denominator if denominator else (1.0 if aa == bb == 0 else 0.0)
        return ValueDiff(
            norm_a=math.sqrt(aa),
            norm_b=math.sqrt(bb),
            diff_norm=math.sqrt(math.fsum(self.dd)),
            cosine=cosine,
            max_abs_diff=self.max_abs,
            beyond_tolerance=self.beyond,
            identical=self.identical,
        )


def _same_bytes(a: np.ndarray, b: np.ndarray) -> bool:
    """Bit-identical: for small arrays a bytes comparison, which costs a tenth of array_equal's
    fixed overhead (it matters for thousands of small arrays); larger ones are not copied."""
    if a.nbytes <= _SMALL_BYTES:
        return a.tobytes() == b.tobytes()
    return np.array_equal(np.ascontiguousarray(a).view(np.uint8), np.ascontiguousarray(b).view(np.uint8))


_SMALL_BYTES = 1 << 16


def _structure_changes(a: ParamInfo, b: ParamInfo, transposed: bool = False) -> list[str]:
    """What differs in shape, dtype and saved sharding; A's as compared (transposed: ``A.T``).
    A format that stores no sharding (safetensors, npz) leaves nothing to compare it with."""
    changes = []
    shape, sharding = a.shape, a.sharding
    if transposed:
        shape = shape[::-1]
        sharding = sharding[::-1] if sharding is not None else None
    seen = "A.T " if transposed else ""
    if shape != b.shape:
        changes.append(f"shape {seen}{shape} -> {b.shape}")
    if a.dtype != b.dtype:
        changes.append(f"dtype {a.dtype} -> {b.dtype}")
    if a.sharding_stored and b.sharding_stored and sharding != b.sharding:
        changes.append(f"sharding {seen}{_sharding_text(a, sharding)} -> {_sharding_text(b, b.sharding)}")
    return changes


def _sharding_text(param: ParamInfo, spec) -> str:
    """``spec`` (the param's, or its transpose) as every table writes a sharding."""
    return spec_text(sharding_json(spec) if spec is not None else param_sharding_json(param))


def _reversed(index: tuple[slice, ...] | None) -> tuple[slice, ...] | None:
    """The index of A's box that holds, transposed, B's box at ``index``."""
    return None if index is None else tuple(reversed(index))


def diff_params(
    params_a: Sequence[ParamInfo],
    params_b: Sequence[ParamInfo],
    *,
    rtol: float = 0.0,
    atol: float = 0.0,
    values: bool = True,
    memory_budget: int | str | None = None,
    on_bytes: Callable[[int], Any] | None = None,
    cluster: Cluster = LOCAL,
    rules: PairingRules = NO_RULES,
) -> DiffResult:
    """Compares two checkpoints' parameters (from :func:`paramscope.open_checkpoint`).

    Args:
        params_a: The reference (A).
        params_b: The other (B).
        rtol, atol: An element differs when ``|a - b| > atol + rtol * |a|``.
        values: Compare values (reads both); False compares structure only.
        memory_budget: Bytes of array data held at once, both sides together.
        on_bytes: Called with the bytes of each region once compared (progress).
        cluster: Cooperating processes; each compares its share, all end with the result.
        rules: How A's paths are renamed to pair them with B's, and which of A's arrays are
            compared transposed.

    Raises:
        UsageError: The rules give two of A's arrays the same name.
    """
    by_path_b = {p.path: p for p in params_b}
    names = renamed_paths((p.path for p in params_a), rules)
    paired: set[str] = set()
    diffs: list[ParamDiff] = []
    pairs: list[tuple[ParamDiff, ParamInfo, ParamInfo]] = []
    for a in params_a:
        path = names[a.path]
        transposed = rules.transposed(path)
        b = by_path_b.get(path)
        if b is None:
            diffs.append(ParamDiff(path, "removed", a, None, transposed=transposed))
            continue
        paired.add(path)
        entry = ParamDiff(
            path, "identical", a, b, _structure_changes(a, b, transposed), transposed=transposed
        )
        diffs.append(entry)
        if entry.changes:
            entry.status = "changed"
        if (a.shape[::-1] if transposed else a.shape) == b.shape and values:
            pairs.append((entry, a, b))
    diffs += [ParamDiff(b.path, "added", None, b) for b in params_b if b.path not in paired]
    if pairs:
        _compare_values(pairs, rtol, atol, memory_budget, on_bytes, cluster)
    return DiffResult(sorted(diffs, key=lambda d: path_sort_key(d.path)), rtol, atol, rules)


def _compare_values(pairs, rtol, atol, memory_budget, on_bytes, cluster: Cluster) -> None:
    flips = [entry.transposed for entry, _, _ in pairs]
    # Regions are planned over the array whose index is the comparison's: A's, or B's where A is
    # compared transposed (counting the larger itemsize of the two); the other is its partner.
    planned, partners = [], []
    for (_, a, b), flip in zip(pairs, flips):
        planned.append(replace(b, itemsize=max(a.itemsize, b.itemsize)) if flip else a)
        partners.append(a if flip else b)
    sums = [_PairSums(rtol, atol) for _ in pairs]
    # both sides are read anyway: their content digests come with them
    digests = [
        (DigestState(a.dtype, a.shape, a.itemsize), DigestState(b.dtype, b.shape, b.itemsize))
        for _, a, b in pairs
    ]

    def start(_, handles, region):
        _, a, b = pairs[region.param]
        flip = flips[region.param]
        handle_b, handle_a = handles if flip else handles[::-1]
        index_a = _reversed(region.read_index) if flip else region.read_index
        return (
            checkpoint.start_read(handle_a, a.index_in_store(index_a), a.path),
            checkpoint.start_read(handle_b, b.index_in_store(region.read_index), b.path),
        )

    # Both sides of a region are in memory together, and the next group's are in flight; a
    # transposed region is copied once more, into the order of B's.
    parts = 5 if any(flips) else 4
    limit = max(1, memory_budget_bytes(memory_budget) // parts)
    failure = None
    try:
        for region, (read_a, read_b) in stream_regions(
            planned,
            limit,
            start,
            select=lambda regions: share(cluster, [r.nbytes for r in regions]),
            partners=partners,
        ):
            _, a, b = pairs[region.param]
            value_a, value_b = checkpoint.finish_read(read_a, a.path), checkpoint.finish_read(read_b, b.path)
            state_a, state_b = digests[region.param]
            if flips[region.param]:
                feed_box(state_a, a.shape, _reversed(region.index), value_a)
                value_a = np.ascontiguousarray(value_a.T)
            else:
                feed_box(state_a, a.shape, region.index, value_a)
            feed_box(state_b, b.shape, region.index, value_b)
            sums[region.param].feed(value_a, value_b)
            if on_bytes is not None:
                on_bytes(2 * region.nbytes)
    except ParamscopeError as err:
        if not cluster.active:
            raise
        failure = err
    if cluster.active:
        agree_on_failure(cluster, failure, "comparing")
        vectors = np.array([pair_sums.summary() for pair_sums in sums], dtype=np.float64)
        gathered = gather_float64(cluster, vectors.ravel(), "combining results").reshape(
            cluster.num_processes, len(sums), -1
        )
        sums = [_PairSums(rtol, atol) for _ in pairs]
        for i, pair_sums in enumerate(sums):
            for process in range(cluster.num_processes):
                pair_sums.merge_summary(gathered[process, i])
        merge_digests(cluster, [state for pair in digests for state in pair])
    for (entry, a, b), pair_sums, (state_a, state_b) in zip(pairs, sums, digests):
        entry.values = pair_sums.result()
        entry.digest_a, entry.digest_b = state_a.hexdigest(), state_b.hexdigest()
        keys = bool(a.random_key or b.random_key)
        if entry.status == "identical" and not entry.values.identical:
            entry.status = "changed" if entry.values.beyond_tolerance or keys else "close"
        if keys:  # typed PRNG keys: their bits are compared, but norms of them are no numbers
            entry.values = None


def diff_digests(
    params_a: Sequence[ParamInfo],
    digests_a: Mapping[str, str],
    params_b: Sequence[ParamInfo],
    digests_b: Mapping[str, str],
    rules: PairingRules = NO_RULES,
) -> DiffResult:
    """Compares two sets of parameters by structure and content digest alone (no values read
    together): ``identical`` when the digests agree, else ``changed``.

    ``digests_a`` is keyed by A's own paths; ``rules`` rename them before pairing. A digest is
    of the bytes in their stored order, so no array can be compared transposed this way.
    """
    if rules.transpose:
        raise ValueError("digests compare bytes in stored order: no array can be compared transposed")
    names = renamed_paths((p.path for p in params_a), rules)
    by_path_a = {names[p.path]: p for p in params_a}
    by_path_b = {p.path: p for p in params_b}
    diffs = []
    for path in sorted(by_path_a.keys() | by_path_b.keys(), key=path_sort_key):
        a, b = by_path_a.get(path), by_path_b.get(path)
        if a is None or b is None:
            diffs.append(ParamDiff(path, "added" if a is None else "removed", a, b))
            continue
        da, db = digests_a.get(a.path), digests_b.get(path)
        changes = _structure_changes(a, b)
        same = not changes and da is not None and da == db
        diffs.append(ParamDiff(path, "identical" if same else "changed", a, b, changes, None, da, db))
    return DiffResult(diffs, 0.0, 0.0, rules)
