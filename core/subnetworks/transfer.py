"""The ``transfer`` stage ("subtask induction"): transplant a discovered subnetwork into a fresh model and train.

For every n in ``transfer.n_disambiguation`` (token tasks: the ambiguous rows plus n disambiguating rows; omit it
for image tasks), every condition and every learning rate, one sub-run trains the condition's starting model
(``instill.subnetworks.transplant.transplant``) on the same data, selecting on the validation split and stopping early
when ``train.early_stop`` says so. Conditions: see ``instill list conditions`` (yours registered too). Every
condition at a given n starts from the same fresh weights and sees the same batches; the learning-rate sweep stops
once a rate reaches ``transfer.lr_stop_at``.

Writes one sub-directory per (n, condition, lr) with its own metrics and state (an interrupted sweep resumes where
it stopped) and its trained model (``model.safetensors`` + ``model.json``, a model source for compare and
stitch), ``accuracy_logs.csv`` (token tasks: one row per (n, condition) with the best learning rate) or
``results.csv`` (image tasks: textured and shape-only accuracy and shape bias per condition), plots, and
``summary.json``. Raises UserError, before the run directory exists, for an unknown condition, an empty n list, a
learning rate <= 0, a ``model:`` section (the model is the base run's), a mask whose names, shapes or base-weights
hash do not match its base model (names are checked against the layer selection recorded in ``mask.json``), or a
condition the mask cannot serve (``sampled_complement`` of a layer whose subnetwork keeps more than half of it).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from pydantic import Field, confloat, conlist, field_validator

from ..config import Section
from ..errors import UserError
from .masks import base_run_of, load_mask, read_mask_meta, unit_masks
from ..data import DataBundle
from ..models import LoadedModel, build_fresh, load_model, save_model
from ..run import Run
from ..plots import format_table, plot_bars, plot_lines, plot_runs
from ..files import atomic_write_csv
from ..seeds import derive_seed, seed_everything
from ..stages.compatibility import UsesBaseModel, check_compatible
from ..stages.runner import Context, build_data
from ..stages.task import LossScope, evaluate_task, make_loss, summary_metrics
from ..stages.upstream import resolve_upstream
from ..train import Objective, fit
from .transplant import CONDITIONS, BatchNorm, NonMasked, check_condition, check_optimizer, transplant

DEFAULT_CONDITIONS = ["subnet", "subnet_trainable", "full_model", "random_init", "sampled_subnet"]


class TransferSection(Section):
    mask: str = Field(description="the discovered mask: an ablate run directory, the ablate stage's config, or a "
                                  "mask imported with instill import-neurosurgeon")
    mask_base: Optional[str] = Field(
        None, description="with a NeuroSurgeon best_circuit_model.pt as mask: the base it was found on (a base run, "
                          "a base config or an HF checkpoint folder)")
    conditions: conlist(str, min_length=1) = Field(default_factory=lambda: list(DEFAULT_CONDITIONS))
    n_disambiguation: Optional[conlist(int, min_length=1)] = Field(
        None, description="token tasks: the numbers of disambiguating examples to sweep over")
    lrs: Optional[conlist(confloat(gt=0), min_length=1)] = Field(None, description="learning rates (default: train's)")
    lr_stop_at: Optional[float] = Field(1.0, description="stop the lr sweep once a rate reaches this val accuracy")
    non_masked: NonMasked = Field(
        "inherit",
        description="parameters without a mask (embeddings, norms, biases): inherit (the original) or reinit")
    batch_norm: BatchNorm = Field(
        "inherit", description="batch-norm running statistics: inherit the base's (they update in training), reset "
                               "them, or freeze the base's (batch-norm layers stay in eval mode, as the original)")
    freeze: bool = Field(True, description="keep transplanted entries frozen (subnet_trainable never freezes)")
    legacy_sampling: bool = Field(False, description="the original's sampled baselines (they kept the complement)")

    @field_validator("conditions")
    @classmethod
    def _known(cls, conditions: list[str]) -> list[str]:
        for name in conditions:
            CONDITIONS.known(name)
        return conditions

    @field_validator("n_disambiguation")
    @classmethod
    def _non_negative(cls, ns: Optional[list[int]]) -> Optional[list[int]]:
        if ns is not None and min(ns) < 0:
            raise ValueError("n_disambiguation values must be >= 0")
        return ns


class Config(UsesBaseModel):
    transfer: TransferSection
    loss_scope: LossScope = "answer"


def prepare(cfg: Config) -> None:
    """Run the upstream configs if needed, then check everything a sub-run could fail on, before any is written."""
    spec = cfg.transfer
    spec.mask = resolve_upstream(spec.mask, "ablate", "transfer.mask", spec.mask_base)
    if spec.n_disambiguation is not None and "n_disambiguation" not in cfg.data.params:
        raise UserError(f"transfer.n_disambiguation is set but data {cfg.data.name!r} has no n_disambiguation key")
    inputs = _inputs(spec.mask)
    mask = inputs.mask
    units = unit_masks(inputs.base.model, mask, inputs.unit)  # what the sampled conditions draw
    for condition in spec.conditions:  # feasibility depends on the condition and the mask, not on n or lr
        check_condition(condition, units)
    if spec.freeze and set(spec.conditions) - {"subnet_trainable", "full_model", "random_init"}:
        check_optimizer(cfg.train.optimizer.name)  # frozen entries stay fixed only under these optimizers
    kept = sum(int(m.sum()) for m in mask.values())
    if kept == 0 and {"subnet", "subnet_trainable", "sampled_subnet"} & set(spec.conditions):
        print(f"warning: the mask in {spec.mask} keeps no weight (density 0): subnet conditions start from the "
              "fresh model alone", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class TransferInputs:
    """What every sub-run starts from: the base model (with the config and data facts that rebuild it fresh) and
    the subnetwork's checked masks."""

    base: LoadedModel
    mask: dict[str, torch.Tensor]
    unit: str  # weight or neuron: what the sampled conditions draw


