"""Norms and statistics of a checkpoint's arrays: one streaming pass, in bounded memory.

Arrays are read by :mod:`paramscope.compute.plan` in groups that fit half the memory budget (a
quarter on the mesh, where values also live on devices).

Two engines reduce a group, with the same numbers (see :mod:`paramscope.compute.moments`):

* ``host``: numpy on the host, spread over a thread pool. The fastest path on a CPU-only
  machine: no jax import, no copy onto simulated devices.
* ``mesh``: each piece is placed on the device mesh with the sharding it was saved with (fitted
  to the mesh), every device reading only its own shard, and reduced there with jax.
  64-bit arrays, which jax without x64 would narrow to 32 bits, are reduced on the host.

``auto`` picks ``mesh`` when a mesh is asked for or an accelerator is present, else ``host``.
"""

from __future__ import annotations

import importlib.util
import math
import os
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from paramscope.compute.digest import DigestState, combined, feed_box, merge_digests
from paramscope.compute.moments import Accumulator, Histogram, Moments, mesh_reduction
from paramscope.compute.plan import Region, memory_budget_bytes, stream_regions
from paramscope.errors import ParamscopeError, UsageError
from paramscope.io import checkpoint
from paramscope.io.inventory import Inventory, ParamInfo
from paramscope.parallel.cluster import LOCAL, Cluster, agree_on_failure, gather_float64, share

ENGINES = ("auto", "host", "mesh")
_ACCELERATOR_PLUGINS = (
    "jax_cuda12_plugin",
    "jax_cuda13_plugin",
    "jax_rocm7_plugin",
    "jax_rocm60_plugin",
    "libtpu",
)


# ----------------------------------------------------------------------------------------------
# Engines


def _index_key(index) -> tuple:
    return tuple((s.start, s.stop, s.step) for s in index)


class HostEngine:
    """Reduces with numpy on a thread pool (numpy releases the GIL in its loops)."""

    name = "host"
    mesh = None

    histogram_path: str | None = None  # the one parameter whose values are also binned
    histogram = None

    def __init__(self, full: bool):
        self.full = full
        self.pool = ThreadPoolExecutor(max_workers=os.cpu_count() or 1)
        self.bytes_read = 0

    def collective(self, param: ParamInfo) -> bool:
        """Whether every process takes part in reducing this parameter's regions (on the mesh)."""
        return False

    def start(self, param: ParamInfo, handle, region: Region):
        self.bytes_read += region.nbytes
        return checkpoint.start_read(handle, param.index_in_store(region.read_index), param.path)

    def reduce(
        self,
        param: ParamInfo,
        region: Region,
        pending,
        local: Accumulator,
        shared: Accumulator,
        digest=None,
        layers=None,
    ) -> None:
        """Adds a region to ``local`` (this process's own share) or, reduced on the mesh by every
        process together, to ``shared``; its bytes to ``digest`` (a DigestState) if given; and
        each layer's part to its accumulator, ``layers`` being (axis, one accumulator per layer)."""
        values = checkpoint.finish_read(pending, param.path)
        local.feed(values, self.pool)
        if digest is not None:
            feed_box(digest, param.shape, region.index, values, self.pool)
        if param.path == self.histogram_path:
            self.histogram.feed(values)
        if layers is not None:
            axis, accumulators = layers
            first = region.index[axis].start or 0
            for k in range(values.shape[axis]):  # each layer's part is contiguous in that layer
                accumulators[first + k].feed(np.take(values, k, axis=axis), self.pool)

    def close(self) -> None:
        self.pool.shutdown(wait=False)


class MeshEngine(HostEngine):
    """Places each region on the device mesh with its saved sharding and reduces it with jax."""

    name = "mesh"

    def __init__(self, full: bool, mesh):
        super().__init__(full)
        import jax

        self.mesh = mesh
        self.host_paths: set[str] = set()  # reduced on the host (per-layer numbers)
        self.function = mesh_reduction(full)
        self.narrowed = not jax.config.jax_enable_x64

    def _on_host(self, param: ParamInfo) -> bool:
        return (
            (self.narrowed and param.itemsize >= 8)
            or param.path in self.host_paths
            or param.layer is not None
        )

    def collective(self, param: ParamInfo) -> bool:
        return not self._on_host(param)

    def start(self, param: ParamInfo, handle, region: Region):
        from paramscope.parallel.mesh import named_sharding

        if self._on_host(param):
            return super().start(param, handle, region)
        sharding = named_sharding(self.mesh, param.sharding, region.shape)
        reads = {}
        for local in sharding.addressable_devices_indices_map(region.shape).values():
            key = _index_key(local)
            if key not in reads:  # devices holding the same slice share one read
                index = tuple(
                    slice(r.start + (s.start or 0), r.start + (dim if s.stop is None else s.stop))
                    for r, s, dim in zip(region.index, local, region.shape)
                )
                self.bytes_read += math.prod(s.stop - s.start for s in index) * param.itemsize
                reads[key] = index, checkpoint.start_read(handle, index, param.path)
        return sharding, reads

    def reduce(
        self,
        param: ParamInfo,
        region: Region,
        pending,
        local: Accumulator,
        shared: Accumulator,
        digest=None,
        layers=None,
    ) -> None:
        import jax

        if self._on_host(param):
            return super().reduce(param, region, pending, local, shared, digest, layers)
        sharding, reads = pending
        shards = {key: checkpoint.finish_read(future, param.path) for key, (_, future) in reads.items()}
        if digest is not None:  # the bytes of each shard this process read, where they lie
            for key, (index, _) in reads.items():
                feed_box(digest, param.shape, index, shards[key], self.pool)
        array = jax.make_array_from_callback(region.shape, sharding, lambda index: shards[_index_key(index)])
        out = self.function(array)  # replicated results: every process holds them
        shared.partials.add_summary(**{name: np.asarray(value).item() for name, value in out.items()})


