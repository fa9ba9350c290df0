"""Speed of the layer-similarity comparison against the peer tool torch-cka, measured side by side in one process.

Setup: two ConvNets of the registry (``convnet``, eight 3x3 conv blocks 16-16-32-32-32-64-64-64, strides
1,1,2,1,1,2,1,1, different seeds) on 2,048 natural-image crops (``crops``, 3x32x32), batches of 256 (the original's
``compare_nets.py`` default), the outputs of all 8 blocks of each: an 8 x 8 matrix of minibatch linear CKA
(unbiased HSIC summed over batches, Nguyen et al. 2021).

* ``ours``: ``instill.compare.measures.compare_models(..., measures=["cka_minibatch"])``: one Gram matrix per layer per
batch,
  U-centred once, all 64 pairs from one matmul, accumulated in float64 on the device, one transfer at the end.
* ``torch_cka``: ``torch_cka.CKA(...).compare(loader)`` (pip install torch-cka, a benchmark-only extra:
  ``pip install -e .[bench]``): per pair it recomputes both layers' self-HSIC, with O(n^3) ``trace(K @ L)`` products,
  and synchronises on every value (``.item()``).

Both see the same batches in the same order; the two matrices must agree within 1e-4 (torch-cka computes in
float32). Timing: the tools alternate (``--repeats`` rounds after one warm-up); a ratio is the median of per-round
ratios. torch-cka runs as its README calls it (recording autograd graphs: ``speedup_vs_torch_cka``, target >= 3x)
and under ``torch.no_grad()`` (``speedup_vs_torch_cka_no_grad``). Both tools must run the two models' forward
passes, timed alone as ``forwards_s``; ``speedup_beyond_forwards`` compares the work each adds to them.
Both ratios meet a physical bound here: per batch torch-cka makes 72 Gram products (each of model b's layers once
per layer of a) and 136 n x n x n products, compare 16 Gram products as symmetric updates (below); torch-cka took
10.9-12.8 s of which the forwards are 2.1-3.1 s, the 16 products take 1.08-1.18 s, so no exact method comes out
above about 4x overall (torch-cka over the forwards alone) or about 9x beyond the forwards.

The floor (``floor_s``): the two forward passes plus the Gram products ``X X^T`` of every selected layer of both
models for every batch, timed alone as bare matmuls on tensors of the same shapes made beforehand (``grams_s``, at
compare's float32 precision). ``over_floor``: ours / floor, the median of per-round ratios; target <= 1.10. On
the CPU compare makes each Gram product as a symmetric rank-k update (``symmetric_product``: the BLAS computes one
triangle, half the multiply-adds, 1.08-1.18 s against 1.70-1.79 s for the bench's 128 products as bare matmuls), so
``over_floor`` goes below 1; ``over_symmetric_floor`` divides by the floor with the products made that way
(``symmetric_floor_s``), which keeps what compare adds beyond its arithmetic in view. Where
the rest went (torch.profiler over ``compare_models`` on 512 images, one CPU thread): convolutions, batch norm and
ReLU of the forwards and the 16 Gram matmuls per batch, and 13 % in ``isfinite``: the capture hooks refused
non-finite activations with ``torch.isfinite(t).all()``, four full passes (ne, eq, abs, all) over every 256 x 16,384
activation, as much as the batch norms. Now a finite sum settles it in one reduction (``holds_non_finite``), and
cka_minibatch alone checks the Gram matrices its hooks keep (a NaN or inf reaches their diagonal) instead of the
activations: 0.1 % of the profile. What remains beyond the floor (~1-2 %): the float64 U-centring of the eight
256 x 256 Gram matrices of each model, the one (8 x 65,536) @ (65,536 x 8) float64 product for all 64 pairs, the
loader's collation, the hooks' Python; no transfer (one ``.cpu()`` of the 8 x 8 result). Five alternating rounds
of 512 images after the change (load 4.3): over_floor 0.96, 1.00, 1.00, 0.80, 1.01 (before it, load 1.1: 1.28,
1.14, 1.24, 1.14, 1.20).

Approximate mode (``--sketch 32,64,128,512``: ``compare_models(..., sketch_features=k)``, ``instill.compare.measures.
Sketch``): each layer wider than k projected by two independent Gaussian d x k/2 matrices drawn from the seed, the
HSIC terms from the products of the two halves (unbiased). For each k and each of ``--sketch-seeds`` fresh seeds
(100, 101, ...) the bench prints every pair's |error| against the exact matrix (mean, max, and the max by the width
of layer a: 16,384, 8,192 and 4,096 features here) and the run's time over the floor; figures in the README's
Benchmarks section and docs/results.md. The error grows with a layer's effective rank over k (nearly white
features need k in the hundreds), so the mode is for a quick look at many wide layers, not for reported values.

Without torch-cka the bench times ``run_textbook`` (its algorithm written out) and says so (``peer``;
``speedup_vs_torch_cka`` is null). ``python bench/compare.py`` or ``--quick`` (256 images, seconds). Run on a
quiet machine (``uptime``). The last line printed is one JSON object with ``speedup_vs_torch_cka``.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import statistics
import warnings

import torch
from torch.utils.data import DataLoader, TensorDataset

from instill.compare.measures import compare_models
from instill.data import DataContext, DatasetInfo
from instill.registry import DATASETS, MODELS
from timing import gram_product, synced_seconds

CHANNELS = [16, 16, 32, 32, 32, 64, 64, 64]
STRIDES = [1, 1, 2, 1, 1, 2, 1, 1]
LAYERS = [f"layers.{i}" for i in range(len(CHANNELS))]


def _models(info: DatasetInfo) -> tuple[torch.nn.Module, torch.nn.Module]:
    models = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        models.append(MODELS.build("convnet", info, {"channels": CHANNELS, "strides": STRIDES}).eval())
    return models[0], models[1]


def run_ours(model_a, model_b, loader, device, sketch_features=None, seed=0) -> torch.Tensor:
    result = compare_models(model_a, model_b, loader, layers_a=LAYERS, measures=["cka_minibatch"], device=device,
                            sketch_features=sketch_features, seed=seed)
    return torch.from_numpy(result.matrix("cka_minibatch"))


def sketch_errors(model_a, model_b, loader, device, exact: torch.Tensor, features: list[int], seeds: list[int],
                  floor_s: float, exact_s: float) -> list[dict]:
    """The approximate mode against the exact matrix: for each k and each seed, every pair's |error| (mean, max),
    the largest by layer width, and the time of one run against the floor and the exact run (one timing per seed:
    each seed draws its projections afresh, which the time includes)."""
    widths = [f[0].numel() for f in _first_features(model_a, loader)]
    out = []
    for k in features:
        per_seed, times = [], []
        for seed in seeds:
            t, values = _timed(device, run_ours, model_a, model_b, loader, device, k, seed)
            error = (values - exact).abs()
            by_width = {w: round(max(error[i].max().item() for i in range(len(LAYERS)) if widths[i] == w), 4)
                        for w in sorted(set(widths))}
            per_seed.append({"seed": seed, "mean_abs": round(error.mean().item(), 4),
                             "max_abs": round(error.max().item(), 4), "max_abs_by_width_a": by_width})
            times.append(t)
            print(f"sketch k={k} seed {seed}: |error| mean {per_seed[-1]['mean_abs']:.4f} max "
                  f"{per_seed[-1]['max_abs']:.4f} (by width of layer a: {by_width}), {t:.3f}s = "
                  f"{t / floor_s:.3f} x floor", flush=True)
        out.append({"features": k, "seeds": per_seed,
                    "mean_abs": round(statistics.mean(r["mean_abs"] for r in per_seed), 4),
                    "max_abs": max(r["max_abs"] for r in per_seed),
                    "times_s": [round(t, 4) for t in times],
                    "over_floor": round(statistics.median(times) / floor_s, 3),
                    "vs_exact": round(statistics.median(times) / exact_s, 3)})
    return out


def _first_features(model, loader) -> list[torch.Tensor]:
    from instill.compare.capture import FeatureCapture

    with torch.no_grad(), FeatureCapture(model, LAYERS) as capture:
        model(next(iter(loader))[0][:1])
        return list(capture.pop().values())


def run_torch_cka(model_a, model_b, loader, device, no_grad: bool = False) -> torch.Tensor:
    """torch-cka as its README calls it (``CKA(...).compare(loader)``, which records autograd graphs), or under
    ``torch.no_grad()`` (``no_grad``: the peer at its best)."""
    from contextlib import nullcontext

    from torch_cka import CKA

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cka = CKA(model_a, model_b, model1_name="a", model2_name="b", model1_layers=LAYERS, model2_layers=LAYERS,
                  device=str(device))
        with torch.no_grad() if no_grad else nullcontext():
            cka.compare(loader)
    for model in (model_a, model_b):  # torch-cka leaves its hooks on the models: remove them for the next round
        for module in model.modules():
            module._forward_hooks.clear()
    return cka.hsic_matrix.detach().double().cpu()


def run_textbook(model_a, model_b, loader, device) -> torch.Tensor:
    """torch-cka's algorithm written out, for machines without it: per pair, both Gram matrices and three unbiased
    HSIC estimates with O(n^3) ``trace(K @ L)``, each synchronised with ``.item()``."""
    from instill.compare.capture import FeatureCapture

    def hsic(k, l):
        n = k.shape[0]
        ones = torch.ones(n, 1, device=k.device)
        value = torch.trace(k @ l) + ((ones.T @ k @ ones) * (ones.T @ l @ ones)).item() / ((n - 1) * (n - 2))
        value -= (ones.T @ k @ l @ ones).item() * 2 / (n - 2)
        return (value / (n * (n - 3))).item()

    sums = torch.zeros(len(LAYERS), len(LAYERS), 3, dtype=torch.float64)
    with torch.no_grad(), FeatureCapture(model_a, LAYERS) as capture_a, FeatureCapture(model_b, LAYERS) as capture_b:
        for x, _ in loader:
            model_a(x), model_b(x)
            feats_a, feats_b = capture_a.pop(), capture_b.pop()
            for i, name_a in enumerate(LAYERS):
                flat = feats_a[name_a].flatten(1)
                k = (flat @ flat.T).fill_diagonal_(0)
                for j, name_b in enumerate(LAYERS):
                    other = feats_b[name_b].flatten(1)
                    l = (other @ other.T).fill_diagonal_(0)
                    sums[i, j] += torch.tensor([hsic(k, k), hsic(k, l), hsic(l, l)], dtype=torch.float64)
    return sums[..., 1] / (sums[..., 0] * sums[..., 2]).sqrt()


def run_forwards(model_a, model_b, loader) -> None:
    """The two models' forward passes alone: the floor both tools share."""
    with torch.no_grad():
        for x, _ in loader:
            model_a(x), model_b(x)


