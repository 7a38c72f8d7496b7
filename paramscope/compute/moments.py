"""Single-pass statistics of array values, exact to float32 rounding and independent of splitting.

An array is reduced in fixed blocks of ``BLOCK`` elements of its flattened values, wherever the
pieces it is read in begin and end (:class:`Accumulator` carries a partial block from one piece
to the next). Each block yields a few partial sums; they are combined with ``math.fsum``, which
is exact, so the result depends neither on the memory budget, nor on the number of threads, nor
on the order the blocks were reduced in: any two runs give bit-identical numbers.

Accuracy: each block is upcast to float64 (exact for every dtype up to 32 bits) and reduced
there, and blocks are added exactly, so sums of squares agree with a float64 reference to about
1e-15 whatever the array's size. The variance adds each block's squared deviations from its own
mean and the between-block term, so a large mean does not cancel a small spread.

Statistics other than the norm (mean, std, min, max, max |x|) are over the finite values; NaN and
Inf are counted. The norm is over all values: a NaN makes it NaN, an Inf makes it Inf.
"""

from __future__ import annotations

import math
from array import array
from dataclasses import dataclass

import numpy as np

BLOCK = 1 << 16


@dataclass(frozen=True)
class Moments:
    """Statistics of one array (``full`` False: only what a norm needs)."""

    count: int
    sum_sq: float
    nan: int
    inf: int
    full: bool = False
    finite: int = 0
    mean: float = math.nan
    m2: float = math.nan
    min: float = math.nan
    max: float = math.nan
    zeros: int = 0

    @property
    def norm(self) -> float:
        return math.sqrt(self.sum_sq)

    @property
    def nonfinite(self) -> int:
        return self.nan + self.inf

    @property
    def std(self) -> float:
        return math.sqrt(max(self.m2, 0.0) / self.finite) if self.finite else math.nan

    @property
    def max_abs(self) -> float:
        return max(abs(self.min), abs(self.max)) if self.finite else math.nan

    @property
    def zero_fraction(self) -> float:
        return self.zeros / self.count if self.count else math.nan

    def stats(self) -> dict[str, float | int]:
        """The statistics by name, as ``paramscope stats`` shows them."""
        return {
            "norm": self.norm,
            "mean": self.mean,
            "std": self.std,
            "min": self.min,
            "max": self.max,
            "max_abs": self.max_abs,
            "zero_fraction": self.zero_fraction,
            "nan": self.nan,
            "inf": self.inf,
        }