def accelerator_present() -> bool:
    """Whether jax would run on an accelerator, decided without importing jax when possible."""
    platforms = os.environ.get("JAX_PLATFORMS", "")
    if platforms:
        return any(p.strip() not in ("", "cpu") for p in platforms.split(","))
    if not any(importlib.util.find_spec(name) for name in _ACCELERATOR_PLUGINS):
        return False
    import jax

    return jax.default_backend() != "cpu"


def make_engine(engine: str, full: bool, mesh_axes, saved_mesh, cluster: Cluster = LOCAL):
    if engine not in ENGINES:
        raise UsageError(f"unknown engine {engine!r}", hint=f"choose one of {', '.join(ENGINES)}")
    if engine == "auto":
        engine = "mesh" if mesh_axes is not None or accelerator_present() else "host"
    if engine == "host":
        return HostEngine(full)
    import jax

    from paramscope.parallel.mesh import build_mesh, fit_mesh

    devices = jax.devices()  # in a cluster, every process's devices: the mesh spans them all
    if mesh_axes is None:
        mesh_axes = fit_mesh(saved_mesh, len(devices))
    return MeshEngine(full, build_mesh(mesh_axes, devices))


# ----------------------------------------------------------------------------------------------
# The pass


@dataclass(frozen=True)
class ParamStats:
    param: ParamInfo
    moments: Moments
    digest: str | None = None  # the content digest, when asked for

    @property
    def norm(self) -> float:
        return self.moments.norm

    @property
    def nonfinite(self) -> int:
        return self.moments.nonfinite


@dataclass
class ScanResult:
    params: list[ParamStats]
    global_norm: float
    nonfinite: int
    engine: str
    mesh: tuple[tuple[str, int], ...] | None
    memory_budget: int
    bytes_read: list[int]  # array bytes each process read, by process
    layers: dict[int, list[Moments]] = field(default_factory=dict)  # per layer of unstacked arrays
    histogram: Any = None  # the binned values of one parameter, when asked for

    @property
    def digest(self) -> str | None:
        """The digest of all the parameters read (None unless digests were computed)."""
        if any(r.digest is None for r in self.params):
            return None
        return combined((r.param.path, r.digest) for r in self.params)


