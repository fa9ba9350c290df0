"""Causal ablations of a found subnetwork: the base model scored with its masked weights kept, removed or replaced.

The modes are NeuroSurgeon 0.1.0's (``CircuitModel.set_ablate_mode``), plus the unmasked model as the reference:

======================  ============================================================  =================================
mode                    the masked parameters hold                                    NeuroSurgeon 0.1.0
======================  ============================================================  =================================
``full_model``          their trained values (the reference)                          ``use_masks(False)``
``subnetwork``          the subnetwork's values, zero elsewhere                       ``set_ablate_mode("none")``
``zero_ablate``         zero in the subnetwork, the trained values elsewhere          ``"zero_ablate"``
``random_ablate``       fresh random values in the subnetwork, trained elsewhere      ``"random_ablate"``
``randomly_sampled``    zero in k random units, trained elsewhere                     ``"randomly_sampled"``
``complement_sampled``  zero in k random units outside the subnetwork                 ``"complement_sampled"``
======================  ============================================================  =================================

k is the number of units the subnetwork keeps in that parameter, so the sampled modes remove a random set of the same
size per layer: weights for weight masks, whole output units (neurons) for neuron masks, as NeuroSurgeon samples in
the shape of its mask logits. ``complement_sampled`` needs k <= N - k in every parameter (NeuroSurgeon raises too).
The random values of ``random_ablate`` are the layer type's default initialisation, as NeuroSurgeon's: a uniform
on +-1/sqrt(fan_in) for ``Linear`` and ``Conv*d`` weights and biases (``kaiming_uniform_(a=sqrt(5))``),
N(0, 0.02) weights and zero biases for GPT-2's ``Conv1D``; N(0, 1) for ``Embedding``; Xavier-uniform weights and zero
biases for ``MultiheadAttention``. Parameters outside the mask (embeddings, norms, unmasked biases) always keep their
values.

NeuroSurgeon draws one random mask or value tensor per layer and keeps it; here every drawn mode is drawn ``draws``
times, draw d of parameter p from its own generator seeded by (seed, mode, d, p), so results replay exactly and
report a mean and spread.
"""

from __future__ import annotations

import math
import statistics
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

import torch
from torch import nn

from ..errors import UserError, did_you_mean
from ..seeds import derive_seed
from .masks import check_masks, kind_of, listing, owner_of, unit_masks
from .transplant import sample_mask

MODES = ("full_model", "subnetwork", "zero_ablate", "random_ablate", "randomly_sampled", "complement_sampled")
DRAWN = frozenset({"random_ablate", "randomly_sampled", "complement_sampled"})
MODE_WORDS = {"full_model": "whole model", "subnetwork": "subnetwork only", "zero_ablate": "subnetwork removed",
              "random_ablate": "subnetwork randomised", "randomly_sampled": "random same-size removed",
              "complement_sampled": "same size removed outside it"}
NEUROSURGEON_MODES = {"full_model": "use_masks(False)", "subnetwork": "none", "zero_ablate": "zero_ablate",
                      "random_ablate": "random_ablate", "randomly_sampled": "randomly_sampled",
                      "complement_sampled": "complement_sampled"}


def check_modes(modes: Sequence[str], draws: int) -> None:
    """UserError (one line) for an unknown or repeated mode, no mode, or fewer than one draw."""
    for mode in modes:
        if mode not in MODES:
            raise UserError(f"ablation mode {mode!r} is unknown" + did_you_mean(mode, MODES)
                            + f"; known: {', '.join(MODES)}")
    if not modes or len(set(modes)) != len(modes):
        raise UserError(f"ablation modes must be a non-empty list without repeats, got {list(modes)}")
    if isinstance(draws, bool) or not isinstance(draws, int) or draws < 1:
        raise UserError(f"ablation draws must be an integer >= 1, got {draws!r}")


# ----------------------------------------------------------------------------------------------------- units

def check_complement(units: Mapping[str, torch.Tensor]) -> None:
    """UserError unless a same-sized sample fits outside the subnetwork in every parameter (complement_sampled)."""
    dense = [f"{name} ({int(m.sum())} of {m.numel()})" for name, m in units.items() if 2 * int(m.sum()) > m.numel()]
    if dense:
        raise UserError(f"complement_sampled: the subnetwork keeps more than half of the units of {listing(dense)}, so "
                        f"no equal-sized sample fits outside it; leave complement_sampled out of the modes")


