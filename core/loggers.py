"""Optional metric sinks beside ``metrics.jsonl``: TensorBoard event files and Weights & Biases offline runs.

``metrics.jsonl`` stays the source of truth; a sink receives the very rows written there (every numeric column at
the row's ``step``) and nothing else. Enable them in a config::

    logging: {tensorboard: true}               # <run>/tensorboard/: tensorboard --logdir checkpoints/
    logging: {wandb: true, wandb_project: me}  # <run>/wandb/ in offline mode: wandb sync <run>/wandb/offline-run-*

Each sub-run (a sweep's condition) gets its own event files or W&B run inside its directory. Neither package is
required: each is imported only when enabled, and enabling one that is not installed stops the run before its
directory exists, with one line that gives the command that installs it (from a clone: ``pip install -e
'.[tensorboard]'``). Nothing is sent anywhere: W&B runs offline.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, Optional

from .errors import require

PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}  # config key -> the package it needs


def check_available(logging_cfg: Any) -> None:
    """UserError naming the missing package and the command that installs it, for each enabled logger."""
    for key, package in PACKAGES.items():
        if getattr(logging_cfg, key):
            require(package, extra=key, feature=f"logging.{key}: true")


def sink_factory(logging_cfg: Any, run_name: str, config: dict[str, Any]) -> Optional[Callable[[Path], list]]:
    """A function that opens the enabled sinks for a run directory, or None when none is enabled."""
    if not (logging_cfg.tensorboard or logging_cfg.wandb):
        return None

    def open_sinks(path: Path) -> list:
        sinks: list = []
        if logging_cfg.tensorboard:
            sinks.append(TensorBoardSink(path))
        if logging_cfg.wandb:
            sinks.append(WandbSink(path, logging_cfg.wandb_project, run_name, config))
        return sinks

    return open_sinks


def numeric(row: dict[str, Any]) -> dict[str, float]:
    """The row's finite-or-not numbers (booleans and text left out), without the step itself."""
    return {k: float(v) for k, v in row.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"}


class TensorBoardSink:
    """Scalars into ``<run>/tensorboard/`` event files, flushed after every row."""

    def __init__(self, path: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(Path(path) / "tensorboard"))

    def log(self, row: dict[str, Any]) -> None:
        step = int(row.get("step", 0))
        for key, value in numeric(row).items():
            if not math.isnan(value):
                self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbSink:
    """One offline W&B run per run directory (files in ``<run>/wandb/``)."""

    def __init__(self, path: Path, project: str, name: str, config: dict[str, Any]):
        import wandb

        self.run = wandb.init(project=project, name=f"{name}/{Path(path).name}", dir=str(path), mode="offline",
                              config=config, reinit="create_new")

    def log(self, row: dict[str, Any]) -> None:
        self.run.log(numeric(row), step=int(row.get("step", 0)))

    def close(self) -> None:
        self.run.finish()
