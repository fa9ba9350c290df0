"""Speed and memory of model stitching, measured side by side in one process.

Prints these figures and, last, one JSON object with them:

* ``step_over_tail``: one training step of the stitch stage (the front activations cached, as the stage does for
  data without augmentation: index the cache, transform, end model's tail, cross-entropy, backward, Adam step)
  divided by a forward+backward of the transform and the end model's tail alone on the same activations. Target
  <= 1.2: no work before or after the cuts.
* ``uncached_step_over_tail``: the same step when the front head runs every step (data with augmentation): the
  head's forward is real work, so this is above 1 by the head's cost, and nothing else.
* ``original_step_over_tail``: the original's method for comparison: both whole networks run (a hook keeps the front
  activation, a hook swaps it into the end model), forward+backward.
* ``ps_inv_peak_mb``: peak memory of our least-squares fit (streaming float64 normal equations) at the paper's
  size, 50,000 images x 16 channels x 30 x 30 positions (Tiny10 bn1), counted analytically from the tensors one
  update holds (the accumulators and one batch's rows and temporaries): it does not depend on the number of images.
  ``ps_inv_rss_growth_mb`` checks that empirically: the growth of the process's peak resident memory between
  fitting ``n_small`` and ``n_large`` images (each in a fresh subprocess; ~0 means independent of n).
* ``original_ps_inv_peak_mb``: the original's ``np.linalg.pinv`` over all (N H W) x (C + 1) rows, measured with
  ``tracemalloc`` (numpy reports its allocations to it) on ``pinv_probe_images`` images and scaled linearly to
  50,000 (its memory is linear in the rows); ``ps_inv_memory_ratio`` = original / ours. Target >= 10.

Timing: the compared steps take turns (``--repeats`` rounds after warm-up); a ratio is the median over rounds. Run
from the repository root on a quiet machine: ``PYTHONPATH=. python bench/stitch.py`` (Tiny10 on 32x32, batch 128,
stitched at bn3) or ``--quick``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tracemalloc

import numpy as np
import torch
import torch.nn.functional as F

from instill.registry import MODELS
from instill.stitching.stitch import Head, Side, StitchTransform, Tail, freeze, layout_of
from timing import synced_median

INFO = {"input_shape": (3, 32, 32), "num_classes": 10}
PAPER = {"images": 50_000, "channels": 16, "side": 30}


def step_ratios(batch: int, repeats: int, layer: str = "bn3", device: torch.device = torch.device("cpu")
                ) -> dict[str, float]:
    torch.manual_seed(0)
    front, end = (freeze(MODELS.build("tiny10", INFO, {})).to(device) for _ in range(2))
    head, tail = Head(front, layer), Tail(end, layer)
    x = torch.randn(batch * 4, 3, 32, 32).to(device)
    y = torch.randint(0, 10, (batch * 4,)).to(device)
    with torch.no_grad():
        cache = head(x)
    side = Side(tuple(cache.shape[1:]), layout_of(tuple(cache.shape[1:])))
    transform = StitchTransform(side, side).to(device)
    optimizer = torch.optim.Adam(transform.parameters(), lr=1e-3)
    index = torch.arange(batch, device=device)

    def stage_step():  # what the stage's loss and the training loop do per step with cached activations
        a = cache[index]
        loss = F.cross_entropy(tail(transform(a)), y[index])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def uncached_step():
        with torch.no_grad():
            a = head(x[index])
        loss = F.cross_entropy(tail(transform(a)), y[index])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    a_fixed = cache[index].clone()

    def tail_alone():
        loss = F.cross_entropy(tail(transform(a_fixed)), y[index])
        loss.backward()
        transform.zero_grad(set_to_none=True)

    cut = dict(front.named_modules())[layer], dict(end.named_modules())[layer]

    def original_step():  # both whole networks with hooks, as the original's FrankeinsteinNet
        kept = {}
        h1 = cut[0].register_forward_hook(lambda m, i, o: kept.__setitem__("a", o))
        h2 = cut[1].register_forward_hook(lambda m, i, o: transform(kept["a"]))
        try:
            with torch.no_grad():
                front(x[index])
            loss = F.cross_entropy(end(x[index]), y[index])
        finally:
            h1.remove()
            h2.remove()
        loss.backward()
        transform.zero_grad(set_to_none=True)

    rounds = {name: [] for name in ("stage", "uncached", "tail", "original")}
    for _ in range(repeats):
        for name, fn in (("stage", stage_step), ("uncached", uncached_step), ("tail", tail_alone),
                         ("original", original_step)):
            rounds[name].append(synced_median(fn, device, 5, warmup=2))
    med = {k: statistics.median(v) for k, v in rounds.items()}
    return {"step_over_tail": med["stage"] / med["tail"], "uncached_step_over_tail": med["uncached"] / med["tail"],
            "original_step_over_tail": med["original"] / med["tail"], "tail_step_ms": 1000 * med["tail"]}


def ours_peak_bytes(channels: int, side: int, batch_images: int) -> int:
    """Peak bytes one ``LinearStats.update`` holds for a batch of rows (plus the accumulators), as written:
    the float32 activations and their row copies, the float64 rows, [X, 1], and y*y."""
    m, c = batch_images * side * side, channels
    accumulators = 8 * ((c + 1) ** 2 + (c + 1) * c + c)
    float32 = 4 * m * c * 4  # a, b and their (rows) copies
    float64 = 8 * m * (c + c + (c + 1) + c)  # x, y, xa, y*y
    return accumulators + float32 + float64


def _fit_rss(images: int, channels: int, side: int, batch_images: int) -> int:
    """Peak resident memory (KB) of a fresh process that fits the statistics over ``images`` random images."""
    code = f"""
