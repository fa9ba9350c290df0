"""Activation capture: the outputs of chosen modules, recorded by forward hooks during an ordinary forward pass.

    with FeatureCapture(model, ["layer1.0.conv1", nn.Linear], transform=None) as capture:
        logits = model(x)          # one forward: the logits and the features
        features = capture.pop()   # {"layer1.0.conv1": (n, ...), "fc": (n, ...)}, in execution order

Layers are chosen by module name (as in ``model.named_modules()``, a ``module.`` prefix of DDP/DataParallel
wrappers may be left out), by a glob pattern of names (``bn*``, ``layer?.0.conv1``), by module type (``nn.Linear``,
or the string ``"type:Linear"`` from a config), or any mix. A name that is not in the model, or a pattern that
matches none, raises a UserError naming the nearest names. ``DEFAULT_TYPES`` is the original guidance code's
selection plus GRU and transformer encoder layers; ``ORIGINAL_TYPES`` is exactly its list.

What a capture is:

- Keys are module names in execution order. A module called several times in one forward (a weight-tied layer
  stack, a reused block) gives one capture per call: ``name``, ``name@1``, ``name@2``, ...
- Tuple outputs give their first element (RNN/LSTM/GRU: the output sequence, not the final state; attention: the
  attended values, not the weights). A ``PackedSequence`` is padded back, batch first.
- The batch axis is declared, never guessed from sizes, and moved to the front. A module that declares its layout
  (``batch_first`` on RNNs, ``nn.MultiheadAttention``, ``nn.Transformer*``) decides for itself and its submodules;
  everything else uses ``batch_axis`` (0 by default; 1 for sequence-first models). ``batch_axes`` declares the
  axis by module name, for that module and its submodules (as ``batch_first`` does), over any own declaration.
- ``transform`` (one callable, or a dict by module name) runs inside the hook on the fresh output, e.g. a guide's
  Gram matrix under ``no_grad``: the activation is dropped at once and only the n x n matrix is kept.
- In-place operations cannot corrupt a capture: by default an output is copied when it is kept as it is or when
  it requires grad (a transform may save it for backward); with ``clone=False`` nothing is copied and ``pop``
  raises if a later in-place operation (``ReLU(inplace=True)``) changed a kept tensor.

Hooks stay registered until the context exits (or ``close()``), so nothing is rebuilt per step. The transformer fast
paths are switched off meanwhile: in eval mode ``nn.TransformerEncoder`` would hand its layers nested tensors. The
switch is shared: it stays off while any capture that needs it is open, and the last one to close restores the
setting the first one found, in whatever order they close.
"""

from __future__ import annotations

import fnmatch
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pad_packed_sequence

from ..errors import UserError, did_you_mean, known_names, unknown_name

ORIGINAL_TYPES: tuple[type[nn.Module], ...] = (
    nn.Conv2d, nn.Linear, nn.AdaptiveAvgPool2d, nn.LSTM, nn.RNN, nn.TransformerDecoderLayer, nn.LayerNorm,
    nn.MultiheadAttention)
DEFAULT_TYPES: tuple[type[nn.Module], ...] = ORIGINAL_TYPES + (nn.GRU, nn.TransformerEncoderLayer)

LayerSpec = str | type[nn.Module]
Transform = Callable[[Tensor], Any]


# ----------------------------------------------------------------------------------------------------- selection

def _named_modules(model: nn.Module) -> dict[str, nn.Module]:
    return dict(model.named_modules(remove_duplicate=False))


def _type_matches(spec: str | type[nn.Module], module: nn.Module) -> bool:
    if isinstance(spec, type):
        return isinstance(module, spec)
    return any(cls.__name__ == spec for cls in type(module).__mro__)  # "type:Linear" matches subclasses too


def _resolve_name(name: str, modules: Mapping[str, nn.Module], params: set[str]) -> str:
    for candidate in (name, f"module.{name}", name.removeprefix("module.")):
        if candidate and candidate in modules:
            return candidate
    owner = name.rsplit(".", 1)[0]
    if name in params:
        raise UserError(f"layer {name!r} is a parameter, not a module: name its module {owner!r}")
    raise unknown_name("layer", name, [n for n in modules if n], where=f" in {type(modules['']).__name__}",
                       suggestions=5, cutoff=0.5)


def is_glob(name: str) -> bool:
    """A layer name with shell wildcards (``layer1.*.bn?``) selects every module name it matches."""
    return any(c in name for c in "*?[")


def _glob_names(pattern: str, modules: Mapping[str, nn.Module]) -> set[str]:
    matched = {name for name in modules if name and fnmatch.fnmatchcase(name, pattern)}
    if not matched:
        names = [n for n in modules if n]
        raise UserError(f"no layer matches {pattern!r} in {type(modules['']).__name__}"
                        + did_you_mean(pattern.replace("*", "").replace("?", ""), names, 5, 0.3) + known_names(names))
    return matched


