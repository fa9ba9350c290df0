"""Masks that NeuroSurgeon 0.1.0 found, imported as instill mask artifacts.

A NeuroSurgeon ``CircuitModel`` state dict (``wrapped_model.*`` keys, or the research code's ``root_model.*``) holds
mask logits per weight; ``import_neurosurgeon`` turns them into hard masks of the base model and writes
``mask.safetensors`` + ``mask.json`` like a mask this package found::

    instill import-neurosurgeon best_circuit_model.pt --base checkpoints/<base run> --out DIR
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import torch
from torch import nn

from ..errors import UserError, exit_code_of
from .masks import MaskConfig, check_known, listing, make_method, save_mask
from ..files import atomic_write_json

NEUROSURGEON_PREFIXES = ("wrapped_model.", "root_model.")
_NEUROSURGEON_SUFFIXES = {"weight_mask_params": "weight", "bias_mask_params": "bias"}
NEUROSURGEON_METHODS = ("continuous_sparsification", "hard_concrete")  # the NeuroSurgeon methods with logits


def read_neurosurgeon_state(path: str | Path) -> dict[str, torch.Tensor]:
    """A NeuroSurgeon ``CircuitModel`` state dict from a ``torch.save`` file (tensors only: no code is unpickled)."""
    import pickle

    if os.path.lexists(path) and not Path(path).is_file():  # a FIFO would block the reader forever
        raise UserError(f"{path}: cannot read a NeuroSurgeon state dict (not a regular file)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"{path}: NeuroSurgeon state dict not found") from None
    except (OSError, RuntimeError, pickle.UnpicklingError, EOFError, ValueError) as err:
        raise UserError(f"{path}: cannot read a NeuroSurgeon state dict ({err.__class__.__name__})") from None
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path}: not a state dict (a mapping of names to tensors)")
    return dict(state)


def neurosurgeon_logits(state: Mapping[str, torch.Tensor] | str | Path) -> dict[str, torch.Tensor]:
    """Mask logits from a NeuroSurgeon ``CircuitModel`` state dict (or a file holding one), by parameter name.

    Accepts upstream keys (``wrapped_model.<module>.weight_mask_params``) and the research code's legacy keys
    (``root_model.*``). Sampled-mask caches and base weights are ignored.
    """
    if isinstance(state, (str, Path)):
        state = read_neurosurgeon_state(state)
    logits = {}
    for key, value in state.items():
        module, leaf = _neurosurgeon_name(key)
        if leaf in _NEUROSURGEON_SUFFIXES:
            logits[f"{module}.{_NEUROSURGEON_SUFFIXES[leaf]}" if module else _NEUROSURGEON_SUFFIXES[leaf]] = value
    if not logits:
        raise UserError("NeuroSurgeon state dict holds no *_mask_params tensors (is it a CircuitModel's?)")
    return logits


def _neurosurgeon_name(key: str) -> tuple[str, str]:
    """(module name in the wrapped model, leaf) of a CircuitModel state-dict key."""
    prefix = next((p for p in NEUROSURGEON_PREFIXES if key.startswith(p)), "")
    module, _, leaf = key[len(prefix):].rpartition(".")
    return module, leaf


def neurosurgeon_masks(state: Mapping[str, torch.Tensor], model: nn.Module,
                       method: str = "continuous_sparsification", source: str = "NeuroSurgeon state dict"
                       ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(bool masks in each parameter's shape, the layer selection that names them) from a CircuitModel state dict.

    The hard masks are NeuroSurgeon's evaluation masks: logits > 0 (continuous sparsification) or a stretched
    sigmoid > 0.5 (hard concrete, default stretch), which are ours. A logit tensor may differ from its parameter in
    one dimension of size 1 (a neuron mask), and is repeated along it as NeuroSurgeon does. For ``Conv1d``/
    ``Conv2d`` that dimension is the input channels, so NeuroSurgeon's conv "neuron" masks hold one logit per
    output channel and kernel position (``(out, 1, kh, kw)``), finer than ours (``(out, 1, 1, 1)``); as hard masks
    they import exactly. Base weights in the state dict must equal ``model``'s.
    """
    if method not in NEUROSURGEON_METHODS:
        raise UserError(f"{source}: method {method!r} cannot be imported; use one of {', '.join(NEUROSURGEON_METHODS)}")
    logits = neurosurgeon_logits(state)
    params = dict(model.named_parameters())
    check_known(logits, params, source)
    bad = [f"{name} {tuple(x.shape)} vs {tuple(params[name].shape)}" for name, x in logits.items()
           if not _neurosurgeon_shape(x.shape, params[name].shape)]
    if bad:
        raise UserError(f"{source}: mask logits that do not fit their parameter: {listing(bad)}")
    rule = make_method(MaskConfig(layers=("*",), method=method))
    masks = {name: rule.hard(x.float(), params[name]).expand(params[name].shape).contiguous()
             for name, x in logits.items()}
    stored = {name: _stored_weight(state, name) for name in params}
    differ = [name for name, param in params.items() if stored[name] is not None
              and not torch.equal(stored[name].to(param.dtype), param.detach().cpu())]
    if differ:
        raise UserError(f"{source}: its base weights differ from the base model's: {listing(differ)}")
    order = {name: i for i, name in enumerate(params)}
    names = sorted(masks, key=order.__getitem__)
    units = {"weight" if tuple(logits[n].shape) == tuple(params[n].shape) else "neuron" for n in names
             if n.endswith("weight")}
    selection = {"layers": list(dict.fromkeys(n.rpartition(".")[0] for n in names)),
                 "mask_bias": any(n.endswith(".bias") for n in names), "unit": "/".join(sorted(units)),
                 "method": method}
    return {name: masks[name] for name in names}, selection


