"""The ``guide`` stage ("Training the Untrainable"): train a target network with representational alignment.

    loss = task loss + alpha * reduce over layer pairs of weight * (1 - similarity(target layer, guide layer))

Each of ``guidance.conditions`` runs as a sub-run on the same data, from the same target initialisation:
``unguided`` (the task loss alone), ``guided_untrained`` (a randomly initialised guide built from
``guidance.guide``), ``guided_trained`` (the trained guide of ``guidance.guide_run``: a run directory, or a base
config that runs first). The guide is frozen, in evaluation mode, without gradients; only its layers' Gram
matrices are kept. Layers are chosen by name or type (``type:Linear``) on each side; ``layer_map`` pairs them
(``repo``: the original's mapping with its overwriting; ``uniform``: every mapped pair; or explicit pairs).
Options: alpha; sum or mean over pairs; the similarity measure; guidance only for the first N optimizer steps
(then the hooks are removed); noise inputs for the guide; token-wise similarity for sequences (``positions``, the
original's sum over positions, or ``rows``; trailing padding left out); each side's batch axis by layer name.
Every evaluation logs the task loss, the alignment loss and each pair's similarity. Writes ``results.csv`` (one
row per condition with the task metrics), ``results.png``, ``summary.json``, and each condition's trained target
(``<condition>/model.safetensors`` + ``model.json``, a model source for compare and stitch).

Before the run directory exists (``prepare``), each guide is built and one alignment loss is evaluated on a
training batch, so these raise a UserError with nothing written: a layer name that is not in a model (with the
nearest names), a layer whose batch axis is not the input's, a pair whose two sides compare different rows, a
trained guide built for other data than this run's or whose checkpoint does not match its architecture, or a
batch too small for the estimator (unbiased CKA needs 4 samples).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

import torch
from pydantic import BaseModel, Field, conlist, field_validator, model_validator

from ..dataset_info import DatasetInfo
from ..config import ModelConfig, RunConfig, Section
from ..data.sequences import real_positions
from ..errors import UserError, under_key
from ..compare.capture import DEFAULT_TYPES, probe
from .loss import AlignmentLoss, LayerMap, Reduce, Tokenwise, compared_rows, resolve_pairs
from ..models import load_model, save_model
from ..config import options_by_name
from ..registry import MODELS, OptionsOf, Registry
from ..plots import describe, format_table, plot_bars, plot_runs
from ..files import atomic_write_csv
from ..seeds import derive_seed, seed_everything
from ..compare.similarity import SIMILARITIES, get_similarity
from ..stages.compatibility import check_data_fits
from ..stages.runner import STAGES, Context, Figures, Stage, build_data
from ..stages.task import LossScope, evaluate_task, make_loss, summary_metrics
from ..stages.upstream import resolve_upstream
from ..train import Objective, fit, resolve_device

DEFAULT_LAYERS = [f"type:{t.__name__}" for t in DEFAULT_TYPES]


@dataclass(frozen=True)
class GuideContext:
    """What a guide condition builds its guide from: the run's config and seed, and the data's facts."""

    cfg: "Config"
    seed: int
    info: DatasetInfo


@dataclass(frozen=True)
class GuideCondition:
    """A guide condition: ``guide(ctx: GuideContext, *, options) -> nn.Module`` builds the frozen guide the target
    is aligned to (None: the task loss alone, no guide); its keyword-only parameters are the condition's options
    (``guidance.condition_options``). ``needs``: the ``guidance`` keys it reads, required when it is chosen."""

    guide: Optional[Callable[..., torch.nn.Module]] = None
    needs: tuple[str, ...] = ()
    __signature__ = OptionsOf("guide")  # its options: guide's keyword-only parameters

    def __call__(self, ctx: GuideContext) -> Optional[torch.nn.Module]:
        return None if self.guide is None else self.guide(ctx)


# Guide conditions, by name: a ``GuideCondition``, or a plain function ``guide(ctx: GuideContext, *, options) ->
# nn.Module``. Add one with ``@GUIDE_CONDITIONS.register("name")``, an import path or an entry point of group
# ``instill.guide_conditions``; ``instill list conditions`` lists them with their options.
GUIDE_CONDITIONS = Registry("guide condition")


def guide_condition(name: str) -> GuideCondition:
    """The guide condition ``name`` names; a UserError otherwise."""
    entry = GUIDE_CONDITIONS.get(name)
    return entry.build if isinstance(entry.build, GuideCondition) else GuideCondition(entry.build)


def _trained_guide(ctx: GuideContext) -> torch.nn.Module:
    spec = ctx.cfg.guidance
    loaded = load_model(spec.guide_run)
    check_data_fits(loaded.info, ctx.info, f"the guide in {spec.guide_run}", key=f"data ({ctx.cfg.data.name})")
    return loaded.model


def _fresh_guide(ctx: GuideContext) -> torch.nn.Module:
    seed_everything(derive_seed(ctx.seed, "guide"), ctx.cfg.reproducibility.deterministic)  # the guide's own stream
    with under_key("guidance.guide"):
        return MODELS.build(ctx.cfg.guidance.guide.name, ctx.info, ctx.cfg.guidance.guide.params)


for _name, _condition, _doc, _label in (
    ("unguided", GuideCondition(), "the task loss alone", "no guidance"),
    ("guided_untrained", GuideCondition(_fresh_guide, needs=("guide",)),
     "task loss + alignment to a randomly initialised guide built from guidance.guide", "guided by an untrained guide"),
    ("guided_trained", GuideCondition(_trained_guide, needs=("guide_run",)),
     "task loss + alignment to the trained guide of guidance.guide_run", "guided by a trained guide"),
):
    GUIDE_CONDITIONS.register(_name, doc=_doc, label=_label)(_condition)


class ExplicitPair(BaseModel):
    model_config = {"extra": "forbid"}
    target: str
    guide: str
    weight: float = 1.0


class GuidanceSection(Section):
    conditions: conlist(str, min_length=1) = Field(default_factory=lambda: ["unguided", "guided_untrained"],
                                                   description="guide conditions (instill list conditions)")
    condition_options: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="options of conditions, by name (instill list conditions shows them)")
    guide: Optional[ModelConfig] = Field(None, description="the guide's architecture (guided_untrained)")
    guide_run: Optional[str] = Field(None, description="trained guide: a run directory or a base config")
    alpha: float = Field(1.0, ge=0)
    reduce: Reduce = "sum"
    similarity: str = Field("cka", description="a similarity measure (instill list similarities)")
    similarity_options: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="options of similarity measures, by name (a measure of your own: its "
                                          "keyword-only parameters)")
    target_layers: list[str] = Field(default_factory=lambda: list(DEFAULT_LAYERS))
    guide_layers: list[str] = Field(default_factory=lambda: list(DEFAULT_LAYERS))
    drop_last_layer: bool = Field(True, description="leave out each side's last captured layer (the logits), "
                                                    "as the original does")
    layer_map: Union[LayerMap, list[ExplicitPair]] = "repo"
    guidance_steps: Optional[int] = Field(None, ge=1, description="guide only the first N optimizer steps")
    noise_inputs: bool = Field(False, description="feed the guide random inputs instead of the batch")
    tokenwise: Tokenwise = Field(
        None, description="sequences: positions (or true): the sum over positions of 1 - similarity at that "
                          "position, as the original; rows: one similarity over all (sample, token) rows; "
                          "padding left out in both")
    target_batch_axes: dict[str, int] = Field(default_factory=dict, description="{layer name: batch axis} for "
                                              "target layers (and their submodules) that are not batch first")
    guide_batch_axes: dict[str, int] = Field(default_factory=dict, description="the same for guide layers")

    @field_validator("tokenwise", mode="before")
    @classmethod
    def _tokenwise_flag(cls, value: Any) -> Any:  # true: the original's token-wise CKA
        if isinstance(value, bool):
            return "positions" if value else None
        return value

    @field_validator("similarity")
    @classmethod
    def _known_similarity(cls, name: str) -> str:
        return SIMILARITIES.known(name)

    @field_validator("similarity_options")
    @classmethod
    def _known_similarity_options(cls, options: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        return options_by_name(SIMILARITIES, options)

    @field_validator("conditions")
    @classmethod
    def _known_conditions(cls, names: list[str]) -> list[str]:
        return [GUIDE_CONDITIONS.known(name) for name in names]

    @field_validator("condition_options")
    @classmethod
    def _known_options(cls, options: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        return options_by_name(GUIDE_CONDITIONS, options)

    @model_validator(mode="after")
    def _guides_given(self):
        for name in self.conditions:
            for key in guide_condition(name).needs:
                if getattr(self, key) is None:
                    raise ValueError(f"condition {name} needs guidance.{key}: "
                                     f"{type(self).model_fields[key].description}")
        return self

    def needs(self, key: str) -> bool:
        """Whether a chosen condition reads ``guidance.<key>``."""
        return any(key in guide_condition(name).needs for name in self.conditions)

    def guided(self) -> list[str]:
        """The chosen conditions that align the target to a guide."""
        return [name for name in self.conditions if guide_condition(name).guide is not None]


class Config(RunConfig):
    model: ModelConfig
    guidance: GuidanceSection = Field(default_factory=GuidanceSection)
    loss_scope: LossScope = "answer"


def prepare(cfg: Config) -> None:
    """Resolve the trained guide's run, then check every guided condition on one training batch (see above)."""
    spec = cfg.guidance
    needed = get_similarity(spec.similarity).min_samples
    if cfg.train.batch_size < needed:
        raise UserError(f"train.batch_size {cfg.train.batch_size}: similarity {spec.similarity} needs at least "
                        f"{needed} samples per batch")
    if spec.guide_run is not None and spec.needs("guide_run"):
        spec.guide_run = resolve_upstream(spec.guide_run, "base", "guidance.guide_run")
    guided = spec.guided()
    if not guided:
        return
    seed, device = cfg.reproducibility.random_seed, resolve_device(cfg.train.device)
    data = build_data(cfg, seed)
    if spec.tokenwise and data.info.vocab_size is None:
        raise UserError(f"guidance.tokenwise: token-wise similarity needs token sequences; data {cfg.data.name} "
                        f"has none")
    if len(data.train) < cfg.train.batch_size:  # the guided conditions train on full batches only
        raise UserError(f"train.batch_size {cfg.train.batch_size} is larger than the training set of "
                        f"{len(data.train)} examples: guidance uses full batches only; lower train.batch_size")
    batch = (data.train.head(cfg.train.batch_size).to(device), data.train.y[: cfg.train.batch_size].to(device))
    with under_key("model"):
        target = MODELS.build(cfg.model.name, data.info, cfg.model.params).to(device)  # each check closes its hooks
    for condition in guided:
        guide = build_guide(cfg, seed, condition, data.info).to(device)
        alignment = _alignment(spec, target, guide, batch[0])
        try:
            with torch.no_grad(), under_key(f"guidance ({condition}, similarity {spec.similarity})"):
                target(batch[0])
                loss, _ = alignment(*_alignment_inputs(spec, batch, data.info))
        finally:
            alignment.close()
        if not torch.isfinite(loss):
            raise UserError(f"guidance ({condition}): the alignment loss is {loss.item()} on the first training "
                            f"batch: a paired layer's activations hold NaN or inf")


