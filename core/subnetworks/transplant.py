"""Subnetwork transplant ("subtask induction") and its baselines.

Given a trained base model, a bool mask per parameter name (``instill.subnetworks.masks``) and a freshly initialised
model of the same architecture, ``transplant`` builds one condition's starting model:

=====================  ========================================================================================
``subnet``             masked-in weights take their trained values and stay FROZEN; the rest of each masked
                       parameter keeps the fresh initialisation and trains
``subnet_trainable``   the same start, everything trains
``full_model``         the whole base model ("full-model transfer")
``random_init``        the fresh model as it is
``sampled_subnet``     a random mask with exactly as many kept entries per parameter as the subnetwork
``sampled_complement`` the same count, drawn from outside the subnetwork
=====================  ========================================================================================

Parameters without a mask (embeddings, norms, biases) and buffers other than batch-norm statistics are inherited from
the base model by default, as the original code did (``non_masked="inherit"``); ``non_masked="reinit"`` keeps the
fresh values instead, which is what the paper's wording describes. Batch-norm running statistics follow
``batch_norm`` alone: ``inherit`` copies the base's (they then update in training), ``reset`` starts them fresh, and
``freeze`` copies the base's and keeps the batch-norm layers in evaluation mode while training
(``Transplant.train_mode``), so the statistics stay fixed, as the original's vision transfer kept them (it also kept
the layers' affine parameters frozen; here they follow ``non_masked`` and train). ``random_init`` is fresh
throughout whatever the settings. Sampled conditions are frozen like ``subnet`` unless ``freeze=False``.

``legacy_sampling=True`` reproduces the original code's sampled baselines, which turned NeuroSurgeon's *ablation*
masks into kept masks and so transplanted the complement: ``sampled_subnet`` kept N - k random entries instead of k,
``sampled_complement`` kept the subnetwork plus all but k of the other entries.

A neuron mask (``unit="neuron"``: each output unit kept or dropped whole) is sampled in units: the sampled conditions
keep as many whole units per parameter as the subnetwork does, so the baseline matches its structure as well as its
size (drawing single weights would spread the same count over every unit).

Frozen entries cost nothing in the forward and backward passes and one bit each in memory: the model holds one
ordinary weight tensor per parameter, and a hook common to all torch optimizers zeroes the frozen entries' gradients
before each step and applies weight decay everywhere but there (``FrozenEntries``), so that the step never moves them
(momentum, Adam moments and weight decay included) and no copy of their values is kept. ``zero_grads=True`` zeroes
their gradient as soon as it exists, which hides it from gradient clipping too, as in the original code.
``check_condition`` says before any training whether a condition can be built from a mask.

What sets the conditions apart is each entry's own (``Condition``): which entries it transplants, whether it starts
from a whole model instead, whether its entries freeze, what it needs of the mask. A condition of your own gets the
same treatment as the shipped ones, with its options (keyword-only parameters of ``kept``) from
``transfer.condition_options`` or ``transplant(..., options=...)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Mapping, Optional, get_args

import math
import weakref

import torch
from torch import nn

from ..errors import UserError
from ..registry import OptionsOf, Registry
from .masks import check_masks, listing, mask_density, unit_masks
from ..seeds import derive_seed

# Transfer conditions, by name: a ``Condition``, or a plain function ``kept(ctx: ConditionContext, *, option=default)
# -> {parameter name: bool tensor}`` (a condition that transplants and freezes those entries). Add one with
# ``@CONDITIONS.register("name")``, an import path or an entry point of group ``instill.transfer_conditions``;
# ``instill list conditions`` lists them with their help (the shipped ones' from the table above) and options.
CONDITIONS = Registry("transfer condition")


@dataclass(frozen=True)
class ConditionContext:
    """What a condition's kept masks are drawn from: the subnetwork's masks (and, for neuron masks, the same masks in
    the shape of their units), the sampling seed, the legacy flag."""

    mask: Mapping[str, torch.Tensor]
    seed: int
    legacy_sampling: bool
    units: Optional[Mapping[str, torch.Tensor]] = None  # neuron masks in the shape of their units: what is drawn


@dataclass(frozen=True)
class Condition:
    """What a transfer condition does, so that ``transplant`` treats every condition, yours too, the same way.

    Attributes:
        kept: ``kept(ctx, *, options) -> {parameter name: bool tensor}``: the entries transplanted from the base
            model; its keyword-only parameters are the condition's options. None for a whole-model condition.
        whole: a whole-model condition starts from the ``base`` model entire (batch-norm statistics per
            ``batch_norm``) or from the ``fresh`` one as it is, and reads no mask; None: it transplants ``kept``.
        freezes: its transplanted entries stay fixed in training (unless ``transplant(freeze=False)``).
        check: ``check(mask)`` raises a UserError for a mask this condition cannot serve, before any training.
    """

    kept: Optional[Callable[..., dict[str, torch.Tensor]]] = None
    whole: Optional[Literal["base", "fresh"]] = None
    freezes: bool = True
    check: Optional[Callable[[Mapping[str, torch.Tensor]], None]] = None
    __signature__ = OptionsOf("kept")  # its options: kept's keyword-only parameters

    @property
    def transplants(self) -> bool:
        """Whether it transplants masked entries (a subnetwork or a sample drawn from its mask)."""
        return self.whole is None

    def __call__(self, ctx: "ConditionContext") -> Optional[dict[str, torch.Tensor]]:
        return None if self.kept is None else self.kept(ctx)


def get_condition(name: str) -> Condition:
    """The transfer condition ``name`` names (registered, import path, entry point); a UserError otherwise."""
    entry = CONDITIONS.get(name)
    return entry.build if isinstance(entry.build, Condition) else Condition(entry.build)


def _table_help() -> dict[str, str]:
    """Each shipped condition's description, read from the table in this module's docstring (its one source)."""
    import re

    described: dict[str, str] = {}
    current = None
    for line in (__doc__ or "").splitlines():
        row = re.match(r"``(\w+)``\s+(.*)", line)
        if row and row.group(1) not in described and line.startswith("``"):
            current = row.group(1)
            described[current] = row.group(2).strip()
        elif current and line.startswith(" " * 23) and line.strip():
            described[current] += " " + line.strip()
        else:
            current = None
    return described


NonMasked = Literal["inherit", "reinit"]
BatchNorm = Literal["inherit", "reset", "freeze"]


# ----------------------------------------------------------------------------------------------------- freezing

# Optimizers whose update of an entry is exactly zero while its gradient and its state are zero (SGD with momentum,
# the Adam family, RMSprop, ...): with the frozen entries' gradients zeroed and weight decay taken over below, their
# step leaves frozen entries bit for bit as they were. Others (Adafactor's factored statistics, ASGD's averaging,
# LBFGS's line search) could move them.
FROZEN_SAFE_OPTIMIZERS = ("SGD", "Adam", "AdamW", "NAdam", "RAdam", "Adamax", "RMSprop", "Adagrad", "Adadelta",
                          "Rprop")


def check_optimizer(name: str) -> None:
    """UserError (one line) unless the optimizer ``name`` keeps frozen entries fixed (``FROZEN_SAFE_OPTIMIZERS``)."""
    if name not in FROZEN_SAFE_OPTIMIZERS:
        raise UserError(f"optimizer {name} cannot train a model with frozen entries (transfer with freeze): "
                        f"use one of {', '.join(FROZEN_SAFE_OPTIMIZERS)}")


class FrozenEntries:
    """Keeps chosen entries of a model's parameters at fixed values through training, holding one bit per entry.

    Nothing is saved to restore them: the optimizer never moves them. A hook common to all torch optimizers
    (``_before_step``) runs before each step of any optimizer that holds a parameter with frozen entries and

    * zeroes the frozen entries' gradient (so momentum and Adam moments stay exactly zero there, and the update,
      zero over a positive denominator, is exactly zero);
    * takes over the parameter group's weight decay for that step: it applies the same decay (decoupled,
      ``p *= 1 - lr * wd``, or coupled, ``grad += wd * p``) to every entry of the group except the frozen ones, with
      the same floating-point operations as torch's optimizers, then sets the group's ``weight_decay`` to 0 for the
      step (``_after_step`` puts it back);
    * the first time it meets an optimizer, zeroes any state it holds at frozen entries (a resumed state).

    The trainable entries thus get the updates they got when frozen values were written back after each step, bit
    for bit (tests/test_transfer.py checks it against that implementation). With ``zero_grads``, a
    post-accumulate-grad hook zeroes the frozen entries' gradient as soon as it exists, so gradient clipping (and
    anything else before the step) never sees them, as in the original code, where the frozen copy had no gradient;
    without it they count in the clipping norm and are zeroed only at the step. The forward and backward passes are
    untouched. A parameter frozen entirely just stops requiring gradients.

    Memory: one bit per entry of each partly frozen parameter (``_Bits``), whatever the density; while stepping, one
    parameter at a time, its mask unpacked (one byte per entry) and, under decoupled weight decay, a factor per entry.
    Only the optimizers in ``FROZEN_SAFE_OPTIMIZERS`` may step such parameters (others raise ``UserError``).
    """

    def __init__(self, model: nn.Module, frozen: Mapping[str, torch.Tensor], zero_grads: bool = False):
        params = dict(model.named_parameters())
        self._bits: list[_Bits] = []
        for name, mask in frozen.items():
            param = params[name]
            mask = mask.to(param.device, torch.bool)
            if bool(mask.all()):
                param.requires_grad_(False)
            elif bool(mask.any()):
                bits = _Bits(mask, zeroed_early=zero_grads)
                self._bits.append(bits)
                _register(param, bits)
                if zero_grads:
                    param.register_post_accumulate_grad_hook(bits.zero_grad)  # lives as long as the parameter

    @property
    def count(self) -> int:
        return sum(bits.count for bits in self._bits)

    def extra_bytes(self) -> int:
        """Memory held for freezing: one bit per entry of each partly frozen parameter."""
        return sum(bits.nbytes() for bits in self._bits)


class _Bits:
    """One parameter's trainable entries as a bit mask (eight entries a byte, 1 = trains), unpacked only in use.

    Unpacked (``keep``), the bits are 1 where the entry trains and 0 where it is frozen, in the gradient's floating
    type: the optimizer hooks multiply by them, which torch vectorises, where ``masked_fill_`` and ``where`` with a
    bool mask run several times slower on the CPU. Unpacking is one gather from a table of the 256 bytes' bits.
    """

    _tables: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}
    _factor_tables: dict[tuple[torch.device, torch.dtype], tuple[float, torch.Tensor]] = {}  # the last factor's

    def __init__(self, frozen: torch.Tensor, zeroed_early: bool):
        keep = frozen.reshape(-1).logical_not()
        self.shape, self.count, self.zeroed_early = frozen.shape, int(frozen.sum()), zeroed_early
        self.first_frozen = int(keep.logical_not().nonzero()[0])  # one frozen entry's flat index
        padded = torch.cat([keep, keep.new_zeros(-keep.numel() % 8)]).view(-1, 8).to(torch.uint8)
        self.packed = (padded << torch.arange(8, dtype=torch.uint8, device=keep.device)).sum(1).to(torch.uint8)

    @classmethod
    def _table(cls, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """(256, 8): the bits of each byte value, lowest first."""
        key = (device, dtype)
        if key not in cls._tables:
            cls._tables[key] = ((torch.arange(256).unsqueeze(1) >> torch.arange(8)) & 1).to(device, dtype)
        return cls._tables[key]

    def keep(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """1 where the entry trains, 0 where it is frozen, in ``dtype``, the parameter's shape, on ``device`` (the
        bits follow the parameter there, once)."""
        return self._unpacked(self._table(device, dtype))

    def _unpacked(self, table: torch.Tensor) -> torch.Tensor:
        """The entries of ``table`` (256, 8) that the bits pick, in the parameter's shape, on the table's device."""
        if self.packed.device != table.device:
            self.packed = self.packed.to(table.device)
        unpacked = table.index_select(0, self.packed.int())
        return unpacked.view(-1)[:math.prod(self.shape)].view(self.shape)

    def decay_factors(self, device: torch.device, dtype: torch.dtype, factor: float | torch.Tensor) -> torch.Tensor:
        """``factor`` where the entry trains, 1 where it is frozen (``_decay_factors``), unpacked in one gather from
        a table of the 256 bytes' factors: one pass over the entries instead of unpacking ``keep`` and two more."""
        if isinstance(factor, torch.Tensor):
            return self._unpacked(_decay_factors(self._table(device, dtype).clone(), factor))
        key = (device, dtype)
        cached = self._factor_tables.get(key)
        if cached is None or cached[0] != factor:  # made once per learning rate (per step under a schedule)
            cached = self._factor_tables[key] = (factor, _decay_factors(self._table(device, dtype).clone(), factor))
        return self._unpacked(cached[1])

    def mask(self, device: torch.device) -> torch.Tensor:
        """The frozen entries (bool)."""
        return self.keep(device, torch.bool).logical_not()

    def zero_grad(self, param: torch.Tensor) -> None:
        param.grad.mul_(self.keep(param.grad.device, _opmath(param.grad.dtype)))

    def nbytes(self) -> int:
        return self.packed.numel()


