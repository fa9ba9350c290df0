"""The ``align`` stage: backprop-free learning rules against back-propagation, and input-weight alignment scores.

For every combination of ``align.data_limits`` (training images kept, through the dataset's ``limit`` key or a seeded
subset of its training split; the held-out sets keep their size),
``align.widths`` (the model's ``width``), ``align.lrs`` and ``align.rules``, one sub-run trains the model with that
rule (``train.rule``, ``instill.align.rules``) through the one training loop. Every rule at a given width starts from
the
same initial weights and sees the same batches. Loss: ``mse`` on (one-hot - target_offset) as the original (summed
over time, averaged over sequences for the Add task), or ``cross_entropy``.

With ``align.scores`` the back-propagation sub-runs also accumulate the Align-zero baseline from their own errors
(``instill.align.scores.AlignmentBaseline``) and log, at every evaluation, each scored layer's alignment score and its
chance controls. Writes ``results.csv`` (one row per combination: rule, width, lr, data_limit, test accuracy and
loss, or the best train and test loss of a regression task as the original reports, the seed and the final score
per layer), ``accuracy_vs_width.png``, ``alignment_vs_width.png``, ``alignment_vs_epoch.png`` (the widest
back-propagation run, with its chance control) and ``summary.json``.

Before the run directory exists (``prepare``) these raise a UserError: a rule the model cannot take (``dfa`` on a
model without blocks and a registered readout), ``widths`` for a model without a ``width`` key, a data limit
larger than the training split, a scored layer the model does not have (nearest names listed), cross-entropy on a
regression task.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal, Optional

import torch
import torch.nn.functional as F
from pydantic import Field, confloat, conint, conlist, field_validator

from ..dataset_info import DatasetInfo
from .scores import CHANCE, AlignmentBaseline, check_layers
from ..config import ModelConfig, RunConfig, Section
from ..data import DataBundle
from ..errors import UserError, under_key
from .ntk import MAX_WIDTH
from ..registry import MODELS, RULES
from ..plots import format_table, plot_lines
from ..steps import RuleContext, build_rule
from ..files import atomic_write_csv
from ..seeds import derive_seed, seed_everything
from ..run import read_metrics
from ..train import Objective, fit
from ..stages.runner import Context, build_data
from ..stages.task import summary_metrics


class HutchinsonSection(Section):
    probes: conint(ge=1) = Field(100, description="Gaussian probes per iteration (the original: 100)")
    iterations: conint(ge=1) = Field(100, description="iterations (the original: 100)")
    normalise: bool = Field(True, description="the original's per-batch mean-|.| renormalisation")


class AlignSection(Section):
    rules: conlist(str, min_length=1) = Field(default_factory=lambda: ["backprop", "align_zero", "align_ada"])
    widths: Optional[conlist(conint(ge=1, le=MAX_WIDTH), min_length=1)] = Field(
        None, description="model widths to sweep (default: the model's)")
    lrs: Optional[conlist(confloat(gt=0), min_length=1)] = Field(None, description="learning rates (default: train's)")
    data_limits: Optional[conlist(conint(ge=1), min_length=1)] = Field(
        None, description="training-set sizes to sweep (the dataset's limit key, else a seeded subset of its "
                          "training split; the held-out sets keep their size)")
    loss: Literal["mse", "cross_entropy"] = Field("mse", description="mse on (one-hot - target_offset), or CE")
    target_offset: float = Field(0.1, description="mse targets are one-hot minus this (the original: 0.1)")
    scores: bool = Field(True, description="alignment scores on the backprop sub-runs, at every evaluation")
    score_layers: Optional[list[str]] = Field(None, description="layers to score (default: every weight layer)")
    score_method: Literal["exact", "hutchinson"] = Field(
        "exact", description="exact: dense formula, convs with circular boundaries; hutchinson: the original's "
                             "probe estimate, convs zero-padded (docs/results.md has the difference)")
    chance: list[Literal[CHANCE]] = Field(default_factory=lambda: list(CHANCE))
    hutchinson: HutchinsonSection = Field(default_factory=HutchinsonSection)

    @field_validator("rules")
    @classmethod
    def _known_rules(cls, rules: list[str]) -> list[str]:
        for name in rules:
            RULES.known(name)
        if len(set(rules)) != len(rules):
            raise ValueError("a rule is listed twice")
        return rules


class Config(RunConfig):
    model: ModelConfig
    align: AlignSection = Field(default_factory=AlignSection)


def prepare(cfg: Config) -> None:
    """Check every combination's inputs (see the module docstring) before anything is written."""
    spec = cfg.align
    data = build_data(cfg, cfg.reproducibility.random_seed)
    regression = data.info.regression
    if regression and spec.loss == "cross_entropy":
        raise UserError(f"align.loss: cross_entropy needs classes; data {cfg.data.name} is a regression task")
    if spec.widths is not None and "width" not in cfg.model.params:
        raise UserError(f"align.widths: model {cfg.model.name} has no width key")
    if spec.data_limits is not None:
        if max(spec.data_limits) > len(data.train):
            raise UserError(f"align.data_limits: {max(spec.data_limits)} training examples requested, but the "
                            f"training split has {len(data.train)}")
    model = _build_model(cfg, data.info, (spec.widths or [None])[0])
    criterion = make_criterion(spec, data.info)
    for rule in spec.rules:
        with under_key("align.rules"):
            build_rule(rule, RuleContext(model, None, criterion, 0), cfg.train.rule_builder_options(rule))
    if spec.scores and "backprop" in spec.rules:
        with under_key("align.score_layers"):
            check_layers(spec.score_layers, _layer_names(model))


