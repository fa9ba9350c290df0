"""The one training loop every stage uses.

Features: ``device: auto|cpu|cuda``; any ``torch.optim`` optimizer by name; constant / step / cosine / linear schedules
with linear warm-up; gradient clipping and accumulation; bf16 autocast on CUDA; evaluation every N epochs or steps; the
best checkpoint by a chosen metric, early stopping on it (patience or target); a NaN/inf guard that names the step;
state saved atomically every epoch and on Ctrl-C, so ``--resume`` ends with the same metrics as an uninterrupted
run; DistributedDataParallel under torchrun (every rank stops together when any rank's loss stops being finite).

A stage plugs in an ``Objective``: how to compute a batch's loss, how to evaluate, and optional hooks (per-epoch
set-up such as a temperature, per-step clean-up such as restoring frozen weights).

Raises ``DivergedError`` (a UserError: exit code 2) when the loss stops being finite; the last saved state stays.
"""

from __future__ import annotations

import copy
import math
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from . import dist
from .config import OptimizerConfig, ScheduleConfig, TrainConfig
from .data import BatchLoader, Split, batches
from .errors import UserError, under_key
from .steps import Backprop, GradientProvider, RuleContext, StepContext, build_rule
from .run import TIMING_PREFIX, Run, has_state, time_left
from .seeds import derive_seed, rng_state, set_rng_state
from .files import fault_point

IGNORE_INDEX = -100


class DivergedError(UserError):
    """The loss became NaN or infinite."""


@dataclass
class Objective:
    """What a stage plugs into ``fit``.

    loss(model, batch) -> (loss tensor, {name: float} averaged over the batches that log that name)
    evaluate(model) -> {metric: float}; must contain ``TrainConfig.select_metric``
    train_mode(model): put the model in training mode (masks keep their frozen base in eval mode, for example)
    on_epoch_start(epoch) -> {name: float} logged with the epoch's evaluation (a temperature, say)
    after_step(): after every optimizer step (restore frozen weights, say)
    step: the number of optimizer steps taken so far, kept current by the loop for ``loss`` to read
    criterion(logits, targets) -> loss: what learning rules other than backprop (``train.rule``) differentiate
    gradients: a gradient provider that replaces the one ``train.rule`` names (backprop with a monitor, say)
    """

    loss: Callable[[nn.Module, Any], tuple[torch.Tensor, dict[str, float]]]
    evaluate: Callable[[nn.Module], dict[str, float]]
    train_mode: Callable[[nn.Module], None] = lambda model: model.train()
    on_epoch_start: Optional[Callable[[int], dict[str, float]]] = None
    after_step: Optional[Callable[[], None]] = None
    step: int = 0
    criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = lambda logits, y: classification_loss(logits, y)
    gradients: Optional[GradientProvider] = None


@dataclass
class FitResult:
    best: dict[str, Any]
    last: dict[str, Any]
    steps: int
    stop_reason: str
    history: list[dict[str, Any]] = field(default_factory=list)
    best_weights: Optional[dict[str, torch.Tensor]] = None  # the state dict of the best evaluation


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("train.device: cuda requested but no CUDA device is available (use auto or cpu)")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and dist.world_size() > 1:
        return torch.device("cuda", dist.local_rank())
    return torch.device(name)


def build_optimizer(params: Iterable[torch.nn.Parameter], cfg: OptimizerConfig) -> torch.optim.Optimizer:
    """The configured optimizer (its arguments were checked when the config was validated)."""
    return getattr(torch.optim, cfg.name)([p for p in params if p.requires_grad], lr=cfg.lr, **cfg.kwargs)


def lr_factor(cfg: ScheduleConfig, step: int, steps_per_epoch: int, total_steps: int) -> float:
    """The learning-rate multiplier at optimizer step ``step`` (0-based)."""
    warm = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0
    if cfg.name == "step":
        return warm * cfg.gamma ** ((step // max(steps_per_epoch, 1)) // cfg.step_epochs)
    if cfg.name == "cosine":
        span = max(total_steps - cfg.warmup_steps, 1)
        progress = min(max(step - cfg.warmup_steps, 0) / span, 1.0)
        return warm * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))
    if cfg.name == "linear" and step >= cfg.warmup_steps:  # transformers' get_linear_schedule_with_warmup
        return max(0.0, (total_steps - step) / max(total_steps - cfg.warmup_steps, 1))
    return warm