def _opmath(dtype: torch.dtype) -> torch.dtype:
    """The type torch computes elementwise operations on ``dtype`` in (float for the half types)."""
    return torch.promote_types(dtype, torch.float32)


# Every parameter with frozen entries, for the hooks common to all optimizers (registered with the first one).
_FROZEN: Any = None
_WEIGHT_DECAY_TAKEN: "weakref.WeakKeyDictionary[torch.optim.Optimizer, list[float]]" = weakref.WeakKeyDictionary()
_STATE_CLEARED: "weakref.WeakSet[torch.optim.Optimizer]" = weakref.WeakSet()


def _register(param: nn.Parameter, bits: _Bits) -> None:
    global _FROZEN
    if _FROZEN is None:
        from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook
        from torch.utils.weak import WeakIdKeyDictionary

        _FROZEN = WeakIdKeyDictionary()  # entries go with their parameter
        register_optimizer_step_pre_hook(_before_step)
        register_optimizer_step_post_hook(_after_step)
    _FROZEN[param] = bits


@torch.no_grad()
def _before_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    groups = [(group, [(p, _FROZEN.get(p)) for p in group["params"]]) for group in optimizer.param_groups]
    if not any(bits for _, params in groups for _, bits in params):
        return
    check_optimizer(type(optimizer).__name__)
    if optimizer not in _STATE_CLEARED:
        _clear_frozen_state(optimizer, groups)
    adamw = isinstance(optimizer, torch.optim.AdamW)
    taken = []
    for group, params in groups:
        decay = group.get("weight_decay", 0) if any(bits for _, bits in params) else 0
        taken.append(group.get("weight_decay"))
        decoupled = adamw or group.get("decoupled_weight_decay", False)
        for param, bits in params:
            if param.grad is not None:  # torch's optimizers skip a parameter without one, weight decay included
                _guard(param, bits, group, decay, decoupled)
        if decay:
            group["weight_decay"] = 0
    _WEIGHT_DECAY_TAKEN[optimizer] = taken


