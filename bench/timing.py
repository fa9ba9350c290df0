"""Timing helpers shared by the benchmarks: steps taken in turns, compared by the median of per-round ratios.

A benchmark script imports them as ``from timing import ...`` (``python bench/x.py`` puts ``bench/`` on the path);
a test that imports ``bench.x`` puts ``bench/`` there too (tests/conftest.py).
"""

from __future__ import annotations

import statistics
import time
from typing import Callable


def gram_product(symmetric: bool) -> Callable:
    """``X X^T`` as a floor times it: a bare matmul, or (``symmetric``) as instill makes it (``symmetric_product``:
    one triangle by the BLAS on the CPU)."""
    from instill.compare.similarity import symmetric_product

    return symmetric_product if symmetric else lambda x: x @ x.T


def interleaved_times(steps: dict[str, Callable[[], None]], repeats: int, warmup: int, device=None
                      ) -> dict[str, list[float]]:
    """Seconds per call of each step, the steps alternating in a rotated order so that drifting noise hits all;
    ``device`` (a torch.device) synchronised around each call, as ``synced_median`` does."""
    names = list(steps)
    for _ in range(warmup):
        for name in names:
            steps[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for i in range(repeats):
        for name in names[i % len(names):] + names[:i % len(names)]:
            times[name].append(synced_seconds(steps[name], device))
    return times


def synced_seconds(fn: Callable[[], None], device=None) -> float:
    """Seconds of one call of ``fn``, ``device``'s queued work waited for before and after (see ``sync``)."""
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def median_ratio(numerator: list[float], denominator: list[float]) -> float:
    """Median over rounds of numerator / denominator: a ratio that machine-wide slowdowns mostly cancel out of."""
    return statistics.median(a / b for a, b in zip(numerator, denominator))


def synced_median(fn: Callable[[], None], device, repeats: int, warmup: int = 1) -> float:
    """Median seconds of ``repeats`` calls of ``fn`` after ``warmup`` calls, the device synchronised around each
    (``device`` a torch.device: a CUDA kernel queue would otherwise be timed at its launch)."""
    for _ in range(warmup):
        fn()
    return statistics.median(synced_seconds(fn, device) for _ in range(repeats))


def sync(device) -> None:
    """Wait for ``device``'s queued work (CUDA); nothing to wait for on the CPU (or without a device)."""
    if device is not None and device.type == "cuda":
        import torch

        torch.cuda.synchronize(device)
