"""Model registry entries live in submodules; ``instill.registry.MODELS`` holds them.

A model builder is ``build(info, *, key=default, ...)`` where ``info`` is the dataset's ``DatasetInfo``
(``info.input_shape``, ``info.num_classes``, ``info.vocab_size``, ...) and the keyword-only parameters are the
config's keys.

A trained model is stored as ``<name>.safetensors`` plus ``<name>.json`` (the model config and the data facts it
was built for), so a later stage rebuilds the very architecture without rebuilding the data.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from ..dataset_info import DatasetInfo
from ..errors import UserError


@dataclass
class LoadedModel:
    """A trained or registered model with what rebuilds it: the one bundle ``load_model`` and the model sources of
    compare and stitch (``instill.compare.sources``) return."""

    model: torch.nn.Module
    label: str  # for tables and plots
    kind: str  # base | ablate | run | weights | fresh
    model_cfg: dict[str, Any] = field(default_factory=dict)  # {name: ..., <builder options>}: rebuilds the architecture
    info: Optional[DatasetInfo] = None  # what the data the model was built for provide


def save_model(run, name: str, model: torch.nn.Module, model_cfg: dict[str, Any], info: DatasetInfo) -> None:
    """``<name>.safetensors`` and its ``<name>.json`` sidecar in the run directory."""
    run.save_weights(name, model, metadata={"model": model_cfg["name"]})
    run.write_json(f"{name}.json", {"model": model_cfg, "info": info.to_dict()})


def build_fresh(model_cfg: dict[str, Any], info: DatasetInfo) -> torch.nn.Module:
    """The architecture a saved model config describes, freshly initialised. A pretrained request is dropped: the
    weights come from the run directory, or are meant to be fresh (a random initialisation to compare against)."""
    from ..registry import MODELS

    params = {k: v for k, v in model_cfg.items() if k != "name"}
    if params.get("pretrained"):
        params["pretrained"] = False
    return MODELS.build(model_cfg["name"], info, params)


def load_model(run_dir: str | Path, name: str = "model") -> LoadedModel:
    """The model with its trained weights, its model config and data facts, from a run directory written by
    ``save_model`` (``kind`` ``run``, labelled by the directory's name)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_model as load_weights

    from ..files import read_regular_bytes

    run_dir = Path(run_dir)
    sidecar, weights = run_dir / f"{name}.json", run_dir / f"{name}.safetensors"
    for path in (sidecar, weights):
        if not path.exists():
            raise UserError(f"{path} not found: {run_dir} holds no trained model named {name!r}")
        if not path.is_file():  # a FIFO would block the reader forever
            raise UserError(f"{path} is not a regular file: {run_dir} holds no readable model named {name!r}")
    try:
        meta = json.loads(read_regular_bytes(sidecar))
        model_cfg, info = dict(meta["model"]), DatasetInfo.from_dict(meta["info"])
    except UserError as err:
        raise UserError(f"{sidecar}: unreadable model description ({err})") from None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise UserError(f"{sidecar}: unreadable model description") from None
    model = build_fresh(model_cfg, info)
    try:
        load_weights(model, str(weights))
    except SafetensorError as err:  # empty, truncated, or not a safetensors file at all
        raise UserError(f"{weights} is not a readable safetensors file ({_first_detail(err)}); the run that wrote "
                        "it may have been cut off, or the file replaced") from None
    except (RuntimeError, OSError, ValueError) as err:
        raise UserError(f"{weights} does not match model {model_cfg['name']!r}: {_first_detail(err)}") from None
    check_finite_weights(model, str(weights))
    return LoadedModel(model, run_dir.name, "run", model_cfg, info)


def holds_non_finite(tensor: torch.Tensor) -> bool:
    """Whether a floating-point tensor holds NaN or inf. A NaN or inf entry makes the sum NaN or inf, so a finite
    sum settles it in one reduction (``isfinite(t).all()`` makes four passes: 13% of a comparison's time); only a
    sum that overflows is checked entry by entry."""
    if not tensor.is_floating_point():
        return False
    with torch.no_grad():
        return not bool(torch.isfinite(tensor.sum())) and not bool(torch.isfinite(tensor).all())


def check_finite_weights(model: torch.nn.Module, what: str) -> None:
    """Refuse a model whose weights hold NaN or inf (a diverged run, a damaged file): every figure computed from it
    would be NaN, or fail deep inside a solver (eigh) with a message that blames something else.

    Raises:
        UserError: naming ``what`` (the model's file or source) and the first non-finite tensor.
    """
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if holds_non_finite(tensor):
            raise UserError(f"{what}: weight {name!r} holds NaN or inf: the model is unusable (did its training "
                            "diverge?)")


def check_finite_output(tensor: torch.Tensor, layer: str, what: str) -> None:
    """Refuse a captured activation holding NaN or inf (finite weights, so the input data or an overflow)."""
    if holds_non_finite(tensor):
        raise UserError(f"{what}: the output of layer {layer!r} holds NaN or inf on this data (its weights are "
                        "finite: check the input data)")


def _first_detail(err: Exception, limit: int = 300) -> str:
    """The headline and the first detail of a load error ("Error(s) in loading state_dict for FCN:" says nothing
    about what differs), on one line."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()] or [type(err).__name__]
    text = " ".join(lines[:2])
    return text if len(text) <= limit else text[: limit - 3] + "..."