def _guard(param: torch.Tensor, bits: Optional[_Bits], group: dict, decay: float, decoupled: bool) -> None:
    """One parameter's part of ``_before_step``: the group's weight ``decay`` as torch would apply it (the same
    operations, hence the same values), except at frozen entries, whose gradient ends zero."""
    grad = param.grad
    if decay and not decoupled:  # added to the gradient before the moments; under maximize after its negation
        grad.add_(param, alpha=-decay if group.get("maximize", False) else decay)
    if bits is None:
        if decay and decoupled:
            param.mul_(1 - group["lr"] * decay)
        return
    if (decay and not decoupled) or not bits.zeroed_early:
        grad.mul_(bits.keep(param.device, _opmath(param.dtype)))
    if decay and decoupled:
        param.mul_(bits.decay_factors(param.device, _opmath(param.dtype), 1 - group["lr"] * decay))


def _decay_factors(keep: torch.Tensor, factor: float | torch.Tensor) -> torch.Tensor:
    """``factor`` where ``keep`` is 1, 1 where it is 0 (overwriting ``keep``), rounded to ``keep``'s type as torch's
    ``mul_(factor)`` rounds it, so that multiplying gives the same values as that ``mul_`` at the kept entries.

    ``keep * (factor - 1) + 1`` is exact: ``factor - 1`` is (Sterbenz) for factors in [0.5, 2], and adding 1 back
    then gives ``factor`` itself.
    """
    if isinstance(factor, torch.Tensor) or not 0.5 <= factor <= 2:  # no exact shortcut: the slower select
        factor = torch.as_tensor(factor, dtype=keep.dtype, device=keep.device)
        return torch.where(keep.bool(), factor, torch.ones((), dtype=keep.dtype, device=keep.device))
    rounded = torch.tensor(factor, dtype=keep.dtype).item()
    return keep.mul_(rounded - 1).add_(1)