def device_of(model: nn.Module) -> torch.device:
    """Where ``model``'s parameters are (the CPU for a model without any): its batches go there."""
    param = next(iter(model.parameters()), None)
    return param.device if param is not None else torch.device("cpu")


def input_target_pair(batch: Any) -> tuple[Any, Any]:
    """``(inputs, targets)`` of a batch a user's data loader yielded; one line when it is something else."""
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[0], batch[1]
    raise UserError(f"the data loader must yield (inputs, targets) batches, got {type(batch).__name__}")


def logits_of(output: Any) -> torch.Tensor:
    """Models may return a tensor or an object / tuple holding logits (Hugging Face outputs, say)."""
    if isinstance(output, torch.Tensor):
        return output
    if hasattr(output, "logits"):
        return output.logits
    if isinstance(output, (tuple, list)):
        return output[0]
    raise TypeError(f"cannot find logits in a model output of type {type(output).__name__}")


def classification_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy for (B, C) logits or (B, T, C) sequence logits; targets of -100 are not scored."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1), ignore_index=IGNORE_INDEX)


@torch.no_grad()
def evaluate_classification(model: nn.Module, splits: dict[str, Split], batch_size: int, device: torch.device,
                            forward: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None
                            ) -> dict[str, float]:
    """``<split>_acc`` and ``<split>_loss`` for each split (scored positions only for sequences)."""
    metrics = {}
    for name, split in splits.items():
        metrics[f"{name}_acc"], metrics[f"{name}_loss"], _ = score_batches(model, batches(split, batch_size), device,
                                                                           forward)
    return metrics


@torch.no_grad()
def score_batches(model: nn.Module, pairs: Iterable[tuple[torch.Tensor, torch.Tensor]], device: torch.device,
                  forward: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None) -> tuple[float, float, int]:
    """(accuracy, mean cross-entropy, scored count) of ``model`` in evaluation mode over the scored positions (targets
    other than -100) of ``(inputs, targets)`` batches; accuracy and loss are 0 when nothing is scored (count 0)."""
    forward = forward or (lambda m, x: logits_of(m(x)))
    was_training = model.training
    model.eval()
    correct = scored = 0
    loss_sum = 0.0
    for x, y in pairs:
        x, y = x.to(device), y.to(device)
        logits = forward(model, x).float()
        flat_logits, flat_y = logits.reshape(-1, logits.shape[-1]), y.reshape(-1)
        keep = flat_y != IGNORE_INDEX
        loss_sum += F.cross_entropy(flat_logits[keep], flat_y[keep], reduction="sum").item()
        correct += (flat_logits[keep].argmax(-1) == flat_y[keep]).sum().item()
        scored += int(keep.sum())
    model.train(was_training)
    return correct / max(scored, 1), loss_sum / max(scored, 1), scored


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch_size: int, device: torch.device) -> torch.Tensor:
    """Predicted classes (argmax of the last logits dimension) for ``x``, on the CPU."""
    was_training = model.training
    model.eval()
    out = [logits_of(model(x[i:i + batch_size].to(device))).argmax(-1).cpu() for i in range(0, len(x), batch_size)]
    model.train(was_training)
    return torch.cat(out)


class _DeferredInterrupt:
    """Ctrl-C sets a flag that the loop checks after each optimizer step (and that step's evaluation), so the state
    it saves is consistent.

    A second Ctrl-C interrupts at once. Outside the main thread (where signals cannot be caught) this does nothing.
    """

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
        return False


class _Tracker:
    """Best value of the selection metric and the evaluations since it improved."""

    def __init__(self, mode: str, ties: str = "first"):
        self.mode, self.ties = mode, ties
        self.best_value: Optional[float] = None
        self.best_row: dict[str, Any] = {}
        self.since_best = 0

    def update(self, value: float, row: dict[str, Any]) -> bool:
        """Record an evaluation; True when it becomes the best (so its weights must be kept, ties included)."""
        tie = self.best_value is not None and value == self.best_value
        better = self.best_value is None or (value > self.best_value if self.mode == "max" else value < self.best_value)
        replaced = better or (tie and self.ties == "last")
        if replaced:
            self.best_value, self.best_row, self.since_best = value, dict(row), 0
        else:
            self.since_best += 1
        return replaced

    def reached(self, target: Optional[float]) -> bool:
        if target is None or self.best_value is None:
            return False
        return self.best_value >= target if self.mode == "max" else self.best_value <= target


