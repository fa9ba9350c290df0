"""How time and peak memory grow with the size of the work, for each system, each curve against its ideal line.

Curves (x: the size of the work; ideal lines drawn from the first point):

* ``compare_samples``: ``compare_models`` (minibatch CKA, 8 x 8 layers of two ConvNets) against the number of
  images: time linear (through the origin), peak memory flat (one batch's activations and Gram matrices).
* ``compare_pairs``: the same at a fixed number of images against the number of layer pairs (1, 4, 16, 64: 1, 2,
  4, 8 layers a side): ideal time linear in pairs; each layer's Gram matrix serves all its pairs, so the curve
  bends below it by design; memory flat.
* ``masks_depth``: GPT-2 depth (2, 4, 8, 12 layers at the masks bench's width): a mask-discovery step over a plain
  forward+backward, and a transplanted model's training step over a plain one (time ratios), and the transplanted
  model's training memory over the plain one's (bytes of parameters, gradients, AdamW state and freezing state):
  all ideally flat.
* ``guided_batch``: the guided copy-paste step against the batch size: its time over its floor (the unguided step,
  the guide's forward and the loss's Gram products timed alone; ideally flat), and its peak memory (ideal linear:
  activations grow with the batch; the n x n Gram matrices add n^2 terms, small at these sizes).
* ``stitch_fit``: the least-squares initialisation of a stitch (streaming float64 normal equations, Tiny10 bn1
  shapes: 16 channels, 30 x 30 positions) against the number of images: time linear, memory flat.
* ``sweep_points`` (full mode only: each point is a run in a worker process): ``python -m instill.sweep`` over 2, 4,
  8 points of the tiny digits FCN with 2 workers: time linear, the sweep process's own peak memory flat.

Peak memory: on CUDA the allocator's peak over the call; on the CPU the growth of the process's peak resident set
over the call (``/proc/self/clear_refs`` resets the peak, ``malloc_trim`` first returns freed memory to the system,
so earlier calls do not hide a new peak); both from a state where the models and data already exist.
``bend`` in the JSON: the last point over its ideal (1.0 = on the line). Each time is the median of
``--repeats`` calls. ``python bench/scaling.py`` writes ``bench/scaling.png`` and prints one JSON object last;
``--quick`` (tiny models and sizes, seconds, no sweep) writes the plot only where ``--plot`` says.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch.utils.data import DataLoader, TensorDataset

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from timing import interleaved_times, median_ratio, sync, synced_median  # noqa: E402 - bench/ is on the path from here on


@dataclass
class Curve:
    name: str
    x_label: str
    xs: list[float] = field(default_factory=list)
    series: dict[str, list[float]] = field(default_factory=dict)  # name -> values per x
    ideal: dict[str, str] = field(default_factory=dict)  # series name -> "linear" | "flat"
    units: dict[str, str] = field(default_factory=dict)

    def add(self, x: float, **values: float) -> None:
        self.xs.append(x)
        for key, value in values.items():
            self.series.setdefault(key, []).append(value)

    def ideal_line(self, key: str) -> list[float]:
        first, x0 = self.series[key][0], self.xs[0]
        return [first * x / x0 if self.ideal[key] == "linear" else first for x in self.xs]

    def bends(self) -> dict[str, float]:
        return {key: round(values[-1] / max(self.ideal_line(key)[-1], 1e-12), 3) for key, values in self.series.items()}


# ----------------------------------------------------------------------------------------------------- measuring

def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    return 0


def measured(fn: Callable[[], None], device: torch.device, repeats: int) -> tuple[float, float]:
    """(median seconds of ``repeats`` calls, peak memory growth in MB over one more call)."""
    median = synced_median(fn, device, repeats)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        sync(device)
        peak = torch.cuda.max_memory_allocated(device) - base
    else:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")  # the peak resident set starts again from the current one
        base = _status_bytes("VmRSS")
        fn()
        peak = _status_bytes("VmHWM") - base
    return median, peak / 2**20


# ----------------------------------------------------------------------------------------------------- systems

def _convnets(channels: list[int], strides: list[int], device: torch.device):
    from instill.data import DataContext
    from instill.registry import DATASETS, MODELS

    data = DATASETS.build("crops", DataContext(seed=0), {"n_train": 8, "n_val": 4, "n_test": 4})
    models = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        models.append(MODELS.build("convnet", data.info, {"channels": channels, "strides": strides}).eval().to(device))
    return models


def compare_curves(quick: bool, device: torch.device, repeats: int) -> list[Curve]:
    from instill.compare.measures import compare_models

    channels, strides = ([8, 8, 16, 16], [1, 2, 1, 2]) if quick else ([16, 16, 32, 32, 32, 64, 64, 64],
                                                                         [1, 1, 2, 1, 1, 2, 1, 1])
    side, batch = (16, 32) if quick else (32, 256)
    a, b = _convnets(channels, strides, device)
    layers = [f"layers.{i}" for i in range(len(channels))]
    images = torch.randn((512 if quick else 2048), 3, side, side, generator=torch.Generator().manual_seed(0))

    def run(n: int, chosen: list[str]) -> Callable[[], None]:
        loader = DataLoader(TensorDataset(images[:n].to(device)), batch_size=batch)
        return lambda: compare_models(a, b, loader, layers_a=chosen, measures=["cka_minibatch"], device=device)

    samples = Curve("compare_samples", "images", ideal={"time_s": "linear", "peak_mb": "flat"})
    for n in ([64, 128, 256, 512] if quick else [256, 512, 1024, 2048]):
        t, peak = measured(run(n, layers), device, repeats)
        samples.add(n, time_s=t, peak_mb=peak)
    pairs = Curve("compare_pairs", "layer pairs", ideal={"time_s": "linear", "peak_mb": "flat"})
    for count in ([1, 2, 4] if quick else [1, 2, 4, 8]):
        t, peak = measured(run(2 * batch, layers[:count]), device, repeats)
        pairs.add(count * count, time_s=t, peak_mb=peak)
    return [samples, pairs]


def masks_curve(quick: bool, device: torch.device, repeats: int) -> Curve:
    import masks as bench

    curve = Curve("masks_depth", "GPT-2 layers", ideal={"discovery_vs_plain": "flat", "transfer_vs_plain": "flat",
                                                        "transfer_training_memory_vs_plain": "flat"})
    for depth in ([1, 2] if quick else [2, 4, 8, 12]):
        size = dataclasses.replace(bench.QUICK if quick else bench.Size(), n_layer=depth, device=str(device))
        discovery = interleaved_times({"ours": bench.ours_discovery_step(size),
                                       "plain": bench.plain_forward_backward(size)}, repeats, 1, device)
        moved, plain = bench.transfer_steps(size)
        transfer = interleaved_times({"moved": moved, "plain": plain}, repeats, 1, device)
        curve.add(depth, discovery_vs_plain=median_ratio(discovery["ours"], discovery["plain"]),
                  transfer_vs_plain=median_ratio(transfer["moved"], transfer["plain"]),
                  transfer_training_memory_vs_plain=bench.memory_ratios(size, size.density)["training"])
    return curve


def guided_curve(quick: bool, device: torch.device, repeats: int) -> Curve:
    import guidance as bench

    curve = Curve("guided_batch", "batch", ideal={"over_floor": "flat", "peak_mb": "linear"})
    shrink = ["data.n_train=256", "data.n_val=8", "data.n_test=8"]
    for batch in ([8, 16] if quick else [32, 64, 128, 256]):
        steps, release = bench.guided_steps(bench.step_setup(batch, shrink, str(device)))
        try:
            steps.pop("original")
            times = interleaved_times(steps, repeats, 1, device)
            floor = [u + g + m for u, g, m in zip(times["unguided"], times["guide_forward"], times["loss_grams"])]
            _, peak = measured(steps["ours"], device, 1)
        finally:
            release()
        curve.add(batch, over_floor=median_ratio(times["ours"], floor), peak_mb=peak)
    return curve


def stitch_curve(quick: bool, device: torch.device, repeats: int) -> Curve:
    from instill.stitching.stitch import LinearStats, rows

    channels, side, batch = (16, 8, 64) if quick else (16, 30, 128)
    block = torch.randn(batch, channels, side, side, generator=torch.Generator().manual_seed(0)).to(device)

    def fit(images: int) -> Callable[[], None]:
        def run() -> None:
            stats = LinearStats(channels, channels)
            for _ in range(images // batch):
                stats.update(rows(block), rows(block.flip(0)))
            stats.solve()
        return run

    curve = Curve("stitch_fit", "images", ideal={"time_s": "linear", "peak_mb": "flat"})
    for images in ([128, 256, 512, 1024] if quick else [1024, 2048, 4096, 8192]):
        t, peak = measured(fit(images), device, repeats)
        curve.add(images, time_s=t, peak_mb=peak)
    return curve


def sweep_curve() -> Curve:
    import resource

    import sweep as bench

    curve = Curve("sweep_points", "points", ideal={"time_s": "linear", "peak_mb": "flat"})
    for points in (2, 4, 8):
        with tempfile.TemporaryDirectory(prefix="instill-bench-scaling-") as folder:
            path = bench.sweep_file(Path(folder), 2, points)
            before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
            start = time.perf_counter()
            subprocess.run([sys.executable, "-m", "instill.sweep", str(path), "--out", str(Path(folder) / "out")],
                           check=True, stdout=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"})
            seconds = time.perf_counter() - start
            peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # the largest child so far, in KB
        curve.add(points, time_s=seconds, peak_mb=max(peak, before) / 1024)
    return curve


# ----------------------------------------------------------------------------------------------------- output

def plot(curves: list[Curve], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(curve, key) for curve in curves for key in curve.series]
    cols = 3
    rows_ = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows_, cols, figsize=(4.2 * cols, 3.1 * rows_), squeeze=False)
    for ax, (curve, key) in zip(axes.flat, panels):
        ax.plot(curve.xs, curve.series[key], "o-", label="measured")
        ax.plot(curve.xs, curve.ideal_line(key), "--", color="grey", label=f"ideal ({curve.ideal[key]})")
        ax.set_title(f"{curve.name}: {key}", fontsize=9)
        ax.set_xlabel(curve.x_label, fontsize=8)
        ax.tick_params(labelsize=7)
        if curve.ideal[key] == "linear":
            ax.set_xscale("log", base=2), ax.set_yscale("log")
        else:  # a flat ideal: from zero, so that small wobbles look small
            ax.set_ylim(0, 1.15 * max(*curve.series[key], *curve.ideal_line(key)))
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny models and sizes, no sweep")
    parser.add_argument("--repeats", type=int, help="timed calls per point (default 3; 2 with --quick)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--plot", help="where the plot goes (default bench/scaling.png; none with --quick)")
    parser.add_argument("--only", nargs="*", help="curves to measure: compare masks guided stitch sweep")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device, repeats = torch.device(args.device), args.repeats or (2 if args.quick else 3)
    wanted = set(args.only or ["compare", "masks", "guided", "stitch"] + ([] if args.quick else ["sweep"]))
    load = [round(v, 2) for v in os.getloadavg()]
    curves: list[Curve] = []
    if "compare" in wanted:
        curves += compare_curves(args.quick, device, repeats)
    if "masks" in wanted:
        curves.append(masks_curve(args.quick, device, repeats))
    if "guided" in wanted:
        curves.append(guided_curve(args.quick, device, repeats))
    if "stitch" in wanted:
        curves.append(stitch_curve(args.quick, device, repeats))
    if "sweep" in wanted:
        curves.append(sweep_curve())
    load_after = [round(v, 2) for v in os.getloadavg()]
    for curve in curves:
        for key, bend in curve.bends().items():
            print(f"{curve.name} {key}: " + ", ".join(f"{x:g}: {v:.4g}" for x, v in zip(curve.xs, curve.series[key]))
                  + f"; last point / ideal {bend:.2f}")
    path = args.plot or (None if args.quick else str(HERE / "scaling.png"))
    if path:
        plot(curves, Path(path), f"instill scaling ({device.type}, {torch.get_num_threads()} thread(s), load "
                                 f"{load[0]}-{load_after[0]})")
    result = {"bench": "scaling", "device": str(device), "threads": torch.get_num_threads(), "quick": args.quick,
              "load_before": load, "load_after": load_after, "plot": path,
              "curves": {c.name: {"x": c.xs, "x_label": c.x_label, **{k: [round(v, 5) for v in vs]
                                                                      for k, vs in c.series.items()},
                                  "ideal": c.ideal, "bend": c.bends()} for c in curves}}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