def main(ctx: Context) -> dict[str, Any]:
    cfg = ctx.cfg
    data = ctx.build_data()
    guides = {c: build_guide(cfg, ctx.seed, c, data.info).to(ctx.device) for c in cfg.guidance.guided()}
    rows = ctx.run.sweep([(c, lambda sub, c=c: _train_condition(ctx, sub, c, data, guides.get(c)))
                          for c in cfg.guidance.conditions])
    return _write_results(ctx, rows)


def build_guide(cfg: Config, seed: int, condition: str, info: DatasetInfo) -> torch.nn.Module:
    """The guide of ``condition`` (a guided one), built by its entry with its options: the shipped ones give the
    trained guide of ``guide_run`` (built for this run's data) or a fresh one from its own seed."""
    entry = GUIDE_CONDITIONS.bound(condition, guide_condition(condition), "guide",
                                   cfg.guidance.condition_options.get(condition))
    return entry(GuideContext(cfg, seed, info))


def _sample(data, device: torch.device) -> torch.Tensor:
    return data.train.head(8).to(device)


def _alignment_inputs(spec: GuidanceSection, batch, info: DatasetInfo) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """What the alignment loss takes for a batch: the guide's input and, token-wise, the real positions."""
    x, y = batch
    real = real_positions(x, y) if spec.tokenwise and info.pad_token is not None else None
    return _guide_input(x, info, spec.noise_inputs), real


