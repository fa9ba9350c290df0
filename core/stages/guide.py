"""The ``guide`` stage ("Training the Untrainable"): train a target network with representational alignment.

    loss = task loss + alpha * reduce over layer pairs of weight * (1 - similarity(target layer, guide layer))

Each of ``guidance.conditions`` runs as a sub-run on the same data, from the same target initialisation:
``unguided`` (the task loss alone), ``guided_untrained`` (a randomly initialised guide built from
``guidance.guide``), ``guided_trained`` (the trained guide of ``guidance.guide_run``: a run directory, or a base
config that runs first). The guide is frozen, in evaluation mode, without gradients; only its layers' Gram
matrices are kept. Layers are chosen by name or type (``type:Linear``) on each side; ``layer_map`` pairs them
(``repo``: the original's mapping with its overwriting; ``uniform``: every mapped pair; or explicit pairs).
Options: alpha; sum or mean over pairs; the similarity measure; guidance only for the first N optimizer steps;
noise inputs for the guide; token-wise similarity for sequences. Every evaluation logs the task loss, the
alignment loss and each pair's similarity. Writes ``results.csv`` (one row per condition with the task metrics),
``results.png`` and ``summary.json``.

Raises UserError for a layer name that is not in a model (with the nearest names), a guide that sees another batch
size than the target, a guide checkpoint that does not match its architecture, or a batch too small for the
estimator (unbiased CKA needs 4 samples).
"""

from __future__ import annotations

import csv
import io
import math
from typing import Any, Literal, Optional, Union

import torch
from pydantic import BaseModel, Field, conlist, field_validator, model_validator

from core.config import ModelConfig, RunConfig, Section
from core.errors import UserError
from core.features import DEFAULT_TYPES, probe
from core.guidance import AlignmentLoss, resolve_pairs
from core.models import load_model
from core.report import format_table, plot_bars
from core.run import atomic_write_text, derive_seed, seed_everything
from core.stages import Context, evaluate_task, make_loss, resolve_upstream, summary_metrics
from core.train import Objective, fit

CONDITIONS = ("unguided", "guided_untrained", "guided_trained")
DEFAULT_LAYERS = [f"type:{t.__name__}" for t in DEFAULT_TYPES]


class ExplicitPair(BaseModel):
    model_config = {"extra": "forbid"}
    target: str
    guide: str
    weight: float = 1.0


class GuidanceSection(Section):
    conditions: conlist(Literal[CONDITIONS], min_length=1) = Field(default_factory=lambda: ["unguided",
                                                                                          "guided_untrained"])
    guide: Optional[ModelConfig] = Field(None, description="the guide's architecture (guided_untrained)")
    guide_run: Optional[str] = Field(None, description="trained guide: a run directory or a base config")
    alpha: float = Field(1.0, ge=0)
    reduce: Literal["sum", "mean"] = "sum"
    similarity: str = Field("cka", description="cka, cka_unbiased, rsa, rsa_classic, procrustes, cca, svcca, ...")
    target_layers: list[str] = Field(default_factory=lambda: list(DEFAULT_LAYERS))
    guide_layers: list[str] = Field(default_factory=lambda: list(DEFAULT_LAYERS))
    drop_last_layer: bool = Field(True, description="leave out each side's last captured layer (the logits), "
                                                    "as the original does")
    layer_map: Union[Literal["repo", "uniform"], list[ExplicitPair]] = "repo"
    guidance_steps: Optional[int] = Field(None, ge=1, description="guide only the first N optimizer steps")
    noise_inputs: bool = Field(False, description="feed the guide random inputs instead of the batch")
    tokenwise: bool = Field(False, description="sequences: every (sample, token) is one row of the similarity")

    @field_validator("similarity")
    @classmethod
    def _known_similarity(cls, name: str) -> str:
        from core.similarity import get_similarity

        try:
            get_similarity(name)
        except UserError as err:
            raise ValueError(str(err)) from None
        return name

    @model_validator(mode="after")
    def _guides_given(self):
        if "guided_untrained" in self.conditions and self.guide is None:
            raise ValueError("condition guided_untrained needs guidance.guide (the guide's architecture)")
        if "guided_trained" in self.conditions and self.guide_run is None:
            raise ValueError("condition guided_trained needs guidance.guide_run (a trained guide's run or config)")
        return self


class Config(RunConfig):
    model: ModelConfig
    guidance: GuidanceSection = Field(default_factory=GuidanceSection)
    loss_scope: Literal["answer", "sequence"] = "answer"


def prepare(cfg: Config) -> None:
    if cfg.guidance.guide_run is not None and "guided_trained" in cfg.guidance.conditions:
        cfg.guidance.guide_run = resolve_upstream(cfg.guidance.guide_run, "base", "guidance.guide_run")
    if cfg.guidance.similarity == "cka_unbiased" and cfg.train.batch_size < 4:
        raise UserError("train.batch_size: unbiased CKA needs at least 4 samples per batch")


def main(ctx: Context) -> dict[str, Any]:
    cfg = ctx.cfg
    data = ctx.build_data()
    guides = {c: build_guide(ctx, c, data.info).to(ctx.device) for c in cfg.guidance.conditions if c != "unguided"}
    for guide in guides.values():  # check every layer map before anything trains
        _alignment(cfg.guidance, ctx.build_model(data.info).to(ctx.device), guide, _sample(data, ctx.device)).close()
    rows = ctx.run.sweep([(c, lambda sub, c=c: _train_condition(ctx, sub, c, data, guides.get(c)))
                          for c in cfg.guidance.conditions])
    for i, row in enumerate(rows):
        ctx.run.log_metrics({"step": i + 1, **{k: v for k, v in row.items() if not isinstance(v, (dict, list))}})
    return _write_results(ctx, rows)


