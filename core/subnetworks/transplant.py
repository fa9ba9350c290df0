"""Subnetwork transplant ("subtask induction") and its baselines.

Given a trained base model, a bool mask per parameter name (``instill.subnetworks.masks``) and a freshly initialised
model of the
same architecture, ``transplant`` builds one condition's starting model:

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

Frozen entries cost nothing in the forward and backward passes: the model holds one ordinary weight tensor per
parameter, and ``Transplant.after_step()``, called after every optimizer step, writes the transplanted values back
into the frozen entries (``FrozenEntries``): whatever the optimizer does (weight decay, momentum), they never
change. ``zero_grads=True`` also hides their gradient from the optimizer and from gradient clipping, as in the
original code. Extra memory: per frozen entry one saved value and one byte for its position (see ``FrozenEntries``).
``check_condition`` says before any training whether a condition can be built from a mask.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Mapping, Optional, get_args

import torch
from torch import nn

from ..errors import UserError
from ..registry import Registry
from .masks import check_masks, listing, mask_density
from ..seeds import derive_seed

# Transfer conditions, by name. An entry is a function ``kept(ctx: ConditionContext, *, option=default) -> {parameter
# name: bool tensor}``: the entries transplanted (and frozen unless ``freeze=False``) into the fresh model. The
# whole-model conditions ``full_model`` and ``random_init`` take no mask (``WHOLE_MODEL``). Add one with
# ``@CONDITIONS.register("name")``, an import path or an entry point of group ``instill.transfer_conditions``;
# ``instill list conditions`` lists them with their help (the shipped ones' from the table above).
CONDITIONS = Registry("transfer condition")
WHOLE_MODEL = ("full_model", "random_init")


@dataclass(frozen=True)
class ConditionContext:
    """What a condition's kept masks are drawn from: the subnetwork's masks, the sampling seed, the legacy flag."""

    mask: Mapping[str, torch.Tensor]
    seed: int
    legacy_sampling: bool


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


def condition_help() -> dict[str, str]:
    """Each condition's one line of help, by name."""
    return {entry.name: entry.doc for entry in CONDITIONS.entries()}


NonMasked = Literal["inherit", "reinit"]
BatchNorm = Literal["inherit", "reset", "freeze"]


# ----------------------------------------------------------------------------------------------------- freezing

class FrozenEntries:
    """Keeps chosen entries of a model's parameters at fixed values through training.

    ``restore()``, called after every optimizer step, writes the saved values back into the frozen entries: whatever
    the optimizer did (weight decay, momentum, Adam moments), they hold exactly the values they had when frozen.
    The forward and backward passes are untouched. With ``zero_grads``, a post-accumulate-grad hook also zeroes the
    frozen entries' gradient, so that gradient clipping and optimizers that mix entries (Adafactor, say) never see
    them, as in the original code, where the frozen copy had no gradient; elementwise optimizers (SGD, Adam, AdamW,
    RMSprop) give the other entries the same updates either way. The hook costs time on the CPU: a few index
    operations per parameter, and torch's default (non-fused) Adam takes a slow ``sqrt`` path on the exact zeros it
    leaves in the second moments. A parameter frozen entirely just stops requiring gradients.

    Memory: per frozen entry, its saved value and one byte for its position (``_Positions``).
    """

    def __init__(self, model: nn.Module, frozen: Mapping[str, torch.Tensor], zero_grads: bool = False):
        params = dict(model.named_parameters())
        self._entries: list[_Frozen] = []
        for name, mask in frozen.items():
            param = params[name]
            mask = mask.to(param.device, torch.bool)
            if bool(mask.all()):
                param.requires_grad_(False)
            elif bool(mask.any()):
                entry = _Frozen(param, mask)
                self._entries.append(entry)
                if zero_grads:
                    param.register_post_accumulate_grad_hook(entry.zero_grad)  # lives as long as the parameter

    @property
    def count(self) -> int:
        return sum(entry.values.numel() for entry in self._entries)

    @torch.no_grad()
    def restore(self) -> None:
        """Write every frozen entry back to its saved value (call after each optimizer step)."""
        for entry in self._entries:
            entry.restore()

    def extra_bytes(self) -> int:
        """Memory held for freezing: positions and saved values."""
        return sum(e.positions.nbytes() + e.values.numel() * e.values.element_size() for e in self._entries)