def _train_condition(ctx: Context, sub, condition: str, data, guide: Optional[torch.nn.Module]) -> dict[str, Any]:
    cfg, spec = ctx.cfg, ctx.cfg.guidance
    seed_everything(derive_seed(ctx.seed, "target"), cfg.reproducibility.deterministic)  # same start everywhere
    target = ctx.build_model(data.info).to(ctx.device)
    task_loss = make_loss(cfg.loss_scope)
    eval_batch = cfg.train.eval_batch_size
    train_cfg = cfg.train.model_copy(update={"drop_last": True})  # a ragged last batch could be too small
    alignment = None if guide is None else _alignment(spec, target, guide, _sample(data, ctx.device))

    def loss(model, batch):
        guided = alignment is not None and alignment.active(objective.step)  # before the forward its hooks watch
        # The guide runs before the target's forward (less memory at once, see AlignmentLoss.run_guide), except on
        # noise, which is drawn after the forward as it always was, so that seeded runs keep their random streams.
        ahead = guided and not spec.noise_inputs
        # a layer that became constant, say, is a UserError; a NaN reaches the loop's guard instead
        step = f"guidance ({condition}) at step {objective.step + 1}"
        if ahead:
            with under_key(step):
                alignment.run_guide(*_alignment_inputs(spec, batch, data.info))
        value, logs = task_loss(model, batch)
        if alignment is None:
            return value, {}
        if not guided:
            return value, {"task_loss": value.item(), "align_loss": 0.0}
        with under_key(step):
            align, sims = alignment() if ahead else alignment(*_alignment_inputs(spec, batch, data.info))
        return value + align, {"task_loss": value.item(), "align_loss": align.item(), **sims}

    def evaluate(model):
        if alignment is None:
            return evaluate_task(model, {"val": data.val}, data.info, eval_batch, ctx.device)
        with alignment.paused():  # evaluation forwards are not aligned
            return evaluate_task(model, {"val": data.val}, data.info, eval_batch, ctx.device)

    objective = Objective(loss, evaluate)
    try:
        result = fit(target, objective, data.train, train_cfg, sub, seed=derive_seed(ctx.seed, "batches"),
                     device=ctx.device)
    finally:
        if alignment is not None:
            alignment.close()
    final = evaluate_task(target, data.eval_sets(), data.info, eval_batch, ctx.device)
    save_model(sub, "model", target, cfg.model.model_dump(), data.info)  # for compare/stitch (instill.compare.sources)
    if data.info.next_token:  # next-token prediction, not parity
        final["test_perplexity"] = math.exp(min(final["test_loss"], 50.0))
    pairs = [] if alignment is None else [f"{p.target}~{p.guide}" for p in alignment.pairs]
    return {"condition": condition, "seed": ctx.seed, "steps": result.steps, "best_epoch": result.best.get("epoch"),
            "pairs": pairs, **summary_metrics(final)}


