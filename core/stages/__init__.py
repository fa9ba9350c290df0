"""Stages: each takes a validated config and writes one run directory.

A stage module defines ``Config`` (a ``RunConfig`` subclass with the stage's own sections) and ``main(ctx)``, which
does the work and returns the summary. ``execute`` wraps every stage the same way: seed, device, run directory,
finish or clean up. A stage that needs another's output names it by run directory or by config file
(``resolve_upstream``); a missing output whose config is named is produced first.
"""

from __future__ import annotations

import fcntl
import importlib
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Optional

import torch
from pydantic import field_validator

from .. import dist
from ..config import RunConfig, load_config, read_yaml, to_yaml
from ..data import DataBundle, DataContext, Split, batches
from ..errors import UserError
from ..loggers import check_available as check_loggers
from ..loggers import sink_factory
from ..metrics import shape_bias
from ..models.vision import check_accepts
from ..registry import DATASETS, MODELS
from ..run import TIMING_PREFIX, Run, derive_seed, draw_seed, has_state, is_finished, seed_everything
from ..train import classification_loss, evaluate_classification, logits_of, predict, resolve_device

# modules of this package, imported when a stage runs
STAGES = ("ablate", "align", "base", "compare", "guide", "stitch", "transfer")


def stage_module(stage: str):
    if stage not in STAGES:
        raise UserError(f"unknown stage {stage!r}; known: {', '.join(STAGES)}")
    return importlib.import_module(f".{stage}", __package__)


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


def load_stage_config(path: str | Path, stage: str, overrides: list[str] = (), out: Optional[str] = None,
                      values: Optional[dict[str, Any]] = None) -> RunConfig:
    cfg = load_config(path, stage_module(stage).Config, stage, overrides, values)
    if out is not None:
        cfg.output_dir = out
    return cfg


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during a run; ``resumable`` when its run directory holds saved state to continue from."""

    def __init__(self, path: Path, resumable: bool):
        super().__init__(str(path))
        self.path, self.resumable, self.upstream = path, resumable, False


RESUME_OVERRIDES = ("train.threads", "train.progress")  # what --set may change on --resume: not the results


def execute(cfg: RunConfig, *, resume: bool = False, overrides: list[str] = ()) -> Path:
    """Run a stage end to end; returns its run directory. UserErrors leave nothing half-written behind.

    Args:
        cfg: the validated config.
        resume: continue the unfinished run in ``cfg.output_dir`` with the config (and seed) it started with.
        overrides: the ``--set`` items given with ``resume``; only RESUME_OVERRIDES keys are accepted.

    Raises:
        UserError: bad input, checked before the run directory is claimed where possible.
    """
    module = stage_module(cfg.stage)
    if resume:  # continue with the very config (and seed) the run started with
        cfg = _resumed_config(cfg, overrides)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    device = resolve_device(cfg.train.device)
    dist.init(device)  # before the seed is drawn: rank 0 draws it and the others must receive it
    repro = cfg.reproducibility
    seed = repro.random_seed if repro.reproduce else dist.broadcast(draw_seed)
    cfg.reproducibility = repro.model_copy(update={"reproduce": True, "random_seed": seed})  # snapshot replays
    seed_everything(seed, repro.deterministic)
    check_loggers(cfg.logging)
    prepare = getattr(module, "prepare", None)
    if prepare is not None:  # upstream runs and input checks, before the run directory exists
        prepare(cfg)
    run = Run.create(cfg.output_dir, to_yaml(cfg), seed, str(device), resume)
    run.attach_sinks(sink_factory(cfg.logging, cfg.name, cfg.model_dump(mode="json")))
    try:
        return _run_stage(module, cfg, run, seed, device, resume)
    finally:
        run.close_sinks()
        run.close()


def _resumed_config(cfg: RunConfig, overrides: list[str]) -> RunConfig:
    """The config a run started with, from its config.yaml; ``--set`` items may only repeat its values (the same
    command again) or change RESUME_OVERRIDES."""
    out = Path(cfg.output_dir)
    if not out.exists():
        raise UserError(f"--resume: {out} does not exist: there is no run to resume")
    config = out / "config.yaml"
    if not config.is_file():
        raise UserError(f"--resume: {out} is not a run directory (no config.yaml)")
    stored = load_stage_config(config, cfg.stage, out=cfg.output_dir)
    kept = _dump_without(stored, RESUME_OVERRIDES)
    for item in overrides:
        changed = load_stage_config(config, cfg.stage, [item], out=cfg.output_dir)
        if _dump_without(changed, RESUME_OVERRIDES) != kept:
            raise UserError(f"--resume continues a run with its own config.yaml; --set {item} would change it "
                            f"(with --resume, --set may change only {', '.join(RESUME_OVERRIDES)})")
    return load_stage_config(config, cfg.stage, list(overrides), out=cfg.output_dir)


def _dump_without(cfg: RunConfig, keys: tuple[str, ...]) -> dict[str, Any]:
    dump = cfg.model_dump(mode="json")
    for key in keys:
        *sections, leaf = key.split(".")
        node = dump
        for section in sections:
            node = node.get(section) or {}
        node.pop(leaf, None)
    return dump


def _run_stage(module, cfg: RunConfig, run: Run, seed: int, device: torch.device, resume: bool) -> Path:
    repro = cfg.reproducibility
    seed_everything(seed, repro.deterministic)  # the same RNG state whatever prepare() consumed
    verb = "resuming" if run.resumed else ("replaying into" if run.replay_of else "writing")
    if dist.is_main():
        print(f"{cfg.stage}: {verb} {run.path} (seed {seed})", flush=True)
    try:
        summary = module.main(Context(cfg, run, seed, device))
        summary = {"stage": cfg.stage, "name": cfg.name, "seed": seed, "duration_s": round(run.elapsed_s(), 2),
                   **summary}
        run.finish(summary)
    except (UserError, KeyboardInterrupt) as err:
        run.close_sinks()
        if isinstance(err, KeyboardInterrupt) and is_finished(run.path):  # Ctrl-C after its last write: complete
            return run.path
        if not run.discard_if_empty():  # stopped before any state was saved: nothing to keep, nothing to resume
            run.record_elapsed(quiet=True)  # a resumed run goes on counting from here
        if isinstance(err, KeyboardInterrupt):
            raise Interrupted(run.path, has_state(run.path)) from None
        raise
    return run.path


class UsesBaseModel(RunConfig):
    """A stage whose model is the base run's (ablate, transfer): a ``model:`` section would be silently ignored."""

    @field_validator("model", mode="before")
    @classmethod
    def _no_model_section(cls, value):
        if value is not None:
            raise ValueError("the model comes from the base run (its model.json), so this stage takes no model "
                             "section; remove it (or set model: null)")
        return value


