"""The ``base`` stage: train a model on a dataset with cross-entropy and keep the best and the last checkpoints.

Writes ``model.safetensors`` (the best weights by ``train.select_metric``: what later stages load),
``last.safetensors`` (the weights when training stopped), each with its ``.json`` sidecar, metrics per evaluation,
the final figures of every evaluation set at the best checkpoint in ``summary.json``, and ``curves.png``.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

from ..config import ModelConfig, RunConfig
from ..models import save_model
from ..models.vision import check_accepts
from ..plots import plot_run
from .runner import Context
from .task import LossScope, evaluate_task, make_loss, summary_metrics
from ..train import Objective, fit


class Config(RunConfig):
    model: ModelConfig
    loss_scope: LossScope = Field(
        "answer", description="answer: the labelled positions; sequence: next-token loss over the whole input")


def main(ctx: Context) -> dict[str, Any]:
    cfg = ctx.cfg
    data = ctx.build_data()
    model = ctx.build_model(data.info)
    check_accepts(model, data.info)
    eval_batch = cfg.train.eval_batch_size

    def evaluate(m):
        return evaluate_task(m, {"val": data.val}, data.info, eval_batch, ctx.device)

    objective = Objective(make_loss(cfg.loss_scope), evaluate)
    result = fit(model, objective, data.train, cfg.train, ctx.run, seed=ctx.seed, device=ctx.device,
                 restore_best=False)
    save_model(ctx.run, "last", model, cfg.model.model_dump(), data.info)
    model.load_state_dict(result.best_weights)
    final = evaluate_task(model, data.eval_sets(), data.info, eval_batch, ctx.device)
    save_model(ctx.run, "model", model, cfg.model.model_dump(), data.info)
    if ctx.run.writes:  # rank 0 writes
        plot_run(ctx.run.path)
        print("best checkpoint: " + " | ".join(f"{k} {v:.4f}" for k, v in final.items() if k.endswith("_acc")))
    return {"steps": result.steps, "stop_reason": result.stop_reason, "best_epoch": result.best.get("epoch"),
            **summary_metrics(final)}
