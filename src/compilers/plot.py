"""A picture of a Benchmark: latency and throughput versus batch size, one line per model (needs matplotlib,
the `bench` extra)."""
from __future__ import annotations

import os
from pathlib import Path

from .bench import RAW, Benchmark
from .errors import InputError
from .files import replacing


def plot(bench: Benchmark, path: str | os.PathLike, title: str = "") -> Path:
    """Write the chart to `path` (PNG; SVG or PDF by the suffix): p50 latency per call (dotted: p99) and samples/s
    versus batch size, eager dashed."""
    plt = pyplot()
    from matplotlib.ticker import FuncFormatter, NullFormatter
    plot_format(path)
    fig, (lat, thr) = plt.subplots(1, 2, figsize=(12, 4.8))
    for name in bench.names:
        if name.endswith(RAW):
            continue
        ok = [bench.get(name, b) for b in bench.batch_sizes if bench.get(name, b).error is None]
        if not ok:
            continue
        eager = name == bench.baseline
        xs = [t.batch for t in ok]
        line, = lat.plot(xs, [t.p50_ms for t in ok], marker="o", label=name, linewidth=2 if eager else 1.5,
                         **(dict(color="black") if eager else {}))
        lat.plot(xs, [t.p99_ms for t in ok], linestyle=":", color=line.get_color(), linewidth=1)
        thr.plot(xs, [t.throughput for t in ok], marker="o", label=name, color=line.get_color(),
                 linewidth=line.get_linewidth())
    plain, minor = FuncFormatter(lambda v, _: _short(v)), FuncFormatter(lambda v, _: _short(v) if _leading(v) in (2, 5) else "")
    for ax in (lat, thr):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(bench.batch_sizes, [str(b) for b in bench.batch_sizes])
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(minor)
        ax.tick_params(axis="y", which="minor", labelsize="x-small")
        ax.set_xlabel("batch size")
        ax.grid(True, which="both", alpha=0.3)
    lat.set_title("latency per call, ms: p50 (solid), p99 (dotted)", fontsize="medium")
    thr.set_title("throughput, samples/s (one call at a time)", fontsize="medium")
    thr.legend(fontsize="small")
    fig.suptitle(f"{title}\n{bench.machine}, {bench.threads} torch threads" if title else
                 f"{bench.machine}, {bench.threads} torch threads", fontsize="medium")
    return save(fig, path, dpi=110)


def pyplot():
    """matplotlib's pyplot, drawing off screen (Agg); InputError naming the extra when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        from matplotlib import pyplot as plt
    except ImportError:
        raise InputError("plotting (--plot) needs matplotlib: pip install 'compilers[bench]'") from None
    return plt


def save(fig, path: str | os.PathLike, dpi: int = 100) -> Path:
    """Lay `fig` out and write it to `path` in one rename (png, svg or pdf by the suffix), then close it."""
    from matplotlib import pyplot as plt
    kind = plot_format(path)
    fig.tight_layout()
    try:
        with replacing(path) as tmp:
            fig.savefig(tmp, dpi=dpi, format=kind)
    finally:
        plt.close(fig)
    return Path(path)


def plot_format(path: str | os.PathLike) -> str:
    """The chart format a path asks for by its suffix (png without one); InputError for any other."""
    kind = Path(path).suffix.lower().lstrip(".") or "png"
    if kind not in ("png", "svg", "pdf"):
        raise InputError(f"--plot {path}: write a .png, .svg or .pdf file, not .{kind}")
    return kind


def _short(v: float) -> str:
    """1500000 -> 1.5M, 20000 -> 20k, 0.05 -> 0.05."""
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if v >= scale:
            return f"{v / scale:g}{suffix}"
    return f"{v:g}"


def _leading(v: float) -> int:
    return int(f"{v:e}"[0]) if v > 0 else 0
