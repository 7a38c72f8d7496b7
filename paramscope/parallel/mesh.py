"""Device meshes for reading checkpoints, and the shardings placed on them."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

from paramscope.errors import BadMesh, UsageError

_AXIS = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*=\s*(\d+)\s*$")


def parse_mesh(text: str) -> tuple[tuple[str, int], ...]:
    """Parses ``AXIS=N[,AXIS=N...]``.

    >>> parse_mesh("data=2,model=4")
    (('data', 2), ('model', 4))
    """
    axes = []
    for part in text.split(","):
        match = _AXIS.match(part)
        if not match or int(match.group(2)) < 1:
            raise UsageError(
                f"malformed --mesh {text!r}", hint="write AXIS=N[,AXIS=N...], e.g. --mesh data=2,model=4"
            )
        axes.append((match.group(1), int(match.group(2))))
    names = [name for name, _ in axes]
    if len(set(names)) != len(names):
        raise UsageError(f"--mesh {text!r} names an axis twice", hint="give each axis once")
    return tuple(axes)


def fit_mesh(saved: Sequence[tuple[str, int]] | None, num_devices: int) -> tuple[tuple[str, int], ...]:
    """A mesh over at most ``num_devices`` devices, shaped like the saved one as far as it fits.

    Each saved axis gets the largest divisor of its saved size that the devices left allow, so
    every dimension the saved mesh divided is still divided.

    >>> fit_mesh((("data", 2), ("model", 4)), 8)
    (('data', 2), ('model', 4))
    >>> fit_mesh((("data", 2), ("model", 4)), 4)
    (('data', 2), ('model', 2))
    >>> fit_mesh(None, 8)
    (('devices', 8),)
    """
    if not saved:
        return (("devices", num_devices),)
    left = num_devices
    axes = []
    for name, size in saved:
        take = math.gcd(left, size)
        axes.append((name, take))
        left //= take
    return tuple(axes)


def build_mesh(axes: Sequence[tuple[str, int]], devices=None):
    """A jax Mesh with automatic axis types over the first of ``devices`` (default: the local ones)."""
    import jax
    import numpy as np
    from jax.sharding import Mesh

    devices = list(devices) if devices is not None else jax.local_devices()
    needed = math.prod(size for _, size in axes)
    if needed > len(devices):
        raise BadMesh(
            f"mesh {','.join(f'{n}={s}' for n, s in axes)} needs {needed} devices, {len(devices)} available",
            hint="choose a smaller --mesh (XLA_FLAGS=--xla_force_host_platform_device_count=N gives N CPUs)",
        )
    grid = np.array(devices[:needed]).reshape(tuple(size for _, size in axes))
    names = tuple(name for name, _ in axes)
    axis_types = (jax.sharding.AxisType.Auto,) * len(names)
    return Mesh(grid, names, axis_types=axis_types)


def fitted_spec(
    spec: Sequence[Any] | None, shape: Sequence[int], mesh_axes: dict[str, int]
) -> tuple[Any, ...]:
    """The saved partition spec, with each dimension the mesh cannot divide replicated.

    >>> fitted_spec(("data", ("x", "model")), (6, 8), {"data": 4, "model": 2})
    ()
    >>> fitted_spec(("data", "model"), (6, 8), {"data": 4, "model": 2})
    (None, 'model')
    >>> fitted_spec(("data", "model"), (8, 8), {"data": 4, "model": 2})
    ('data', 'model')
    """
    if spec is None:
        return ()
    fitted = []
    for dim, entry in zip(shape, spec):
        names = (entry,) if isinstance(entry, str) else tuple(entry or ())
        if not names or any(n not in mesh_axes for n in names):
            fitted.append(None)
            continue
        size = math.prod(mesh_axes[n] for n in names)
        fitted.append(entry if dim % size == 0 else None)
    while fitted and fitted[-1] is None:
        fitted.pop()
    return tuple(fitted)


def idle_axes(axes: Sequence[tuple[str, int]], params) -> list[str]:
    """Mesh axes (of size > 1) that shard no dimension of any parameter once specs are fitted.

    >>> from types import SimpleNamespace as P
    >>> idle_axes((("data", 2), ("x", 2)), [P(sharding=("data", None), shape=(4, 4))])
    ['x']
    """
    sizes = dict(axes)
    used: set[str] = set()
    for param in params:
        for entry in fitted_spec(param.sharding, param.shape, sizes):
            used.update((entry,) if isinstance(entry, str) else entry or ())
    return [name for name, size in axes if size > 1 and name not in used]


def named_sharding(mesh, spec: Sequence[Any] | None, shape: Sequence[int]):
    from jax.sharding import NamedSharding, PartitionSpec

    return NamedSharding(mesh, PartitionSpec(*fitted_spec(spec, shape, dict(mesh.shape))))


def check_mesh(axes: Sequence[tuple[str, int]], engine: str, params, saved_mesh) -> None:
    """Refuses a mesh the host engine would ignore, that the devices cannot hold, or with idle axes."""
    if engine == "host":
        raise UsageError(
            "a mesh given with the host engine", hint="the mesh is for the mesh engine (or auto)"
        )
    import jax

    build_mesh(axes, jax.devices())  # enough devices (of every process, in a cluster)?
    idle = idle_axes(axes, params)
    if idle:
        saved = ",".join(f"{n}={s}" for n, s in saved_mesh) if saved_mesh else "none"
        raise UsageError(
            f"mesh axis {idle[0]!r} divides no dimension of any parameter's saved sharding",
            hint=f"use the checkpoint's axis names, with sizes that divide its dimensions (saved: {saved})",
        )