def check_data_fits(model_info: dict, data_info: dict, model_desc: str, key: str = "data") -> None:
    """UserError unless this run's data have the inputs and classes a saved model was built for.

    Compared: ``vocab_size`` (and the vocabulary itself where both runs list one) for tokens, else ``input_shape``
    (sequence models read any length); ``num_classes`` always.
    """
    kinds = ["token sequences" if "vocab_size" in info else "images" for info in (model_info, data_info)]
    if kinds[0] != kinds[1]:
        raise UserError(f"{key}: these data are {kinds[1]}, but {model_desc} was built for {kinds[0]}")
    facts = ["vocab_size", "num_classes"] if "vocab_size" in data_info else ["input_shape", "num_classes"]
    if "vocab" in model_info and "vocab" in data_info:
        facts.append("vocab")
    show = lambda fact, v: f"of {len(v)} tokens" if fact == "vocab" else v  # noqa: E731
    for fact in facts:
        theirs, ours = model_info.get(fact), data_info.get(fact)
        if fact == "input_shape":
            theirs, ours = (None if v is None else tuple(v) for v in (theirs, ours))
        if theirs != ours:
            raise UserError(f"{key}: {fact} is {show(fact, ours)} but {model_desc} was built for "
                            f"{show(fact, theirs)}")


