"""The ``ablate`` stage: discover the subnetwork of a trained model that performs a subtask.

The base model (named by ``base``: a run directory, or a base config that runs first when its output is missing)
is frozen; mask logits over the selected weights train on the subtask data (``data``) with the task loss plus
``l0_lambda`` times the L0 term, while the temperature anneals to ``final_temp``. Each evaluation uses the hard
mask and logs the subtask accuracy, the density per layer and overall, the mean logit and the temperature. The
mask of the best evaluation is kept: by default the last epoch reaching the best accuracy, as the original did
(usually the sparsest; ``train.select_ties: first`` keeps the first). The model is the base run's: a ``model:``
section is an error.

At the end the found mask is tested causally (``ablations``, on by default; ``instill.subnetworks.ablations``): the
base model is scored on the subtask's test split and on the base task's (the base run's own data and seed, from its
``config.yaml``) with only the subnetwork kept, with it removed (``zero_ablate``) or randomised (``random_ablate``),
and with a random set of the same size per layer removed (``randomly_sampled``, ``complement_sampled``), the random
modes ``ablations.draws`` times. ``complement_sampled`` is skipped, with a note in the summary, when the mask keeps
more than half of some layer.

Writes ``mask.safetensors`` + ``mask.json`` (``instill.subnetworks.masks``), ``mask_density.png``, metrics,
``ablations.csv`` (one row per mode and draw), ``ablations.png`` and ``summary.json`` (``ablations``: mean, standard
deviation, minimum, maximum and every draw's value per mode and score).
Raises UserError when the data do not fit the base model, the layer selection matches no weight, or
``ablations.base_task: true`` and the base run records no data (no ``config.yaml``; by default the base task is then
skipped with a note), before the run directory exists.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional

import torch
from pydantic import Field, conlist, field_validator

from ..config import RunConfig, Section, Ties, TrainConfig, read_yaml
from ..errors import UserError, under_key
from ..files import atomic_write_csv
from .ablations import MODES, check_complement, check_modes, initialiser, run_ablations, unit_masks
from .masks import MaskConfig, MaskedModel, mask_density, select_targets
from ..models import load_model
from ..plots import format_table, plot_bars, plot_run
from ..seeds import derive_seed
from ..stages.compatibility import UsesBaseModel, check_compatible
from ..stages.runner import Context, build_data, load_stage_config
from ..stages.task import LossScope, evaluate_task, make_loss, summary_metrics
from ..stages.upstream import resolve_upstream
from ..train import Objective, evaluate_classification, fit

MaskConfig.__pydantic_config__ = {"extra": "forbid"}  # the library dataclass doubles as the config section


class AblateTrainConfig(TrainConfig):
    select_ties: Ties = Field(
        "last", description="on a tie of the selection metric: last (the original's >=, usually the sparsest mask) "
                            "or first")


class AblationsSection(Section):
    enabled: bool = Field(True, description="test the found mask causally at the end (ablations.csv, ablations.png)")
    modes: conlist(str, min_length=1) = Field(
        default_factory=lambda: list(MODES),
        description="full_model, subnetwork, zero_ablate, random_ablate, randomly_sampled, complement_sampled "
                    "(NeuroSurgeon 0.1.0's ablation modes; instill.subnetworks.ablations)")
    draws: int = Field(5, ge=1, description="random draws of random_ablate, randomly_sampled and complement_sampled")
    split: Literal["val", "test"] = Field("test", description="the split of each data set that is scored")
    base_task: Optional[bool] = Field(
        None, description="also score the base task (the base run's data and seed, from its config.yaml): true, "
                          "false, or null: where the base run records them (an imported base may not)")

    @field_validator("modes")
    @classmethod
    def _known(cls, modes: list[str]) -> list[str]:
        try:
            check_modes(modes, 1)
        except UserError as err:
            raise ValueError(str(err)) from None
        return modes


class Config(UsesBaseModel):
    base: str = Field(description="the trained base model: a run directory, or the base stage's config file")
    mask: MaskConfig
    loss_scope: LossScope = "answer"
    train: AblateTrainConfig = Field(default_factory=AblateTrainConfig)
    ablations: AblationsSection = Field(default_factory=AblationsSection)


def prepare(cfg: Config) -> None:
    cfg.base = resolve_upstream(cfg.base, "base", "base")
    base = load_model(cfg.base).model  # an unreadable or mismatched checkpoint stops here, before the run directory
    if cfg.ablations.enabled:  # what the ablations could fail on, checked before anything trains
        if cfg.ablations.base_task is True:
            base_task_config(cfg.base)
        if "random_ablate" in cfg.ablations.modes:
            with under_key("mask"):
                targets = select_targets(base, cfg.mask.layers, cfg.mask.mask_bias)
            with under_key("ablations.modes"):
                for target in targets:
                    initialiser(base, target.name)


def base_task_config(base_run: str) -> RunConfig:
    """The base run's resolved config (its data section and seed): the base task the ablations also score."""
    path = Path(base_run) / "config.yaml"
    if not path.is_file():
        raise UserError(f"ablations.base_task: {path} not found, so the base task's data are unknown; set "
                        f"ablations.base_task: false (or null) to score the subtask only")
    with under_key("ablations.base_task"):
        return load_stage_config(path, str(read_yaml(path).get("stage") or "base"))


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
    summary = {"steps": best.get("step"), "best_epoch": best.get("epoch"), "density": meta["density"],
               "kept": meta["kept"], "total": meta["total"], **summary_metrics(final)}
    if cfg.ablations.enabled:
        summary["ablations"] = causal_ablations(ctx, base, base_info, masked.hard_masks(), data)
        summary.update({f"ablation/{mode}/{score}": figures["mean"]  # flat figures, for sweep tables
                        for mode, scores in summary["ablations"]["modes"].items()
                        for score, figures in scores.items() if score.endswith("_acc")})
    return summary


