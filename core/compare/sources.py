"""Where a stage's trained model comes from: one config section and one loader for every stage that reads models
(compare, stitch, align).

A model source is a config section of one of two forms::

    model_a:                      # a run directory of any stage
      run: checkpoints/shapes_base            # base run: its model.safetensors (checkpoint: last for last.safetensors)
      # run: configs/my_base.yaml             # a base config: its run directory, trained first when missing
      # run: checkpoints/shapes_ablate        # ablate run: its base run's model with the mask applied (pruned)
      # run: checkpoints/shapes_transfer/subnet   # transfer or guide sub-run: the model it trained

    model_b:                      # a registered architecture and, optionally, a local weights file
      name: tiny10                            # any name of the model registry
      weights: tests/fixtures/drfrankenstein/Tiny10/CIFAR10/in0-gn0/110000.pt   # .pt/.pth state dict or .safetensors
      # width: 2                              # the builder's options, as in a model section (resnet20: width)

Without ``weights`` the registered architecture is freshly initialised from the run's seed (a random network to
compare against). A registered architecture is sized by the run's data (``info``); a run directory's model keeps
the data facts it was built for, and these must match the run's data.

Use from a stage::

    from .sources import ModelSource, load_model_source

    class Config(RunConfig):
        model_a: ModelSource
        ...

    loaded = load_model_source(cfg.model_a, data.info, key="model_a")
    loaded.model        # nn.Module on the CPU, in eval mode, every parameter frozen (requires_grad False)
    loaded.label        # a short description for tables and plots ("tiny10 <- .../110000.pt")

Everything is checked before a run directory exists when ``load_model_source`` is called from the stage's
``prepare``: a missing path, an unfinished run, a run directory that holds no model, a weights file that is not
readable or does not match the architecture (one line naming the first mismatching key), data the model was not
built for. Weights files load with ``torch.load(..., map_location="cpu", weights_only=True)`` or safetensors:
nothing is unpickled beyond tensors and plain containers.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Optional

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from ..dataset_info import DatasetInfo
from ..errors import UserError, under_key
from ..models import LoadedModel, check_finite_weights, load_model
from ..registry import MODELS


class ModelSource(BaseModel):
    """``{run: DIR}`` or ``{name: REGISTERED, weights: FILE, <builder option>: value, ...}``; see the module docs."""

    model_config = ConfigDict(extra="allow")
    run: Optional[str] = Field(None, description="a run directory: base, ablate (mask applied), transfer or guide "
                                                 "sub-run; or a base config (trained first when missing)")
    checkpoint: str = Field("model", description="run: which saved model (model: the selected one; last)")
    name: Optional[str] = Field(None, description="a registered model name (with weights: a local weights file)")
    weights: Optional[str] = Field(None, description="name: a local .pt/.pth state dict or .safetensors file; "
                                                     "omitted: fresh initialisation")

    @model_validator(mode="after")
    def _one_form(self):
        extra = dict(self.model_extra or {})
        if (self.run is None) == (self.name is None):
            raise ValueError("give either run (a run directory) or name (a registered model, with weights)")
        if self.run is not None:
            if self.weights is not None or extra:
                stray = "weights" if self.weights is not None else sorted(extra)[0]
                raise ValueError(f"{stray!r} does not go with run: the run directory records its model")
            return self
        try:
            self.__pydantic_extra__ = MODELS.validate(self.name, extra)
        except UserError as err:  # an unknown name
            raise ValueError(str(err)) from None
        return self

    @property
    def params(self) -> dict[str, Any]:
        """The builder options of a registered model."""
        return dict(self.model_extra or {})


def load_model_source(source: ModelSource | dict[str, Any], data_info: Optional[DatasetInfo], *, key: str = "model",
                      freeze: bool = True, check_data: bool = True) -> LoadedModel:
    """The model a source names, checked against the data it will see.

    Args:
        source: a ``ModelSource`` (or its dict form, validated here).
        data_info: the run's ``DataBundle.info`` (or a mapping of its names): sizes a registered architecture; a
            run's model must match it (None only to inspect a run directory's model, with ``check_data`` off).
        key: the config key of the source, for error messages ("model_a").
        freeze: eval mode and ``requires_grad_(False)`` (both models of a comparison or a stitch are frozen).
        check_data: check that a run directory's model was built for ``data_info`` (off only to inspect a model).

    Returns:
        A ``LoadedModel`` (model on the CPU, label, kind, model config, data facts).

    Raises:
        UserError: an invalid source, a missing or unfinished run directory, a run directory holding no model, an
        unreadable weights file or one that does not match the architecture (naming the first mismatching key),
        data other than the model was built for.
    """
    if isinstance(source, dict):
        source = _validated(source, key)
    if data_info is not None:
        data_info = DatasetInfo.of(data_info)
    if source.run is not None:
        loaded = _from_run(Path(source.run), source.checkpoint, data_info if check_data else None, key)
    else:
        loaded = _from_registry(source, data_info, key)
    if freeze:
        loaded.model.eval().requires_grad_(False)
    return loaded


def _validated(raw: dict[str, Any], key: str) -> ModelSource:
    from pydantic import ValidationError

    from ..registry import describe_error

    try:
        return ModelSource.model_validate(raw)
    except ValidationError as err:
        raise UserError(describe_error(err, ModelSource, prefix=key)) from None


# ----------------------------------------------------------------------------------------------------- run dirs

def _from_run(path: Path, checkpoint: str, data_info: Optional[DatasetInfo], key: str) -> LoadedModel:
    from ..subnetworks.masks import META_FILE, base_run_of, load_mask
    from ..run import is_finished
    from ..stages.compatibility import check_data_fits

    if path.suffix in (".yaml", ".yml"):  # a base config: its run directory, trained first when missing
        from ..stages.upstream import resolve_upstream

        path = Path(resolve_upstream(str(path), "base", f"{key}.run"))
    if not path.is_dir():
        raise UserError(f"{key}.run: {path} is not a directory")
    if not is_finished(path):
        raise UserError(f"{key}.run: {path} is not a finished run (no summary.json marking it finished)")
    if (path / META_FILE).is_file():  # an ablate run: the base model with its subnetwork mask applied
        base_dir = base_run_of(path)
        loaded = load_model(base_dir, checkpoint)
        apply_masks(loaded.model, load_mask(path, loaded.model))
        kind, label = "ablate", f"{path.name} (mask on {Path(base_dir).name})"
    elif (path / f"{checkpoint}.json").is_file():
        loaded = load_model(path, checkpoint)
        kind, label = ("base" if _stage_of(path) == "base" else "run"), path.name
    else:
        holding = sorted(p.name for p in path.iterdir() if (p / f"{checkpoint}.json").is_file())
        hint = f"; its sub-runs with a model: {', '.join(holding)}" if holding else ""
        raise UserError(f"{key}.run: {path} holds no model ({checkpoint}.json) and no mask ({META_FILE}){hint}")
    if data_info is not None:
        check_data_fits(loaded.info, data_info, f"the model of {path}", key=f"{key} (data)")
    return dataclasses.replace(loaded, label=label, kind=kind)


def _stage_of(path: Path) -> Optional[str]:
    config = path / "config.yaml"
    if not config.is_file():
        return None
    import yaml

    try:
        return (yaml.safe_load(config.read_text()) or {}).get("stage")
    except yaml.YAMLError:
        return None


@torch.no_grad()
def apply_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    """Zero every weight entry a mask leaves out (True = kept), in place: the discovered subnetwork alone."""
    params = dict(model.named_parameters())
    for name, mask in masks.items():
        params[name].mul_(mask.to(params[name].device, params[name].dtype))


# ----------------------------------------------------------------------------------------------------- registry

def _from_registry(source: ModelSource, data_info: DatasetInfo, key: str) -> LoadedModel:
    with under_key(key):
        model = MODELS.build(source.name, data_info, source.params)
    model_cfg = {"name": source.name, **source.params}
    if source.weights is None:
        return LoadedModel(model, f"{source.name} (fresh)", "fresh", model_cfg, data_info)
    load_weights_file(model, source.weights, label=source.name, key=f"{key}.weights")
    return LoadedModel(model, f"{source.name} <- {_short(source.weights)}", "weights", model_cfg, data_info)


def _short(path: str, parts: int = 3) -> str:
    return "/".join(Path(path).parts[-parts:])


def read_state_dict(path: str | Path, key: str = "weights") -> dict[str, torch.Tensor]:
    """The tensors of a weights file: a ``.safetensors`` file, or a ``torch.save``d state dict (loaded with
    ``weights_only=True``; a checkpoint dict holding it under ``state_dict`` or ``model`` is unwrapped, and a
    ``module.`` prefix of DataParallel/DDP is dropped).

    Raises:
        UserError: a missing, unreadable or truncated file, or one that holds no tensors.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{key}: {path} not found")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated, foreign, or a pickle naming more than tensors: refused, never run
        reason = (str(err).splitlines() or [""])[0][:160]
        raise UserError(f"{key}: cannot read {path} as weights ({err.__class__.__name__}: {reason})") from None
    for wrapper in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{key}: {path} holds no state dict of tensors")
    if all(k.startswith("module.") for k in state):
        state = {k.removeprefix("module."): v for k, v in state.items()}
    return state