class Partials:
    """Per-block partial sums; merging two is concatenation, so order never matters."""

    def __init__(self, full: bool):
        self.full = full
        self.count = self.nan = self.inf = self.zeros = 0
        self.sum_sq = array("d")
        self.finite = array("d")  # finite values per block
        self.sums = array("d")  # sum of the finite values per block
        self.m2 = array("d")  # squared deviations from the block's own mean
        self.min = math.inf
        self.max = -math.inf

    def extend(self, other: Partials) -> None:
        self.count += other.count
        self.nan += other.nan
        self.inf += other.inf
        self.zeros += other.zeros
        self.sum_sq.extend(other.sum_sq)
        self.finite.extend(other.finite)
        self.sums.extend(other.sums)
        self.m2.extend(other.m2)
        self.min = min(self.min, other.min)
        self.max = max(self.max, other.max)

    def add_block(self, values: np.ndarray, source: np.ndarray | None = None) -> None:
        """One block, already upcast to float64; ``source``: the same values in their own
        (narrower, real) dtype, where the zeros are counted and, when all are finite, the
        extremes found: the same numbers, from half the bytes."""
        n = values.size
        self.count += n
        # einsum, not np.dot: BLAS would start its own threads for each block and fight
        # TensorStore's decoders and our thread pool for the cores.
        sum_sq = float(np.einsum("i,i->", values, values))
        self.sum_sq.append(sum_sq)
        finite = values
        if not math.isfinite(sum_sq):  # NaN or Inf somewhere (or a float64 overflow)
            finite_mask = np.isfinite(values)
            nan = int(np.count_nonzero(np.isnan(values)))
            self.nan += nan
            self.inf += n - nan - int(np.count_nonzero(finite_mask))
            if self.full:
                finite = values[finite_mask]
        if not self.full:
            return
        narrow = values if source is None else source
        # x == 0 counted as booleans: several times faster than count_nonzero on floats
        self.zeros += int(np.count_nonzero(narrow == 0))
        if finite.size:
            total = float(np.sum(finite))
            centered = finite - total / finite.size
            self.finite.append(finite.size)
            self.sums.append(total)
            self.m2.append(float(np.einsum("i,i->", centered, centered)))
            extremes = narrow if finite is values else finite
            self.min = min(self.min, float(extremes.min()))
            self.max = max(self.max, float(extremes.max()))

    def add_summary(
        self,
        count,
        sum_sq,
        nan,
        inf,
        finite=0,
        center=0.0,
        shifted_sum=0.0,
        shifted_sq=0.0,
        low=math.inf,
        high=-math.inf,
        zeros=0,
    ) -> None:
        """A piece reduced elsewhere (on the mesh), as one block.

        Its finite values' sums come shifted by a ``center`` near their mean (the sums of x - c
        and of (x - c)^2): small numbers that float32 holds accurately. Mean and squared
        deviations follow from them in float64 here.
        """
        self.count += int(count)
        self.nan += int(nan)
        self.inf += int(inf)
        self.sum_sq.append(float(sum_sq))
        if self.full:
            self.zeros += int(zeros)
            n = int(finite)
            if n:
                shifted_sum = float(shifted_sum)
                self.finite.append(n)
                self.sums.append(float(center) * n + shifted_sum)
                self.m2.append(float(shifted_sq) - shifted_sum * shifted_sum / n)
                self.min = min(self.min, float(low))
                self.max = max(self.max, float(high))

    def result(self) -> Moments:
        sum_sq = math.fsum(self.sum_sq)
        if not self.full:
            return Moments(self.count, sum_sq, self.nan, self.inf)
        finite = int(math.fsum(self.finite))
        if not finite:
            return Moments(self.count, sum_sq, self.nan, self.inf, True, 0, zeros=self.zeros)
        mean = math.fsum(self.sums) / finite
        between = math.fsum(n * (s / n - mean) ** 2 for n, s in zip(self.finite, self.sums))
        m2 = math.fsum(self.m2) + between
        return Moments(
            self.count, sum_sq, self.nan, self.inf, True, finite, mean, m2, self.min, self.max, self.zeros
        )


def block_partials(flat: np.ndarray, full: bool) -> Partials:
    """The partials of consecutive whole blocks (and a last short one) of a flat array."""
    if np.iscomplexobj(flat):
        flat = np.abs(flat)
    partials = Partials(full)
    if flat.dtype == np.float64:  # already wide (a difference of two steps): no copy
        for start in range(0, flat.size, BLOCK):
            partials.add_block(flat[start : start + BLOCK])
        return partials
    wide = np.empty(min(BLOCK, flat.size), np.float64)
    narrow = _native_narrow(flat.dtype)
    for start in range(0, flat.size, BLOCK):
        block = flat[start : start + BLOCK]
        upcast = wide[: block.size]
        upcast[...] = block  # exact for every dtype up to 32 bits
        partials.add_block(upcast, block if narrow else None)
    return partials


def _native_narrow(dtype: np.dtype) -> bool:
    """Whether numpy compares values of ``dtype`` natively and exactly as their float64 copies
    (not ml_dtypes' types, whose loops are slow; not 64-bit integers, which float64 rounds)."""
    return dtype.kind in "fiub" and dtype.itemsize <= 4 and type(dtype).__module__.startswith("numpy")