def _layer_names(model: torch.nn.Module) -> list[str]:
    if hasattr(model, "layer_names"):
        return model.layer_names()
    return [n for n, m in model.named_modules() if isinstance(getattr(m, "weight", None), torch.nn.Parameter)
            and m.weight.dim() in (2, 4)]


def _build_model(cfg: Config, info: DatasetInfo, width: Optional[int]) -> torch.nn.Module:
    params = dict(cfg.model.params)
    if width is not None:
        params["width"] = width
    with under_key("model"):
        return MODELS.build(cfg.model.name, info, params)


def make_criterion(spec: AlignSection, info: DatasetInfo):
    """The loss of (logits, targets): mse on one-hot - offset (mean over samples and classes), the Add task's
    mse (summed over time, mean over sequences, as the original) or cross-entropy."""
    if info.regression:
        return lambda out, y: (out - y).square().sum(1).mean()
    if spec.loss == "cross_entropy":
        return lambda logits, y: F.cross_entropy(logits, y)
    classes, offset = info.num_classes, spec.target_offset
    return lambda logits, y: (logits - (F.one_hot(y, classes).to(logits.dtype) - offset)).square().mean()


@torch.no_grad()
def evaluate_splits(model: torch.nn.Module, splits: dict[str, Any], criterion, batch_size: int, classify: bool,
                    device: torch.device) -> dict[str, float]:
    """``<split>_loss`` (and ``<split>_acc``) over equal-sized chunks of at most ``batch_size``: batch-statistics
    norm makes outputs depend on the chunk, so no chunk is left tiny."""
    metrics = {}
    for name, split in splits.items():
        chunks = max(1, math.ceil(len(split) / batch_size))
        loss = correct = 0.0
        for index in torch.tensor_split(torch.arange(len(split)), chunks):
            x, y = split.inputs(index).to(device), split.y[index].to(device)
            out = model(x).float()
            loss += float(criterion(out, y)) * len(y)
            if classify:
                correct += float((out.argmax(-1) == y).sum())
        metrics[f"{name}_loss"] = loss / len(split)
        if classify:
            metrics[f"{name}_acc"] = correct / len(split)
    return metrics