def _inputs(mask_dir: str) -> TransferInputs:
    base = load_model(base_run_of(mask_dir))
    recorded = read_mask_meta(mask_dir).get("hyperparameters", {}).get("unit", "weight")
    # a NeuroSurgeon import mixing neuron and weight logits records "neuron/weight": sampled per weight
    return TransferInputs(base, load_mask(mask_dir, base.model), "neuron" if recorded == "neuron" else "weight")


def main(ctx: Context) -> dict[str, Any]:
    cfg, spec = ctx.cfg, ctx.cfg.transfer
    inputs = _inputs(spec.mask)
    rows = []
    for n in spec.n_disambiguation or [None]:
        data = build_data(cfg, ctx.seed) if n is None else _data_with_n(cfg, ctx.seed, n)
        check_compatible(inputs.base.model, inputs.base.info, data.info)
        for condition in spec.conditions:
            rows.append(_sweep_lrs(ctx, inputs, data, n=n, condition=condition))
    return _write_results(ctx, rows)


def _data_with_n(cfg: Config, seed: int, n: int):
    data_cfg = cfg.data.model_copy(update={})
    data_cfg.__pydantic_extra__ = {**cfg.data.params, "n_disambiguation": n}
    return build_data(cfg.model_copy(update={"data": data_cfg}), seed)


def _sweep_lrs(ctx: Context, inputs: TransferInputs, data: DataBundle, *, n: Optional[int], condition: str
               ) -> dict[str, Any]:
    """Train ``condition`` at each learning rate until one reaches ``lr_stop_at``; the row of the best one."""
    spec = ctx.cfg.transfer
    best: Optional[dict[str, Any]] = None
    for lr in spec.lrs or [ctx.cfg.train.optimizer.lr]:
        name = (f"n{n}-" if n is not None else "") + f"{condition}-lr{lr:g}"
        row = ctx.run.sweep([(name, lambda sub: _train_condition(ctx, sub, inputs, data, n=n, condition=condition,
                                                                  lr=lr))])[0]
        if best is None or row["best_eval_acc"] > best["best_eval_acc"]:
            best = row
        if spec.lr_stop_at is not None and row["best_eval_acc"] >= spec.lr_stop_at:
            break
    return best