def _alignment(spec: GuidanceSection, target, guide, sample: torch.Tensor) -> AlignmentLoss:
    """Capture keys of each side (in execution order, logits layer left out), paired by the layer map; the shapes
    of a probe forward on ``sample`` checked: batch axis first, both sides of each pair comparing the same rows."""
    target_shapes = probe(target, spec.target_layers, sample, batch_axes=spec.target_batch_axes)
    guide_shapes = probe(guide, spec.guide_layers, sample, batch_axes=spec.guide_batch_axes)
    for side, shapes in (("target", target_shapes), ("guide", guide_shapes)):
        odd = {key: shape for key, shape in shapes.items() if shape[0] != len(sample)}
        if odd:
            key, shape = next(iter(odd.items()))
            raise UserError(f"guidance.{side}_layers: layer {key!r} gives shape {shape}, whose first axis is not the "
                            f"input's batch of {len(sample)} (declare its batch axis: guidance.{side}_batch_axes: "
                            f"{{layer: axis}})")
    target_keys, guide_keys = list(target_shapes), list(guide_shapes)
    if spec.drop_last_layer:
        target_keys, guide_keys = target_keys[:-1], guide_keys[:-1]
    with under_key("guidance.layer_map"):
        pairs = resolve_pairs([p.model_dump() for p in spec.layer_map] if isinstance(spec.layer_map, list)
                              else spec.layer_map, target_keys, guide_keys)
    if not pairs:
        raise UserError("guidance: the layer map pairs no layers (does each side capture at least two layers?)")
    for pair in pairs:
        _check_rows(pair, target_shapes[pair.target], guide_shapes[pair.guide], tuple(sample.shape[:2]),
                    spec.tokenwise)
    return AlignmentLoss(target, guide, pairs, similarity=spec.similarity,
                         similarity_options=spec.similarity_options.get(spec.similarity), alpha=spec.alpha,
                         reduce=spec.reduce,
                         tokenwise=spec.tokenwise, target_batch_axes=spec.target_batch_axes,
                         guide_batch_axes=spec.guide_batch_axes, steps=spec.guidance_steps)