class _Positions:
    """Sorted flat positions in one byte each: the offset within its block of 256 entries, plus a count per block.

    Half the memory of int16 indices and a quarter of int32 ones, for 2 bytes per 256 entries of the parameter;
    expanding them to the int64 indices that ``index_copy_`` takes is a temporary, one parameter at a time, and costs
    about as much as that copy (a bit mask would be smaller above 12% density, but the masked copy it needs runs
    several times slower on the CPU).
    """

    BLOCK = 256

    def __init__(self, index: torch.Tensor, numel: int):
        self.offsets = (index % self.BLOCK).to(torch.uint8)
        blocks = -(-numel // self.BLOCK)
        self.counts = torch.bincount(index // self.BLOCK, minlength=blocks).to(torch.int16)  # <= 256 each

    def to(self, device: torch.device) -> None:
        if self.offsets.device != device:
            self.offsets, self.counts = self.offsets.to(device), self.counts.to(device)

    def index(self) -> torch.Tensor:
        """The int64 flat indices (on the positions' device)."""
        starts = torch.arange(0, len(self.counts) * self.BLOCK, self.BLOCK, device=self.offsets.device)
        index = torch.repeat_interleave(starts, self.counts.long(), output_size=self.offsets.numel())
        return index.add_(self.offsets)

    def nbytes(self) -> int:
        return self.offsets.numel() + 2 * self.counts.numel()


class _Frozen:
    """One parameter's frozen entries: their positions and saved values.

    It holds the Parameter, not its storage, so ``model.to(device or dtype)`` after freezing is fine: positions and
    values follow the parameter on first use.
    """

    def __init__(self, param: nn.Parameter, mask: torch.Tensor):
        index = mask.reshape(-1).nonzero().squeeze(1)
        self.param = param
        self.positions = _Positions(index, param.numel())
        self.values = param.detach().view(-1).index_select(0, index).clone()

    def _index(self, like: torch.Tensor) -> torch.Tensor:
        self.positions.to(like.device)
        return self.positions.index()

    def zero_grad(self, param: torch.Tensor) -> None:
        param.grad.view(-1).index_fill_(0, self._index(param.grad), 0)

    def restore(self) -> None:
        flat = self.param.detach().view(-1)
        if self.values.device != flat.device or self.values.dtype != flat.dtype:
            self.values = self.values.to(flat.device, flat.dtype)
        flat.index_copy_(0, self._index(flat), self.values)


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
    CONDITIONS.get(condition)
    if condition == "sampled_complement":
        dense = [f"{name} ({int(m.sum())} of {m.numel()})" for name, m in mask.items() if not _fits_outside(m)]
        if dense:
            raise UserError(f"sampled_complement: the subnetwork keeps more than half of the entries of "
                            f"{listing(dense)}, so no equal-sized sample fits outside it")


@dataclass
class Transplant:
    """A condition's starting model; train it in ``train_mode`` and call ``after_step()`` after every step."""

    model: nn.Module
    condition: str
    kept: Optional[dict[str, torch.Tensor]] = None  # the transplanted entries per masked parameter
    frozen: Optional[FrozenEntries] = None
    info: dict[str, Any] = field(default_factory=dict)
    fixed_norms: list[nn.Module] = field(default_factory=list)  # batch-norm layers whose statistics stay fixed

    def after_step(self) -> None:
        if self.frozen is not None:
            self.frozen.restore()

    def train_mode(self, model: nn.Module) -> None:
        """``model.train()``, except the batch-norm layers of ``batch_norm="freeze"``, which stay in eval mode."""
        model.train()
        for norm in self.fixed_norms:
            norm.eval()


def transplant(condition: str, base: nn.Module, fresh: nn.Module, mask: Mapping[str, torch.Tensor], *,
               non_masked: NonMasked = "inherit", batch_norm: BatchNorm = "inherit", freeze: bool = True,
               legacy_sampling: bool = False, seed: int = 0, zero_grads: bool = False) -> Transplant:
    """Build ``condition``'s starting model in ``fresh`` (modified in place and returned in the Transplant).

    Args:
        condition: a name in ``CONDITIONS`` (the module docstring's table; ``instill list conditions``).
        base: the trained model the mask was found on.
        fresh: a freshly initialised model of the same architecture; it becomes the starting model.
        mask: ``{parameter name: bool tensor}`` (True = in the subnetwork), e.g. from ``load_mask``.
        non_masked: ``inherit`` the base's parameters without a mask, or ``reinit`` (keep the fresh ones).
        batch_norm: ``inherit``, ``reset`` or ``freeze`` the batch-norm statistics.
        freeze: keep the transplanted entries fixed (sampled conditions too); ``subnet_trainable`` never freezes.
        legacy_sampling: the original code's sampled baselines (see the module docstring).
        seed: drives the sampled conditions (one independent draw per parameter).
        zero_grads: zero the frozen entries' gradients too (see ``FrozenEntries``; use it with gradient clipping).

    Returns:
        A ``Transplant``: train ``.model`` (in ``.train_mode(model)``) and call ``.after_step()`` after every
        optimizer step, which writes the frozen entries back.

    Raises:
        UserError: an unknown condition or option, architectures that differ, a mask that does not fit ``base``, or
            a sampled condition that cannot be drawn from this mask.
    """
    check_condition(condition, mask)
    for key, value, kind in (("non_masked", non_masked, NonMasked), ("batch_norm", batch_norm, BatchNorm)):
        allowed = get_args(kind)
        if value not in allowed:
            raise UserError(f"{key} {value!r} is unknown; use {' or '.join(allowed)}")
    _check_same_architecture(base, fresh)
    check_masks(mask, base, source="transfer mask")
    if condition == "random_init":
        return Transplant(fresh, condition)
    if condition == "full_model":
        fresh.load_state_dict(base.state_dict())
        kept, frozen, info = None, None, {}
    else:
        kept = CONDITIONS.get(condition).build(ConditionContext(mask, seed, legacy_sampling))
        _copy_weights(base, fresh, kept, non_masked)
        frozen_wanted = freeze and condition != "subnet_trainable"
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
        return {name: sample_mask(m.to(torch.bool), kind, _generator(ctx.seed, name), ctx.legacy_sampling)
                for name, m in sorted(ctx.mask.items())}

    return kept


def _whole_model(ctx: ConditionContext) -> None:  # transplant() builds these without a mask
    return None


for _name, _kept in (("subnet", _the_subnetwork), ("subnet_trainable", _the_subnetwork),
                     ("full_model", _whole_model), ("random_init", _whole_model),
                     ("sampled_subnet", _sampled("subnet")), ("sampled_complement", _sampled("complement"))):
    CONDITIONS.register(_name, doc=_table_help()[_name])(_kept)


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