class Accumulator:
    """Reduces one array fed in consecutive pieces of its flattened values, in blocks fixed by
    their position in the array, not by where the pieces begin and end."""

    def __init__(self, full: bool, span: int = 1 << 22, size: int | None = None):
        self.partials = Partials(full)
        self.carry: np.ndarray | None = None
        self.size = size  # elements of the whole array, when known: its last piece is flushed
        self.fed = 0
        self.span = span - span % BLOCK or BLOCK

    def feed(self, values: np.ndarray, pool=None) -> None:
        flat = np.ascontiguousarray(values).reshape(-1)
        self.fed += flat.size
        if self.fed == flat.size == self.size and flat.size < BLOCK:
            # The whole array in one piece shorter than a block: the same single block as below,
            # without the carry bookkeeping (it adds up over thousands of small arrays).
            self.partials = block_partials(flat, self.partials.full)
            return
        self._feed(flat, pool)
        if self.fed == self.size:  # done: reduce the carry now rather than hold it to the end
            self.flush()

    def feed_difference(self, values: np.ndarray, previous: np.ndarray, pool=None) -> list[float] | None:
        """Feeds a whole array (as :meth:`feed`, the same partials) and returns the float64 sums
        of ``(values - previous)^2`` by the same blocks, both from one upcast of each block;
        None, feeding nothing, unless the array is fed whole here, real, and not yet float64."""
        flat = np.ascontiguousarray(values).reshape(-1)
        before = np.ascontiguousarray(previous).reshape(-1)
        if self.fed or before.size != flat.size or flat.dtype == np.float64:
            return None
        if np.iscomplexobj(flat) or np.iscomplexobj(before) or flat.dtype.kind not in "fiub":
            return None
        self.fed = flat.size
        full = self.partials.full
        narrow = _native_narrow(flat.dtype)

        def span(bounds: tuple[int, int]) -> tuple[Partials, list[float]]:
            lo, hi = bounds
            partials, sums = Partials(full), []
            wide = np.empty(min(BLOCK, hi - lo), np.float64)
            difference = np.empty_like(wide)
            for start in range(lo, hi, BLOCK):
                stop = min(start + BLOCK, hi)
                upcast, d = wide[: stop - start], difference[: stop - start]
                upcast[...] = flat[start:stop]  # exact for every dtype up to 32 bits
                partials.add_block(upcast, flat[start:stop] if narrow else None)
                d[...] = before[start:stop]  # upcast, then subtract: faster than a mixed-type subtract
                np.subtract(upcast, d, out=d)
                sums.append(float(np.einsum("i,i->", d, d)))
            return partials, sums

        spans = [(lo, min(lo + self.span, flat.size)) for lo in range(0, flat.size, self.span)]
        mapper = pool.map if pool is not None and len(spans) > 1 else map
        out: list[float] = []
        for partials, sums in mapper(span, spans):
            self.partials.extend(partials)
            out += sums
        return out

    def _feed(self, flat: np.ndarray, pool) -> None:
        if self.carry is not None:
            head = flat[: BLOCK - self.carry.size]
            block = np.concatenate([self.carry, head])
            flat = flat[head.size :]
            if block.size < BLOCK:
                self.carry = block
                return
            self.carry = None
            self.partials.extend(block_partials(block, self.partials.full))
        whole = flat.size - flat.size % BLOCK
        if whole:
            spans = [flat[i : min(i + self.span, whole)] for i in range(0, whole, self.span)]
            mapper = pool.map if pool is not None and len(spans) > 1 else map
            for part in mapper(lambda span: block_partials(span, self.partials.full), spans):
                self.partials.extend(part)
        if whole < flat.size:
            self.carry = flat[whole:].copy()

    def flush(self) -> Partials:
        """The partials of everything fed, the last short block included."""
        if self.carry is not None:
            self.partials.extend(block_partials(self.carry, self.partials.full))
            self.carry = None
        return self.partials

    def result(self) -> Moments:
        return self.flush().result()

    def summary(self) -> list[float]:
        """The arguments of :meth:`Partials.add_summary` for everything fed (to send elsewhere)."""
        moments = self.result()
        if not moments.full or not moments.finite:
            return [
                moments.count,
                moments.sum_sq,
                moments.nan,
                moments.inf,
                0,
                0.0,
                0.0,
                0.0,
                math.inf,
                -math.inf,
                moments.zeros,
            ]
        return [
            moments.count,
            moments.sum_sq,
            moments.nan,
            moments.inf,
            moments.finite,
            moments.mean,
            0.0,
            moments.m2,
            moments.min,
            moments.max,
            moments.zeros,
        ]