def _clear_frozen_state(optimizer: torch.optim.Optimizer, groups: list) -> None:
    """Zero the optimizer's state at frozen entries (a state from elsewhere, resumed, may hold momentum there)."""
    for _, params in groups:
        for param, bits in params:
            for value in optimizer.state.get(param, {}).values():
                if bits and isinstance(value, torch.Tensor) and value.shape == param.shape:
                    value.masked_fill_(bits.mask(value.device), 0)
    _STATE_CLEARED.add(optimizer)


def _after_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    taken = _WEIGHT_DECAY_TAKEN.pop(optimizer, None)
    if taken is None:  # the optimizer holds no parameter with frozen entries
        return
    for group, decay in zip(optimizer.param_groups, taken):
        if "weight_decay" in group:
            group["weight_decay"] = decay
    _keep_frozen_squares_positive(optimizer)


# Optimizer state whose square root every step takes: Adam's second moments (AdamW, NAdam, RAdam, AMSGrad's maximum),
# RMSprop's and Adagrad's running squares.
SQUARE_ROOTED_STATE = ("exp_avg_sq", "max_exp_avg_sq", "square_avg", "sum")
LOWEST_FROZEN_SQUARE = 1e-20  # refilled below this, far above float32's subnormal numbers (1.2e-38), slow too
# Steps between two looks at them (a look costs ~0.4 ms per step at the bench's GPT-2): from 1e-20 a decay factor
# above 0.08 per step cannot reach subnormal numbers in 16 steps (Adam's beta2, RMSprop's alpha are 0.9 or more).
SQUARES_CHECKED_EVERY = 16
_STEPS_SINCE_CHECK: "weakref.WeakKeyDictionary[torch.optim.Optimizer, int]" = weakref.WeakKeyDictionary()