def _check_rows(pair, target_shape: tuple, guide_shape: tuple, sequence: tuple, tokenwise) -> None:
    """Both sides of a pair compare the same samples: token-wise, both are (batch, time, ...) like the input."""
    rows = compared_rows(target_shape, tokenwise), compared_rows(guide_shape, tokenwise)
    if rows[0] == rows[1] and (not tokenwise or rows[0] == sequence):
        return
    need = (f"token-wise, both need (batch, time, ...) = {sequence[0]} x {sequence[1]} x features" if tokenwise
            else f"{rows[0][0]} samples against {rows[1][0]}")
    raise UserError(f"guidance: pair {pair.target}~{pair.guide} compares target shape {target_shape} with guide "
                    f"shape {guide_shape}: {need}")


def _guide_input(x: torch.Tensor, info: DatasetInfo, noise: bool) -> torch.Tensor:
    """The batch itself, or noise of its kind: random tokens, or clamp(N(0,1) + 0.1 N(0,1), 0, 1) images."""
    if not noise:
        return x
    if info.vocab_size:
        return torch.randint(0, info.vocab_size, x.shape, device=x.device)
    return (torch.randn_like(x) + 0.1 * torch.randn_like(x)).clamp(0, 1)


def _write_results(ctx: Context, rows: list[dict[str, Any]]) -> dict[str, Any]:
    metric_columns = [k for k in rows[0] if k.startswith(("test_", "val_")) and "/" not in k]
    columns = ["condition", *metric_columns, "seed"]
    table = [{c: r.get(c, "") for c in columns} for r in rows]
    if ctx.run.writes:
        atomic_write_csv(ctx.run.path / "results.csv", table, columns)
        headline = "test_acc" if "test_acc" in rows[0] else metric_columns[0]
        plot_bars(ctx.run.path / "results.png", {r["condition"]: r[headline] for r in rows},
                  title=f"{describe(headline)} per condition", ylabel=describe(headline))
        plot_runs(ctx.run.path)  # curves.png of each condition's training
        print("\nresults.csv:\n" + format_table(table))
    return {"results": rows}


STAGES.register("guide", doc=__doc__)(Stage(
    Config, main, prepare=prepare, sections=("guidance",), figures=Figures(own=("shape_bias", "best_eval_acc"))))