def _train_condition(ctx: Context, sub: Run, inputs: TransferInputs, data: DataBundle, *, n: Optional[int],
                     condition: str, lr: float) -> dict[str, Any]:
    cfg, spec, base = ctx.cfg, ctx.cfg.transfer, inputs.base
    seed_everything(derive_seed(ctx.seed, "init", n), cfg.reproducibility.deterministic)  # same fresh start
    fresh = build_fresh(base.model_cfg, base.info)
    start = transplant(condition, base.model, fresh, inputs.mask, non_masked=spec.non_masked,
                       batch_norm=spec.batch_norm, freeze=spec.freeze, legacy_sampling=spec.legacy_sampling,
                       seed=derive_seed(ctx.seed, "sample", n),
                       zero_grads=cfg.train.grad_clip is not None,  # frozen entries must not count in the norm
                       unit=inputs.unit)
    train_cfg = cfg.train.model_copy(update={"optimizer": cfg.train.optimizer.model_copy(update={"lr": lr})})
    eval_batch = train_cfg.eval_batch_size
    watched = {k: v for k, v in data.eval_sets().items() if k != "test"}  # the test split is read once, at the end

    def evaluate(model):
        return evaluate_task(model, watched, data.info, eval_batch, ctx.device)

    objective = Objective(make_loss(cfg.loss_scope), evaluate, train_mode=start.train_mode)
    seed_everything(derive_seed(ctx.seed, "train", n, condition, lr), cfg.reproducibility.deterministic)
    result = fit(start.model, objective, data.train, train_cfg, sub, seed=derive_seed(ctx.seed, "batches", n),
                 device=ctx.device)
    final = evaluate_task(start.model, data.eval_sets(), data.info, eval_batch, ctx.device)
    save_model(sub, "model", start.model, base.model_cfg, base.info)  # for compare/stitch (instill.compare.sources)
    return {"n_disambiguation": n, "condition": condition, "lr": lr, "seed": ctx.seed,
            "best_eval_acc": result.best[train_cfg.select_metric], "best_epoch": result.best.get("epoch"),
            "steps": result.steps, **start.info, **summary_metrics(final)}


def _flat(row: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in row.items() if isinstance(v, (int, float, str)) or v is None}


TOKEN_COLUMNS = ["n_disambiguation", "condition", "lr", "best_eval_acc", "test_acc", "seed"]
IMAGE_COLUMNS = ["condition", "textured_acc", "shape_only_acc", "shape_bias", "seed"]


def _write_results(ctx: Context, rows: list[dict[str, Any]]) -> dict[str, Any]:
    spec = ctx.cfg.transfer
    by_n = spec.n_disambiguation is not None
    columns, name = (TOKEN_COLUMNS, "accuracy_logs.csv") if by_n else (IMAGE_COLUMNS, "results.csv")
    columns = [c for c in columns if any(c in r for r in rows)]
    if ctx.run.writes:
        atomic_write_csv(ctx.run.path / name, rows, columns)
        _plot(ctx.run.path, rows, by_n)
        plot_runs(ctx.run.path)  # curves.png of each condition's training
        print(f"\n{name}:\n" + format_table([{c: r.get(c, "") for c in columns} for r in rows]))
    return {"results": [_flat(r) for r in rows], "results_file": name}


def _plot(path: Path, rows: list[dict[str, Any]], by_n: bool) -> None:
    if by_n:
        series: dict[str, list[tuple[float, float]]] = {}
        for row in rows:
            series.setdefault(row["condition"], []).append((max(row["n_disambiguation"], 1), row["test_acc"]))
        plot_lines(path / "accuracy_vs_n.png", series, title="test accuracy against disambiguating examples",
                   xlabel="disambiguating training examples (log scale)", ylabel="test accuracy (fraction correct)",
                   logx=True, fraction=True)
    elif any("shape_bias" in r for r in rows):
        figures = {key: {r["condition"]: r[key] for r in rows if key in r}
                   for key in ("textured_acc", "shape_only_acc", "shape_bias")}
        plot_bars(path / "shape_bias.png", {k: v for k, v in figures.items() if v},
                  title="test accuracy (textured, shape-only) and shape bias (cue-conflict) per condition; one seed "
                        "(a sweep over seeds reports mean and spread)",
                  ylabel="fraction (accuracy, or shape decisions)", fraction=True)
