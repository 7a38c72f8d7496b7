"""Pictures of a run, drawn with matplotlib (the optional extra ``paramscope[plot]``). Names
from a checkpoint are drawn with their control characters escaped, as on a terminal."""

from __future__ import annotations

import math
from collections.abc import Sequence

from paramscope.errors import UsageError, few, printable

MAX_LINES = 8  # more lines than this, nobody reads: the rest are summarised as one band


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise UsageError(
            "plotting needs matplotlib", hint="install the extra: pip install 'paramscope[plot]'"
        ) from None
    matplotlib.use("Agg")  # files only, no window
    import matplotlib.pyplot as plt

    return plt


def picture_formats() -> list[str]:
    """The file name extensions matplotlib can write here (png, svg, pdf, jpg, ...): its
    canvas's own list, less PGF where no TeX is installed to measure its text."""
    import shutil

    import matplotlib
    from matplotlib.backend_bases import FigureCanvasBase

    formats = list(FigureCanvasBase.get_supported_filetypes())
    if shutil.which(matplotlib.rcParams["pgf.texsystem"]) is None:
        formats.remove("pgf")
    return formats


def check_format(path: str) -> str:
    """The picture format ``path`` names by its extension; a ``UsageError`` when matplotlib
    cannot write it."""
    _pyplot()
    extension = path.rsplit(".", 1)[-1].lower() if "." in path.rsplit("/", 1)[-1] else ""
    formats = picture_formats()
    if extension not in formats:
        usual = [f for f in ("png", "svg", "pdf", "jpg") if f in formats]
        shown = few([f".{f}" for f in usual + [f for f in formats if f not in usual]], 4)
        raise UsageError(
            f"cannot tell the picture format of {path!r}",
            hint=f"end the name with one of the formats matplotlib writes: {shown}",
        )
    return extension


def _spans_decades(values: Sequence[float]) -> bool:
    positive = [v for v in values if v is not None and math.isfinite(v) and v > 0]
    return bool(positive) and max(positive) / min(positive) >= 100


# tab10 without its grey, which would read as the grey band of the other series
COLOURS = [
    "tab:blue",
    "tab:orange",
    "tab:green",
    "tab:red",
    "tab:purple",
    "tab:brown",
    "tab:pink",
    "tab:olive",
]
NONFINITE = "crimson"


class Drawn(dict):
    """The norms drawn, by line name; ``xlim``: the x-axis range (every step), ``first_nonfinite``:
    the step marked as the first with a NaN or Inf (None when there is none)."""

    xlim: tuple[float, float] = (0.0, 1.0)
    first_nonfinite: int | None = None


def _at_top_edge(axis, steps, values, colour, label=None) -> None:
    """Markers at the top edge of ``axis`` at the steps whose value is NaN or Inf: they have no
    height to draw, and without them the line would just stop."""
    bad = [st for st, v in zip(steps, values) if v is not None and not math.isfinite(v)]
    if bad:
        axis.plot(
            bad,
            [1.0] * len(bad),
            linestyle="none",
            marker="X",
            markersize=7,
            color=colour,
            clip_on=False,
            transform=axis.get_xaxis_transform(),  # x in steps, y in axis fractions
            label=label,
        )


