"""Norms of a checkpoint's parameters, computed with jax on a device mesh.

Each array is read onto the mesh with the sharding it was saved with (fitted to the mesh), each
device reading only its own shard, and reduced there with :func:`get_sharded_norm_logits`,
which accumulates in float32 or wider. 64-bit arrays, which jax without x64 would narrow to 32
bits, are reduced on the host in float64 instead. The next array's read is in flight while the
current one is reduced, and only one or two arrays are held at a time.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache

from paramscope import checkpoint
from paramscope.inventory import ParamInfo
from paramscope.mesh import build_mesh, fit_mesh, named_sharding


@dataclass(frozen=True)
class ParamNorm:
    param: ParamInfo
    sum_of_squares: float
    nonfinite: int

    @property
    def norm(self) -> float:
        return math.sqrt(self.sum_of_squares)


@dataclass
class NormsResult:
    global_norm: float
    nonfinite: int
    params: list[ParamNorm]
    mesh: tuple[tuple[str, int], ...]


@cache
def _leaf_reduction():
    import jax
    import jax.numpy as jnp

    from paramscope.param_utils import get_sharded_norm_logits

    def reduce(x):
        return get_sharded_norm_logits(x), jnp.sum(~jnp.isfinite(x), dtype=jnp.int32)

    return jax.jit(reduce)


def _needs_host(param: ParamInfo) -> bool:
    """64-bit arrays when jax runs without x64: jax would narrow them to 32 bits on transfer."""
    import jax

    return param.itemsize >= 8 and not jax.config.jax_enable_x64


def _index_key(index) -> tuple:
    return tuple((s.start, s.stop, s.step) for s in index)


@dataclass
class _PendingRead:
    """The shard reads of one array, started; ``sharding`` is None for an array kept on the host."""

    param: ParamInfo
    sharding: object
    shards: dict

    @classmethod
    def start(cls, param: ParamInfo, mesh) -> _PendingRead:
        handle = checkpoint.open_array(param.stored)
        if _needs_host(param):
            sharding, indices = None, [tuple(slice(None) for _ in param.shape)]
        else:
            sharding = named_sharding(mesh, param.sharding, param.shape)
            indices = sharding.addressable_devices_indices_map(param.shape).values()
        shards = {}
        for index in indices:  # devices holding the same slice share one read
            key = _index_key(index)
            if key not in shards:
                shards[key] = checkpoint.start_read(handle, index, param.path)
        return cls(param, sharding, shards)

    def reduce(self) -> tuple[float, int]:
        """(sum of squares, non-finite count), on the mesh or, for 64-bit arrays, in float64 numpy."""
        import jax
        import numpy as np

        values = {key: checkpoint.finish_read(future, self.param.path) for key, future in self.shards.items()}
        if self.sharding is None:
            (value,) = values.values()
            value = np.asarray(np.abs(value) if np.iscomplexobj(value) else value, dtype=np.float64)
            return float(np.sum(np.square(value))), int(value.size - np.count_nonzero(np.isfinite(value)))
        array = jax.make_array_from_callback(self.param.shape, self.sharding, lambda i: values[_index_key(i)])
        sum_sq, nonfinite = _leaf_reduction()(array)
        return float(sum_sq), int(nonfinite)


def compute_norms(
    params: Sequence[ParamInfo],
    mesh_axes: Sequence[tuple[str, int]] | None = None,
    saved_mesh: Sequence[tuple[str, int]] | None = None,
    on_param: Callable[[ParamInfo], None] | None = None,
) -> NormsResult:
    """Per-parameter squared norms and non-finite counts, and the global L2 norm.

    Args:
        params: The parameters to reduce (from :func:`paramscope.open_checkpoint`).
        mesh_axes: The mesh, as (axis, size) pairs; default all local devices laid out like
            ``saved_mesh``.
        saved_mesh: The mesh the checkpoint was saved on, to lay out the default mesh.
        on_param: Called after each parameter is reduced (for progress).

    Returns:
        A :class:`NormsResult`; the global norm sums the per-parameter float32 sums in float64.
    """
    import jax

    if mesh_axes is None:
        mesh_axes = fit_mesh(saved_mesh, len(jax.local_devices()))
    mesh = build_mesh(mesh_axes)
    results = []
    upcoming = _PendingRead.start(params[0], mesh) if params else None
    for i, param in enumerate(params):
        current = upcoming
        # The next array's reads run while this one is reduced.
        upcoming = _PendingRead.start(params[i + 1], mesh) if i + 1 < len(params) else None
        sum_sq, nonfinite = current.reduce()
        results.append(ParamNorm(param, sum_sq, nonfinite))
        del current
        if on_param is not None:
            on_param(param)
    global_sq = math.fsum(r.sum_of_squares for r in results)
    return NormsResult(
        global_norm=math.sqrt(global_sq) if not math.isnan(global_sq) else math.nan,
        nonfinite=sum(r.nonfinite for r in results),
        params=results,
        mesh=tuple(mesh_axes),
    )