def _neurosurgeon_shape(logits: Sequence[int], param: Sequence[int]) -> bool:
    """NeuroSurgeon's rule: the same shape, or one dimension of size 1 where the parameter's is larger."""
    differ = [(a, b) for a, b in zip(logits, param) if a != b]
    return len(logits) == len(param) and (not differ or (len(differ) == 1 and differ[0][0] == 1))


def _stored_weight(state: Mapping[str, torch.Tensor], name: str) -> Optional[torch.Tensor]:
    return next((state[p + name] for p in NEUROSURGEON_PREFIXES if p + name in state), None)


def import_neurosurgeon(state_dict: str | Path, base: str | Path, out: str | Path,
                        method: str = "continuous_sparsification") -> dict[str, Any]:
    """Convert a NeuroSurgeon ``CircuitModel`` state dict over the model of run ``base`` into a mask directory.

    ``out`` gets ``mask.safetensors``, ``mask.json`` (with the base weights' hash and ``base_run``) and a
    ``summary.json``, so the transfer stage takes it as ``transfer.mask``. Nothing is written unless every check
    passes; ``out`` must be new (or an empty directory): an existing run or folder is never written into.
    """
    from ..models import load_model
    from ..run import is_finished

    out = Path(out)
    if os.path.lexists(out) and not (out.is_dir() and not any(out.iterdir())):  # never into a run or a user's folder
        raise UserError(f"--out {out} already exists and is not an empty directory (a finished run is never "
                        "rewritten): choose a new --out")
    if not is_finished(base):
        raise UserError(f"--base: {base} is not a finished run directory")
    model = load_model(base).model
    masks, selection = neurosurgeon_masks(read_neurosurgeon_state(state_dict), model, method, source=str(state_dict))
    meta = save_mask(out, masks, model, method=method, hyperparameters=selection, base_run=base,
                     extra={"source": "NeuroSurgeon", "state_dict": str(state_dict)})
    atomic_write_json(out / "summary.json", {"status": "finished", "stage": "import-neurosurgeon",
                                             "density": meta["density"], "kept": meta["kept"], "total": meta["total"]})
    return meta


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``instill import-neurosurgeon STATE_DICT --base RUN_DIR --out DIR [--method ...]``."""
    import argparse

    parser = argparse.ArgumentParser(prog="instill import-neurosurgeon", description="a NeuroSurgeon CircuitModel "
                                     "state dict (a .pt file with wrapped_model.* or legacy root_model.* keys) into "
                                     "mask.safetensors + mask.json")
    parser.add_argument("state_dict", help="the torch.save file of CircuitModel.state_dict()")
    parser.add_argument("--base", required=True, help="run directory of the base model the masks were found on")
    parser.add_argument("--out", required=True, help="directory to write the mask into")
    parser.add_argument("--method", choices=NEUROSURGEON_METHODS, default="continuous_sparsification",
                        help="the NeuroSurgeon mask method (it decides how logits become the hard mask)")
    args = parser.parse_args(argv)
    return exit_code_of(lambda: _import_command(args))


def _import_command(args) -> int:
    meta = import_neurosurgeon(args.state_dict, args.base, args.out, args.method)
    print(f"{args.out}: {len(meta['layers'])} masks, density {meta['density']:.4f} (of {meta['total']} weights)")
    return 0