def causal_ablations(ctx: Context, base: torch.nn.Module, base_info, masks: dict[str, torch.Tensor], data
                     ) -> dict[str, Any]:
    """Score the base model under each ablation mode on the subtask (and base task) data; write ablations.csv and
    ablations.png; the summary's ``ablations`` entry."""
    cfg, spec = ctx.cfg, ctx.cfg.ablations
    splits, notes = {"subtask": data.eval_sets()[spec.split]}, []
    if spec.base_task is None and not (Path(cfg.base) / "config.yaml").is_file():
        notes.append(f"base task skipped: the base run {cfg.base} records no config.yaml (data and seed)")
    elif spec.base_task is not False:
        base_cfg = base_task_config(cfg.base)
        base_data = build_data(base_cfg, base_cfg.reproducibility.random_seed)  # the base run's very splits
        check_compatible(base, base_info, base_data.info)
        splits["base_task"] = base_data.eval_sets()[spec.split]
    modes = list(spec.modes)
    if "complement_sampled" in modes:
        try:
            check_complement(unit_masks(base, masks, cfg.mask.unit))
        except UserError as err:  # the mask is found by now: skip the mode rather than lose the run
            modes.remove("complement_sampled")
            notes.append(f"complement_sampled skipped: {err}")
    result = run_ablations(base, masks, lambda model: evaluate_classification(
        model, splits, cfg.train.eval_batch_size, ctx.device), modes=modes, draws=spec.draws,
        seed=derive_seed(ctx.seed, "ablations"), unit=cfg.mask.unit)
    if ctx.run.writes:
        atomic_write_csv(ctx.run.path / "ablations.csv", result.rows)
        result.plot(ctx.run.path / "ablations.png")
        table = [{"mode": mode, **{score: f"{s['mean']:.4f} +- {s['std']:.4f}" if len(s["values"]) > 1
                                   else f"{s['mean']:.4f}" for score, s in scores.items() if score.endswith("_acc")}}
                 for mode, scores in result.summary().items()]
        print(f"\nablations ({spec.split} split; mean +- sd over {spec.draws} draws where drawn):\n"
              + format_table(table) + "".join(f"\n{note}" for note in notes))
    return {"split": spec.split, "draws": spec.draws, "unit": cfg.mask.unit, "modes": result.summary(),
            "notes": notes}


def mask_stats(masked: MaskedModel) -> dict[str, float]:
    """Hard-mask density per layer and overall, and the mean mask logit."""
    density = mask_density(masked.hard_masks())
    stats = {"density": density["density"]}
    stats.update({f"density/{name}": layer["density"] for name, layer in density["layers"].items()})
    if len(masked.logits):
        with torch.no_grad():
            stats["mean_logit"] = float(torch.cat([p.reshape(-1) for p in masked.logits]).mean())
    return stats