# ----------------------------------------------------------------------------------------------------- random values

def fresh_values(model: nn.Module, name: str, generator: torch.Generator) -> torch.Tensor:
    """Random values for parameter ``name`` from its layer type's default initialisation (on the CPU, float32).

    Raises:
        UserError: a parameter whose module is not one of the layer types with a known initialisation.
    """
    return initialiser(model, name)(generator)


def initialiser(model: nn.Module, name: str) -> Callable[[torch.Generator], torch.Tensor]:
    """The default initialisation of parameter ``name``'s layer type, as a function of a generator (see
    ``fresh_values``); UserError for a layer type without one."""
    module, attr = owner_of(model, name)
    kind = kind_of(module)
    shape = tuple(getattr(module, attr).shape)
    kind_name = type(module).__name__ if kind is None else kind.cls.__name__
    if kind_name == "Conv1D":  # transformers' GPT-2 layer: its _init_weights and NeuroSurgeon's random values
        if attr == "weight":
            return lambda generator: torch.randn(shape, generator=generator) * 0.02
        return lambda generator: torch.zeros(shape)
    if kind_name == "Embedding":
        return lambda generator: torch.randn(shape, generator=generator)
    if kind_name == "MultiheadAttention":
        if attr.endswith("bias"):
            return lambda generator: torch.zeros(shape)
        return lambda generator: _uniform(shape, math.sqrt(6.0 / (shape[0] + shape[1])), generator)
    if kind_name in ("Linear", "Conv1d", "Conv2d", "Conv3d"):
        fan_in = module.weight[0].numel()  # in_features, or in_channels / groups times the kernel size
        bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
        return lambda generator: _uniform(shape, bound, generator)
    raise UserError(f"random_ablate: no default initialisation is known for {name} (a {type(module).__name__}); "
                    f"leave random_ablate out of the modes")


def _uniform(shape: Sequence[int], bound: float, generator: torch.Generator) -> torch.Tensor:
    return (torch.rand(shape, generator=generator) * 2 - 1) * bound


# ----------------------------------------------------------------------------------------------------- ablated weights

def _generator(seed: int, mode: str, draw: int, name: str) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(derive_seed(seed, "ablation", mode, draw, name))


def ablated_weights(mode: str, model: nn.Module, masks: Mapping[str, torch.Tensor],
                    units: Mapping[str, torch.Tensor], *, seed: int = 0, draw: int = 0) -> dict[str, torch.Tensor]:
    """The values each masked parameter holds in ``mode`` (see the module docstring), in its dtype and device.

    Args:
        mode: one of ``MODES``.
        model: the base model the masks were found on.
        masks: ``{parameter name: bool tensor in the parameter's shape}`` (True: in the subnetwork).
        units: the same masks in the shape of their units (``unit_masks``): what the sampled modes draw from.
        seed, draw: which random draw (the drawn modes only).
    """
    params = dict(model.named_parameters())
    weights = {}
    for name in sorted(masks):
        weight = params[name].detach()
        mask = masks[name].to(weight.device)
        if mode == "full_model":
            continue
        if mode == "subnetwork":
            weights[name] = weight.masked_fill(~mask, 0)
        elif mode == "zero_ablate":
            weights[name] = weight.masked_fill(mask, 0)
        elif mode == "random_ablate":
            values = fresh_values(model, name, _generator(seed, mode, draw, name)).to(weight.device, weight.dtype)
            weights[name] = torch.where(mask, values, weight)
        else:  # randomly_sampled / complement_sampled: k units removed, drawn from all units or from the complement
            kind = "subnet" if mode == "randomly_sampled" else "complement"
            removed = sample_mask(units[name].cpu(), kind, _generator(seed, mode, draw, name))
            weights[name] = weight.masked_fill(removed.expand(weight.shape).to(weight.device), 0)
    return weights


@contextmanager
def weights_replaced(model: nn.Module, weights: Mapping[str, torch.Tensor]) -> Iterator[nn.Module]:
    """Within this block ``model``'s named parameters hold ``weights`` (every slot of a tied weight too); the
    trained values come back afterwards, whatever happens inside."""
    params = dict(model.named_parameters())
    saved = {name: params[name].data for name in weights}
    try:
        for name, value in weights.items():
            params[name].data = value
        yield model
    finally:
        for name, value in saved.items():
            params[name].data = value