def check_compatible(model: torch.nn.Module, model_info: dict, data_info: dict) -> None:
    """UserError unless the data fit the base model: the inputs and classes it was built for, and a dry forward."""
    check_data_fits(model_info, data_info, "the base model")
    check_accepts(model, data_info)


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
def _upstream_lock(output_dir: str):
    """One process at a time produces an upstream run (parallel sweep points may name the same one). Under
    torchrun the ranks produce it together, so they take no lock."""
    if dist.world_size() > 1:
        yield
        return
    out = Path(output_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{out.name}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def resolve_upstream(ref: str, stage: str, key: str) -> str:
    """The finished run directory that ``ref`` names: a run directory, or a config file (run now if needed)."""
    path = Path(ref)
    if path.is_dir():
        if not is_finished(path):
            raise UserError(f"{key}: {path} is not a finished run directory")
        return str(path)
    if path.suffix not in (".yaml", ".yml"):
        raise UserError(f"{key}: {ref} is neither a run directory nor a config file")
    declared = _stage_of(read_yaml(path))
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
    with _upstream_lock(cfg.output_dir):
        return _produce_upstream(cfg, path, key)


def _produce_upstream(cfg: RunConfig, path: Path, key: str) -> str:
    if is_finished(cfg.output_dir):  # another process made it while this one waited for the lock
        return cfg.output_dir
    unfinished = has_state(cfg.output_dir)  # an upstream run interrupted earlier: continue it
    if dist.is_main():
        what = "unfinished, so resuming" if unfinished else "missing, so running"
        print(f"{key}: {cfg.output_dir} is {what} {path} first", flush=True)
    try:
        return str(execute(cfg, resume=unfinished))
    except Interrupted as err:
        err.upstream = True  # rerunning the downstream command resumes it; --resume would name the wrong stage
        raise


STAGE_SECTIONS = {"mask": "ablate", "transfer": "transfer", "guidance": "guide"}  # sections only that stage has


def _stage_of(raw: dict[str, Any]) -> Optional[str]:
    """The stage a config is for: its ``stage:`` key, or the section only that stage has (None: can't tell)."""
    if raw.get("stage") is not None:
        return str(raw["stage"])
    found = next((stage for section, stage in STAGE_SECTIONS.items() if section in raw), None)
    return found or ("base" if raw.get("model") is not None and "base" not in raw else None)


LossScope = Literal["answer", "sequence"]


def make_loss(scope: LossScope) -> Callable[[torch.nn.Module, Any], tuple[torch.Tensor, dict[str, float]]]:
    """The task loss of an Objective: ``answer`` scores the labelled positions (an image's class, the arithmetic
    answer); ``sequence`` is the causal-LM loss over every next token of the input, as the original math code."""

    def loss(model, batch):
        x, y = batch
        logits = logits_of(model(x))
        if scope == "sequence":
            return classification_loss(logits[:, :-1], x[:, 1:]), {}
        return classification_loss(logits, y), {}

    return loss


def evaluate_task(model: torch.nn.Module, splits: dict[str, Split], info: dict, batch_size: int,
                  device: torch.device) -> dict[str, float]:
    """Accuracy and loss per split; shape bias (overall and per class) for each cue-conflict pair in ``info``."""
    pairs = info.get("cue_conflict_pairs", {})
    metrics = evaluate_classification(model, {k: v for k, v in splits.items() if k not in pairs.values()},
                                      batch_size, device)
    for shape_set, texture_set in pairs.items():
        if shape_set not in splits or texture_set not in splits:
            continue
        pred = torch.cat([predict(model, x, batch_size, device) for x, _ in batches(splits[shape_set], batch_size)])
        bias = shape_bias(pred, splits[shape_set].y, splits[texture_set].y, info["num_classes"])
        prefix = "" if shape_set == "cue_conflict" else f"{shape_set}_"
        metrics[f"{prefix}shape_bias"] = bias.overall
        metrics[f"{texture_set}_acc"] = bias.texture_accuracy
        names = info.get("class_names") or [str(c) for c in range(info["num_classes"])]
        metrics.update({f"{prefix}shape_bias/{name}": value for name, value in zip(names, bias.per_class)})
    return metrics


def summary_metrics(result_row: dict[str, Any]) -> dict[str, Any]:
    """The numeric figures of a metrics row, without timing columns."""
    return {k: v for k, v in result_row.items() if isinstance(v, (int, float)) and not k.startswith(TIMING_PREFIX)}