import resource, torch
from instill.stitching.stitch import LinearStats, rows
torch.manual_seed(0)
stats = LinearStats({channels}, {channels})
for start in range(0, {images}, {batch_images}):
    a = torch.randn({batch_images}, {channels}, {side}, {side})
    b = torch.randn({batch_images}, {channels}, {side}, {side})
    stats.update(rows(a), rows(b))
stats.solve()
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"OMP_NUM_THREADS": "1", "PATH": "", "PYTHONPATH": "."})
    return int(out.stdout.split()[-1])


def original_pinv_bytes(images: int, channels: int, side: int) -> int:
    """tracemalloc peak of the original's ps_inv: pixels as rows, a column of ones, ``np.linalg.pinv`` of the
    (N H W) x (C + 1) float64 matrix, then times Y."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((images, channels, side, side)).astype(np.float32)
    b = rng.standard_normal((images, channels, side, side)).astype(np.float32)
    tracemalloc.start()
    x = a.transpose(0, 2, 3, 1).reshape(-1, channels).astype(np.float64)
    x = np.concatenate([x, np.ones((len(x), 1))], 1)
    y = b.transpose(0, 2, 3, 1).reshape(-1, channels).astype(np.float64)
    solution = np.linalg.pinv(x) @ y
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    del solution
    return peak


def memory(quick: bool) -> dict[str, float]:
    c, side, batch_images = PAPER["channels"], PAPER["side"], 128
    ours = ours_peak_bytes(c, side, batch_images)
    probe = 20 if quick else 200
    original = original_pinv_bytes(probe, c, side) * PAPER["images"] / probe
    small, large = (256, 1024) if quick else (1024, 8192)
    growth_kb = _fit_rss(large, c, side, batch_images) - _fit_rss(small, c, side, batch_images)
    return {"ps_inv_peak_mb": ours / 2**20, "original_ps_inv_peak_mb": original / 2**20,
            "ps_inv_memory_ratio": original / ours, "ps_inv_rss_growth_mb": growth_kb / 1024,
            "n_small": small, "n_large": large, "pinv_probe_images": probe}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, a few repeats")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--device", default="cpu", help="where the stitch step runs (cuda: timed calls synchronised; "
                                                        "the least-squares memory figures stay on the CPU)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    repeats = args.repeats or (3 if args.quick else 7)
    batch = args.batch or (32 if args.quick else 128)
    result = {"batch": batch, "device": args.device, **step_ratios(batch, repeats, device=torch.device(args.device)),
              **memory(args.quick)}
    for key, value in result.items():
        print(f"{key}: {value:.4g}" if isinstance(value, float) else f"{key}: {value}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
