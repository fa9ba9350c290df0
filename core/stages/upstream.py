"""Upstream runs: a stage that needs another's output names it by run directory or by config file; a missing
output whose config is named is produced first (``resolve_upstream``)."""

from __future__ import annotations

import fcntl
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .. import dist
from ..config import RunConfig, read_yaml
from ..errors import UserError
from ..files import first_missing, make_directory, remove_quietly, write_error
from ..seeds import derive_seed
from ..run import has_state, is_finished
from .runner import Interrupted, UpstreamPending, execute, load_stage_config, stage_of, validate, validating


@dataclass
class UpstreamPlacement:
    """Where upstream runs named by config file go: ``root/<name>``, seeded from ``seed`` when it is set (so that
    every point of a sweep trains its own base and mask, replayably, instead of sharing one)."""

    root: Path
    seed: Optional[int] = None


_placement: Optional[UpstreamPlacement] = None


@contextmanager
def upstream_runs_in(placement: Optional[UpstreamPlacement]):
    """Within this block, ``resolve_upstream`` writes upstream runs named by config file per ``placement``."""
    global _placement
    before, _placement = _placement, placement
    try:
        yield
    finally:
        _placement = before


@contextmanager
def producer_lock(output_dir: str):
    """One process at a time produces ``output_dir`` (an upstream run that parallel sweep points may name, an
    import of another code base's files); the others wait, then find it made. Under torchrun the ranks produce it
    together, so they take no lock."""
    if dist.world_size() > 1:
        yield
        return
    out = Path(output_dir)
    created = first_missing(out.parent)
    make_directory(out.parent)
    lock_file = out.parent / f".{out.name}.lock"
    try:
        with open(lock_file, "w") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                remove_quietly(str(lock_file))  # a waiter that opened it still gets it; it re-checks the run first
                fcntl.flock(handle, fcntl.LOCK_UN)
    except OSError as err:
        raise write_error(lock_file, err) from None
    finally:
        if created is not None and not any(created.iterdir()):  # an upstream that could not start: no folders
            created.rmdir()


# Importers of what other code bases wrote (HF Trainer checkpoints, NeuroSurgeon masks), imported by name when an
# upstream reference is resolved: they sit in a higher layer (instill.migrate) and import from this package.
IMPORTER_MODULES = ("migrate.imports",)


def _foreign(ref: str, stage: str, key: str, mask_base: Optional[str]) -> Optional[str]:
    """The run directory an importer makes of ``ref`` (None: ``ref`` is an instill run or config)."""
    import importlib

    for name in IMPORTER_MODULES:
        made = importlib.import_module(f"..{name}", __package__).resolve_imported(ref, stage, key, mask_base)
        if made is not None:
            return made
    return None


def resolve_upstream(ref: str, stage: str, key: str, mask_base: Optional[str] = None) -> str:
    """The finished run directory that ``ref`` names: a run directory, a config file (run now if needed), or what
    the original code wrote (an HF checkpoint folder, a NeuroSurgeon state dict over ``mask_base``: imported)."""
    imported = _foreign(ref, stage, key, mask_base)
    if imported is not None:
        return imported
    path = Path(ref)
    if path.is_dir():
        if not is_finished(path):
            raise UserError(f"{key}: {path} is not a finished run directory")
        return str(path)
    if path.suffix not in (".yaml", ".yml"):
        raise UserError(f"{key}: {ref} is neither a run directory nor a config file")
    declared = stage_of(read_yaml(path))
    if declared is not None and declared != stage:
        raise UserError(f"{key}: {path} is a config of the {declared} stage; {key} takes a {stage} run directory or "
                        f"a {stage} config")
    cfg = load_stage_config(path, stage)
    if _placement is not None:
        cfg.output_dir = str(_placement.root / cfg.name)
        if _placement.seed is not None and not cfg.reproducibility.reproduce:
            cfg.reproducibility = cfg.reproducibility.model_copy(
                update={"reproduce": True, "random_seed": derive_seed(_placement.seed, "upstream", cfg.name)})
    if is_finished(cfg.output_dir):
        return cfg.output_dir
    if validating():  # --validate: check the upstream config (and its own upstream), train nothing
        raise UpstreamPending(key, str(path), cfg.output_dir, validate(cfg))
    with producer_lock(cfg.output_dir):
        return _produce_upstream(cfg, path, key)


def _produce_upstream(cfg: RunConfig, path: Path, key: str) -> str:
    if is_finished(cfg.output_dir):  # another process made it while this one waited for the lock
        return cfg.output_dir
    unfinished = has_state(cfg.output_dir)  # an upstream run interrupted earlier: continue it
    what = "unfinished, so resuming" if unfinished else "missing, so running"
    try:  # said once the upstream run has really started, not before a refusal of its config
        return str(execute(cfg, resume=unfinished, announce=f"{key}: {cfg.output_dir} is {what} {path} first"))
    except Interrupted as err:
        err.upstream = True  # rerunning the downstream command resumes it; --resume would name the wrong stage
        raise