@torch.no_grad()
def _keep_frozen_squares_positive(optimizer: torch.optim.Optimizer) -> None:
    """Set the square-rooted state of frozen entries to 1 on the CPU, again whenever its decay brings it below
    ``LOWEST_FROZEN_SQUARE``.

    Frozen entries' gradients are zero, so these states are exactly zero there, and on the CPU torch's square root
    of zero takes ten times that of a positive number (5 vs 0.5 ms per million float32 entries on the 2-core
    bench machine): it made the AdamW step of a transplanted GPT-2 1.10x a plain one (``bench/masks.py``). The value
    never reaches a parameter: it only divides the frozen entries' first moment or gradient, which are zero, so
    the update there stays exactly zero and every other entry is computed as before, bit for bit
    (tests/test_transfer.py). Every frozen entry of a state decays alike from the same fill, so one entry tells;
    it is read every ``SQUARES_CHECKED_EVERY`` steps (the first step's included: the state is made in it).
    """
    steps = _STEPS_SINCE_CHECK.get(optimizer, 0)
    _STEPS_SINCE_CHECK[optimizer] = (steps + 1) % SQUARES_CHECKED_EVERY
    if steps:
        return
    for group in optimizer.param_groups:
        for param in group["params"]:
            bits, state = _FROZEN.get(param), optimizer.state.get(param)
            if bits is None or not state or param.device.type != "cpu":
                continue
            for key in SQUARE_ROOTED_STATE:
                value = state.get(key)
                if (isinstance(value, torch.Tensor) and value.shape == param.shape
                        and not value.view(-1)[bits.first_frozen] >= LOWEST_FROZEN_SQUARE):
                    value.masked_fill_(bits.mask(value.device), 1.0)


