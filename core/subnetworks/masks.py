"""Masks over named weights of any model: discovery methods, the masked model, the schedule, the mask artifact.

One mechanism serves every layer type and every model (Hugging Face, timm, torchvision, plain PyTorch):
``MaskedModel`` keeps the model frozen, holds one tensor of mask logits per selected parameter, and for the length
of each forward call puts ``weight * mask`` in the parameter's slot (every slot, for tied weights), as
``torch.func.functional_call`` does but without its per-call search for tied weights. The model's own forward code
runs unchanged, so a masked ``nn.Linear``, ``nn.Conv2d``, transformers' ``Conv1D``,
``nn.MultiheadAttention.in_proj_weight`` or ``nn.Embedding`` all take the same path; there is no class per layer.

Selection (``layers``): each entry is a layer type (``Linear``, ``Conv1d``, ``Conv2d``, ``Conv3d``, ``Conv1D``,
``MultiheadAttention``, ``Embedding``: every module of that type), a glob over module names
(``transformer.h.*.attn.c_attn``), or a glob over parameter names (``*.in_proj_weight``). Modules contribute their
weights, and their biases with ``mask_bias``. An entry that matches nothing is a UserError.

Methods (``method``):

* ``continuous_sparsification`` (Savarese et al. 2020): logits s start at ``mask_init_value``; training uses the
  soft mask sigmoid(beta * s) with beta the annealed ``temperature``; evaluation the hard mask s > 0;
  L0 = the sum of the soft mask. Output and L0 equal NeuroSurgeon 0.1.0's mask layers' for the same logits.
* ``hard_concrete`` (Louizos et al. 2018): log-alpha starts at log(f / (1 - f)) with f = ``mask_init_fraction``;
  training samples a stretched, clamped concrete variable (noise drawn on the logits' device); L0 is the
  probability of a non-zero gate; evaluation keeps the entries whose deterministic gate exceeds 0.5.
* ``magnitude``: keeps the largest ``1 - prune_fraction`` of each parameter by |w| (by the L2 norm of the unit's
  weights for neuron masks); nothing trains.

``unit: neuron`` gives one logit per output unit (the dimension that indexes a layer's outputs); L0 then counts the
weights a unit carries, as NeuroSurgeon does. The base model is frozen (``requires_grad`` off) and held in
evaluation mode (dropout off, batch-norm statistics frozen) whatever mode the wrapper is in.

Artifact: ``mask.safetensors`` (one bool tensor per parameter name, in the parameter's shape) and ``mask.json``
(method, hyperparameters with the layer selection, per-layer and global density, a hash of the base model's weights,
the base run relative to the mask directory, and the content hash of ``mask.safetensors``). ``load_mask`` checks
names (against the recorded selection), shapes, that the file is the one ``mask.json`` describes (content hash,
kept counts, the base hash stamped in the file; artifacts from before the content hash by their kept counts only)
and the base weights' hash, and names exactly what does not match.

NeuroSurgeon 0.1.0 masks convert into an artifact with ``instill import-neurosurgeon`` (``neurosurgeon``).
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Literal, Mapping, Optional, Sequence, get_args

import torch
from torch import nn

from ..errors import UserError, nearest
from ..files import atomic_save_safetensors, atomic_write_json, make_directory
from ..registry import Registry

# Mask methods, by name. An entry is a class (or function) called ``method(cfg: MaskConfig, *, option=default, ...)``
# that returns the method: ``trainable``, ``init_logits(weight, shape)``, and then ``masked(weight, logits,
# temperature)`` and ``hard(logits, weight)`` (trainable) or ``hard_for(weight, shape)`` (not). The shipped methods
# read their settings from MaskConfig's own fields (kept, so that recorded configs and mask.json replay unchanged);
# a method of your own takes its options from its keyword-only parameters, given as ``mask.method_options``. Add one
# with ``@MASK_METHODS.register("name")``, by import path (``method: pkg.module:Method``) or by an entry point of
# group ``instill.mask_methods`` (docs/design.md, "Extending instill"). ``instill list mask_methods`` lists them.
MASK_METHODS = Registry("mask method")
Unit = Literal["weight", "neuron"]
UNITS: tuple[str, ...] = get_args(Unit)
MASK_FILE = "mask.safetensors"
META_FILE = "mask.json"
ARTIFACT_VERSION = 2  # 2: mask.json records mask_hash, the content hash of mask.safetensors


# ----------------------------------------------------------------------------------------------------- config

@dataclass(frozen=True)
class MaskConfig:
    """What to mask and how. ``final_temp``/``legacy_schedule`` drive ``temperature_at`` (continuous sparsification).

    Args:
        layers: layer types (``Linear``, ``Conv2d``, ``Conv1D``, ``Embedding``, ...), globs over module names or over
            parameter names.
        method: a registered mask method (``MASK_METHODS``; the shipped ones in the module docstring).
        unit: ``weight`` (one logit per weight) or ``neuron`` (one per output unit).
        mask_bias: mask the selected modules' biases too.
        l0_lambda: the weight of the L0 penalty; the other fields are each shipped method's settings.
        method_options: the options of a method of your own (its builder's keyword-only parameters), validated
            against them and filled with their defaults.

    Raises:
        UserError: an unknown method or unit, an empty selection, a value out of range.
    """

    layers: tuple[str, ...]
    method: str = "continuous_sparsification"
    unit: str = "weight"
    mask_bias: bool = False
    mask_init_value: float = -0.1
    mask_init_fraction: float = 0.5
    prune_fraction: float = 0.5
    l0_lambda: float = 1e-7
    final_temp: float = 100.0
    legacy_schedule: bool = False
    concrete_temperature: float = 2 / 3
    stretch: tuple[float, float] = (-0.1, 1.1)
    method_options: dict[str, Any] = field(default_factory=dict, hash=False)

    def __post_init__(self):
        object.__setattr__(self, "layers", tuple(self.layers))
        object.__setattr__(self, "stretch", tuple(self.stretch))
        try:
            options = MASK_METHODS.validate(self.method, dict(self.method_options))
        except ValueError as err:  # an unknown method is a UserError already, with the one wording
            raise err if isinstance(err, UserError) else UserError(f"method_options: {err}") from None
        object.__setattr__(self, "method_options", options)
        checks = [
            (self.unit in UNITS, f"unit {self.unit!r} is unknown; use weight or neuron"),
            (len(self.layers) > 0, "layers is empty; name layer types (Linear, Conv1D, ...) or name patterns"),
            (0 < self.mask_init_fraction < 1, f"mask_init_fraction must be in (0, 1), got {self.mask_init_fraction}"),
            (0 <= self.prune_fraction < 1, f"prune_fraction must be in [0, 1), got {self.prune_fraction}"),
            (self.l0_lambda >= 0, f"l0_lambda must be >= 0, got {self.l0_lambda}"),
            (self.final_temp > 0, f"final_temp must be > 0, got {self.final_temp}"),
            (self.concrete_temperature > 0, f"concrete_temperature must be > 0, got {self.concrete_temperature}"),
            (len(self.stretch) == 2 and self.stretch[0] < 0 < 1 < self.stretch[1],
             f"stretch must be (left < 0, right > 1), got {self.stretch}"),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(message)  # the ablate config names the section

    def hyperparameters(self) -> dict[str, Any]:
        """What mask.json records (``method_options`` only where a method has options, as before they existed)."""
        recorded = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}
        if not recorded["method_options"]:
            del recorded["method_options"]
        return recorded


def temperature_at(epoch: int, epochs: int, final_temp: float, legacy: bool = False) -> float:
    """The continuous-sparsification temperature during 0-based ``epoch`` of ``epochs``.

    With r = final_temp ** (1 / epochs), epoch e (1-based) trains at r ** (e - 1): 1 first, final_temp / r last.
    ``legacy`` reproduces the original scripts, which multiplied each layer's temperature twice per epoch
    (through the wrapper's setter and then the layer itself): epoch 1 at 1, epoch e >= 2 at r ** e, the last at
    exactly final_temp.
    """
    ratio = final_temp ** (1.0 / epochs)
    if legacy:
        return 1.0 if epoch == 0 else ratio ** (epoch + 1)
    return ratio**epoch


# ----------------------------------------------------------------------------------------------------- selection

@dataclass(frozen=True)
class LayerKind:
    """A module type whose named weights (and biases) can be masked; ``out_dim`` indexes its output units."""

    cls: type
    weights: tuple[str, ...]
    biases: tuple[str, ...]
    out_dim: int


@lru_cache(maxsize=1)
def layer_kinds() -> dict[str, LayerKind]:
    kinds = {
        "Linear": LayerKind(nn.Linear, ("weight",), ("bias",), 0),
        "Conv1d": LayerKind(nn.Conv1d, ("weight",), ("bias",), 0),
        "Conv2d": LayerKind(nn.Conv2d, ("weight",), ("bias",), 0),
        "Conv3d": LayerKind(nn.Conv3d, ("weight",), ("bias",), 0),
        "MultiheadAttention": LayerKind(
            nn.MultiheadAttention, ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight"),
            ("in_proj_bias",), 0),
        "Embedding": LayerKind(nn.Embedding, ("weight",), (), 1),
    }
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # transformers is optional for non-HF models
        pass
    else:
        kinds["Conv1D"] = LayerKind(Conv1D, ("weight",), ("bias",), 1)  # weight is (in, out)
    return kinds


def kind_of(module: nn.Module) -> Optional[LayerKind]:
    for kind in layer_kinds().values():
        if isinstance(module, kind.cls):
            return kind
    return None


@dataclass(frozen=True)
class Target:
    """A masked parameter: its canonical name (as ``named_parameters`` gives it) and output-unit dimension."""

    name: str
    out_dim: int


def select_targets(model: nn.Module, layers: Sequence[str], mask_bias: bool = False) -> list[Target]:
    """The parameters that ``layers`` selects, in the model's parameter order (tied weights once)."""
    canonical = {id(p): name for name, p in model.named_parameters()}
    modules = [(name, m) for name, m in model.named_modules() if name]
    found: dict[str, int] = {}
    for entry in layers:
        matched = _match(entry, model, modules, canonical, mask_bias)
        if not matched:
            raise UserError(_no_match_message(entry, modules, canonical))
        for name, out_dim in matched:
            found.setdefault(name, out_dim)
    order = {name: i for i, name in enumerate(canonical.values())}
    return [Target(name, dim) for name, dim in sorted(found.items(), key=lambda item: order[item[0]])]


def _match(entry: str, model: nn.Module, modules, canonical, mask_bias: bool) -> list[tuple[str, int]]:
    kinds = layer_kinds()
    if entry in kinds:  # the root too: a bare nn.Linear given as the model is a layer like any other
        return [hit for _, m in [("", model), *modules] if isinstance(m, kinds[entry].cls)
                for hit in _module_params(m, kinds[entry], canonical, mask_bias)]
    named = [(name, m) for name, m in modules if fnmatch.fnmatchcase(name, entry)]
    hits = []
    for name, module in named:
        kind = kind_of(module)
        if kind is None and not _is_glob(entry):
            raise UserError(f"layers entry {entry!r} is a {type(module).__name__}, which has no maskable weight "
                            f"(supported types: {', '.join(kinds)}; or name a parameter)")
        hits += _module_params(module, kind, canonical, mask_bias) if kind else []
    if hits:
        return hits
    return [(name, 0) for name in canonical.values() if fnmatch.fnmatchcase(name, entry)]


def _module_params(module: nn.Module, kind: LayerKind, canonical, mask_bias: bool) -> list[tuple[str, int]]:
    attrs = [(a, kind.out_dim) for a in kind.weights] + ([(a, 0) for a in kind.biases] if mask_bias else [])
    hits = []
    for attr, out_dim in attrs:
        param = getattr(module, attr, None)
        if isinstance(param, nn.Parameter):
            hits.append((canonical[id(param)], out_dim))
    return hits


def _is_glob(pattern: str) -> bool:
    return any(c in pattern for c in "*?[")


def _no_match_message(entry: str, modules, canonical) -> str:
    names = list(layer_kinds()) + [name for name, _ in modules] + list(canonical.values())
    hint = nearest(entry, names)
    near = f"; nearest names: {', '.join(hint)}" if hint else ""
    return (f"layers entry {entry!r} matches no maskable weight (use a layer type such as "
            f"{', '.join(layer_kinds())}, or a module or parameter name pattern){near}")


def unit_shape(shape: Sequence[int], out_dim: int, unit: str) -> tuple[int, ...]:
    """Shape of the logits: the parameter's shape, or 1 everywhere but the output-unit dimension (neurons)."""
    if unit == "weight" or len(shape) < 2:
        return tuple(shape)
    return tuple(size if dim == out_dim else 1 for dim, size in enumerate(shape))


def owner_of(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    module_name, _, attr = name.rpartition(".")
    return model.get_submodule(module_name), attr


def unit_masks(model: nn.Module, masks: Mapping[str, torch.Tensor], unit: str) -> dict[str, torch.Tensor]:
    """Each mask in the shape of its units: unchanged for weight masks; one entry per output unit for neuron masks.

    Raises:
        UserError: a neuron mask that is not constant over the weights of one unit.
    """
    if unit == "weight":
        return dict(masks)
    if unit != "neuron":
        raise UserError(f"unit {unit!r} is unknown; use weight or neuron")
    reduced, mixed = {}, []
    for name, mask in masks.items():
        module, attr = owner_of(model, name)
        kind = kind_of(module)
        out_dim = kind.out_dim if kind is not None and attr in kind.weights else 0
        dims = [d for d, size in enumerate(unit_shape(mask.shape, out_dim, "neuron")) if size != mask.shape[d]]
        if not dims:
            reduced[name] = mask
            continue
        kept = mask.any(dim=dims, keepdim=True)
        if not torch.equal(kept, mask.all(dim=dims, keepdim=True)):
            mixed.append(name)
        reduced[name] = kept
    if mixed:
        raise UserError(f"neuron masks must keep or drop each output unit whole, but {listing(mixed)} mix(es) kept "
                        f"and dropped weights within a unit (is it a weight mask?)")
    return reduced


# ----------------------------------------------------------------------------------------------------- methods

class _SoftMaskedWeight(torch.autograd.Function):
    """(weight * sigmoid(beta * s), sum of the soft mask) in one node: 3 weight-sized buffers instead of 7.

    Autograd would keep beta * s, the mask and the product, and in the backward pass allocate the mask's gradient
    twice (product and L0 paths, then their sum), the sigmoid's and the scaling's; here the backward pass works in
    one buffer. Same arithmetic as NeuroSurgeon's layers, so outputs agree with them.
    """

    @staticmethod
    def forward(ctx, weight: torch.Tensor, logits: torch.Tensor, beta: float):
        mask = torch.mul(logits, beta).sigmoid_()
        ctx.save_for_backward(weight, mask)
        ctx.beta = beta
        return weight * mask.to(weight.dtype), mask.sum()

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor, grad_l0: torch.Tensor):
        weight, mask = ctx.saved_tensors
        grad_weight = grad_out * mask.to(grad_out.dtype) if ctx.needs_input_grad[0] else None
        grad = (grad_out * weight).float().sum_to_size(mask.shape)  # neuron masks broadcast over their unit
        grad.add_(grad_l0)
        torch.ops.aten.sigmoid_backward.grad_input(grad, mask, grad_input=grad)
        return grad_weight, grad.mul_(ctx.beta), None


class ContinuousSparsification:
    """Soft mask sigmoid(beta * s) while training, hard mask s > 0 otherwise; L0 = sum of the soft mask."""

    trainable = True

    def __init__(self, cfg: MaskConfig):
        self.init_value = cfg.mask_init_value

    def init_logits(self, weight: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        return torch.full(shape, float(self.init_value), device=weight.device)

    def masked(self, weight: torch.Tensor, logits: torch.Tensor, temperature: float
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """(the weight under the soft mask, L0 of the mask): the forward mask is the L0 term, computed once."""
        return _SoftMaskedWeight.apply(weight, logits, float(temperature))

    def hard(self, logits: Optional[torch.Tensor], weight: torch.Tensor) -> torch.Tensor:
        return logits > 0


class HardConcrete:
    """Louizos et al. (2018): stretched, clamped concrete gates with a closed-form expected L0."""

    trainable = True

    def __init__(self, cfg: MaskConfig):
        self.init_fraction = cfg.mask_init_fraction
        self.beta = cfg.concrete_temperature
        self.left, self.right = cfg.stretch

    def init_logits(self, weight: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        value = math.log(self.init_fraction / (1 - self.init_fraction))
        return torch.full(shape, value, device=weight.device)

    def _stretch(self, gate: torch.Tensor) -> torch.Tensor:
        return torch.clamp(gate * (self.right - self.left) + self.left, 0.0, 1.0)

    def gates(self, logits: torch.Tensor) -> torch.Tensor:
        """A sample of the stretched, clamped concrete gates (noise drawn on the logits' device)."""
        u = torch.rand_like(logits).clamp_(1e-4, 1 - 1e-4)
        return self._stretch(torch.sigmoid((torch.log(u) - torch.log1p(-u) + logits) / self.beta))

    def masked(self, weight: torch.Tensor, logits: torch.Tensor, temperature: float
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """(the weight under sampled gates, expected L0: the probability of each gate being non-zero)."""
        l0 = torch.sigmoid(logits - self.beta * math.log(-self.left / self.right)).sum()
        return weight * self.gates(logits).to(weight.dtype), l0

    def hard(self, logits: Optional[torch.Tensor], weight: torch.Tensor) -> torch.Tensor:
        return self._stretch(torch.sigmoid(logits)) > 0.5


class Magnitude:
    """Keeps the largest (1 - prune_fraction) of each parameter by |w| (unit L2 norm for neuron masks)."""

    trainable = False

    def __init__(self, cfg: MaskConfig):
        self.prune_fraction = cfg.prune_fraction

    def init_logits(self, weight: torch.Tensor, shape: tuple[int, ...]) -> None:
        return None

    def scores(self, weight: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        if tuple(shape) == tuple(weight.shape):
            return weight.detach().abs()
        dims = [d for d, size in enumerate(shape) if size == 1 and weight.shape[d] != 1]
        return weight.detach().norm(dim=dims, keepdim=True)

    def hard_for(self, weight: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        scores = self.scores(weight, shape).reshape(-1)
        keep = round((1 - self.prune_fraction) * scores.numel())
        mask = torch.zeros(scores.numel(), dtype=torch.bool, device=weight.device)
        mask[torch.topk(scores, keep, sorted=False).indices] = True  # exactly `keep` entries, ties or not
        return mask.reshape(shape)


for _name, _method in (("continuous_sparsification", ContinuousSparsification), ("hard_concrete", HardConcrete),
                      ("magnitude", Magnitude)):
    MASK_METHODS.register(_name)(_method)


def make_method(cfg: MaskConfig):
    """The mask method ``cfg.method`` names, built with ``cfg`` and its ``method_options``."""
    return MASK_METHODS.build(cfg.method, cfg, cfg.method_options)


# ----------------------------------------------------------------------------------------------------- masked model

class MaskedModel(nn.Module):
    """A frozen model run with masked weights. Only the mask logits (``self.logits``) train.

    ``forward`` takes the model's own arguments. After a training forward, ``l0()`` is the L0 term of that very
    forward (no second mask computation) and ``penalty()`` is ``l0_lambda * l0()``. Set ``temperature`` (or call
    ``set_epoch``) for continuous sparsification.

    Args:
        model: the trained model; its parameters are frozen (``requires_grad`` off) and it stays in eval mode.
        config: what to mask and how (``MaskConfig``: layers, method, unit, L0 weight, schedule).

    Raises:
        UserError: a layer selection that matches no weight of ``model``.
    """

    def __init__(self, model: nn.Module, config: MaskConfig):
        super().__init__()
        self.model = model
        self.config = config
        self.method = make_method(config)
        self.targets = select_targets(model, config.layers, config.mask_bias)
        for param in model.parameters():
            param.requires_grad_(False)
        model.eval()
        self._refresh_base()
        shapes = [unit_shape(w.shape, t.out_dim, config.unit) for t, w in zip(self.targets, self._base)]
        self._shapes = shapes
        logits = [self.method.init_logits(w, s) for w, s in zip(self._base, shapes)]
        self.logits = nn.ParameterList([nn.Parameter(x) for x in logits if x is not None])
        # L0 counts weights: a neuron's logit stands for every weight of the unit
        self._scale = [w.numel() / math.prod(s) for w, s in zip(self._base, shapes)]
        self.temperature = 1.0
        self._l0: Optional[torch.Tensor] = None

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.targets]

    def _refresh_base(self) -> None:
        """The target parameters and every (module, name) slot that holds each (tied weights have several)."""
        params = dict(self.model.named_parameters())
        self._base = [params[t.name] for t in self.targets]
        where = {id(p): i for i, p in enumerate(self._base)}
        self._slots: list[list[tuple[nn.Module, str]]] = [[] for _ in self._base]
        for module in self.model.modules():
            for key, param in module._parameters.items():
                if param is not None and id(param) in where:
                    self._slots[where[id(param)]].append((module, key))

    def _apply(self, fn, *args, **kwargs):
        result = super()._apply(fn, *args, **kwargs)
        self._refresh_base()  # .to() / .cuda() may hand the model new parameter objects
        return result

    def train(self, mode: bool = True) -> "MaskedModel":
        """Masks follow ``mode``; the frozen base stays in evaluation mode (dropout off, BN statistics frozen)."""
        self.training = mode
        self.model.eval()
        return self

    def set_epoch(self, epoch: int, epochs: int) -> dict[str, float]:
        """Set the temperature for 0-based ``epoch``; returns it for logging (continuous sparsification only)."""
        if not isinstance(self.method, ContinuousSparsification):
            return {}
        self.temperature = temperature_at(epoch, epochs, self.config.final_temp, self.config.legacy_schedule)
        return {"temperature": self.temperature}

    # --- masks --------------------------------------------------------------------------------------------------

    def _masked_weights(self) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The weights this forward uses and the L0 of their masks (counted in weights)."""
        if self.training and self.method.trainable:
            pairs = [self.method.masked(w, logits, self.temperature) for w, logits in zip(self._base, self.logits)]
            parts = [part if scale == 1 else part * scale for (_, part), scale in zip(pairs, self._scale)]
            return [weight for weight, _ in pairs], torch.stack(parts).sum()
        masks = self._hard_unit_masks()
        l0 = sum(float(m.sum()) * scale for m, scale in zip(masks, self._scale))
        return [w * m.to(w.dtype) for w, m in zip(self._base, masks)], torch.tensor(l0)

    def _hard_unit_masks(self) -> list[torch.Tensor]:
        with torch.no_grad():
            if not self.method.trainable:
                return [self.method.hard_for(w, s) for w, s in zip(self._base, self._shapes)]
            return [self.method.hard(logits, w) for logits, w in zip(self.logits, self._base)]

    def forward(self, *args, **kwargs):
        masked, self._l0 = self._masked_weights()
        for slots, tensor in zip(self._slots, masked):
            for module, key in slots:
                module._parameters[key] = tensor  # what functional_call does; the Parameter goes back below
        try:
            return self.model(*args, **kwargs)
        finally:
            for slots, param in zip(self._slots, self._base):
                for module, key in slots:
                    module._parameters[key] = param

    def l0(self) -> torch.Tensor:
        """L0 of the last forward (differentiable in training); before any forward, of the current masks."""
        if self._l0 is None:
            _, self._l0 = self._masked_weights()
        return self._l0

    def penalty(self) -> torch.Tensor:
        return self.config.l0_lambda * self.l0()

    def hard_masks(self) -> dict[str, torch.Tensor]:
        """The binary masks.

        Returns:
            One bool tensor per parameter name in the parameter's full shape, on the CPU (True: kept).
        """
        return {t.name: m.expand(w.shape).contiguous().cpu()
                for t, w, m in zip(self.targets, self._base, self._hard_unit_masks())}

    def load_logits(self, logits: Mapping[str, torch.Tensor], source: str = "logits") -> None:
        """Set the logits from ``{parameter name: tensor}``; every masked parameter exactly once, same shapes."""
        if not self.method.trainable:
            raise UserError(f"{source}: the {self.config.method} method has no logits to load")
        _check_names(logits.keys(), self.names, source)
        with torch.no_grad():
            for name, param, shape in zip(self.names, self.logits, self._shapes):
                value = logits[name]
                if tuple(value.shape) != tuple(shape):
                    hint = ("; NeuroSurgeon's conv neuron masks hold a logit per output channel and kernel position: "
                            "import them as hard masks (instill import-neurosurgeon)"
                            if self.config.unit == "neuron" and value.dim() > 2 else "")
                    raise UserError(f"{source}: {name} has shape {tuple(value.shape)}, the mask needs {shape}{hint}")
                param.copy_(value.to(param.dtype))

    def save(self, directory: str | Path, base_run: Optional[str | Path] = None, **extra: Any) -> dict[str, Any]:
        """Write the mask artifact of the current hard masks: ``mask.safetensors`` and ``mask.json``.

        Args:
            directory: where to write (created if missing); files are replaced atomically.
            base_run: the base model's run directory, recorded relative to ``directory``.
            **extra: further JSON-serialisable fields for ``mask.json``.

        Returns:
            The metadata written: method, hyperparameters, density per layer and overall, the base weights' hash.

        Raises:
            UserError: masks that do not fit the model (cannot happen for masks this model made).
        """
        return save_mask(directory, self.hard_masks(), self.model, method=self.config.method,
                         hyperparameters=self.config.hyperparameters(), base_run=base_run, extra=extra)


# ----------------------------------------------------------------------------------------------------- artifact

def tensors_hash(tensors: Mapping[str, torch.Tensor]) -> str:
    """sha256 over named tensors (names, dtypes, shapes, bytes), in name order."""
    digest = hashlib.sha256()
    for name, tensor in sorted(tensors.items()):
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}|{flat.dtype}|{tuple(tensor.shape)}\n".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")
    return digest.hexdigest()


def weights_hash(model: nn.Module) -> str:
    """sha256 over the model's state dict (names, dtypes, shapes, bytes), in name order."""
    return tensors_hash(model.state_dict())


def mask_density(masks: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """Kept entries per parameter and overall.

    Args:
        masks: ``{parameter name: bool tensor}``.

    Returns:
        ``{"kept", "total", "density", "layers": {name: {"shape", "kept", "total", "density"}}}``.

    Raises:
        Nothing: empty masks give density 0.
    """
    layers = {name: {"shape": list(m.shape), "kept": int(m.sum()), "total": m.numel(),
                     "density": float(m.sum()) / max(m.numel(), 1)} for name, m in masks.items()}
    kept = sum(layer["kept"] for layer in layers.values())
    total = sum(layer["total"] for layer in layers.values())
    return {"kept": kept, "total": total, "density": kept / max(total, 1), "layers": layers}


def save_mask(directory: str | Path, masks: Mapping[str, torch.Tensor], base_model: nn.Module, *, method: str,
              hyperparameters: dict[str, Any], base_run: Optional[str | Path] = None,
              extra: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """Write ``mask.safetensors`` and ``mask.json`` atomically; returns the metadata.

    ``hyperparameters`` must record the layer selection (``layers``, ``mask_bias``) that gives exactly these
    parameter names, so that a later ``load_mask`` can check the artifact; ``base_run`` (the base model's run
    directory) is stored relative to ``directory``, so the pair can move together (see ``base_run_of``).
    """
    from safetensors.torch import save_file

    directory = Path(directory)
    check_masks(masks, base_model, recorded_selection(hyperparameters, base_model, "mask"), source="mask")
    masks = {name: m.detach().cpu().contiguous() for name, m in masks.items()}
    density = mask_density(masks)
    meta = {"version": ARTIFACT_VERSION, "method": method, "hyperparameters": hyperparameters,
            "base_hash": weights_hash(base_model), "mask_hash": tensors_hash(masks),
            "density": density["density"], "kept": density["kept"],
            "total": density["total"], "layers": density["layers"], **(extra or {})}
    if base_run is not None:
        meta["base_run"] = os.path.relpath(base_run, directory)
    make_directory(directory)
    atomic_save_safetensors(directory / MASK_FILE,
                            lambda tmp: save_file(masks, tmp, metadata={"base_hash": meta["base_hash"]}))
    atomic_write_json(directory / META_FILE, meta)
    return meta


def read_mask_meta(directory: str | Path) -> dict[str, Any]:
    from ..files import read_regular_bytes

    path = Path(directory) / META_FILE
    try:
        meta = json.loads(read_regular_bytes(path))  # a FIFO is refused, not waited on
    except FileNotFoundError:
        raise UserError(f"{path}: mask metadata not found (is {Path(directory)} a mask directory?)") from None
    except (OSError, UnicodeDecodeError, ValueError):
        raise UserError(f"{path}: not valid JSON") from None
    if not isinstance(meta, dict):
        raise UserError(f"{path}: expected a JSON object")
    return meta


def base_run_of(directory: str | Path) -> str:
    """The base run directory that a mask directory's ``mask.json`` names.

    ``base_run`` is stored relative to the mask directory; artifacts written before that stored it relative to
    the working directory of their run, which is tried second.
    """
    recorded = read_mask_meta(directory).get("base_run")
    if not recorded:
        raise UserError(f"{Path(directory) / META_FILE} does not name its base run (base_run)")
    candidates = [os.path.normpath(Path(directory) / recorded), recorded]
    for candidate in candidates:
        if Path(candidate).is_dir():
            return candidate
    raise UserError(f"{Path(directory) / META_FILE}: base run {recorded!r} not found (looked in "
                    f"{' and '.join(dict.fromkeys(candidates))})")


def recorded_selection(hyperparameters: Mapping[str, Any], model: nn.Module, source: str) -> list[str]:
    """The parameter names that the layer selection in ``hyperparameters`` (``layers``, ``mask_bias``) gives on
    ``model``: the names a mask artifact must hold, no more, no fewer."""
    layers = hyperparameters.get("layers") if isinstance(hyperparameters, Mapping) else None
    if not layers or not isinstance(layers, (list, tuple)):
        raise UserError(f"{source}: {META_FILE} does not record the layer selection (hyperparameters.layers)")
    try:
        return [t.name for t in select_targets(model, layers, bool(hyperparameters.get("mask_bias", False)))]
    except UserError as err:
        raise UserError(f"{source}: the recorded layer selection does not fit the model: {err}") from None


def load_mask(directory: str | Path, base_model: nn.Module, expected: Optional[Iterable[str]] = None,
              check_hash: bool = True) -> dict[str, torch.Tensor]:
    """The bool masks of a mask directory, checked against ``base_model`` (names, shapes, weights hash).

    Names must be exactly ``expected`` if given, else exactly what the layer selection recorded in ``mask.json``
    gives on ``base_model``: a missing parameter would be inherited whole, an extra one frozen whole.

    Args:
        directory: a mask directory (``mask.safetensors`` + ``mask.json``, as ``MaskedModel.save`` writes).
        base_model: the model the mask was found on.
        expected: the parameter names the mask must hold (default: the recorded selection's).
        check_hash: refuse a mask found on other weights (the hash of the base weights is recorded).

    Returns:
        ``{parameter name: bool tensor in the parameter's shape}`` (True: in the subnetwork).

    Raises:
        UserError: a missing or unreadable file, names or shapes that do not fit, a mask file that is not the one
            ``mask.json`` describes (changed or replaced after saving), or other base weights (``check_hash``).
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(directory) / MASK_FILE
    meta = read_mask_meta(directory)
    try:
        if path.exists() and not path.is_file():  # a FIFO would block the reader forever
            raise OSError(f"{path.name} is not a regular file")
        masks = load_file(path)
    except FileNotFoundError:
        raise UserError(f"{path}: mask file not found") from None
    except (SafetensorError, OSError) as err:
        raise UserError(f"{path}: not a readable safetensors file ({err})") from None
    if expected is None:
        check_known(masks, dict(base_model.named_parameters()), str(path))  # the plainest message first
        expected = recorded_selection(meta.get("hyperparameters"), base_model, str(path))
    check_masks(masks, base_model, expected, source=str(path))
    _check_integrity(path, masks, meta)
    if check_hash:
        actual = weights_hash(base_model)
        if meta.get("base_hash") != actual:
            raise UserError(f"{path}: the mask was found on other base weights (hash {str(meta.get('base_hash'))[:12]} "
                            f"in {META_FILE}, this model hashes to {actual[:12]})")
    return masks


def _check_integrity(path: Path, masks: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> None:
    """The mask file is the one ``mask.json`` describes: its content hash (``mask_hash``), the kept count of every
    layer and the base hash in its own metadata all agree with the record. Artifacts written before ``mask_hash``
    (version 1) are checked by their kept counts only, which an edit that keeps every layer's count would pass."""
    from safetensors import safe_open

    changed = f"{path} does not match {META_FILE}"
    recorded_layers = meta.get("layers") if isinstance(meta.get("layers"), Mapping) else {}
    density = mask_density(masks)
    counts = [f"{name} keeps {layer['kept']} ({recorded_layers[name].get('kept')} recorded)"
              for name, layer in density["layers"].items()
              if isinstance(recorded_layers.get(name), Mapping) and recorded_layers[name].get("kept") != layer["kept"]]
    if "kept" in meta and meta["kept"] != density["kept"] and not counts:
        counts = [f"{density['kept']} kept ({meta['kept']} recorded)"]
    if counts:
        raise UserError(f"{changed}: {listing(counts, limit=2)}; the mask was changed or replaced after it was saved")
    recorded = meta.get("mask_hash")
    if recorded is not None and recorded != tensors_hash(masks):
        raise UserError(f"{changed}: its content hash differs from mask_hash {str(recorded)[:12]} (same kept counts); "
                        f"the mask was changed or replaced after it was saved")
    with safe_open(path, "pt") as handle:
        stamped = (handle.metadata() or {}).get("base_hash")
    if stamped is not None and stamped != meta.get("base_hash"):
        raise UserError(f"{changed}: it was saved for base weights {stamped[:12]}, {META_FILE} records "
                        f"{str(meta.get('base_hash'))[:12]}; the mask file was replaced by another run's")


def check_masks(masks: Mapping[str, torch.Tensor], model: nn.Module, expected: Optional[Iterable[str]] = None,
                source: str = "mask") -> None:
    """UserError (one line) unless every mask names a parameter of ``model``, is bool and has its shape."""
    params = dict(model.named_parameters())
    check_known(masks, params, source)
    if expected is not None:
        _check_names(masks.keys(), list(expected), source)
    wrong = [f"{name} {tuple(m.shape)} vs {tuple(params[name].shape)}" for name, m in masks.items()
             if tuple(m.shape) != tuple(params[name].shape)]
    if wrong:
        raise UserError(f"{source}: shape mismatch (mask vs model): {listing(wrong)}")
    not_bool = [name for name, m in masks.items() if m.dtype != torch.bool]
    if not_bool:
        raise UserError(f"{source}: masks must be bool tensors: {listing(not_bool)}")


def check_known(names: Iterable[str], params: Mapping[str, Any], source: str) -> None:
    unknown = [name for name in names if name not in params]
    if unknown:
        hint = nearest(unknown[0], params, n=1)
        raise UserError(f"{source}: {listing(unknown)} not parameter(s) of the model"
                        + (f" (nearest: {hint[0]})" if hint else ""))


def _check_names(given: Iterable[str], wanted: Sequence[str], source: str) -> None:
    given = list(given)
    missing = [name for name in wanted if name not in set(given)]
    extra = [name for name in given if name not in set(wanted)]
    if missing or extra:
        parts = ([f"missing {listing(missing)}"] if missing else []) + ([f"extra {listing(extra)}"] if extra else [])
        raise UserError(f"{source}: parameters do not match the layer selection: {'; '.join(parts)}")


def listing(names: Sequence[str], limit: int = 3) -> str:
    """A count and the first few names, for one-line messages: ``5: a, b, c, ... (+2)``."""
    shown = ", ".join(names[:limit])
    return f"{len(names)}: {shown}" + (f", ... (+{len(names) - limit})" if len(names) > limit else "")