def fit(model: nn.Module, objective: Objective, train: Split, cfg: TrainConfig, run: Run, *, seed: int,
        device: torch.device, params: Optional[Iterable[nn.Parameter]] = None, restore_best: bool = True
        ) -> FitResult:
    """Train ``model`` on ``train`` with ``objective``; log to ``run``; leave the best weights in ``model``."""
    loop = _Loop(model, objective, train, cfg, run, seed, device, params)
    with _DeferredInterrupt() as interrupt:
        loop.interrupt = interrupt
        result = loop.run()
    if interrupt.requested:  # Ctrl-C after the last step (its evaluation, the final save): stop now, state saved
        raise KeyboardInterrupt
    if restore_best and result.best_weights is not None:
        dist.unwrap(loop.model).load_state_dict(result.best_weights)
    return result


class _Loop:
    def __init__(self, model, objective, train, cfg, run, seed, device, params):
        self.cfg, self.run_dir, self.objective, self.device = cfg, run, objective, device
        model.to(device)
        self.model = dist.wrap(model, device)
        self.loader = BatchLoader(train, cfg.batch_size, shuffle=True, seed=seed, rank=dist.rank(),
                                  world_size=dist.world_size(), drop_last=cfg.drop_last)
        if len(self.loader) == 0 and cfg.epochs > 0:  # not one optimizer step: a "finished" run of the initial model
            share = f" ({len(train) // dist.world_size()} per process)" if dist.world_size() > 1 else ""
            raise UserError(f"train.batch_size {cfg.batch_size} is larger than the training set of {len(train)} "
                            f"examples{share}, and full batches only are used (drop_last): lower train.batch_size")
        self.steps_per_epoch = max(-(-len(self.loader) // cfg.grad_accum), 1)  # a last, partial group steps too
        total = cfg.epochs * self.steps_per_epoch
        self.total_steps = min(total, cfg.max_steps) if cfg.max_steps else total
        self.optimizer = build_optimizer(params if params is not None else model.parameters(), cfg.optimizer)
        # How a step's gradients are produced (train.rule); its initial network is the model as training starts.
        with under_key("train.rule"):
            self.rule = objective.gradients or build_rule(cfg.rule, RuleContext(
                dist.unwrap(self.model), objective.loss, objective.criterion, derive_seed(seed, "rule")),
                cfg.rule_builder_options())
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(cfg.schedule, s, self.steps_per_epoch, self.total_steps))
        self.tracker = _Tracker(cfg.select_mode, cfg.select_ties)
        self.best_weights: Optional[dict[str, torch.Tensor]] = None
        self.history: list[dict[str, Any]] = []
        self.epoch = self.batch_in_epoch = self.step = 0
        self.epoch_logs: dict[str, float] = {}
        self.sums: dict[str, float] = {}  # per logged name: its sum and the number of batches that logged it
        self.counts: dict[str, int] = {}
        self.interrupt: Optional[_DeferredInterrupt] = None
        self.elapsed = 0.0  # training seconds of this fit, over every process that worked on it
        self.stop_reason = "epochs"
        self.autocast = cfg.precision == "bf16" and device.type == "cuda"
        if run.resumed:
            self._restore(run.load_state())

    # --- state ------------------------------------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        return {
            "model": dist.unwrap(self.model).state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "rng": rng_state(), "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch, "step": self.step, "sums": self.sums, "counts": self.counts,
            "epoch_logs": self.epoch_logs, "best_value": self.tracker.best_value, "best_row": self.tracker.best_row,
            "since_best": self.tracker.since_best, "best_weights": self.best_weights, "history": self.history,
            "elapsed": self.elapsed, "stop_reason": self.stop_reason, "rule": self.rule.state_dict(),
        }

    def save(self) -> None:
        self.elapsed = time.perf_counter() - self.started
        self.run_dir.save_state(self.state())

    def _restore(self, state: Optional[dict[str, Any]]) -> None:
        if state is None:
            return
        dist.unwrap(self.model).load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.epoch, self.batch_in_epoch, self.step = state["epoch"], state["batch_in_epoch"], state["step"]
        self.sums, self.epoch_logs = state["sums"], state["epoch_logs"]
        # State saved before names were counted one by one held a single count for every name.
        self.counts = state["counts"] if "counts" in state else {name: state["count"] for name in self.sums}
        self.tracker.best_value, self.tracker.best_row = state["best_value"], state["best_row"]
        self.tracker.since_best, self.best_weights = state["since_best"], state["best_weights"]
        self.history, self.elapsed = state["history"], state["elapsed"]
        self.stop_reason = state.get("stop_reason", "epochs")  # a run that had decided to stop stays stopped
        self.rule.load_state_dict(state.get("rule", {}))
        set_rng_state(state["rng"])
        self.run_dir.truncate_metrics(after_step=self.step)

    # --- loop -------------------------------------------------------------------------------------------------

    def run(self) -> FitResult:
        cfg = self.cfg
        self.started = time.perf_counter() - self.elapsed  # a resumed run goes on counting
        self.first_step = self.step  # the rate for the time left: this process's own steps
        self.epoch_bar = tqdm(total=cfg.epochs, initial=self.epoch, desc=self.run_dir.path.name, unit="epoch",
                              dynamic_ncols=True, disable=not self._show_bars())
        while self.epoch < cfg.epochs and self.stop_reason == "epochs":
            if self.batch_in_epoch == 0 and self.objective.on_epoch_start:
                self.epoch_logs = self.objective.on_epoch_start(self.epoch)
            elif self.objective.on_epoch_start:  # resumed mid-epoch: recompute the epoch's settings silently
                self.objective.on_epoch_start(self.epoch)
            self._train_epoch()
            if self.stop_reason != "epochs":
                break
            self.epoch += 1
            self.batch_in_epoch = 0
            last_epoch = self.epoch == cfg.epochs
            if cfg.eval_unit == "epoch" and (self.epoch % cfg.eval_every == 0 or last_epoch):
                self._evaluate()
            self.save()
            self.epoch_bar.update(1)
        self.epoch_bar.close()
        if not self.history or self.history[-1]["step"] != self.step:
            self._evaluate()
        self.save()
        return FitResult(self.tracker.best_row, self.history[-1], self.step, self.stop_reason, self.history,
                         self.best_weights)

    def _train_epoch(self) -> None:
        cfg = self.cfg
        self.loader.set_epoch(self.epoch)
        self.objective.train_mode(self.model)
        bar = tqdm(total=len(self.loader), initial=self.batch_in_epoch, leave=False, dynamic_ncols=True,
                   desc=f"epoch {self.epoch + 1}/{cfg.epochs}", unit="batch", position=1,
                   disable=not self._show_bars())
        for i, batch in self.loader.iter_from(self.batch_in_epoch):  # resumed: from the next untrained batch
            self._train_batch(batch, self._group_size(i))
            bar.update(1)
            last = i + 1 == len(self.loader)
            if (i + 1) % cfg.grad_accum and not last:
                continue
            self._optimizer_step()
            self.batch_in_epoch = i + 1
            if cfg.eval_unit == "step" and self.step % cfg.eval_every == 0:
                self._evaluate()
                self.objective.train_mode(self.model)
            if cfg.max_steps and self.step >= cfg.max_steps:
                self.stop_reason = "max_steps"
            # Only now, with this step's evaluation logged and the decision to stop taken (both saved), may Ctrl-C
            # stop the process: the resumed run then does exactly what this one would have done next.
            if self.interrupt is not None and self.interrupt.requested:
                self.save()
                raise KeyboardInterrupt
            if self.stop_reason != "epochs":
                break
        bar.close()

    def _group_size(self, batch_index: int) -> int:
        """How many batches the optimizer step that ``batch_index`` belongs to accumulates (the last may be short)."""
        accum = self.cfg.grad_accum
        return min(accum, len(self.loader) - batch_index // accum * accum)

    def _total_steps(self) -> int:
        """The optimizer steps the run takes if nothing stops it early."""
        total = self.cfg.epochs * self.steps_per_epoch
        return min(total, self.cfg.max_steps) if self.cfg.max_steps else total

    def _show_bars(self) -> bool:
        return self.cfg.progress and dist.is_main() and sys.stderr.isatty()

    def _train_batch(self, batch, group_size: int) -> None:
        x, y = (t.to(self.device, non_blocking=True) for t in batch)
        self.objective.step = self.step
        # Gradients land in .grad before the finiteness check; no rank steps the optimizer on a non-finite loss.
        step = StepContext(1 / group_size, self.optimizer.param_groups[0]["lr"], lambda: torch.autocast(
            self.device.type, dtype=torch.bfloat16, enabled=self.autocast))
        # Back-propagation runs through the DDP wrapper; the other rules average their gradients over ranks.
        model = self.model if isinstance(self.rule, Backprop) else dist.unwrap(self.model)
        loss, logs = self.rule.gradients(model, (x, y), step)
        value = loss.item()
        finite = math.isfinite(value)
        # Under DDP every rank must stop together: one that went on would wait forever in the gradient all-reduce.
        if not dist.all_agree(finite, self.device):
            what = value if not finite else "non-finite on another rank"
            raise DivergedError(f"the loss became {what} at step {self.step + 1} (epoch {self.epoch + 1}); the run "
                                f"stopped: {self._what_is_kept()} (lower the learning rate or clip gradients)")
        for name, v in {"train_loss": value, **logs}.items():
            self.sums[name] = self.sums.get(name, 0.0) + float(v)
            self.counts[name] = self.counts.get(name, 0) + 1

    def _what_is_kept(self) -> str:
        """Where the last saved state stays; a run without any is removed when it stops (see stages.execute)."""
        top = self.run_dir.top
        if (self.run_dir.path / "state.pt").is_file():
            return f"its last saved state stays in {self.run_dir.path} (of run {top.path})"
        if top is not self.run_dir and has_state(top.path):
            return f"no state of this sub-run had been saved; run {top.path} keeps the finished ones"
        return "no state had been saved yet, so nothing of the run is kept"

    def _optimizer_step(self) -> None:
        if not isinstance(self.rule, Backprop):  # DDP averaged backprop's; the other rules' are this rank's own
            dist.average_gradients(self.model.parameters())
        if self.cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.objective.after_step:
            self.objective.after_step()
        self.step += 1
        fault_point()  # the tests' crash hook: a kill -9 between two saves

    def _evaluate(self) -> None:
        metrics = self.objective.evaluate(dist.unwrap(self.model))
        if self.cfg.select_metric not in metrics:
            raise UserError(f"train.select_metric: {self.cfg.select_metric!r} is not measured; "
                            f"choose one of {', '.join(sorted(metrics))}")
        train_logs = {k: v / self.counts[k] for k, v in self.sums.items()}
        row = {"epoch": self.epoch, "step": self.step, **train_logs, **self.epoch_logs, **metrics,
               "lr": self.optimizer.param_groups[0]["lr"],
               f"{TIMING_PREFIX}elapsed_s": round(time.perf_counter() - self.started, 3)}
        self.sums, self.counts = {}, {}
        self.history.append(row)
        self.run_dir.log_metrics(row)
        if self.tracker.update(metrics[self.cfg.select_metric], row):
            self.best_weights = copy.deepcopy(dist.unwrap(self.model).state_dict())
        if dist.is_main():
            shown = " | ".join(f"{k} {v:.4g}" for k, v in row.items()  # per-layer/per-class figures: files only
                               if isinstance(v, float) and not k.startswith(TIMING_PREFIX) and "/" not in k)
            left = time_left(time.perf_counter() - self.started - self.elapsed, self.step - self.first_step,
                             self._total_steps() - self.first_step)
            tqdm.write(f"[{self.run_dir.path.name}] epoch {self.epoch} step {self.step} | {shown}"
                       + (f" | {left}" if left else ""))
        early = self.cfg.early_stop
        if self.tracker.reached(early.target):
            self.stop_reason = "target"
        elif early.patience and self.tracker.since_best >= early.patience:
            self.stop_reason = "patience"