def plot_history(series, path: str, top: int = MAX_LINES, title: str = "") -> Drawn:
    """Norm per parameter (or group) over steps, and the relative change per step, to any picture
    format matplotlib writes (PNG, SVG, PDF...).

    The ``top`` series by drift get a line each (a series that became NaN first); the others are
    summarised as a grey band (their range at each step). The x-axis spans every step: a NaN or
    Inf is a marker at the top edge, and the first step with one is marked on both panels.
    Returns the norms drawn, by line name (see :class:`Drawn`).
    """
    plt = _pyplot()
    check_format(path)
    ranked = sorted(series, key=lambda s: -s.drift if not math.isnan(s.drift) else -math.inf)
    shown, rest = ranked[:top], ranked[top:]
    figure, (norms, changes) = plt.subplots(2, 1, figsize=(10, 7), sharex=True, constrained_layout=True)
    drawn = Drawn()
    for s, colour in zip(shown, COLOURS * (top // len(COLOURS) + 1)):
        label = printable(s.path)
        norms.plot(s.steps, s.norms, marker="o", markersize=3, label=label, color=colour)
        drawn[label] = [float(v) for v in s.norms]
        _at_top_edge(norms, s.steps, s.norms, colour)
        points = [(st, c) for st, c in zip(s.steps, s.changes) if c is not None]
        if points:
            changes.plot(*zip(*points), marker="o", markersize=3, color=colour)
            _at_top_edge(changes, *zip(*points), colour)
    if rest:
        steps = rest[0].steps
        low = [min(s.norms[k] for s in rest) for k in range(len(steps))]
        high = [max(s.norms[k] for s in rest) for k in range(len(steps))]
        norms.fill_between(steps, low, high, color="0.85", label=f"{len(rest)} others (range)")
    every_step = sorted({st for s in series for st in s.steps})
    bad_steps = [st for s in series for st, n in zip(s.steps, s.nonfinite) if n]
    bad_steps += [st for s in series for st, v in zip(s.steps, s.norms) if not math.isfinite(v)]
    if every_step:
        pad = max((every_step[-1] - every_step[0]) * 0.03, 0.5)
        drawn.xlim = (every_step[0] - pad, every_step[-1] + pad)
        norms.set_xlim(*drawn.xlim)
    if bad_steps:
        drawn.first_nonfinite = min(bad_steps)
        for axis in (norms, changes):
            axis.axvline(drawn.first_nonfinite, color=NONFINITE, linestyle="--", linewidth=1.2)
        norms.plot(
            [], [], color=NONFINITE, linestyle="--", label=f"first NaN/Inf: step {drawn.first_nonfinite}"
        )
        norms.plot([], [], color="0.3", linestyle="none", marker="X", label="NaN/Inf (at the top edge)")
        changes.annotate(
            f"first NaN/Inf: step {drawn.first_nonfinite}",
            (drawn.first_nonfinite, 1.0),
            xycoords=changes.get_xaxis_transform(),
            xytext=(4, -24),
            textcoords="offset points",
            color=NONFINITE,
            fontsize="small",
        )
    finite = [v for s in series for v in s.norms if math.isfinite(v)]
    if _spans_decades(finite):
        norms.set_yscale("log")
    moved = [v for s in shown for v in s.changes if v is not None]
    if _spans_decades(moved):
        changes.set_yscale("log")
    norms.set_ylabel("L2 norm")
    norms.set_title(printable(title) or "norms over steps")
    norms.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    changes.set_ylabel("||W_t - W_t-1|| / ||W_t-1||")
    changes.set_xlabel("step")
    changes.set_title("relative change from the step before")
    for axis in (norms, changes):
        axis.grid(True, alpha=0.3)
    figure.savefig(path)
    plt.close(figure)
    return drawn


def every_bin(bins: Sequence[tuple[float, float, int]]) -> list[tuple[float, float, int]]:
    """``bins`` (sign and power-of-two bins, the empty ones left out) with the empty ones between
    put back, so that the axis is even: each step along it is one power of two.

    >>> every_bin([(-4.0, -2.0, 1), (1.0, 2.0, 5), (4.0, 8.0, 2)])
    [(-4.0, -2.0, 1), (0.0, 0.0, 0), (1.0, 2.0, 5), (2.0, 4.0, 0), (4.0, 8.0, 2)]
    """
    counts = {(low, high): n for low, high, n in bins}
    negative = [int(math.log2(-low)) for low, _, _ in bins if low < 0]
    positive = [int(math.log2(high)) for low, high, _ in bins if low > 0]
    out = []
    if negative:  # from the largest magnitude down
        for e in range(max(negative), min(negative) - 1, -1):
            key = (-(2.0**e), -(2.0 ** (e - 1)))
            out.append((*key, counts.get(key, 0)))
    if (0.0, 0.0) in counts or (negative and positive):
        out.append((0.0, 0.0, counts.get((0.0, 0.0), 0)))
    if positive:
        for e in range(min(positive), max(positive) + 1):
            key = (2.0 ** (e - 1), 2.0**e)
            out.append((*key, counts.get(key, 0)))
    return out


def plot_stats(
    rows: Sequence[tuple[str, float]], path: str, histogram=None, hist_name: str = "", title: str = ""
):
    """Bars of each parameter's (or layer's) norm for one step; with ``histogram`` (binned by
    power of two) a second panel of one parameter's values. Returns the bar heights drawn."""
    plt = _pyplot()
    check_format(path)
    panels = 2 if histogram is not None else 1
    height = max(3.0, 0.22 * len(rows) + 1.5)
    figure, axes = plt.subplots(
        panels, 1, figsize=(9, height + (3.5 if panels == 2 else 0)), constrained_layout=True
    )
    bars = axes[0] if panels == 2 else axes
    names = [printable(name) for name, _ in rows][::-1]
    values = [value for _, value in rows][::-1]
    drawn = bars.barh(names, values, color="tab:blue")
    if _spans_decades(values):
        bars.set_xscale("log")
    bars.set_xlabel("L2 norm")
    bars.set_title(printable(title) or "norms")
    bars.tick_params(axis="y", labelsize="small")
    bars.grid(True, axis="x", alpha=0.3)
    if histogram is not None:
        hist = axes[1]
        bins = every_bin(histogram.bins())
        labels = [
            "0" if low == high else f"{'-' if low < 0 else ''}2^{int(math.log2(max(abs(low), abs(high))))}"
            for low, high, _ in bins
        ]
        hist.bar(range(len(bins)), [count for _, _, count in bins], color="tab:orange")
        hist.set_xticks(range(len(bins)), labels, rotation=90, fontsize="x-small")
        hist.set_yscale("log")
        hist.set_xlabel("value, binned by sign and power of two (bin upper magnitude)")
        hist.set_ylabel("count")
        extra = f"; NaN {histogram.nan}, Inf {histogram.inf}" if histogram.nan or histogram.inf else ""
        hist.set_title(f"values of {printable(hist_name)}{extra}")
    figure.savefig(path)
    heights = [float(patch.get_width()) for patch in drawn.patches][::-1]
    plt.close(figure)
    return heights


def plot_layer_heatmap(
    stacks: dict[str, list[list[float]]], steps: Sequence[int], path: str, title: str = ""
):
    """One heatmap per stack: the norm of each layer (rows) at each step (columns). ``stacks``
    maps a stack's name to its rows (one list of norms per layer, one value per step)."""
    plt = _pyplot()
    check_format(path)
    names = list(stacks)[:4]  # more stacks than this do not fit one picture
    figure, axes = plt.subplots(
        len(names), 1, figsize=(9, 2.5 + 2.5 * len(names)), squeeze=False, constrained_layout=True
    )
    import matplotlib
    import numpy as np
    from matplotlib.patches import Patch

    colours = matplotlib.colormaps["viridis"].with_extremes(bad=NONFINITE)  # NaN/Inf cells: their own
    nonfinite = False
    for axis, name in zip(axes[:, 0], names):
        rows = stacks[name]
        values = np.ma.masked_invalid(np.asarray(rows, dtype=np.float64))
        nonfinite = nonfinite or bool(np.ma.count_masked(values))
        image = axis.imshow(values, aspect="auto", interpolation="nearest", cmap=colours)
        axis.set_yticks(range(len(rows)))
        axis.set_ylabel(f"{printable(name)}: layer")
        axis.set_xticks(range(len(steps)), [str(s) for s in steps], rotation=45, fontsize="small")
        axis.set_xlabel("step")
        figure.colorbar(image, ax=axis, label="L2 norm of the layer")
    axes[0, 0].set_title(printable(title) or "norms of each layer over steps")
    if nonfinite:
        axes[0, 0].legend(
            handles=[Patch(color=NONFINITE, label="NaN/Inf")],
            loc="lower left",
            bbox_to_anchor=(0.0, 1.08),
            fontsize="small",
            frameon=False,
        )
    figure.savefig(path)
    plt.close(figure)
    return {name: stacks[name] for name in names}


def plot_axis(table, dims: Sequence[int], path: str, title: str = ""):
    """The norm per index of one axis of an array (bars), or of two (a heatmap: the first axis
    down, the second across); ``table`` is an :class:`~paramscope.compute.values.AxisTable`.
    Returns the values drawn."""
    if not path.lower().endswith((".png", ".svg")):
        raise UsageError(f"cannot tell the picture format of {path!r}", hint="name a .png or .svg file")
    plt = _pyplot()
    norms = table.norm
    if norms.ndim == 1:
        figure, axis = plt.subplots(figsize=(9, 3.5), constrained_layout=True)
        axis.bar(table.labels[0], norms, width=1.0 if len(norms) > 64 else 0.8, color="tab:blue")
        axis.set_xlabel(f"index along axis {dims[0]}")
        axis.set_ylabel("L2 norm")
        if _spans_decades(list(norms)):
            axis.set_yscale("log")
        axis.grid(True, axis="y", alpha=0.3)
    else:
        figure, axis = plt.subplots(figsize=(9, 6), constrained_layout=True)
        image = axis.imshow(norms, aspect="auto", interpolation="nearest", cmap="viridis")
        axis.set_ylabel(f"index along axis {dims[0]}")
        axis.set_xlabel(f"index along axis {dims[1]}")
        figure.colorbar(image, ax=axis, label="L2 norm")
    axis.set_title(printable(title) or "norm per index")
    figure.savefig(path)
    plt.close(figure)
    return norms.tolist()