def main(ctx: Context) -> dict[str, Any]:
    cfg, spec = ctx.cfg, ctx.cfg.align
    rows = []
    for limit in spec.data_limits or [None]:
        data = _limited_data(cfg, limit, ctx.seed)
        for width in spec.widths or [None]:
            for lr in spec.lrs or [cfg.train.optimizer.lr]:
                for rule in spec.rules:
                    name = "-".join([rule] + ([f"w{width}"] if width else []) + [f"lr{lr:g}"]
                                    + ([f"n{limit}"] if limit else []))
                    rows += ctx.run.sweep([(name, lambda sub, r=rule, w=width, l=lr, n=limit, d=data:
                                            _train(ctx, sub, d, r, w, l, n))])
    return _write_results(ctx, rows)


def _limited_data(cfg: Config, limit: Optional[int], seed: int) -> DataBundle:
    """The data with ``limit`` training examples: through the dataset's own ``limit`` key where it has one (digits,
    mnist5k, cifar10: its statistics then come from the kept examples), else a seeded random subset of the training
    split (image folders, say; the smaller limits' subsets are nested in the larger ones'). Held-out sets unchanged."""
    if limit is None:
        return build_data(cfg, seed)
    if "limit" in cfg.data.params:
        data_cfg = cfg.data.model_copy(update={})
        data_cfg.__pydantic_extra__ = {**cfg.data.params, "limit": limit}
        return build_data(cfg.model_copy(update={"data": data_cfg}), seed)
    data = build_data(cfg, seed)
    order = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(derive_seed(seed, "data_limit")))
    return dataclasses.replace(data, train=data.train.subset(order[:limit]))


def _train(ctx: Context, sub, data, rule: str, width: Optional[int], lr: float, limit: Optional[int]
           ) -> dict[str, Any]:
    cfg, spec = ctx.cfg, ctx.cfg.align
    deterministic = cfg.reproducibility.deterministic
    seed_everything(derive_seed(ctx.seed, "init", width), deterministic)  # every rule: the same initial weights
    model = _build_model(cfg, data.info, width).to(ctx.device)
    classify = not data.info.regression
    criterion = make_criterion(spec, data.info)
    train_cfg = cfg.train.model_copy(update={
        "rule": rule, "optimizer": cfg.train.optimizer.model_copy(update={"lr": lr})})
    batch = train_cfg.eval_batch_size
    tracker = None
    if rule == "backprop" and spec.scores:
        with under_key("align.score_layers"):
            layers = check_layers(spec.score_layers, _layer_names(model))
        tracker = AlignmentBaseline(model, criterion, layers,
                                    method=spec.score_method, chance=tuple(spec.chance),
                                    seed=derive_seed(ctx.seed, "probes"), hutchinson=spec.hutchinson.model_dump())
    # Regression (the Add task) is watched on the whole training and test sets, as the original reports them.
    watched = {"val": data.val} if classify else {"train_full": data.train, "val": data.val, "test": data.test}

    def evaluate(m):
        metrics = evaluate_splits(m, watched, criterion, batch, classify, ctx.device)
        if tracker is not None:
            metrics.update(tracker.scores(m))
        return metrics

    objective = Objective(lambda m, b: (criterion(m(b[0]).float(), b[1]), {}), evaluate, criterion=criterion,
                          gradients=tracker)
    seed_everything(derive_seed(ctx.seed, "train", rule, width, lr, limit), deterministic)
    result = fit(model, objective, data.train, train_cfg, sub, seed=derive_seed(ctx.seed, "batches", limit),
                 device=ctx.device, restore_best=False)
    final = evaluate_splits(model, {"train_full": data.train, **data.eval_sets()}, criterion, batch, classify,
                            ctx.device)
    row = {"rule": rule, "width": width or cfg.model.params.get("width"), "lr": lr, "data_limit": limit,
           "seed": ctx.seed, "steps": result.steps, **summary_metrics(final)}
    if not classify:  # the original reports the best losses over the evaluations
        row["best_train_loss"] = min(h["train_full_loss"] for h in result.history)
        row["best_test_loss"] = min(h["test_loss"] for h in result.history)
    if tracker is not None:
        row.update({k: v for k, v in result.last.items() if k.startswith("align")})
    return row


