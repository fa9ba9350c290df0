"""Speed of the Align learning rules against back-propagation, measured side by side in one process.

One training step (the rule's gradients through ``instill.align.rules``, then an SGD step) of the NTK MLP of
``configs/align_digits.yaml`` (3 hidden layers with batch-statistics norm, 64 inputs, 10 classes, batch 100) at
width 1024, for every rule, against the backprop step of the same network. The online alignment baseline
(``instill.align.scores.AlignmentBaseline``: backprop plus the initial network's vector-Jacobian product with
backprop's error) is reported as its extra cost over a backprop step, against a plain align_zero step; the exact
dense alignment score of all four layers at width 1024 against one backprop step.

Targets: align_zero, align_ada <= 2.2x backprop; align_prop, fa, dfa <= 1.3x; last_layer <= 0.6x; baseline extra
<= 1.2x an align_zero step; exact scores < 1 backprop step (a dense 1024 x 1024 layer's exact score needs at
least one 1024^3 matmul, more FLOPs than a batch-100 step of the whole network; the bench also reports the scores
against the preset's epoch of 13 steps, since they are computed once per evaluation). Timing: the variants alternate
(``--repeats`` rounds
after warm-up, order rotated each round); a ratio is the median of the per-round ratios. Run on a quiet machine:
``python bench/align.py`` or ``--quick`` (width 256, fewer rounds); ``--device cuda`` (the default where CUDA is
available) times on the GPU, synchronising after every step, where a step is bound by kernel launches rather than by
FLOPs and the exact scores' large matmuls are cheap. The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
from typing import Callable

import torch
import torch.nn.functional as F

from instill.align.scores import AlignmentBaseline
from instill.registry import MODELS, RULES
from instill.steps import RuleContext, StepContext, build_rule
from timing import interleaved_times, median_ratio

RULE_TARGETS = {"align_zero": 2.2, "align_ada": 2.2, "align_prop": 1.3, "fa": 1.3, "dfa": 1.3, "last_layer": 0.6}
INFO = {"input_shape": (1, 8, 8), "num_classes": 10}


def mse(logits, y):
    return (logits - (F.one_hot(y, 10).float() - 0.1)).square().mean()


def training_step(model, provider, batch) -> Callable[[], None]:
    """One optimizer step of ``provider``'s rule (fresh SGD so that every variant does the same work)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)  # small: the weights stay near their start

    def step():
        provider.gradients(model, batch, StepContext(scale=1.0, lr=1e-3))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="width 256, few rounds (seconds)")
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    width = args.width or (256 if args.quick else 1024)
    repeats = args.repeats or (5 if args.quick else 15)
    torch.manual_seed(0)
    batch = (torch.randn(100, 1, 8, 8, device=device), torch.randint(0, 10, (100,), device=device))

    def fresh():
        torch.manual_seed(1)
        return MODELS.build("ntk_mlp", INFO, {"depth": 3, "width": width, "batch_norm": True}).to(device)

    def loss(model, b):
        return mse(model(b[0]), b[1]), {}

    steps, models = {}, {}
    for rule in ["backprop", *RULE_TARGETS]:
        model = models[rule] = fresh()
        steps[rule] = training_step(model, build_rule(rule, RuleContext(model, loss, mse, 7)), batch)
    tracked = fresh()
    tracker = AlignmentBaseline(tracked, mse, tracked.layer_names(), chance=())
    steps["backprop+baseline"] = training_step(tracked, tracker, batch)
    steps["exact_scores"] = lambda: tracker.scores(tracked)
    times = interleaved_times(steps, repeats, warmup=2, device=device)  # synchronised: a step's kernels, not launches

    base = times["backprop"]
    result = {"device": str(device), "width": width, "repeats": repeats,
              "step_ms": {k: round(1000 * statistics.median(v), 2) for k, v in times.items()}}
    ratios = {rule: round(median_ratio(times[rule], base), 3) for rule in RULE_TARGETS}
    extra = [t - b for t, b in zip(times["backprop+baseline"], base)]
    baseline_ratio = round(median_ratio(extra, times["align_zero"]), 3)
    score_ratio = round(median_ratio(times["exact_scores"], base), 3)
    result.update({"ratio_to_backprop": ratios, "baseline_extra_over_align_zero": baseline_ratio,
                   "tracked_step_over_backprop": round(median_ratio(times["backprop+baseline"], base), 3),
                   "exact_scores_over_backprop_step": score_ratio,
                   # scores are computed per evaluation, not per step: against the preset's epoch of 13 steps
                   "exact_scores_over_preset_epoch": round(score_ratio / 13, 3)})
    met = {rule: ratios[rule] <= target for rule, target in RULE_TARGETS.items()}
    met["baseline"] = baseline_ratio <= 1.2
    met["exact_scores"] = score_ratio < 1.0
    result["targets_met"] = met
    for rule in RULE_TARGETS:
        print(f"{rule:>11}: {ratios[rule]:.2f}x backprop (target <= {RULE_TARGETS[rule]}x)")
    print(f"baseline extra: {baseline_ratio:.2f}x an align_zero step (target <= 1.2x); exact scores of "
          f"{len(tracked.layer_names())} layers: {score_ratio:.2f} backprop steps (target < 1)")
    assert set(RULES.names()) >= set(RULE_TARGETS)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