# ----------------------------------------------------------------------------------------------------- evaluation

@dataclass
class Ablations:
    """Scores of the base model under each ablation mode: one row per (mode, draw) with every score's value.

    ``summary()`` gives each mode's mean, standard deviation (over draws; 0 for one draw), minimum, maximum and
    all values per score; ``plot(path)`` draws the accuracies per data set and mode.
    """

    rows: list[dict[str, Any]]
    density: float

    def scores(self) -> list[str]:
        return [k for k in self.rows[0] if k not in ("mode", "draw")] if self.rows else []

    def summary(self) -> dict[str, dict[str, dict[str, Any]]]:
        summary: dict[str, dict[str, dict[str, Any]]] = {}
        for mode in dict.fromkeys(row["mode"] for row in self.rows):
            rows = [row for row in self.rows if row["mode"] == mode]
            summary[mode] = {score: _spread([row[score] for row in rows]) for score in self.scores()}
        return summary

    def plot(self, path: str | Path, title: Optional[str] = None) -> Optional[Path]:
        """Grouped bars of each data set's accuracy per mode (mean; a dot per draw, an error bar of +- one standard
        deviation), on [0, 1]."""
        from ..plots import plot_bars

        sets = [score[: -len("_acc")] for score in self.scores() if score.endswith("_acc")]
        summary = self.summary()
        means = {s: {MODE_WORDS[m]: summary[m][f"{s}_acc"]["mean"] for m in summary} for s in sets}
        spread = {s: {MODE_WORDS[m]: summary[m][f"{s}_acc"]["std"] for m in summary} for s in sets}
        points = {s: {MODE_WORDS[m]: summary[m][f"{s}_acc"]["values"] for m in summary if m in DRAWN} for s in sets}
        title = title or (f"accuracy under ablation of the subnetwork (keeps {self.density:.2%} of the masked "
                          f"weights) and of random same-size sets")
        return plot_bars(path, {f"{s} data": means[s] for s in sets}, title=title, ylabel="accuracy (fraction correct)",
                         fraction=True, spread={f"{s} data": spread[s] for s in sets},
                         points={f"{s} data": points[s] for s in sets})


def _spread(values: list[float]) -> dict[str, Any]:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values), "values": values}


def run_ablations(model: nn.Module, masks: Mapping[str, torch.Tensor],
                  score: Callable[[nn.Module], Mapping[str, float]], *, modes: Sequence[str] = MODES, draws: int = 5,
                  seed: int = 0, unit: str = "weight") -> Ablations:
    """Score ``model`` under each ablation mode (``draws`` times for the drawn ones), restoring its weights after.

    Args:
        model: the base model the masks were found on (its weights are swapped in place and always restored).
        masks: ``{parameter name: bool tensor in the parameter's shape}`` (True: in the subnetwork).
        score: ``score(model) -> {name: value}`` (``subtask_acc``, ``base_task_acc``, ...); called once per
            (mode, draw).
        modes: which of ``MODES``, in this order.
        draws: random draws per drawn mode (``random_ablate``, ``randomly_sampled``, ``complement_sampled``).
        seed: seeds the draws.
        unit: ``weight`` or ``neuron``: what the masks keep and the sampled modes draw.

    Raises:
        UserError: unknown modes, masks that do not fit ``model``, a neuron mask that splits a unit, a
            ``complement_sampled`` that cannot be drawn, or a ``random_ablate`` of a layer type without a known
            initialisation; all before anything is scored.
    """
    check_modes(modes, draws)
    check_masks(masks, model, source="ablation mask")
    masks = {name: m.to(torch.bool) for name, m in masks.items()}
    units = unit_masks(model, masks, unit)
    if "complement_sampled" in modes:
        check_complement(units)
    if "random_ablate" in modes:
        for name in masks:
            initialiser(model, name)  # an unknown layer type stops here, before anything is scored
    rows = []
    for mode in modes:
        for draw in range(draws if mode in DRAWN else 1):
            with weights_replaced(model, ablated_weights(mode, model, masks, units, seed=seed, draw=draw)):
                rows.append({"mode": mode, "draw": draw, **score(model)})
    kept = sum(int(m.sum()) for m in masks.values())
    total = sum(m.numel() for m in masks.values())
    return Ablations(rows, kept / max(total, 1))
