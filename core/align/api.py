"""The Align system's part of the Python API: a learning rule's gradients for your own model and batch, and the
alignment scores of back-propagation's updates."""

from __future__ import annotations

from typing import Any, Callable, Literal, Optional, Sequence

import torch
from torch import nn

from ..errors import UserError, unknown_name
from ..steps import GradientProvider, RuleContext, StepContext, build_rule
from ..train import input_target_pair, logits_of
from .scores import CHANCE, AlignmentBaseline, check_layers

__all__ = ["learning_rule", "learning_rules", "GradientProvider", "StepContext", "alignment_scores",
           "AlignmentBaseline"]


def learning_rules() -> list[str]:
    """The names ``learning_rule`` accepts (``instill list rules`` shows each with its help).

    Returns:
        The rule names, sorted.
    """
    from . import rules as _rules  # noqa: F401 - registers the rules
    from ..registry import RULES

    return RULES.names()


def learning_rule(name: str, model: nn.Module, *, criterion: Optional[Callable[[torch.Tensor, torch.Tensor],
                  torch.Tensor]] = None, seed: int = 0, options: Optional[dict[str, Any]] = None
                  ) -> GradientProvider:
    """A learning rule (Boopathy & Fiete 2022) that puts a batch's update into your model's ``.grad``.

    Build it when training starts: the rules that need the initial network copy ``model``'s weights now (theta0).
    Then, per step::

        optimizer.zero_grad()
        loss, logs = rule.gradients(model, (x, y), instill.StepContext(lr=optimizer.param_groups[0]["lr"]))
        optimizer.step()

    Args:
        name: one of ``learning_rules()`` (``instill list rules``), or a rule of your own (registered, or its import
            path); the rules other than ``backprop`` and ``align_zero`` tap only the models built for them
            (``ntk_mlp``, ``ntk_cnn``, ``add_rnn`` of ``instill.models``).
        model: the network at the start of training.
        criterion: ``criterion(logits, targets)``; default cross-entropy.
        seed: seeds the random feedback of ``fa`` and ``dfa``.
        options: the rule's options (``instill list rules``), e.g. ``{"feedback": "pooled"}`` for ``dfa``.

    Returns:
        The ``GradientProvider``: ``gradients(model, (inputs, targets), StepContext)`` returns ``(loss, logs)``;
        ``state_dict()`` / ``load_state_dict()`` keep theta0 and the feedback for a resumed run.

    Raises:
        UserError: an unknown rule (nearest names listed) or option, or a model the rule cannot tap.
    """
    criterion = criterion or (lambda logits, y: nn.functional.cross_entropy(logits, y))

    def loss(net: nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, float]]:
        x, y = input_target_pair(batch)
        return criterion(logits_of(net(x)), y), {}

    learning_rules()  # registers the rules before the lookup
    return build_rule(name, RuleContext(model, loss, criterion, seed), options)


def alignment_scores(model: nn.Module, layers: Optional[Sequence[str]] = None, *,
                     criterion: Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = None,
                     method: Literal["exact", "hutchinson"] = "exact", chance: Sequence[str] = CHANCE,
                     seed: int = 0) -> AlignmentBaseline:
    """Back-propagation that also tracks the Align-zero baseline, to score how input-aligned the updates are.

    Use it as the learning rule of a back-propagation run (``gradients`` as for ``learning_rule``), then call
    ``scores(model)`` at any time: ``align/<layer>`` is the input-weight alignment score of the layer's weight
    change against the baseline, ``align_<control>/<layer>`` the chance controls.

    Args:
        model: the network at the start of training (its weights are W(0)).
        layers: module names of the weight layers to score (default: every linear and conv weight, or the
            model's ``layer_names()``).
        criterion: ``criterion(logits, targets)``; default cross-entropy.
        method: ``exact`` (deterministic: the dense formula for linear layers; for convolutions the convolution
            with circular boundaries on the layer's input map, in the Fourier domain) or ``hutchinson`` (the
            original's seeded Gaussian-probe estimate, for linear and conv layers alike: on a linear layer it
            estimates what ``exact`` computes; on a convolution it probes the zero-padded convolution, a different
            operator: see ``instill.align.scores`` for the measured differences).
        chance: controls to report, a subset of ``shuffled_weights`` and ``shuffled_update``.
        seed: seeds probes and shuffles.

    Returns:
        The ``AlignmentBaseline``; ``scores(model)`` gives ``{name: score}``.

    Raises:
        UserError: a layer that is not a weight layer of the model (nearest names listed), an unknown control.
    """
    if hasattr(model, "layer_names"):
        available = model.layer_names()
    else:
        available = [n for n, m in model.named_modules()
                     if isinstance(getattr(m, "weight", None), nn.Parameter) and m.weight.dim() in (2, 4)]
    unknown = [name for name in chance if name not in CHANCE]
    if unknown:
        raise UserError(f"alignment_scores: {unknown_name('chance control', unknown[0], CHANCE)}")
    criterion = criterion or (lambda logits, y: nn.functional.cross_entropy(logits, y))
    return AlignmentBaseline(model, criterion, check_layers(list(layers or []), available), method=method,
                             chance=tuple(chance), seed=seed)