def _write_results(ctx: Context, rows: list[dict[str, Any]]) -> dict[str, Any]:
    classify = "test_acc" in rows[0]
    metrics = ["test_acc", "test_loss", "val_acc"] if classify else ["best_train_loss", "best_test_loss",
                                                                       "test_loss", "train_full_loss"]
    score_columns = list(dict.fromkeys(k for r in rows for k in r if k.startswith("align")))
    columns = ["rule", "width", "lr", "data_limit", *metrics, "seed", *score_columns]
    table = [{c: r.get(c, "") for c in columns} for r in rows]
    if ctx.run.writes:
        atomic_write_csv(ctx.run.path / "results.csv", table, columns)
        _plot(ctx, rows, metrics[0] if classify else "best_test_loss")
        print("\nresults.csv:\n" + format_table([{c: r.get(c, "") for c in columns if "/" not in c}
                                                 for r in rows]))
    return {"results": rows}


def _label(ctx: Context, row: dict[str, Any]) -> str:
    spec = ctx.cfg.align
    label = row["rule"]
    if spec.lrs and len(spec.lrs) > 1:
        label += f" lr{row['lr']:g}"
    if spec.data_limits and len(spec.data_limits) > 1:
        label += f" n{row['data_limit']}"
    return label


def _plot(ctx: Context, rows: list[dict[str, Any]], headline: str) -> None:
    path, spec = ctx.run.path, ctx.cfg.align
    if spec.widths and len(spec.widths) > 1:
        series: dict[str, list] = {}
        for r in rows:
            series.setdefault(_label(ctx, r), []).append((r["width"], r[headline]))
        plot_lines(path / "accuracy_vs_width.png", series, title=f"{headline} against width per rule",
                   xlabel="width (log scale)", ylabel=headline, logx=True)
    scored = [r for r in rows if any(k.startswith("align/") for k in r)]
    if not scored:
        return
    if spec.widths and len(spec.widths) > 1:
        series = {}
        for r in scored:
            for key, value in r.items():
                if key.startswith("align"):
                    series.setdefault(_series_name(key) + _suffix(ctx, r), []).append((r["width"], value))
        plot_lines(path / "alignment_vs_width.png", series, title="alignment score against width per layer "
                   "(dashed, dotted: chance controls)", xlabel="width (log scale)", ylabel="alignment score",
                   logx=True, styles=_styles(series))
    widest = max(scored, key=lambda r: r["width"] or 0)
    name = "-".join(["backprop"] + ([f"w{widest['width']}"] if spec.widths else []) + [f"lr{widest['lr']:g}"]
                    + ([f"n{widest['data_limit']}"] if widest["data_limit"] else []))
    series = {}
    for h in read_metrics(path / name):
        for key, value in h.items():
            if key.startswith("align") and isinstance(value, (int, float)):
                series.setdefault(_series_name(key), []).append((h["epoch"], value))
    plot_lines(path / "alignment_vs_epoch.png", series, title=f"{name}: alignment score (dashed, dotted: chance)",
               xlabel="epoch", ylabel="alignment score", styles=_styles(series))


def _styles(series: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """One colour per layer; the chance controls dashed (shuffled weights) and dotted (shuffled update)."""
    layers = list(dict.fromkeys(label.split(" (")[0] for label in series))
    styles = {}
    for label in series:
        style = {"color": f"C{layers.index(label.split(' (')[0]) % 10}"}
        if "shuffled weights" in label:
            style.update(linestyle="--", marker="x")
        elif "shuffled update" in label:
            style.update(linestyle=":", marker=".")
        styles[label] = style
    return styles


def _series_name(key: str) -> str:
    kind, layer = key.split("/", 1)
    return layer if kind == "align" else f"{layer} ({kind.removeprefix('align_').replace('_', ' ')})"


def _suffix(ctx: Context, row: dict[str, Any]) -> str:
    label = _label(ctx, row)
    return "" if label == "backprop" else " " + label.removeprefix("backprop ")