def gram_shapes(model_a, model_b, loader) -> list[tuple[int, int]]:
    """(n, d) of every Gram product compare makes: each selected layer of both models, for every batch."""
    from instill.compare.capture import FeatureCapture

    shapes = []
    with torch.no_grad(), FeatureCapture(model_a, LAYERS) as capture_a, FeatureCapture(model_b, LAYERS) as capture_b:
        for x, _ in loader:
            model_a(x[:1]), model_b(x[:1])
            feats = [*capture_a.pop().values(), *capture_b.pop().values()]
            shapes += [(x.shape[0], f[0].numel()) for f in feats]
    return shapes


def bare_grams(shapes: list[tuple[int, int]], device, symmetric: bool = False) -> callable:
    """The floor's second part: one ``X @ X.T`` per shape, on tensors made beforehand, at compare's precision;
    ``symmetric``: the same products as ``symmetric_product`` makes them (one triangle, on the CPU)."""
    from instill.compare.similarity import full_precision

    made = {shape: torch.randn(shape, device=device) for shape in set(shapes)}
    product = gram_product(symmetric)

    def run() -> None:
        with torch.no_grad(), full_precision(torch.device(device).type):
            for shape in shapes:
                product(made[shape])

    return run


def _timed(device, fn, *args) -> tuple[float, torch.Tensor]:
    """Seconds of ``fn(*args)``, the device synchronised around it (``timing.synced_seconds``), and its result."""
    out = []
    return synced_seconds(lambda: out.append(fn(*args)), device), out[0] if out else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="256 images, one round")
    parser.add_argument("--images", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sketch", default="", help="approximate mode: comma-separated sketch_features to measure "
                                                     "(error against the exact values, time against the floor)")
    parser.add_argument("--sketch-seeds", type=int, default=5, help="fresh seeds per sketch size")
    args = parser.parse_args()
    images, repeats = (256, 1) if args.quick else (args.images, args.repeats)
    device = torch.device(args.device)
    data = DATASETS.build("crops", DataContext(seed=0), {"n_train": images, "n_val": 4, "n_test": 4})
    model_a, model_b = (m.to(device) for m in _models(data.info))
    loader = DataLoader(TensorDataset(data.train.x.to(device), data.train.y.to(device)), batch_size=args.batch_size,
                        shuffle=False)
    have_peer = importlib.util.find_spec("torch_cka") is not None
    if not have_peer:
        print("torch-cka is not installed (pip install -e .[bench]): timing a textbook implementation of its "
              "algorithm instead", flush=True)
    peer = run_torch_cka if have_peer else run_textbook
    peer_no_grad = functools.partial(run_torch_cka, no_grad=True) if have_peer else run_textbook
    run_ours(model_a, model_b, loader, device)  # warm-up (allocations, kernels)
    shapes = gram_shapes(model_a, model_b, loader)
    grams, grams_symmetric = bare_grams(shapes, device), bare_grams(shapes, device, symmetric=True)
    grams(), grams_symmetric()
    times: dict[str, list[float]] = {"ours": [], "torch_cka": [], "torch_cka_no_grad": [], "forwards": [],
                                     "grams": [], "grams_symmetric": []}
    diffs = []
    for _ in range(repeats):
        t_forwards, _ = _timed(device, run_forwards, model_a, model_b, loader)
        t_grams, _ = _timed(device, grams)
        t_symmetric, _ = _timed(device, grams_symmetric)
        t_ours, ours = _timed(device, run_ours, model_a, model_b, loader, device)
        t_peer, peer_values = _timed(device, peer, model_a, model_b, loader, device)
        t_best, best = _timed(device, peer_no_grad, model_a, model_b, loader, device)
        for key, value in zip(times, (t_ours, t_peer, t_best, t_forwards, t_grams, t_symmetric)):
            times[key].append(value)
        diffs.append(max((ours - peer_values).abs().max().item(), (ours - best).abs().max().item()))
        print(f"round: forwards alone {t_forwards:.3f}s  Gram products alone {t_grams:.3f}s (symmetric "
              f"{t_symmetric:.3f}s)  over floor {t_ours / (t_forwards + t_grams):.3f} (symmetric "
              f"{t_ours / (t_forwards + t_symmetric):.3f})  ours {t_ours:.3f}s  torch-cka {t_peer:.3f}s "
              f"(no_grad {t_best:.3f}s)  ratio {t_peer / t_ours:.2f}x  max |diff| {diffs[-1]:.2e}", flush=True)
    print("ours (8 x 8 cka_minibatch):")
    for name, row in zip(LAYERS, ours.tolist()):
        print(f"  {name:9s} " + " ".join(f"{v:.3f}" for v in row))
    max_diff = max(diffs)
    med = {key: statistics.median(values) for key, values in times.items()}
    ratio = lambda key: statistics.median(p / o for p, o in zip(times[key], times["ours"]))  # noqa: E731
    beyond = statistics.median((p - f) / max(o - f, 1e-9) for p, o, f in
                               zip(times["torch_cka"], times["ours"], times["forwards"]))
    over = lambda grams: statistics.median(  # noqa: E731
        o / (f + g) for o, f, g in zip(times["ours"], times["forwards"], times[grams]))
    over_floor = over("grams")
    result = {"bench": "compare", "device": str(device), "threads": torch.get_num_threads(), "images": images,
              "batch_size": args.batch_size, "layers": f"{len(LAYERS)}x{len(LAYERS)}",
              **{f"{key if have_peer else key.replace('torch_cka', 'textbook')}_s": round(value, 4)
                 for key, value in med.items()},
              "peer": "torch-cka" if have_peer else "textbook (torch-cka not installed)",
              "speedup_vs_peer": round(ratio("torch_cka"), 2),
              "speedup_vs_torch_cka": round(ratio("torch_cka"), 2) if have_peer else None,
              "speedup_vs_torch_cka_no_grad": round(ratio("torch_cka_no_grad"), 2) if have_peer else None,
              "speedup_beyond_forwards": round(beyond, 2),
              "floor_s": round(statistics.median(f + g for f, g in zip(times["forwards"], times["grams"])), 4),
              "over_floor": round(over_floor, 3), "over_floor_target_met": over_floor <= 1.10,
              "symmetric_floor_s": round(statistics.median(
                  f + g for f, g in zip(times["forwards"], times["grams_symmetric"])), 4),
              "over_symmetric_floor": round(over("grams_symmetric"), 3), "max_abs_diff": max_diff,
              "agree_1e-4": max_diff <= 1e-4,
              "target_met": have_peer and ratio("torch_cka") >= 3 and beyond >= 8 and max_diff <= 1e-4}
    if args.sketch:
        features = [int(k) for k in args.sketch.split(",")]
        result["sketch"] = sketch_errors(model_a, model_b, loader, device, ours, features,
                                         list(range(100, 100 + args.sketch_seeds)), result["floor_s"], med["ours"])
    print(json.dumps(result))


if __name__ == "__main__":
    main()