def first_mismatch(model: nn.Module, state: dict[str, torch.Tensor]) -> Optional[str]:
    """The first key (in the model's order, then the file's) on which ``state`` does not fit ``model``; None if all
    fit."""
    own = model.state_dict()
    for name, tensor in own.items():
        if name not in state:
            return f"{name!r} is missing from the file"
        if tuple(state[name].shape) != tuple(tensor.shape):
            return f"{name!r} has shape {tuple(state[name].shape)} in the file, {tuple(tensor.shape)} in the model"
    for name in state:
        if name not in own:
            return f"{name!r} in the file is not in the model"
    return None


def load_weights_file(model: nn.Module, path: str | Path, *, label: str = "model", key: str = "weights") -> nn.Module:
    """Load a weights file into ``model`` strictly (every key, every shape).

    Args:
        model: the architecture, built for the data.
        path: a ``.safetensors`` file or a ``torch.save``d state dict (see ``read_state_dict``).
        label: the architecture's name, for the error message.
        key: the config key that named the file.

    Returns:
        ``model``, with the file's weights.

    Raises:
        UserError: an unreadable file (``read_state_dict``), or one whose keys or shapes differ from the model's:
        one line naming the first mismatching key.
    """
    state = read_state_dict(path, key)
    mismatch = first_mismatch(model, state)
    if mismatch is not None:
        raise UserError(f"{key}: {path} does not match model {label}: first mismatching key {mismatch}")
    model.load_state_dict({k: v.to(model.state_dict()[k].dtype) for k, v in state.items()})
    check_finite_weights(model, f"{key}: {path}")
    return model


def guess_architecture(state: dict[str, torch.Tensor], info: DatasetInfo) -> Optional[dict[str, Any]]:
    """The zoo model config (``{"name": ..., <options>}``) whose state dict ``state`` fits exactly, sized for
    ``info``; None if none does. Used by ``python -m instill.layers`` on a bare weights file."""
    candidates: list[dict[str, Any]] = [{"name": "tiny10"}, {"name": "nbn_tiny10"}, {"name": "lenet"}]
    stem = state.get("conv1.weight")
    if stem is not None and stem.dim() == 4 and stem.shape[0] % 16 == 0:
        candidates.append({"name": "resnet20", "width": stem.shape[0] // 16})
    for candidate in candidates:
        try:
            model = MODELS.build(candidate["name"], info, {k: v for k, v in candidate.items() if k != "name"})
        except UserError:
            continue
        if first_mismatch(model, state) is None:
            return candidate
    return None


def describe(loaded: LoadedModel) -> dict[str, Any]:
    """A JSON-ready record of a loaded model for a run's summary."""
    return {"label": loaded.label, "kind": loaded.kind, "model": json.loads(json.dumps(loaded.model_cfg,
                                                                                    default=str))}
