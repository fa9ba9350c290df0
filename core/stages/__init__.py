"""Stages: each takes a validated config and writes one run directory.

A stage module defines ``Config`` (a ``RunConfig`` subclass with the stage's own sections) and ``main(ctx)``, which
does the work and returns the summary. ``execute`` wraps every stage the same way: seed, device, run directory,
finish or clean up. A stage that needs another's output names it by run directory or by config file
(``resolve_upstream``); a missing output whose config is named is produced first.
"""

from __future__ import annotations

import importlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from core import dist
from core.config import RunConfig, load_config, to_yaml
from core.data import DataBundle, DataContext
from core.errors import UserError
from core.registry import DATASETS, MODELS
from core.run import Run, draw_seed, is_finished, seed_everything
from core.train import resolve_device

STAGES = {
    "base": "core.stages.base",
}


def stage_module(stage: str):
    if stage not in STAGES:
        raise UserError(f"unknown stage {stage!r}; known: {', '.join(sorted(STAGES))}")
    return importlib.import_module(STAGES[stage])


@dataclass
class Context:
    """What a stage's ``main`` works with."""

    cfg: RunConfig
    run: Run
    seed: int
    device: torch.device

    def build_data(self) -> DataBundle:
        return build_data(self.cfg, self.seed)

    def build_model(self, info: dict) -> torch.nn.Module:
        return MODELS.build(self.cfg.model.name, info, self.cfg.model.params)


def build_data(cfg: RunConfig, seed: int) -> DataBundle:
    return DATASETS.build(cfg.data.name, DataContext(seed=seed), cfg.data.params)


def load_stage_config(path: str | Path, stage: str, overrides: list[str] = (), out: Optional[str] = None
                      ) -> RunConfig:
    cfg = load_config(path, stage_module(stage).Config, stage, overrides)
    if out is not None:
        cfg.output_dir = out
    return cfg


def execute(cfg: RunConfig, *, resume: bool = False) -> Path:
    """Run a stage end to end; returns its run directory. UserErrors leave nothing half-written behind."""
    module = stage_module(cfg.stage)
    if resume:  # continue with the very config (and seed) the run started with
        cfg = load_stage_config(Path(cfg.output_dir) / "config.yaml", cfg.stage, out=cfg.output_dir)
    repro = cfg.reproducibility
    seed = repro.random_seed if repro.reproduce else dist.broadcast(draw_seed)
    cfg.reproducibility = repro.model_copy(update={"reproduce": True, "random_seed": seed})  # snapshot replays
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    device = resolve_device(cfg.train.device)
    dist.init(device)
    seed_everything(seed, repro.deterministic)
    prepare = getattr(module, "prepare", None)
    if prepare is not None:  # upstream runs and input checks, before the run directory exists
        prepare(cfg)
    run = Run.create(cfg.output_dir, to_yaml(cfg), seed, str(device), resume)
    seed_everything(seed, repro.deterministic)  # the same RNG state whatever prepare() consumed
    verb = "resuming" if resume else ("replaying into" if run.replay_of else "writing")
    if dist.is_main():
        print(f"{cfg.stage}: {verb} {run.path} (seed {seed})", flush=True)
    started = time.perf_counter()
    try:
        summary = module.main(Context(cfg, run, seed, device))
    except UserError:
        run.discard_if_empty()
        raise
    summary = {"stage": cfg.stage, "name": cfg.name, "seed": seed, "duration_s": round(time.perf_counter() - started, 2),
               **summary}
    run.finish(summary)
    return run.path


def resolve_upstream(ref: str, stage: str, key: str) -> str:
    """The finished run directory that ``ref`` names: a run directory, or a config file (run now if needed)."""
    path = Path(ref)
    if path.is_dir():
        if not is_finished(path):
            raise UserError(f"{key}: {path} is not a finished run directory")
        return str(path)
    if path.suffix not in (".yaml", ".yml"):
        raise UserError(f"{key}: {ref} is neither a run directory nor a config file")
    cfg = load_stage_config(path, stage)
    if is_finished(cfg.output_dir):
        return cfg.output_dir
    if dist.is_main():
        print(f"{key}: {cfg.output_dir} is missing, so running {path} first", flush=True)
    return str(execute(cfg))


def summary_metrics(result_row: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """The numeric figures of a metrics row, without timing columns."""
    return {f"{prefix}{k}": v for k, v in result_row.items()
            if isinstance(v, (int, float)) and not k.startswith("time_")}