def select_layers(model: nn.Module, layers: LayerSpec | Sequence[LayerSpec]) -> dict[str, nn.Module]:
    """``{name: module}`` for the given names and types, in the model's registration order, each module once."""
    specs = [layers] if isinstance(layers, (str, type)) else list(layers)
    modules = _named_modules(model)
    params = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    names = [spec for spec in specs if isinstance(spec, str) and not spec.startswith("type:")]
    kinds = [spec.removeprefix("type:") if isinstance(spec, str) else spec for spec in specs if spec not in names]
    wanted = set()
    for name in names:
        wanted |= _glob_names(name, modules) if is_glob(name) else {_resolve_name(name, modules, params)}
    by_type = {name for name, module in model.named_modules() if name and any(_type_matches(k, module) for k in kinds)}
    if kinds and not by_type:
        labels = ", ".join(k if isinstance(k, str) else k.__name__ for k in kinds)
        raise UserError(f"no module of the types {labels} in {type(model).__name__}")
    wanted |= by_type
    selected: dict[str, nn.Module] = {}
    seen: set[int] = set()
    for name, module in modules.items():  # shared modules: one hook, under their first name
        if name in wanted and id(module) not in seen:
            selected[name] = module
            seen.add(id(module))
    return selected


# ----------------------------------------------------------------------------------------------------- layout

def declared_batch_first(module: nn.Module) -> bool | None:
    """The layout a module declares: ``batch_first`` of RNNs, attention and transformer layers; None if none."""
    for owner in (module, getattr(module, "self_attn", None)):
        if isinstance(getattr(owner, "batch_first", None), bool):
            return owner.batch_first
    return None


def batch_axes_of(model: nn.Module, default: int = 0, declared: Mapping[str, int] | None = None) -> dict[str, int]:
    """Each module's batch axis: ``declared[name]``, else its own layout, else its nearest declaring ancestor's,
    else ``default``."""
    declared = declared or {}
    axes: dict[str, int] = {}
    for name, module in model.named_modules(remove_duplicate=False):  # parents come before their children
        inherited = axes[name.rsplit(".", 1)[0] if "." in name else ""] if name else default
        own = declared.get(name)
        if own is None and (layout := declared_batch_first(module)) is not None:
            own = 0 if layout else 1
        axes[name] = inherited if own is None else own
    return axes


def module_of(key: str) -> str:
    """The module name of a capture key (``layers.0@2`` is the third call of ``layers.0``)."""
    return key.split("@", 1)[0]


def capture_key(name: str, call: int) -> str:
    return name if call == 0 else f"{name}@{call}"


def _primary_tensor(output: Any, name: str) -> tuple[Tensor, bool]:
    """The output's main tensor and whether it is already batch-first (padded packed sequences are)."""
    while True:
        if isinstance(output, Tensor):
            return output, False
        if isinstance(output, PackedSequence):
            return pad_packed_sequence(output, batch_first=True)[0], True
        if isinstance(output, Mapping):
            output = next(iter(output.values()), None)
        elif isinstance(output, (tuple, list)) and output:
            output = output[0]
        else:
            raise UserError(f"layer {name!r} returned {type(output).__name__}, not a tensor: capture a submodule")


# ----------------------------------------------------------------------------------------------------- capture

class _FastPathSwitch:
    """The transformer fast paths, off while any holder is open: each capture saving and restoring the global flag
    itself would leave it off when captures close in their opening order."""

    def __init__(self) -> None:
        self.holders = 0
        self.saved: bool | None = None

    def hold(self) -> None:
        if self.holders == 0:
            self.saved = torch.backends.mha.get_fastpath_enabled()
            torch.backends.mha.set_fastpath_enabled(False)
        self.holders += 1

    def release(self) -> None:
        self.holders -= 1
        if self.holders == 0:
            torch.backends.mha.set_fastpath_enabled(self.saved)


FAST_PATH = _FastPathSwitch()


@dataclass
class _Record:
    key: str
    value: Any
    version: int | None  # of ``value`` when kept without a copy: an in-place change shows as a new version


