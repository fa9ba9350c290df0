"""The stage runner: every stage is run the same way (seed, device, run directory, finish or clean up).

A stage is an entry of ``STAGES``: a ``Stage`` holding ``Config`` (a ``RunConfig`` subclass with the stage's own
sections), ``main(ctx)``, which does the work and returns the summary, and optionally ``prepare(cfg)``; ``execute``
wraps them.
"""

from __future__ import annotations

import shutil
import signal
import tempfile
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from ..dataset_info import DatasetInfo
from .. import dist
from ..config import RunConfig, load_config, read_yaml, to_yaml
from ..data import DataBundle, DataContext
from ..data.cache import wait_for_writes
from ..errors import UserError, under_key
from ..loggers import check_available as check_loggers
from ..loggers import sink_factory
from ..registry import BUILTIN_MODULES, DATASETS, MODELS, OptionsOf, Registry
from ..run import Run, has_state, is_finished
from ..seeds import draw_seed, seed_everything
from ..train import resolve_device


TASK_FIGURES = ("acc", "loss", "perplexity")  # what a task evaluation reports per split (stages.task.evaluate_task)


@dataclass(frozen=True)
class Figures:
    """What a stage's result rows hold (the values a reproduce claim may read): ``<split>_<figure>`` for each
    ``per_split`` figure, its ``own`` figures, and any figure named with one of ``prefixes`` (``align/<layer>``)."""

    per_split: tuple[str, ...] = TASK_FIGURES
    own: tuple[str, ...] = ()
    prefixes: tuple[str, ...] = ()


@dataclass(frozen=True)
class Stage:
    """A stage: what ``instill <name> CONFIG`` runs.

    Attributes:
        Config: its config class, a ``RunConfig`` subclass with the stage's own sections.
        main: ``main(ctx: Context) -> summary``: the work, in the run directory ``ctx.run``.
        prepare: ``prepare(cfg)``, run before the run directory exists (and by ``--validate``): upstream runs and
            every input check, so that bad input leaves nothing written.
        sections: top-level config sections only this stage has: they tell a config's stage when it has no
            ``stage:`` key (an upstream reference to a config file, a swept config).
        figures: what its result rows hold (``Figures``), so that a claim naming another is refused before it
            runs; None: checked once it ran.
    """

    Config: type[RunConfig]
    main: Callable[["Context"], dict[str, Any]]
    prepare: Optional[Callable[[RunConfig], None]] = None
    sections: tuple[str, ...] = ()
    figures: Optional[Figures] = None

    __signature__ = OptionsOf("main")  # no options (a stage's are its config's sections); its help: main's docstring

    def __call__(self, ctx: "Context") -> dict[str, Any]:
        return self.main(ctx)


# Stages, by name. Each research system registers its own (``STAGES.register("ablate", doc=__doc__)(Stage(...))`` at
# the end of its stage module), imported by name when a config names it (``registry.BUILTIN_MODULES["stage"]``: the
# systems sit above this package and import from it, never the other way round). Yours: a ``Stage`` named by import
# path (``instill mypkg.stages:census CONFIG``) or by an entry point of group ``instill.stages``.
STAGES = Registry("stage", builtins=BUILTIN_MODULES["stage"])


def get_stage(name: str) -> Stage:
    """The stage ``name`` names; a UserError (with the nearest names) for an unknown one or an object that is no
    ``Stage``."""
    stage = STAGES.get(name).build
    if not isinstance(stage, Stage):
        raise UserError(f"stage {name!r}: {type(stage).__name__} is not an instill.stages.Stage (a stage is "
                        f"Stage(Config, main, prepare=None, sections=()))")
    return stage


def stage_of(raw: dict[str, Any]) -> Optional[str]:
    """The stage a config mapping is for: its ``stage:`` key, or the one stage that claims a section it has
    (``Stage.sections``; by its registered name rather than an import path), or ``base`` for a model without
    upstream runs (None: can't tell)."""
    if raw.get("stage") is not None:
        return str(raw["stage"])
    claims: dict[int, str] = {}  # one name per stage: an import path may name a registered stage again
    for entry in sorted(STAGES.entries(), key=lambda e: (":" in e.name, e.name)):
        if isinstance(entry.build, Stage) and set(entry.build.sections) & set(raw):
            claims.setdefault(id(entry.build), entry.name)
    if len(claims) == 1:
        return next(iter(claims.values()))
    return "base" if not claims and raw.get("model") is not None and "base" not in raw else None


@dataclass
class Context:
    """What a stage's ``main`` works with."""

    cfg: RunConfig
    run: Run
    seed: int
    device: torch.device

    def build_data(self) -> DataBundle:
        return build_data(self.cfg, self.seed)

    def build_model(self, info: DatasetInfo) -> torch.nn.Module:
        with under_key("model"):
            return MODELS.build(self.cfg.model.name, info, self.cfg.model.params)


def build_data(cfg: RunConfig, seed: int) -> DataBundle:
    return DATASETS.build(cfg.data.name, DataContext(seed=seed), cfg.data.params)


