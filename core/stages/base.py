"""The ``base`` stage: train a model on a dataset with cross-entropy and keep the best checkpoint.

Writes ``model.safetensors`` (the best weights by ``train.select_metric``), metrics per evaluation, the final
figures of every evaluation set at the best checkpoint in ``summary.json``, and ``curves.png``.
"""

from __future__ import annotations

from typing import Any

from core.config import ModelConfig, RunConfig
from core.models import save_model
from core.models.vision import check_accepts
from core.report import plot_run
from core.stages import Context, summary_metrics
from core.train import Objective, classification_loss, evaluate_classification, fit, logits_of


class Config(RunConfig):
    model: ModelConfig


def main(ctx: Context) -> dict[str, Any]:
    cfg = ctx.cfg
    data = ctx.build_data()
    model = ctx.build_model(data.info)
    check_accepts(model, data.info)
    eval_sets = data.eval_sets()
    select_sets = {"val": data.val}

    def loss(m, batch):
        x, y = batch
        return classification_loss(logits_of(m(x)), y), {}

    def evaluate(m):
        return evaluate_classification(m, select_sets, cfg.train.eval_batch_size, ctx.device)

    result = fit(model, Objective(loss, evaluate), data.train, cfg.train, ctx.run, seed=ctx.seed, device=ctx.device)
    final = evaluate_classification(model, eval_sets, cfg.train.eval_batch_size, ctx.device)
    save_model(ctx.run, "model", model, cfg.model.model_dump(), data.info)
    plot_run(ctx.run.path)
    print("best checkpoint: " + " | ".join(f"{k} {v:.4f}" for k, v in final.items() if k.endswith("_acc")))
    return {"steps": result.steps, "stop_reason": result.stop_reason, "best_epoch": result.best.get("epoch"),
            **summary_metrics(final)}
