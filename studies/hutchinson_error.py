"""How far the Hutchinson alignment score is from the exact one, and how far the two conv operators are apart.

    OMP_NUM_THREADS=1 python studies/hutchinson_error.py [--seeds N | --seed S ...] [--out FILE.json]

The Align stage scores a layer's weight change D against the baseline D_b as the cosine similarity of the two
input-space Gram operators, tr(M_Dᵀ M_D M_bᵀ M_b) / (||M_Dᵀ M_D||_F ||M_bᵀ M_b||_F). ``score_method: exact`` takes
M_D of a dense layer as D itself and, for a convolution, the convolution with *circular* boundaries (evaluated in
the Fourier domain); ``score_method: hutchinson`` (the original's estimator) probes the convolution with *zero*
padding k // 2, as the original's SAME convolutions. So for a conv layer the two methods measure different
operators. This study separates the two sources of difference, per layer shape and kind of update:

- ``operator``: the exact score of the zero-padded conv (from its explicit matrix) minus the exact circular score;
- ``estimator``: the Hutchinson estimate minus the exact score of the operator it estimates (zero-padded conv,
  or the dense matrix), with the original's per-batch mean-|.| renormalisation (``normalise: true``, the
  default) and without it, at the default 100 probes x 100 iterations (and for dense layers also at the
  100 x 30 of tests/test_align_rules.py);
- ``vs_exact``: the Hutchinson estimate minus what ``score_method: exact`` reports (both effects together).

Kinds of update pair: ``independent`` (D and D_b independent Gaussian: the chance level), ``noisy`` (D_b = D + an
independent Gaussian of the same scale, as in the test), ``low_rank`` (D = G Aᵀ and D_b = G_b Aᵀ of rank 10 with
G_b = G + noise: the same input directions, different errors, as a real layer's updates over ten classes). Seeds are
drawn from the operating system's entropy unless given; every value is printed with its seed, then per (shape, kind)
the mean, standard deviation, and largest absolute difference.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
import torch.nn.functional as F

from instill.align.scores import conv_score, dense_score, hutchinson_score

DENSE = [(20, 30), (64, 64), (256, 64), (10, 256), (1024, 256)]  # (out, in): the test's, digits MLP layers
CONV = [(16, 1, 3, 1, 8), (8, 4, 3, 1, 8), (16, 16, 3, 1, 8), (16, 16, 3, 2, 8), (32, 16, 3, 2, 16), (16, 16, 3, 1, 4),
        (16, 16, 3, 2, 7)]
# (C_out, C_in, k, stride, map side): a digits input layer, NTK-CNN-like blocks, strided ones, small maps (where
# the boundary matters most) and an odd side under stride 2 (the exact score takes it up to the next even side)
KINDS = ("independent", "noisy", "low_rank")
SETTINGS = [(100, 100, True), (100, 100, False)]  # (probes, iterations, normalise): the defaults, unrenormalised
DENSE_EXTRA = [(100, 30, False)]  # the setting of tests/test_align_rules.py's 0.03 tolerance


def update_pair(kind: str, shape: tuple[int, ...], gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    out, rest = shape[0], shape[1:]
    fan_in = int(torch.tensor(rest).prod())
    if kind == "independent":
        d, d_b = (torch.randn(shape, generator=gen, dtype=torch.float64) for _ in range(2))
    elif kind == "noisy":
        d = torch.randn(shape, generator=gen, dtype=torch.float64)
        d_b = d + torch.randn(shape, generator=gen, dtype=torch.float64)
    else:
        a = torch.randn(fan_in, 10, generator=gen, dtype=torch.float64)
        g = torch.randn(out, 10, generator=gen, dtype=torch.float64)
        g_b = g + torch.randn(out, 10, generator=gen, dtype=torch.float64)
        d, d_b = (g @ a.T).reshape(shape), (g_b @ a.T).reshape(shape)
    return d, d_b


def zero_padded_gram(kernel: torch.Tensor, stride: int, side: int, chunk: int = 512) -> torch.Tensor:
    """M_Dᵀ M_D of the conv with zero padding k // 2 and ``stride`` on a side x side map (explicit matrix)."""
    c_in, k = kernel.shape[1], kernel.shape[-1]
    n = c_in * side * side
    cols = []
    for start in range(0, n, chunk):
        eye = torch.eye(n, dtype=torch.float64)[start:start + chunk].reshape(-1, c_in, side, side)
        cols.append(F.conv2d(eye, kernel, stride=stride, padding=k // 2).flatten(1))
    m = torch.cat(cols).T  # (outputs, inputs)
    return m.T @ m


def gram_cosine(g: torch.Tensor, g_b: torch.Tensor) -> float:
    return float((g * g_b).sum() / (g.norm() * g_b.norm()))


def measure(seed: int):
    """Every row of one seed, as it is measured."""
    gen = torch.Generator().manual_seed(seed)
    for shape in DENSE:
        for kind in KINDS:
            d, d_b = update_pair(kind, shape, gen)
            exact = dense_score(d, d_b)
            for probes, iterations, normalise in SETTINGS + DENSE_EXTRA:
                est = hutchinson_score(d, d_b, seed=seed, probes=probes, iterations=iterations, normalise=normalise)
                yield {"seed": seed, "layer": f"dense {shape[0]}x{shape[1]}", "kind": kind,
                       "setting": f"{probes}x{iterations}{' normalised' if normalise else ''}",
                       "exact": exact, "zero_padded": exact, "hutchinson": est}
    for c_out, c_in, k, stride, side in CONV:
        for kind in KINDS:
            d, d_b = update_pair(kind, (c_out, c_in, k, k), gen)
            circular = conv_score(d, d_b, stride, (side, side))
            padded = gram_cosine(zero_padded_gram(d, stride, side), zero_padded_gram(d_b, stride, side))
            for probes, iterations, normalise in SETTINGS:
                est = hutchinson_score(d, d_b, seed=seed, stride=stride, size=(side, side), probes=probes,
                                       iterations=iterations, normalise=normalise)
                yield {"seed": seed, "layer": f"conv {c_out}x{c_in}x{k}x{k} s{stride} on {side}x{side}",
                       "kind": kind, "setting": f"{probes}x{iterations}{' normalised' if normalise else ''}",
                       "exact": circular, "zero_padded": padded, "hutchinson": est}


def summarise(rows: list[dict]) -> None:
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["layer"], row["kind"], row["setting"]), []).append(row)
    print("\nlayer | kind | setting | exact (circular for convs) | operator: zero-padded - exact | "
          "estimator: hutchinson - zero-padded | vs_exact: hutchinson - exact   (mean ± sd [max |.|] over seeds)")
    for (layer, kind, setting), group in groups.items():
        cells = []
        for diff in (lambda r: r["zero_padded"] - r["exact"], lambda r: r["hutchinson"] - r["zero_padded"],
                     lambda r: r["hutchinson"] - r["exact"]):
            values = [diff(r) for r in group]
            sd = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(f"{statistics.mean(values):+.4f} ± {sd:.4f} [{max(abs(v) for v in values):.4f}]")
        exact = statistics.mean(r["exact"] for r in group)
        print(f"{layer} | {kind} | {setting} | {exact:.4f} | " + " | ".join(cells))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=5, help="fresh seeds to draw (ignored with --seed)")
    parser.add_argument("--seed", type=int, action="append", help="replay these seeds instead")
    parser.add_argument("--out", help="also write every row to this JSON file")
    args = parser.parse_args()
    seeds = args.seed or [int.from_bytes(os.urandom(8), "little") >> 1 for _ in range(args.seeds)]
    print(f"seeds: {' '.join(map(str, seeds))}; torch threads {torch.get_num_threads()}; "
          f"load average {open('/proc/loadavg').read().split()[:3]}")
    rows, start = [], time.perf_counter()
    for seed in seeds:
        for row in measure(seed):
            rows.append(row)
            print(f"{row['seed']} | {row['layer']} | {row['kind']} | {row['setting']} | exact {row['exact']:.4f} | "
                  f"zero-padded {row['zero_padded']:.4f} | hutchinson {row['hutchinson']:.4f}", flush=True)
    summarise(rows)
    print(f"\n{time.perf_counter() - start:.0f} s; load average {open('/proc/loadavg').read().split()[:3]}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"seeds": seeds, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
