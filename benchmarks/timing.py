"""Timing shared by the benchmark scripts."""
from __future__ import annotations

import statistics
import time


def interleaved(fns: dict, blocks: int, per_block: int) -> dict[str, float]:
    """Median over blocks of the mean seconds per call; the functions take turns block by block."""
    for fn in fns.values():
        for _ in range(max(3, per_block // 10)):
            fn()
    samples = {k: [] for k in fns}
    for _ in range(blocks):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(per_block):
                fn()
            samples[name].append((time.perf_counter() - t0) / per_block)
    return {k: statistics.median(v) for k, v in samples.items()}