class FeatureCapture:
    """Forward hooks that record the chosen layers' outputs; see the module docstring.

    Args:
        model: the network; hooks go on its modules, nothing else changes.
        layers: module names and/or types (``nn.Linear`` or ``"type:Linear"``); ``DEFAULT_TYPES`` is a good start.
        batch_axis: the batch axis of modules that do not declare their layout.
        batch_axes: the batch axis by module name, for the module and its submodules.
        transform: applied to each capture inside the hook (batch axis already first); a dict applies per name.
        clone: copy kept outputs (default: when kept untransformed, or when they require grad).
        keys: capture keys (``name``, ``name@1``, ...) to keep; other calls of the hooked modules are skipped.
    """

    def __init__(self, model: nn.Module, layers: LayerSpec | Sequence[LayerSpec], *, batch_axis: int = 0,
                 batch_axes: Mapping[str, int] | None = None,
                 transform: Transform | Mapping[str, Transform] | None = None, clone: bool | None = None,
                 keys: Sequence[str] | None = None):
        self.model = model
        self.layers = select_layers(model, layers)
        modules = _named_modules(model)
        params = {name for name, _ in model.named_parameters(remove_duplicate=False)}
        declared = {_resolve_name(name, modules, params): axis for name, axis in (batch_axes or {}).items()}
        axes = batch_axes_of(model, batch_axis, declared)
        self.batch_axes = {name: axes[name] for name in self.layers}
        self._transforms = self._per_layer(transform)
        self.clone = clone
        self.keys = None if keys is None else set(keys)
        if self.keys is not None and (stray := sorted(k for k in self.keys if module_of(k) not in self.layers)):
            raise UserError(f"capture keys {stray} are not calls of the captured layers {self.names}")
        self._records: list[_Record] = []
        self._calls: Counter[str] = Counter()  # per hooked module, since the last pop
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._holds_fast_path = False

    def _per_layer(self, transform: Transform | Mapping[str, Transform] | None) -> dict[str, Transform | None]:
        if not isinstance(transform, Mapping):
            return {name: transform for name in self.layers}
        resolved = {select_layers(self.model, name).popitem()[0]: fn for name, fn in transform.items()}
        unknown = set(resolved) - set(self.layers)
        if unknown:
            raise UserError(f"transform for {sorted(unknown)}, which are not captured layers")
        return {name: resolved.get(name) for name in self.layers}

    @property
    def names(self) -> list[str]:
        """The hooked modules' names (registration order; captures come in execution order)."""
        return list(self.layers)

    # --- hooks -------------------------------------------------------------------------------------------------

    def open(self) -> FeatureCapture:
        """Register the hooks (idempotent) and switch off transformer fast paths that would bypass them."""
        if self._handles:
            return self
        for name, module in self.layers.items():
            self._handles.append(module.register_forward_hook(self._hook(name)))
        if any(isinstance(m, (nn.TransformerEncoderLayer, nn.TransformerEncoder)) for m in self.model.modules()):
            FAST_PATH.hold()
            self._holds_fast_path = True
        return self

    def close(self) -> None:
        """Remove the hooks, give back the fast-path switch, drop unread captures."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._records.clear()
        self._calls.clear()
        if self._holds_fast_path:
            FAST_PATH.release()
            self._holds_fast_path = False

    def __enter__(self) -> FeatureCapture:
        return self.open()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _hook(self, name: str) -> Callable[[nn.Module, Any, Any], None]:
        axis, transform, records, calls = self.batch_axes[name], self._transforms[name], self._records, self._calls

        def hook(module: nn.Module, args: Any, output: Any) -> None:
            key = capture_key(name, calls[name])
            calls[name] += 1
            if self.keys is not None and key not in self.keys:
                return
            tensor, batch_first = _primary_tensor(output, name)
            if axis and not batch_first:
                if not -tensor.dim() <= axis < tensor.dim():
                    raise UserError(f"layer {name!r}: batch axis {axis} declared, but its output has shape "
                                    f"{tuple(tensor.shape)}")
                tensor = tensor.movedim(axis, 0)
            if self.clone if self.clone is not None else (transform is None or tensor.requires_grad):
                tensor = tensor.clone(memory_format=torch.contiguous_format)
            value = tensor if transform is None else transform(tensor)
            records.append(_Record(key, value, value._version if isinstance(value, Tensor) else None))

        return hook

    # --- results -----------------------------------------------------------------------------------------------

    def pop(self, strict: bool = False) -> dict[str, Any]:
        """The captures since the last ``pop``, in execution order, and forget them.

        ``strict``: raise a UserError if a hooked layer did not run (a branch not taken, a fast path).
        """
        records, self._records[:] = list(self._records), []
        calls = Counter(self._calls)
        self._calls.clear()  # in place: the hooks hold this counter
        captures: dict[str, Any] = {}
        for record in records:
            if record.version is not None and record.value._version != record.version:
                raise UserError(f"the capture of layer {module_of(record.key)!r} was changed in place after its "
                                f"forward (e.g. by ReLU(inplace=True)); capture with clone=True")
            captures[record.key] = record.value
        if strict and (silent := [name for name in self.layers if name not in calls]):
            raise UserError(f"layers {silent} did not run in this forward pass")
        return captures


def probe(model: nn.Module, layers: LayerSpec | Sequence[LayerSpec], *inputs: Any, **capture_options: Any
          ) -> dict[str, tuple[int, ...]]:
    """Capture keys in execution order with each capture's shape (batch first), from one forward under no_grad.

    Use it to list a model's layers before training, e.g. to build a layer map (and drop the logits layer).

    Args:
        model: the network.
        layers: module names and/or types, as for ``FeatureCapture``.
        *inputs: the forward's arguments (a sample batch).
        **capture_options: further ``FeatureCapture`` options (``batch_axes``, ...).

    Returns:
        ``{capture key: shape}`` in execution order.

    Raises:
        UserError: a layer name that is not in the model, or a layer output that is not a tensor.
    """
    capture_options.setdefault("transform", lambda tensor: tuple(tensor.shape))
    with torch.no_grad(), FeatureCapture(model, layers, **capture_options) as capture:
        model(*inputs)
        return capture.pop()
