"""How the training loop gets a batch's gradients: the gradient-provider protocol and back-propagation.

The loop (``instill.train``) asks a ``GradientProvider`` for each batch's loss and ``.grad``; back-propagation is the
default provider. Other providers (the Align learning rules, ``instill.align.rules``) register in ``RULES`` and are
built by name with ``build_rule``."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Optional

import torch
from torch import nn

from .errors import UserError
from .registry import RULES
Criterion = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class StepContext:
    """What the loop tells a rule about the step: the gradient scale, the learning rate the optimizer will use,
    and the forward-pass context (bf16 autocast on CUDA)."""

    scale: float = 1.0
    lr: float = 0.0
    autocast: Callable[[], ContextManager] = contextlib.nullcontext


@dataclass
class RuleContext:
    """What a rule's builder receives: the (unwrapped) model at the start of training, the stage's objective
    (``loss(model, batch)`` and ``criterion(logits, targets)``) and the seed of its feedback stream."""

    model: nn.Module
    loss: Callable[[nn.Module, Any], tuple[torch.Tensor, dict[str, float]]]
    criterion: Criterion
    seed: int


class GradientProvider:
    """Computes a batch's loss and adds its rule's parameter gradients (times ``step.scale``) into ``.grad``."""

    def gradients(self, model: nn.Module, batch: Any, step: StepContext) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def build_rule(name: str, ctx: RuleContext, options: Optional[dict[str, Any]] = None) -> GradientProvider:
    """The provider of rule ``name`` for ``ctx.model``.

    Args:
        name: a registered rule (``instill list rules``).
        ctx: the model at the start of training, the objective and the feedback seed.
        options: the rule's options (keywords of its builder, e.g. ``{"feedback": "pooled"}`` for ``dfa``).

    Returns:
        The gradient provider.

    Raises:
        UserError: an unknown rule or option, or a model that cannot take the rule.
    """
    try:
        return RULES.build(name, ctx, options or {})
    except UserError:  # the rule's own refusal names the rule already
        raise
    except ValueError as err:  # the options failed the builder's signature
        raise UserError(f"rule {name}: {err}") from None


class Backprop(GradientProvider):
    def __init__(self, loss):
        self.loss = loss

    def gradients(self, model, batch, step):
        with step.autocast():
            loss, logs = self.loss(model, batch)
        (loss * step.scale).backward()
        return loss, logs


@RULES.register("backprop")
def backprop(ctx: RuleContext) -> GradientProvider:
    """Back-propagation of the stage's loss."""
    return Backprop(ctx.loss)