def host_moments(values: np.ndarray, full: bool = False) -> Moments:
    """The :class:`Moments` of a numpy array (any dtype numpy or ml_dtypes knows).

    >>> import numpy as np
    >>> m = host_moments(np.array([3.0, 4.0, np.nan], dtype=np.float32), full=True)
    >>> (m.norm, m.nan, m.mean, m.std)
    (nan, 1, 3.5, 0.5)
    """
    accumulator = Accumulator(full)
    accumulator.feed(values)
    return accumulator.result()


# ----------------------------------------------------------------------------------------------
# jax on a mesh


def mesh_reduction(full: bool):
    """A jitted function from a (sharded) jax array to the arguments of :meth:`Partials.add_summary`.

    Sums accumulate in float32 or wider on the devices that hold the shards; the sum of squares
    is :func:`paramscope.param_utils.get_sharded_norm_logits`.
    """
    import jax
    import jax.numpy as jnp

    from paramscope.param_utils import _accumulation_dtype, get_sharded_norm_logits

    def reduce(x):
        if jnp.issubdtype(x.dtype, jnp.complexfloating):
            x = jnp.abs(x)
        x = x.astype(_accumulation_dtype(x.dtype))
        out = {
            "count": jnp.asarray(x.size, jnp.int32),
            "sum_sq": get_sharded_norm_logits(x),
            "nan": jnp.sum(jnp.isnan(x), dtype=jnp.int32),
            "inf": jnp.sum(jnp.isinf(x), dtype=jnp.int32),
        }
        if full:
            finite = jnp.isfinite(x)
            n = jnp.sum(finite, dtype=jnp.int32)
            center = jnp.sum(jnp.where(finite, x, 0)) / jnp.maximum(n, 1)
            shifted = jnp.where(finite, x - center, 0)
            out.update(
                finite=n,
                center=center,
                shifted_sum=jnp.sum(shifted),
                shifted_sq=jnp.sum(jnp.square(shifted)),
                low=jnp.min(jnp.where(finite, x, jnp.inf)),
                high=jnp.max(jnp.where(finite, x, -jnp.inf)),
                zeros=jnp.sum(x == 0, dtype=jnp.int32),
            )
        return out

    return jax.jit(reduce)


class Histogram:
    """Counts of values in fixed bins, the same whatever the pieces they come in: one bin per sign
    and power of two of the magnitude (frexp's exponent), plus zeros, NaN and Inf. Needs no range
    known in advance, so it is filled in the same pass as the other statistics."""

    def __init__(self):
        self.counts: dict[tuple[int, int], int] = {}  # (sign, exponent) -> count; (0, 0): zeros
        self.nan = self.inf = 0

    def feed(self, values: np.ndarray) -> None:
        flat = np.asarray(values).reshape(-1).astype(np.float64)
        finite = np.isfinite(flat)
        self.nan += int(np.count_nonzero(np.isnan(flat)))
        self.inf += int(flat.size - np.count_nonzero(finite)) - int(np.count_nonzero(np.isnan(flat)))
        flat = flat[finite]
        _, exponents = np.frexp(np.abs(flat))
        signs = np.sign(flat).astype(np.int64)
        exponents = np.where(signs == 0, 0, exponents)
        keys, counts = np.unique(np.stack([signs, exponents]), axis=1, return_counts=True)
        for (sign, exponent), count in zip(keys.T.tolist(), counts.tolist()):
            self.counts[(sign, exponent)] = self.counts.get((sign, exponent), 0) + count

    def bins(self) -> list[tuple[float, float, int]]:
        """(low, high, count) per non-empty bin, in value order; zeros as (0, 0, n)."""
        out = []
        for (sign, exponent), count in self.counts.items():
            if sign == 0:
                out.append((0.0, 0.0, count))
            else:
                low, high = 2.0 ** (exponent - 1), 2.0**exponent  # frexp: |x| in [2^(e-1), 2^e)
                out.append((-high, -low, count) if sign < 0 else (low, high, count))
        return sorted(out)