def build_guide(ctx: Context, condition: str, info: dict) -> torch.nn.Module:
    spec = ctx.cfg.guidance
    if condition == "guided_trained":
        guide, _, _ = load_model(spec.guide_run)
        return guide
    seed_everything(derive_seed(ctx.seed, "guide"), ctx.cfg.reproducibility.deterministic)
    from core.registry import MODELS

    return MODELS.build(spec.guide.name, info, spec.guide.params)


def _sample(data, device: torch.device) -> torch.Tensor:
    return data.train.x[: min(8, len(data.train))].to(device)


def _train_condition(ctx: Context, sub, condition: str, data, guide: Optional[torch.nn.Module]) -> dict[str, Any]:
    cfg, spec = ctx.cfg, ctx.cfg.guidance
    seed_everything(derive_seed(ctx.seed, "target"), cfg.reproducibility.deterministic)  # same start everywhere
    target = ctx.build_model(data.info).to(ctx.device)
    task_loss = make_loss(cfg.loss_scope)
    eval_batch = cfg.train.eval_batch_size
    train_cfg = cfg.train.model_copy(update={"drop_last": True})  # a ragged last batch could be too small
    alignment = None if guide is None else _alignment(spec, target, guide, _sample(data, ctx.device))

    def loss(model, batch):
        value, logs = task_loss(model, batch)
        if alignment is None:
            return value, {}
        if spec.guidance_steps is not None and objective.step >= spec.guidance_steps:
            alignment.discard()
            return value, {"task_loss": value.item(), "align_loss": 0.0}
        align, sims = alignment(_guide_input(batch[0], data.info, spec.noise_inputs))
        return value + align, {"task_loss": value.item(), "align_loss": align.item(), **sims}

    def evaluate(model):
        if alignment is not None:
            alignment.target_capture.close()  # evaluation forwards are not aligned
        metrics = evaluate_task(model, {"val": data.val}, data.info, eval_batch, ctx.device)
        if alignment is not None:
            alignment.target_capture.open()
        return metrics

    objective = Objective(loss, evaluate)
    try:
        result = fit(target, objective, data.train, train_cfg, sub, seed=derive_seed(ctx.seed, "batches"),
                     device=ctx.device)
    finally:
        if alignment is not None:
            alignment.close()
    final = evaluate_task(target, data.eval_sets(), data.info, eval_batch, ctx.device)
    if data.info.get("vocab_size") and "num_classes" not in data.info:  # next-token prediction, not parity
        final["test_perplexity"] = math.exp(min(final["test_loss"], 50.0))
    pairs = [] if alignment is None else [f"{p.target}~{p.guide}" for p in alignment.pairs]
    return {"condition": condition, "seed": ctx.seed, "steps": result.steps, "best_epoch": result.best.get("epoch"),
            "pairs": pairs, **summary_metrics(final)}


def _alignment(spec: GuidanceSection, target, guide, sample: torch.Tensor) -> AlignmentLoss:
    """Capture keys of each side (in execution order, logits layer left out), paired by the layer map."""
    target_shapes = probe(target, spec.target_layers, sample)
    guide_shapes = probe(guide, spec.guide_layers, sample)
    for side, shapes in (("target", target_shapes), ("guide", guide_shapes)):
        batch = {shape[0] for shape in shapes.values()}
        if batch != {len(sample)}:
            raise UserError(f"guidance.{side}_layers: captured batch sizes {sorted(batch)} differ from the input's "
                            f"{len(sample)} (declare the model's batch axis)")
    target_keys, guide_keys = list(target_shapes), list(guide_shapes)
    if spec.drop_last_layer:
        target_keys, guide_keys = target_keys[:-1], guide_keys[:-1]
    pairs = resolve_pairs([p.model_dump() for p in spec.layer_map] if isinstance(spec.layer_map, list)
                          else spec.layer_map, target_keys, guide_keys)
    if not pairs:
        raise UserError("guidance: the layer map pairs no layers (does each side capture at least two layers?)")
    return AlignmentLoss(target, guide, pairs, similarity=spec.similarity, alpha=spec.alpha, reduce=spec.reduce,
                         tokenwise=spec.tokenwise)


def _guide_input(x: torch.Tensor, info: dict, noise: bool) -> torch.Tensor:
    """The batch itself, or noise of its kind: random tokens, or clamp(N(0,1) + 0.1 N(0,1), 0, 1) images."""
    if not noise:
        return x
    if info.get("vocab_size"):
        return torch.randint(0, info["vocab_size"], x.shape, device=x.device)
    return (torch.randn_like(x) + 0.1 * torch.randn_like(x)).clamp(0, 1)


def _write_results(ctx: Context, rows: list[dict[str, Any]]) -> dict[str, Any]:
    metric_columns = [k for k in rows[0] if k.startswith(("test_", "val_")) and "/" not in k]
    columns = ["condition", *metric_columns, "seed"]
    table = [{c: r.get(c, "") for c in columns} for r in rows]
    if ctx.run.writes:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=columns)
        writer.writeheader()
        writer.writerows(table)
        atomic_write_text(ctx.run.path / "results.csv", buffer.getvalue())
        headline = "test_acc" if "test_acc" in rows[0] else metric_columns[0]
        plot_bars(ctx.run.path / "results.png", {r["condition"]: r[headline] for r in rows},
                  title=f"{headline} per condition", ylabel=headline)
    print("\nresults.csv:\n" + format_table(table))
    return {"results": rows}