# ----------------------------------------------------------------------------------------------------- sampling

def _generator(seed: int, name: str) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(derive_seed(seed, name, legacy="sampled"))


def _random_subset(pool: torch.Tensor, count: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` positions drawn without replacement from the flat positions where ``pool`` is True."""
    candidates = pool.reshape(-1).nonzero().squeeze(1)
    return candidates[torch.randperm(candidates.numel(), generator=generator)[:count]]


def _fits_outside(mask: torch.Tensor) -> bool:
    """Whether as many entries as ``mask`` keeps fit outside it (sampled_complement's draw, legacy or not)."""
    k = int(mask.sum())
    return k <= mask.numel() - k


def sample_mask(mask: torch.Tensor, kind: str, generator: torch.Generator, legacy: bool = False) -> torch.Tensor:
    """A random bool mask matched to ``mask`` (k kept entries); ``kind`` is ``subnet`` or ``complement``.

    Correct: ``subnet`` keeps k entries drawn from all N; ``complement`` keeps k entries drawn from the N - k
    outside the mask. ``legacy``: the original inverted masks (N - k kept; subnetwork plus N - 2k others kept).
    """
    flat = mask.reshape(-1).cpu()
    if kind == "complement" and not _fits_outside(flat):
        raise UserError(f"sampled_complement: the subnetwork keeps {int(flat.sum())} of {flat.numel()} entries, "
                        f"more than half, so no equal-sized sample fits outside it")
    pool = torch.ones_like(flat) if kind == "subnet" else ~flat
    drawn = torch.zeros_like(flat)
    drawn[_random_subset(pool, int(flat.sum()), generator)] = True
    if legacy:  # the original kept the complement of its k-entry ablation sample
        drawn = ~drawn
    return drawn.reshape(mask.shape).to(mask.device)


# ----------------------------------------------------------------------------------------------------- transplant

def check_condition(condition: str, mask: Mapping[str, torch.Tensor]) -> None:
    """UserError (one line) unless ``condition`` is known and can be built from ``mask``.

    What a transplant can fail on depends on the condition and the mask only (not on n, the learning rate or the
    seed), so a sweep checks each condition once before its first run. ``sampled_complement`` needs every masked
    parameter to keep at most half of its entries.
    """
    check = get_condition(condition).check
    if check is not None:
        check(mask)


def _check_fits_outside(mask: Mapping[str, torch.Tensor]) -> None:
    """sampled_complement's check: as many entries as the subnetwork keeps fit outside it, in every parameter."""
    dense = [f"{name} ({int(m.sum())} of {m.numel()})" for name, m in mask.items() if not _fits_outside(m)]
    if dense:
        raise UserError(f"sampled_complement: the subnetwork keeps more than half of the entries of "
                        f"{listing(dense)}, so no equal-sized sample fits outside it")


@dataclass
class Transplant:
    """A condition's starting model; train it in ``train_mode`` (any optimizer of ``FROZEN_SAFE_OPTIMIZERS``)."""

    model: nn.Module
    condition: str
    kept: Optional[dict[str, torch.Tensor]] = None  # the transplanted entries per masked parameter
    frozen: Optional[FrozenEntries] = None
    info: dict[str, Any] = field(default_factory=dict)
    fixed_norms: list[nn.Module] = field(default_factory=list)  # batch-norm layers whose statistics stay fixed

    def after_step(self) -> None:
        """Nothing to do any more (the optimizer's step leaves frozen entries alone); kept for callers of old."""

    def train_mode(self, model: nn.Module) -> None:
        """``model.train()``, except the batch-norm layers of ``batch_norm="freeze"``, which stay in eval mode."""
        model.train()
        for norm in self.fixed_norms:
            norm.eval()


def transplant(condition: str, base: nn.Module, fresh: nn.Module, mask: Mapping[str, torch.Tensor], *,
               non_masked: NonMasked = "inherit", batch_norm: BatchNorm = "inherit", freeze: bool = True,
               legacy_sampling: bool = False, seed: int = 0, zero_grads: bool = False, unit: str = "weight",
               options: Optional[Mapping[str, Any]] = None) -> Transplant:
    """Build ``condition``'s starting model in ``fresh`` (modified in place and returned in the Transplant).

    Args:
        condition: a name in ``CONDITIONS`` (the module docstring's table; ``instill list conditions``).
        base: the trained model the mask was found on.
        fresh: a freshly initialised model of the same architecture; it becomes the starting model.
        mask: ``{parameter name: bool tensor}`` (True = in the subnetwork), e.g. from ``load_mask``.
        non_masked: ``inherit`` the base's parameters without a mask, or ``reinit`` (keep the fresh ones).
        batch_norm: ``inherit``, ``reset`` or ``freeze`` the batch-norm statistics.
        freeze: keep the transplanted entries fixed (sampled conditions too); a condition whose entry says
            ``freezes=False`` (``subnet_trainable``) never freezes.
        legacy_sampling: the original code's sampled baselines (see the module docstring).
        seed: drives the sampled conditions (one independent draw per parameter).
        zero_grads: zero the frozen entries' gradients too (see ``FrozenEntries``; use it with gradient clipping).
        unit: what the mask keeps, ``weight`` or ``neuron`` (whole output units): the sampled conditions draw as
            many units as the subnetwork keeps in each parameter.
        options: the condition's own options (the keyword-only parameters of its ``kept``; ``instill list
            conditions``), validated against them.

    Returns:
        A ``Transplant``: train ``.model`` (in ``.train_mode(model)``) with an optimizer of
        ``FROZEN_SAFE_OPTIMIZERS``; its steps leave the frozen entries as they are.

    Raises:
        UserError: an unknown condition or option, architectures that differ, a mask that does not fit ``base``, or
            a sampled condition that cannot be drawn from this mask.
    """
    entry = CONDITIONS.bound(condition, get_condition(condition), "kept", options)
    units = unit_masks(base, mask, unit)  # weight masks: the masks themselves
    check_condition(condition, units)
    for key, value, kind in (("non_masked", non_masked, NonMasked), ("batch_norm", batch_norm, BatchNorm)):
        allowed = get_args(kind)
        if value not in allowed:
            raise UserError(f"{key} {value!r} is unknown; use {' or '.join(allowed)}")
    _check_same_architecture(base, fresh)
    check_masks(mask, base, source="transfer mask")
    if entry.whole == "fresh":
        return Transplant(fresh, condition)
    if entry.whole == "base":
        fresh.load_state_dict(base.state_dict())
        kept, frozen, info = None, None, {}
    else:
        kept = entry(ConditionContext(mask, seed, legacy_sampling, units))
        _copy_weights(base, fresh, kept, non_masked)
        frozen_wanted = freeze and entry.freezes
        frozen = FrozenEntries(fresh, kept, zero_grads) if frozen_wanted else None
        density = mask_density(kept)
        info = {"non_masked": non_masked, "frozen": frozen_wanted, "legacy_sampling": legacy_sampling,
                "kept": density["kept"], "kept_density": density["density"],
                "frozen_entries": frozen.count if frozen else 0}
    norms = _set_norm_statistics(base, fresh, batch_norm)
    return Transplant(fresh, condition, kept, frozen, info, norms if batch_norm == "freeze" else [])


def _the_subnetwork(ctx: ConditionContext) -> dict[str, torch.Tensor]:
    return {name: m.to(torch.bool) for name, m in ctx.mask.items()}


def _sampled(kind: str):
    def kept(ctx: ConditionContext) -> dict[str, torch.Tensor]:
        drawn_from = ctx.units or ctx.mask  # neuron masks: whole units are drawn, then spread over their weights
        return {name: sample_mask(drawn_from[name].to(torch.bool), kind, _generator(ctx.seed, name),
                                  ctx.legacy_sampling).expand(m.shape).contiguous()
                for name, m in sorted(ctx.mask.items())}

    return kept


for _name, _condition, _label in (
    ("subnet", Condition(_the_subnetwork), "subnetwork (frozen)"),
    ("subnet_trainable", Condition(_the_subnetwork, freezes=False), "subnetwork (trainable)"),
    ("full_model", Condition(whole="base"), "whole base model"),
    ("random_init", Condition(whole="fresh"), "random initialisation"),
    ("sampled_subnet", Condition(_sampled("subnet")), "random subnetwork, same size"),
    ("sampled_complement", Condition(_sampled("complement"), check=_check_fits_outside),
     "random weights outside the subnetwork"),
):
    CONDITIONS.register(_name, doc=_table_help()[_name], label=_label)(_condition)


def _batch_norms(model: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}


@torch.no_grad()
def _copy_weights(base: nn.Module, fresh: nn.Module, kept: Mapping[str, torch.Tensor], non_masked: str) -> None:
    """Kept entries from ``base`` into ``fresh``; unmasked parameters and buffers too when inheriting (batch-norm
    statistics excepted: ``_set_norm_statistics`` decides those)."""
    base_params = dict(base.named_parameters())
    for name, param in fresh.named_parameters():
        source = base_params[name].to(param.device, param.dtype)
        if name in kept:
            param.copy_(torch.where(kept[name].to(param.device), source, param))
        elif non_masked == "inherit":
            param.copy_(source)
    if non_masked == "inherit":
        norms = tuple(f"{name}." for name in _batch_norms(fresh))
        base_buffers = dict(base.named_buffers())
        for name, buffer in fresh.named_buffers():
            if not name.startswith(norms):
                buffer.copy_(base_buffers[name])


@torch.no_grad()
def _set_norm_statistics(base: nn.Module, fresh: nn.Module, batch_norm: str) -> list[nn.Module]:
    """Batch-norm running statistics of ``fresh``: the base's (inherit, freeze) or fresh ones (reset); returns the
    batch-norm layers."""
    base_norms = _batch_norms(base)
    norms = _batch_norms(fresh)
    for name, norm in norms.items():
        if batch_norm == "reset":
            norm.reset_running_stats()
            continue
        source = dict(base_norms[name].named_buffers(recurse=False))
        for key, buffer in norm.named_buffers(recurse=False):
            buffer.copy_(source[key])
    return list(norms.values())


def _check_same_architecture(base: nn.Module, fresh: nn.Module) -> None:
    def shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
        return {n: tuple(t.shape) for n, t in [*model.named_parameters(), *model.named_buffers()]}

    a, b = shapes(base), shapes(fresh)
    if a != b:
        differ = sorted(set(a) ^ set(b)) or sorted(n for n in a if a[n] != b[n])
        raise UserError(f"the fresh model's architecture differs from the base model's "
                        f"({len(differ)} tensors differ, first: {differ[0]})")
