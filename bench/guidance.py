"""Speed of the guidance loss, measured side by side in one process.

CKA part: forward+backward of the alignment term ``1 - CKA(target, guide)`` with respect to the target activations
(n x d, float32), at n = 256 and d in {1024, 50176, 200704}:

* ``textbook``: the original code's formulation: an explicit n x n centring matrix ``H`` built on every call,
  ``H K H``, every Gram matrix recomputed (``K`` and ``L`` twice each), autograd's backward.
* ``ours``: ``1 - cka_with_gram(x, guide_gram)``: the guide's Gram matrix cached (it is computed once per step in
  the guide's forward hook, under ``no_grad``), O(n^2) centring of the target's Gram, a hand-written backward with
  one matmul. ``ours_with_guide`` adds the guide Gram's own cost, to compare the whole per-step CKA work.
* ``matmul``: the float32 matmul floor of that loss: ``X X^T`` and ``G X``, 4 n^2 d FLOPs; and a square
  2048 x 2048 matmul. ``ours`` is reported as a fraction of the faster of these two rates, counting 4 n^2 d FLOPs.

Targets: ours >= 4x faster than textbook at d = 1024 and >= 3x at d = 200704; >= 0.6 of the matmul rate for
d >= 50176; values equal within 1e-5. Timing: the variants alternate (``--repeats`` rounds after warm-up, order
rotated each round); a ratio is the median of the per-round ratios. Run on a quiet machine (``uptime``):
``python bench/guidance.py`` or ``--quick`` (toy sizes, seconds). The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from core.similarity import centered_gram, cka_with_gram, gram


@dataclass
class Size:
    n: int = 256
    widths: tuple[int, ...] = (1024, 50176, 200704)
    repeats: int = 7
    warmup: int = 2
    square: int = 2048  # side of the reference square matmul
    targets: dict[str, float] = field(default_factory=lambda: {"speedup_first": 4.0, "speedup_last": 3.0,
                                                               "matmul_fraction": 0.6, "value_diff": 1e-5})


QUICK = Size(n=32, widths=(64, 2048), repeats=3, warmup=1, square=256)


# ----------------------------------------------------------------------------------------------------- timing

def interleaved_times(steps: dict[str, Callable[[], None]], repeats: int, warmup: int) -> dict[str, list[float]]:
    """Seconds per call of each step, the steps alternating in a rotated order so that drifting noise hits all."""
    names = list(steps)
    for _ in range(warmup):
        for name in names:
            steps[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for i in range(repeats):
        for name in names[i % len(names):] + names[:i % len(names)]:
            start = time.perf_counter()
            steps[name]()
            times[name].append(time.perf_counter() - start)
    return times


def median_ratio(numerator: list[float], denominator: list[float]) -> float:
    return statistics.median(a / b for a, b in zip(numerator, denominator))


# ----------------------------------------------------------------------------------------------------- CKA

def textbook_cka(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The original's ``CKA.linear_CKA`` (rep_sim/rep_sims.py), biased, exactly as written there."""

    def centering(k: torch.Tensor) -> torch.Tensor:
        n = k.shape[0]
        unit = torch.ones([n, n], device=k.device)
        identity = torch.eye(n, device=k.device)
        h = identity - unit / n
        return torch.matmul(torch.matmul(h, k), h)

    def linear_hsic(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.sum(centering(torch.matmul(a, a.T)) * centering(torch.matmul(b, b.T)))

    return linear_hsic(x, y) / (torch.sqrt(linear_hsic(x, x)) * torch.sqrt(linear_hsic(y, y)))


def activations(n: int, d: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Post-ReLU target and guide maps that share half their signal (CKA well inside (0, 1))."""
    g = torch.Generator().manual_seed(seed)
    shared = torch.randn(n, d, generator=g)
    guide = (shared + torch.randn(n, d, generator=g)).relu_()
    target = (shared + torch.randn(n, d, generator=g)).relu_()
    return target.requires_grad_(), guide


def cka_steps(x: torch.Tensor, y: torch.Tensor, square: int) -> dict[str, Callable[[], None]]:
    """The timed variants; each leaves x.grad holding its gradient."""
    with torch.no_grad():
        guide_gram = centered_gram(y)  # what the guide's hook caches
    probe = torch.randn(x.shape[0], x.shape[0])
    a, b = torch.randn(square, square), torch.randn(square, square)

    def textbook() -> None:
        x.grad = None
        (1 - textbook_cka(x, y)).backward()

    def ours() -> None:
        x.grad = None
        (1 - cka_with_gram(x, guide_gram)).backward()

    def ours_with_guide() -> None:
        x.grad = None
        with torch.no_grad():
            cached = centered_gram(y)
        (1 - cka_with_gram(x, cached)).backward()

    def matmul() -> None:
        with torch.no_grad():
            x @ x.T
            probe @ x

    def square_matmul() -> None:
        a @ b

    return {"textbook": textbook, "ours": ours, "ours_with_guide": ours_with_guide, "matmul": matmul,
            "square_matmul": square_matmul}


def agreement(x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """|CKA ours - CKA textbook| and the relative difference of their gradients (both float32)."""
    grads, values = [], []
    for fn in (lambda: cka_with_gram(x, gram(y)), lambda: textbook_cka(x, y)):
        x.grad = None
        value = fn()
        value.backward()
        values.append(value.item())
        grads.append(x.grad.clone())
    x.grad = None
    return abs(values[0] - values[1]), ((grads[0] - grads[1]).norm() / grads[1].norm()).item()


def measure_width(size: Size, d: int) -> dict[str, float]:
    x, y = activations(size.n, d)
    value_diff, grad_diff = agreement(x, y)
    times = interleaved_times(cka_steps(x, y, size.square), size.repeats, size.warmup)
    flops = 4 * size.n * size.n * d
    ours = statistics.median(times["ours"])
    matmul_rate = flops / statistics.median(times["matmul"])
    square_rate = 2 * size.square ** 3 / statistics.median(times["square_matmul"])
    return {"d": d, "textbook_ms": statistics.median(times["textbook"]) * 1e3, "ours_ms": ours * 1e3,
            "ours_with_guide_ms": statistics.median(times["ours_with_guide"]) * 1e3,
            "speedup": median_ratio(times["textbook"], times["ours"]),
            "speedup_with_guide": median_ratio(times["textbook"], times["ours_with_guide"]),
            "ours_gflops": flops / ours / 1e9, "matmul_gflops": matmul_rate / 1e9, "square_gflops": square_rate / 1e9,
            "matmul_fraction": flops / ours / max(matmul_rate, square_rate),
            "value_diff": value_diff, "grad_rel_diff": grad_diff}


def run_cka(size: Size) -> dict[str, object]:
    """Measure every width, print one line each, and return the figures (and whether the targets are met)."""
    rows = []
    for d in size.widths:
        row = measure_width(size, d)
        rows.append(row)
        print(f"n={size.n} d={d}: textbook {row['textbook_ms']:.1f} ms / ours {row['ours_ms']:.1f} ms = "
              f"{row['speedup']:.2f}x (with the guide's Gram {row['speedup_with_guide']:.2f}x); ours "
              f"{row['ours_gflops']:.1f} GFLOP/s = {row['matmul_fraction']:.2f} of matmul (loss's matmuls "
              f"{row['matmul_gflops']:.1f}, square {row['square_gflops']:.1f}); |CKA diff| {row['value_diff']:.1e}, "
              f"grad rel diff {row['grad_rel_diff']:.1e}")
    targets = size.targets
    wide = [row for row in rows if row["d"] >= 50176]
    met = {"speedup_first": rows[0]["speedup"] >= targets["speedup_first"],
           "speedup_last": rows[-1]["speedup"] >= targets["speedup_last"],
           "matmul_fraction": all(row["matmul_fraction"] >= targets["matmul_fraction"] for row in wide),
           "value_diff": all(row["value_diff"] <= targets["value_diff"] for row in rows)}
    scope = "" if size == Size() else " (set for the full size; this is a smaller run)"
    print(f"targets{scope}: " + ", ".join(f"{key} {'met' if ok else 'MISSED'}" for key, ok in met.items()))
    return {"n": size.n, "rows": [{k: float(f"{v:.4g}") if isinstance(v, float) else v for k, v in row.items()}
                                  for row in rows], "targets_met": met}


# ----------------------------------------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="toy sizes, a few repeats")
    parser.add_argument("--repeats", type=int, help="timed rounds per width")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    size = QUICK if args.quick else Size()
    if args.repeats is not None:
        size = dataclasses.replace(size, repeats=args.repeats)
    result = {"cka": run_cka(size), "threads": torch.get_num_threads()}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