def load_stage_config(path: str | Path, stage: str, overrides: list[str] = (), out: Optional[str] = None,
                      values: Optional[dict[str, Any]] = None) -> RunConfig:
    cfg = load_config(path, get_stage(stage).Config, stage, overrides, values)
    if out is not None:
        cfg.output_dir = out
    return cfg


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during a run; ``resumable`` when its run directory holds saved state to continue from; ``finished``
    when the run had written its last file (a Ctrl-C at its very end: nothing is lost, the user is told so)."""

    def __init__(self, path: Path, resumable: bool, finished: bool = False):
        super().__init__(str(path))
        self.path, self.resumable, self.upstream, self.finished = path, resumable, False, finished


@contextmanager
def _noticed_interrupts():
    """Remember every Ctrl-C of the block, so that one raised where Python can only print "Exception ignored"
    (a finalizer, a matplotlib callback during the final plots) still ends the command with code 130. Yields a
    list that holds True once one came. Only in the main thread where SIGINT has its default handler (the
    outermost run of a nested upstream one)."""
    noticed: list[bool] = []
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield noticed
        return

    def handle(signum, frame):
        noticed.append(True)
        signal.default_int_handler(signum, frame)

    previous = signal.signal(signal.SIGINT, handle)
    try:
        yield noticed
    finally:
        signal.signal(signal.SIGINT, previous)


def free_core_threads() -> int:
    """Torch threads for a run whose config sets none: ``OMP_NUM_THREADS`` when set (a sweep's workers set it),
    else one per core that is free at the start (cores less the 1-minute load average, at least 1). Threads beyond
    the free cores wait on each other at every operation: on a busy machine a run at one thread per core is many
    times slower than at one thread."""
    import os

    if os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads()
    try:
        busy = round(os.getloadavg()[0])
    except (AttributeError, OSError):
        busy = 0
    return max(1, min(torch.get_num_threads(), (os.cpu_count() or 1) - busy))


def check_inputs(cfg: RunConfig) -> None:
    """What every run checks before anything is built: the optional packages of the features it switches on, and
    the data's and model's own checks (paths, library model names, weights files against the architecture)."""
    check_loggers(cfg.logging)
    if cfg.data is not None:  # their messages name the key
        DATASETS.check(cfg.data.name, cfg.data.params)
    if cfg.model is not None:  # None: the stage takes its model from an upstream run
        MODELS.check(cfg.model.name, cfg.model.params)


class UpstreamPending(Exception):
    """Raised by ``resolve_upstream`` under ``validate``: the upstream config is valid, but its run does not exist
    yet, so what the stage would check against its output cannot be checked now."""

    def __init__(self, key: str, config: str, output_dir: str, notes: list[str]):
        super().__init__(f"{key}: {output_dir} does not exist yet; {config} (valid) would run first")
        self.notes = notes  # what the upstream config's own validation could not check


_validating = False
_scratch: Optional[Path] = None  # made on first use while ``validate`` runs, removed when it ends


def validating() -> bool:
    """Whether ``validate`` is running: upstream runs are then checked, never produced."""
    return _validating


def validation_scratch() -> Optional[Path]:
    """Under ``validate``, a temporary folder removed when validation ends (None otherwise): what a run would write
    before it starts (an imported checkpoint) is made there, so validation checks it and leaves no file behind."""
    global _scratch
    if _validating and _scratch is None:
        try:
            _scratch = Path(tempfile.mkdtemp(prefix="instill-validate-"))
        except OSError as err:
            raise UserError(f"--validate: cannot make a temporary folder to check an import in ({err.strerror})"
                            ) from None
    return _scratch


def validate(cfg: RunConfig) -> list[str]:
    """``--validate``: every check a run makes before its run directory exists, without training anything (an
    upstream run that is missing has its own config validated instead). Returns notes on what could not be
    checked; raises a UserError for the first problem."""
    global _validating, _scratch
    check_inputs(cfg)
    prepare = get_stage(cfg.stage).prepare
    if prepare is None:
        return []
    before, _validating = _validating, True
    try:
        seed = cfg.reproducibility.random_seed or 0  # prepare builds data with it: any seed checks them
        checked = cfg.model_copy(deep=True)  # prepare resolves upstream paths into its config: not into the caller's
        checked.reproducibility = checked.reproducibility.model_copy(update={"reproduce": True, "random_seed": seed})
        prepare(checked)
    except UpstreamPending as pending:
        return [*pending.notes, str(pending)]
    finally:
        _validating = before
        if not before and _scratch is not None:  # the outermost validation ends
            shutil.rmtree(_scratch, ignore_errors=True)
            _scratch = None
    return []


RESUME_OVERRIDES = ("train.threads", "train.progress")  # what --set may change on --resume: not the results


def execute(cfg: RunConfig, *, resume: bool = False, overrides: list[str] = (), announce: Optional[str] = None
            ) -> Path:
    """Run a stage end to end; returns its run directory. UserErrors leave nothing half-written behind.

    Args:
        cfg: the validated config.
        resume: continue the unfinished run in ``cfg.output_dir`` with the config (and seed) it started with.
        overrides: the ``--set`` items given with ``resume``; only RESUME_OVERRIDES keys are accepted.
        announce: a line printed once the run has started (after its checks and its directory's claim).

    Raises:
        UserError: bad input, checked before the run directory is claimed where possible.
    """
    stage = get_stage(cfg.stage)
    if resume:  # continue with the very config (and seed) the run started with
        cfg = _resumed_config(cfg, overrides)
    threads = cfg.train.threads or free_core_threads()
    torch.set_num_threads(threads)
    cfg.train = cfg.train.model_copy(update={"threads": threads})  # in the snapshot: a replay runs at this count
    device = resolve_device(cfg.train.device)
    dist.init(device)  # before the seed is drawn: rank 0 draws it and the others must receive it
    repro = cfg.reproducibility
    seed = repro.random_seed if repro.reproduce else dist.broadcast(draw_seed)
    cfg.reproducibility = repro.model_copy(update={"reproduce": True, "random_seed": seed})  # snapshot replays
    seed_everything(seed, repro.deterministic)
    check_inputs(cfg)
    if stage.prepare is not None:  # upstream runs and input checks, before the run directory exists
        stage.prepare(cfg)
    run = Run.create(cfg.output_dir, to_yaml(cfg), seed, str(device), resume)
    run.attach_sinks(sink_factory(cfg.logging, cfg.name, cfg.model_dump(mode="json")))
    try:
        with _noticed_interrupts() as noticed:
            path = _run_stage(stage, cfg, run, seed, device, announce)
        if noticed:  # a Ctrl-C that a finalizer swallowed: the run finished all the same
            raise Interrupted(path, False, finished=True)
        return path
    finally:
        wait_for_writes()  # a data cache written in the background is on disk when the run returns
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
    accepted = []
    for item in overrides:
        changed = _dump_without(load_stage_config(config, cfg.stage, [item], out=cfg.output_dir), RESUME_OVERRIDES)
        key = item.partition("=")[0].strip()
        old, new = _value_at(kept, key), _value_at(changed, key)
        if changed == kept:
            accepted.append(item)
        elif not _names_run(new, old):  # a config naming the very run the stored config resolved it to: the same
            raise UserError(f"--resume continues a run with its own config.yaml; --set {item} would change {key} "
                            f"from {old!r} to {new!r} (with --resume, --set may change only "
                            f"{', '.join(RESUME_OVERRIDES)})")
    return load_stage_config(config, cfg.stage, accepted, out=cfg.output_dir)


def _value_at(dump: dict[str, Any], key: str) -> Any:
    node: Any = dump
    for part in key.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def _names_run(value: Any, run_dir: Any) -> bool:
    """Is ``value`` a config file whose run directory is ``run_dir`` (how an upstream reference is recorded)?"""
    if not (isinstance(value, str) and value.endswith((".yaml", ".yml")) and Path(value).is_file()
            and isinstance(run_dir, str) and (Path(run_dir) / "config.yaml").is_file()):
        return False
    try:
        stage = read_yaml(Path(run_dir) / "config.yaml").get("stage")
        return isinstance(stage, str) and Path(load_stage_config(value, stage).output_dir) == Path(run_dir)
    except UserError:
        return False


def _dump_without(cfg: RunConfig, keys: tuple[str, ...]) -> dict[str, Any]:
    dump = cfg.model_dump(mode="json")
    for key in keys:
        *sections, leaf = key.split(".")
        node = dump
        for section in sections:
            node = node.get(section) or {}
        node.pop(leaf, None)
    return dump


def _run_stage(stage: Stage, cfg: RunConfig, run: Run, seed: int, device: torch.device, announce: Optional[str]
               ) -> Path:
    repro = cfg.reproducibility
    seed_everything(seed, repro.deterministic)  # the same RNG state whatever prepare() consumed
    verb = "resuming" if run.resumed else ("replaying into" if run.replay_of else "writing")
    if dist.is_main():
        if announce:
            print(announce, flush=True)
        print(f"{cfg.stage}: {verb} {run.path} (seed {seed}, threads {torch.get_num_threads()})", flush=True)
        differences = run.replay_differences()
        if differences:
            print(f"{cfg.stage}: this replay's settings differ from the recorded ones ({'; '.join(differences)}): "
                  "its metrics are not expected to match the original's bit for bit", flush=True)
    try:
        summary = stage.main(Context(cfg, run, seed, device))
        summary = {"stage": cfg.stage, "name": cfg.name, "seed": seed, "duration_s": round(run.elapsed_s(), 2),
                   **summary}
        run.finish(summary)
    except (UserError, KeyboardInterrupt) as err:
        run.close_sinks()
        if isinstance(err, KeyboardInterrupt) and is_finished(run.path):  # Ctrl-C after its last write: complete
            raise Interrupted(run.path, False, finished=True) from None
        if not run.discard_if_empty():  # stopped before any state was saved: nothing to keep, nothing to resume
            run.record_elapsed(quiet=True)  # a resumed run goes on counting from here
        if isinstance(err, KeyboardInterrupt):
            raise Interrupted(run.path, has_state(run.path)) from None
        raise
    return run.path


