"""The ``ablate`` stage: discover the subnetwork of a trained model that performs a subtask.

The base model (named by ``base``: a run directory, or a base config that runs first when its output is missing)
is frozen; mask logits over the selected weights train on the subtask data (``data``) with the task loss plus
``l0_lambda`` times the L0 term, while the temperature anneals to ``final_temp``. Each evaluation uses the hard
mask and logs the subtask accuracy, the density per layer and overall, the mean logit and the temperature. The
mask of the best evaluation is kept: by default the last epoch reaching the best accuracy, as the original did
(usually the sparsest; ``train.select_ties: first`` keeps the first). The model is the base run's: a ``model:``
section is an error.

Writes ``mask.safetensors`` + ``mask.json`` (``instill.subnetworks.masks``), ``mask_density.png``, metrics and
``summary.json``.
Raises UserError when the data do not fit the base model or the layer selection matches no weight.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field

from ..config import Ties, TrainConfig
from ..errors import under_key
from .masks import MaskConfig, MaskedModel, mask_density
from ..models import load_model
from ..report import plot_bars, plot_run
from ..stages.compatibility import UsesBaseModel, check_compatible
from ..stages.runner import Context
from ..stages.task import LossScope, evaluate_task, make_loss, summary_metrics
from ..stages.upstream import resolve_upstream
from ..train import Objective, fit

MaskConfig.__pydantic_config__ = {"extra": "forbid"}  # the library dataclass doubles as the config section


class AblateTrainConfig(TrainConfig):
    select_ties: Ties = Field(
        "last", description="on a tie of the selection metric: last (the original's >=, usually the sparsest mask) "
                            "or first")


class Config(UsesBaseModel):
    base: str = Field(description="the trained base model: a run directory, or the base stage's config file")
    mask: MaskConfig
    loss_scope: LossScope = "answer"
    train: AblateTrainConfig = Field(default_factory=AblateTrainConfig)


def prepare(cfg: Config) -> None:
    cfg.base = resolve_upstream(cfg.base, "base", "base")
    load_model(cfg.base)  # an unreadable or mismatched checkpoint stops here, before the run directory exists


def main(ctx: Context) -> dict[str, Any]:
    cfg = ctx.cfg
    data = ctx.build_data()
    loaded = load_model(cfg.base)
    base, base_info = loaded.model, loaded.info
    check_compatible(base, base_info, data.info)
    with under_key("mask"):
        masked = MaskedModel(base, cfg.mask).to(ctx.device)
    eval_batch = cfg.train.eval_batch_size
    task_loss = make_loss(cfg.loss_scope)

    def loss(model, batch):
        value, logs = task_loss(model, batch)
        penalty = masked.penalty()
        return value + penalty, {**logs, "l0_penalty": penalty.item()}

    def evaluate(model):
        return {**evaluate_task(model, {"val": data.val}, data.info, eval_batch, ctx.device), **mask_stats(masked)}

    if masked.method.trainable:
        objective = Objective(loss, evaluate, on_epoch_start=lambda e: masked.set_epoch(e, cfg.train.epochs))
        best = fit(masked, objective, data.train, cfg.train, ctx.run, seed=ctx.seed, device=ctx.device,
                   params=masked.logits.parameters()).best
    else:  # magnitude masks: nothing trains, one evaluation
        best = {"epoch": 0, "step": 0, **evaluate(masked)}
        ctx.run.log_metrics(best)
    final = evaluate_task(masked, data.eval_sets(), data.info, eval_batch, ctx.device)
    meta = masked.save(ctx.run.path, base_run=cfg.base, epoch=best.get("epoch"),
                       val_acc=final.get("val_acc")) if ctx.run.writes else mask_density(masked.hard_masks())
    if ctx.run.writes:  # one rank plots and prints
        plot_run(ctx.run.path)
        densities = {name: layer["density"] for name, layer in meta["layers"].items()}
        plot_bars(ctx.run.path / "mask_density.png", densities,
                  title=f"mask density per layer (overall {meta['density']:.3f})", ylabel="kept fraction")
        print(f"mask: density {meta['density']:.4f} | " + " | ".join(f"{k} {v:.4f}" for k, v in final.items()
                                                                  if k.endswith("_acc")))
    return {"steps": best.get("step"), "best_epoch": best.get("epoch"), "density": meta["density"],
            "kept": meta["kept"], "total": meta["total"], **summary_metrics(final)}


def mask_stats(masked: MaskedModel) -> dict[str, float]:
    """Hard-mask density per layer and overall, and the mean mask logit."""
    density = mask_density(masked.hard_masks())
    stats = {"density": density["density"]}
    stats.update({f"density/{name}": layer["density"] for name, layer in density["layers"].items()})
    if len(masked.logits):
        with torch.no_grad():
            stats["mean_logit"] = float(torch.cat([p.reshape(-1) for p in masked.logits]).mean())
    return stats