def scan(
    params: Sequence[ParamInfo],
    *,
    full: bool = False,
    engine: str = "auto",
    mesh_axes: Sequence[tuple[str, int]] | None = None,
    saved_mesh: Sequence[tuple[str, int]] | None = None,
    memory_budget: int | str | None = None,
    on_bytes: Callable[[int], Any] | None = None,
    cluster: Cluster = LOCAL,
    digest: bool = False,
    unstack: Mapping[int, int] | None = None,
    histogram: str | None = None,
) -> ScanResult:
    """Reads every parameter once and summarises it.

    Args:
        params: The parameters (from :func:`paramscope.open_checkpoint`).
        full: Also compute mean, std, min, max, zeros (not only the norm and NaN/Inf counts).
        engine: ``auto``, ``host`` or ``mesh``.
        mesh_axes: The mesh as (axis, size) pairs (mesh engine); default all devices laid out
            like ``saved_mesh``.
        saved_mesh: The mesh the checkpoint was saved on.
        memory_budget: Bytes of array data held at once, an int or a size such as ``"512MiB"``
            (default: :func:`~paramscope.compute.plan.default_memory_budget`).
        on_bytes: Called with the bytes of each region once it is reduced (progress).
        cluster: Cooperating processes (:mod:`paramscope.parallel.cluster`); each reads its share,
            and all end with the same result.
        digest: Also compute each parameter's content digest (:mod:`paramscope.compute.digest`),
            in the same pass.
        unstack: Positions of stacked arrays -> their layer axis: also compute the numbers of each
            layer (``ScanResult.layers``), in the same pass, on the host.
        histogram: The path of one parameter whose values are also counted in fixed bins
            (``ScanResult.histogram``, a :class:`~paramscope.compute.moments.Histogram`); one
            process only.
    """
    budget = memory_budget_bytes(memory_budget)
    runner = make_engine(engine, full, mesh_axes, saved_mesh, cluster)
    limit = max(1, budget // (4 if runner.name == "mesh" else 2))
    local = [Accumulator(full, size=param.count) for param in params]  # this process's share
    shared = [Accumulator(full) for _ in params]  # reduced on the mesh by every process together
    states = [DigestState(p.dtype, p.shape, p.itemsize) for p in params] if digest else [None] * len(params)
    unstack = dict(unstack or {})
    per_layer = {
        i: (axis, [Accumulator(full) for _ in range(params[i].shape[axis])]) for i, axis in unstack.items()
    }
    if isinstance(runner, MeshEngine):
        runner.host_paths = {params[i].path for i in unstack} | ({histogram} if histogram else set())
    if histogram is not None:
        runner.histogram_path, runner.histogram = histogram, Histogram()

    def select(regions: list[Region]) -> list[bool]:
        """Every process reduces the collective regions together; the others are shared out."""
        collective = [runner.collective(params[r.param]) for r in regions]
        mine = iter(share(cluster, [r.nbytes for r, c in zip(regions, collective) if not c]))
        return [c or next(mine) for c in collective]

    failure = None
    try:
        for region, pending in stream_regions(params, limit, runner.start, select=select):
            i = region.param
            runner.reduce(params[i], region, pending, local[i], shared[i], states[i], per_layer.get(i))
            if on_bytes is not None:
                on_bytes(region.nbytes)
    except ParamscopeError as err:
        if not cluster.active:
            raise
        failure = err
    finally:
        runner.close()
    bytes_read = [runner.bytes_read]
    layer_local = [acc for i in sorted(per_layer) for acc in per_layer[i][1]]
    layer_moments = {}
    if cluster.active:
        agree_on_failure(cluster, failure, "reading")
        everything = local + layer_local
        width = len(Accumulator(full).summary())  # the bytes read travel as one more row
        vectors = np.array(
            [acc.summary() for acc in everything] + [[runner.bytes_read] * width], dtype=np.float64
        )
        gathered = gather_float64(cluster, vectors.ravel(), "combining results").reshape(
            cluster.num_processes, len(everything) + 1, -1
        )
        for position in range(len(params)):
            for process in range(cluster.num_processes):
                shared[position].partials.add_summary(*gathered[process, position])
        combined_layers = [Accumulator(full) for _ in layer_local]
        for k, acc in enumerate(combined_layers):
            for process in range(cluster.num_processes):
                acc.partials.add_summary(*gathered[process, len(params) + k])
        layer_local = combined_layers
        bytes_read = [int(b) for b in gathered[:, -1, 0]]
        if digest:
            merge_digests(cluster, states)
    else:
        for acc_shared, acc_local in zip(shared, local):
            acc_shared.partials.extend(acc_local.flush())
    results = [
        ParamStats(param, acc.result(), state.hexdigest() if state is not None else None)
        for param, acc, state in zip(params, shared, states)
    ]
    moments = iter(acc.result() for acc in layer_local)
    for i in sorted(per_layer):
        layer_moments[i] = [next(moments) for _ in per_layer[i][1]]
    global_sq = math.fsum(r.moments.sum_sq for r in results)
    return ScanResult(
        params=results,
        global_norm=math.sqrt(global_sq),
        nonfinite=sum(r.nonfinite for r in results),
        engine=runner.name,
        mesh=tuple(runner.mesh.shape.items()) if runner.mesh is not None else None,
        memory_budget=budget,
        bytes_read=bytes_read,
        layers=layer_moments,
        histogram=runner.histogram,
    )


def compute_norms(params: Sequence[ParamInfo] | Inventory, **options) -> ScanResult:
    """Per-parameter and global L2 norms and NaN/Inf counts, in one pass (see :func:`scan`).

    Given the :class:`Inventory` itself rather than its ``params``, it also proves that the step
    was not deleted or saved again while it was read (:class:`CheckpointChanged` if it was)."""
    return _checked_scan(params, False, options)


def compute_stats(params: Sequence[ParamInfo] | Inventory, **options) -> ScanResult:
    """Norm, mean, std, min, max, max |x|, zero fraction, NaN and Inf counts (see :func:`scan`
    and :func:`compute_norms`)."""
    return _checked_scan(params, True, options)


def _checked_scan(params, full: bool, options) -> ScanResult:
    if not isinstance(params, Inventory):
        return scan(params, full=full, **options)
    params.begin_read()
    try:
        result = scan(params.params, full=full, **options)
    except ParamscopeError:
        params.check_unchanged()
        raise
    params.check_unchanged()
    return result
