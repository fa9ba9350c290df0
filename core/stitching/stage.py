"""The ``stitch`` stage (Csiszarik et al. 2021, "Similarity and Matching of Neural Network Representations"):
the front model up to a layer, a trained stitching transform, the end model from a layer on
(``instill.stitching.stitch``).

Both models are frozen and stay in evaluation mode throughout; only the transform trains. Every pair of
``stitch.front_layers`` x ``stitch.end_layers`` (or ``pairs: zip``: the i-th with the i-th) is one stitch: one pair
writes its files into the run directory, several run as sub-runs (one directory each, a resumed sweep skips the
finished ones) and the run directory gets ``matrix.csv`` and ``matrix.png``: the relative accuracy (label-free data:
the agreement with the end model) of every pair after training, beside the CKA of the same two layers before
stitching and the CKA of the stitched activations with the end model's.

One stitch: the least-squares map of the front activation onto the end activation is fitted on the training split
in one streaming pass (``ps_inv``, float64 normal equations); the mask (semi-match masks from correlations on the
training split) and the init are applied; the transform trains with the objective (``target``: hard labels, soft
targets of model 1 / model 2 / both with a temperature, or ``match``: mean squared error to the end activation; plus
``l1`` times mean |W| and ``cka`` times CKA(transformed, end activation), which penalises similarity when positive
and rewards it when negative). The preset is the original's recipe: Adam 1e-3, 30 epochs, batch 128 (last partial
batch dropped), learning rate x0.1 after 1/3 and 2/3 of the epochs. Data without augmentation (every registered
dataset) have the front model's activations, and whatever else the objective reads from the frozen models, computed
once and cached (``cache: auto``).

Writes per stitch: ``transform_before``, ``transform_after`` and ``transform_ps_inv`` (``.safetensors`` + ``.json``),
metrics per epoch (``curves.png``), ``results.csv`` with one row per variant (``front`` and ``end``: the two models
alone; ``before``, ``after``: the stitched network with the transform before and after training; ``ps_inv``: with
the least-squares map) and split: accuracy, relative accuracy (stitched / end model), agreement with the end
model's predictions, cross-entropy and KL divergence to the end model's softmax, the right/wrong overlap with the end
model (rr, rw, wr, ww as fractions), the similarity measures between transformed and end activations, their mean
squared difference and R^2; and ``results.png``.

Raises UserError before the run directory exists: a model source that cannot be loaded or does not fit the data, a
layer that is not in its model (nearest names listed), two activations that no transform of this kind connects, an
init or mask that does not fit the map (identity between different widths, a mask on a low-rank map), labels needed
(``hard``) but the data have none, an unknown similarity measure.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any, Callable, Literal, Optional, Union

import torch
from pydantic import Field, confloat, conint, conlist, field_validator, model_validator

from ..dataset_info import DatasetInfo
from ..config import OptimizerConfig, RunConfig, ScheduleConfig, Section, TrainConfig
from ..data import DataBundle, Split
from ..errors import UserError, under_key
from ..models.vision import check_accepts
from ..plots import format_table, plot_bars, plot_heatmaps, plot_run
from ..run import Run
from ..files import atomic_write_csv
from ..seeds import derive_seed
from ..compare.similarity import SIMILARITIES, cka, get_similarity
from ..compare.sources import LoadedModel, ModelSource, load_model_source
from .evaluate import evaluate_stitch, evaluate_variants, raw_cka
from .init import INITS, LEAST_SQUARES_MAX_INPUTS, MASKS, check_fits, initialise, least_squares_stats
from .pair import Stitch, Views, build_stitch
from .stitch import TARGETS, LinearStats, StitchTransform, TargetBatch, freeze, stitch_target
from ..train import Objective, fit
from ..stages.runner import Context, build_data
from ..stages.upstream import resolve_upstream

VARIANTS = ("front", "end", "before", "after", "ps_inv")


class StitchTrainConfig(TrainConfig):
    """The original's recipe as the defaults: Adam 1e-3, 30 epochs, batch 128, last partial batch dropped, the
    learning rate x0.1 after 1/3 and 2/3 of the epochs (unless a schedule is given)."""

    epochs: int = Field(30, ge=0)
    batch_size: int = Field(128, ge=1)
    drop_last: bool = True
    optimizer: OptimizerConfig = Field(default_factory=lambda: OptimizerConfig(name="Adam", lr=1e-3))
    select_metric: str = Field("val_agreement", description="kept for the log; the stitch keeps its last weights")

    @model_validator(mode="after")
    def _thirds(self):
        if "schedule" not in self.model_fields_set:
            self.__dict__["schedule"] = ScheduleConfig(name="step", step_epochs=max(1, math.ceil(self.epochs / 3)),
                                                       gamma=0.1)
        return self


class StitchSection(Section):
    front: ModelSource = Field(description="the front model: {run: DIR} (a base config file runs first when "
                                           "missing) or {name: REGISTERED, weights: FILE}")
    end: ModelSource = Field(description="the end model, in the same forms")
    front_layers: conlist(str, min_length=1) = Field(description="front layer name(s), as in named_modules()")
    end_layers: conlist(str, min_length=1) = Field(description="end layer name(s)")
    pairs: Literal["all", "zip"] = Field("all", description="all: every front x end layer; zip: i-th with i-th")
    transform: Literal["affine", "flatten"] = Field("affine", description="affine: channel map shared over positions "
                                                    "(1x1 conv); flatten: one linear map over C x H x W")
    rank: Optional[conint(ge=1)] = Field(None, description="low-rank W = U V of this rank")
    bias: bool = True
    resize: Literal["bilinear", "nearest", "area"] = "bilinear"
    front_layout: Literal["auto", "map", "tokens", "vector"] = "auto"
    end_layout: Literal["auto", "map", "tokens", "vector"] = "auto"
    init: str = Field("random", description="the map's initialisation (instill list stitch_inits)")
    mask: str = Field("identity", description="which entries of the map train (instill list stitch_masks)")
    target: str = Field("hard", description="the training objective: a stitch target (instill list stitch_targets)")
    temperature: confloat(gt=0) = 1.0
    l1: confloat(ge=0) = Field(0.0, description="weight of mean |W|")
    cka: float = Field(0.0, description="weight of CKA(transformed, end activation): > 0 penalises, < 0 rewards")
    measures: list[str] = Field(default_factory=lambda: ["cka", "cka_unbiased", "procrustes", "svcca"],
                                description="similarity measures between transformed and end activations")
    similarity_samples: conint(ge=4) = Field(2000, description="evaluation samples the measures use (at most)")
    data_seed: Union[Literal["run", "end"], conint(ge=0)] = Field(
        "end", description="seed of the data splits: end (the end model's run seed, so the stitch is evaluated on "
                           "the end model's own held-out split; the run seed when the end is no run), run, or a number")
    cache: Literal["auto", "on", "off"] = Field("auto", description="cache what the frozen models compute (auto: "
                                                "when the data have no augmentation)")

    @field_validator("front_layers", "end_layers", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("target")
    @classmethod
    def _known_target(cls, name: str) -> str:
        return TARGETS.known(name)

    @field_validator("init", "mask")
    @classmethod
    def _known_choice(cls, name: str, info) -> str:
        return (INITS if info.field_name == "init" else MASKS).known(name)

    @field_validator("measures")
    @classmethod
    def _known_measures(cls, names: list[str]) -> list[str]:
        for name in names:
            SIMILARITIES.known(name)
        return names

    @model_validator(mode="after")
    def _consistent(self):
        if self.pairs == "zip" and len(self.front_layers) != len(self.end_layers):
            raise ValueError(f"pairs: zip needs as many front as end layers, got {len(self.front_layers)} and "
                             f"{len(self.end_layers)}")
        if self.rank is not None and self.mask != "identity":
            raise ValueError("a mask restricts single entries of W; a low-rank W = U V has none (drop rank or mask)")
        if self.transform == "flatten" and self.mask in ("semi_match", "abs_semi_match"):
            raise ValueError(f"mask {self.mask} matches channels; transform: flatten has none")
        return self


class Config(RunConfig):
    stitch: StitchSection
    train: StitchTrainConfig = Field(default_factory=StitchTrainConfig)

    @field_validator("model", mode="before")
    @classmethod
    def _no_model_section(cls, value):
        if value is not None:
            raise ValueError("the models are stitch.front and stitch.end, so this stage takes no model section")
        return value


# ----------------------------------------------------------------------------------------------------- inputs

def resolve_runs(spec: StitchSection) -> None:
    """A ``run:`` that names a base config becomes its run directory (run first when missing), so the snapshot
    names what was stitched."""
    for key, source in (("stitch.front", spec.front), ("stitch.end", spec.end)):
        if source.run is not None and Path(source.run).suffix in (".yaml", ".yml"):
            source.run = resolve_upstream(source.run, "base", f"{key}.run")


def data_seed(cfg: Config, seed: int) -> int:
    """The seed the data splits are drawn with (``stitch.data_seed``)."""
    choice, end = cfg.stitch.data_seed, cfg.stitch.end
    if isinstance(choice, int):
        return choice
    if choice == "end" and end.run is not None:
        if not Path(end.run).is_dir():
            raise UserError(f"stitch.end.run: {end.run} does not exist (a run directory: run its config first)")
        try:
            return int((Path(end.run) / "seed.txt").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            raise UserError(f"stitch.data_seed: end: {end.run}/seed.txt is missing or unreadable") from None
    return seed


def load_source(source: ModelSource, key: str, data_info: DatasetInfo) -> LoadedModel:
    """The frozen model a source names (``instill.compare.sources``), checked against the data."""
    loaded = load_model_source(source, data_info, key=key)
    check_accepts(loaded.model, DatasetInfo(data_info.input_shape))  # real-valued inputs; any head
    freeze(loaded.model)
    return loaded


def layer_pairs(spec: StitchSection) -> list[tuple[str, str]]:
    if spec.pairs == "zip":
        return list(zip(spec.front_layers, spec.end_layers))
    return [(f, e) for f in spec.front_layers for e in spec.end_layers]


def labelled(data: DataBundle) -> bool:
    """Labels to score against: ``info`` says so (crops do not) and no sample of train or val lacks one."""
    return bool(data.info.labeled and data.info.num_classes) and \
        all(bool((s.y >= 0).all()) for s in (data.train, data.val))


def stitch_pair(spec: StitchSection, front: LoadedModel, end: LoadedModel, front_layer: str, end_layer: str,
                sample: torch.Tensor) -> Stitch:
    """The pair's stitch as ``spec`` configures it (``instill.stitching.pair.build_stitch``), its init and mask
    checked against the map's size; UserErrors for names and shapes."""
    with under_key("stitch"):
        stitch = build_stitch(front.model, end.model, front_layer, end_layer, sample, kind=spec.transform,
                              rank=spec.rank, bias=spec.bias, resize=spec.resize,
                              layouts=(spec.front_layout, spec.end_layout), names=(front.label, end.label))
    for key, registry, name in (("init", INITS, spec.init), ("mask", MASKS, spec.mask)):
        with under_key(f"stitch.{key} ({front_layer} -> {end_layer})"):
            check_fits(registry, name, stitch.transform.d_in, stitch.transform.d_out)
    return stitch


def prepare(cfg: Config) -> None:
    """Load both models and build every pair's stitch on a few training samples: names, shapes, init, mask."""
    spec = cfg.stitch
    resolve_runs(spec)
    data = build_data(cfg, data_seed(cfg, cfg.reproducibility.random_seed))
    if stitch_target(spec.target).labels and not labelled(data):
        raise UserError(f"stitch.target {spec.target} needs labels; data {cfg.data.name} has none (use soft_2)")
    front = load_source(spec.front, "stitch.front", data.info)
    end = load_source(spec.end, "stitch.end", data.info)
    for split_name, split in (("val", data.val), ("train", data.train)):
        if len(split) < 2:
            raise UserError(f"data: the {split_name} split has {len(split)} samples; a stitch needs at least 2")
    evaluated = min(spec.similarity_samples, len(data.val))
    for name in spec.measures:
        if evaluated < get_similarity(name).min_samples:
            raise UserError(f"stitch.measures: {name} needs at least {get_similarity(name).min_samples} samples, "
                            f"the validation split gives {evaluated}")
    if spec.cka and cfg.train.batch_size < 2:
        raise UserError(f"stitch.cka: the CKA term needs batches of at least 2 samples, train.batch_size is "
                        f"{cfg.train.batch_size}")
    sample = data.train.head(4)
    for front_layer, end_layer in layer_pairs(spec):
        stitch_pair(spec, front, end, front_layer, end_layer, sample)


# ----------------------------------------------------------------------------------------------------- one stitch

def main(ctx: Context) -> dict[str, Any]:
    cfg, spec = ctx.cfg, ctx.cfg.stitch
    data = build_data(cfg, data_seed(cfg, ctx.seed))
    front = load_source(spec.front, "stitch.front", data.info)
    end = load_source(spec.end, "stitch.end", data.info)
    for source in (front, end):
        source.model.to(ctx.device)
    pairs = layer_pairs(spec)
    if len(pairs) == 1:
        rows = [run_pair(ctx, ctx.run, data, front, end, *pairs[0])]
    else:
        rows = ctx.run.sweep([(pair_name(f, e), lambda sub, f=f, e=e: run_pair(ctx, sub, data, front, end, f, e))
                              for f, e in pairs])
        if ctx.run.writes:
            write_matrix(ctx.run.path, spec, rows)
    return {"pairs": rows, "results": variant_rows(rows)}


def variant_rows(pairs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The result rows a sweep report and ``make reproduce`` compare: one per layer pair and variant (``front``,
    ``end``, ``before``, ``after``, ``ps_inv``), its figures per split (``test_acc``, ``val_rel_acc``, ...), from
    each pair's flat summary row (``test_after_acc``, ...)."""
    rows = []
    for pair in pairs:
        for variant in VARIANTS:
            figures = {f"{split}_{key[len(split) + len(variant) + 2:]}": value for key, value in pair.items()
                       for split in pair.get("splits", ("val", "test")) if key.startswith(f"{split}_{variant}_")
                       and isinstance(value, (int, float))}
            if figures:
                rows.append({"front_layer": pair["front_layer"], "end_layer": pair["end_layer"], "variant": variant,
                             **figures})
    return rows


def pair_name(front_layer: str, end_layer: str) -> str:
    return f"{front_layer}--{end_layer}"


def run_pair(ctx: Context, run: Run, data: DataBundle, front: LoadedModel, end: LoadedModel, front_layer: str,
             end_layer: str) -> dict[str, Any]:
    """Fit, train and evaluate one stitch; write its files into ``run``; its summary row."""
    cfg, spec, device = ctx.cfg, ctx.cfg.stitch, ctx.device
    stitch = stitch_pair(spec, front, end, front_layer, end_layer, data.train.head(4).to(device))
    transform = stitch.transform
    has_labels = labelled(data)
    cached = spec.cache == "on" or (spec.cache == "auto" and not data.info.augmentation)
    target = stitch_target(spec.target)
    train_needs = {"b"} | set(target.needs)
    if not target.on_activations and not stitch.tail.traced:
        train_needs.add("x")
    eval_needs = {"b", "front_logits", "end_logits"} | ({"x"} if not stitch.tail.traced else set())
    batch = cfg.train.eval_batch_size
    train_views = Views(stitch, front.model, end.model, data.train, train_needs, cached, batch, device)
    eval_splits = {k: v for k, v in data.eval_sets().items() if len(v)}
    eval_views = {name: Views(stitch, front.model, end.model, split, eval_needs, cached, batch, device)
                  for name, split in eval_splits.items()}

    stats = fit_statistics(transform, train_views)
    generator = torch.Generator().manual_seed(derive_seed(ctx.seed, "init", front_layer, end_layer) % 2**63)
    ps_w, ps_b = initialise(transform, spec.init, spec.mask, generator, stats) or (None, None)
    variants = {"before": copy.deepcopy(transform)}
    _save_transform(run, "transform_before", transform, spec, front_layer, end_layer)
    if ps_w is not None:
        ps_inv = _copy_with(transform, ps_w, ps_b)
        variants["ps_inv"] = ps_inv
        _save_transform(run, "transform_ps_inv", ps_inv, spec, front_layer, end_layer)

    def evaluate(t):
        return {f"val_{k}": v for k, v in evaluate_stitch(stitch, t, eval_views["val"], has_labels,
                                                          ["cka"], spec.similarity_samples).items()}

    objective = Objective(_loss(spec, stitch, train_views, has_labels), evaluate)
    train_split = Split(torch.arange(len(data.train)), data.train.y)  # batches of indices into the views
    fit(transform, objective, train_split, cfg.train, run, seed=derive_seed(ctx.seed, "batches"), device=device,
        restore_best=False)
    variants["after"] = transform
    _save_transform(run, "transform_after", transform, spec, front_layer, end_layer)

    table = evaluate_variants(stitch, variants, eval_views, has_labels, spec.measures, spec.similarity_samples)
    summary = {"front_layer": front_layer, "end_layer": end_layer, "front_traced": stitch.head.traced,
               "end_traced": stitch.tail.traced, "front_shape": list(transform.front.shape),
               "end_shape": list(transform.end.shape), "splits": list(eval_views)}
    if stats is not None:
        summary.update(ps_inv_train_r2=stats.r2(ps_w, ps_b),
                       before_train_r2=stats.r2(variants["before"].matrix(), variants["before"].bias),
                       after_train_r2=stats.r2(transform.matrix(), transform.bias))
    summary["raw_cka"] = raw_cka(stitch, eval_views["val"], spec.similarity_samples)
    for row in table:
        summary.update({f"{row['split']}_{row['variant']}_{k}": v for k, v in row.items()
                            if isinstance(v, float)})
    if run.writes:
        _write_table(run.path, table)
        plot_run(run.path)
    return summary


def fit_statistics(transform: StitchTransform, views: Views) -> Optional[LinearStats]:
    """The least-squares statistics over the training split (the ``ps_inv`` variant is measured whatever the init);
    None when the map is too wide for them (a wide ``flatten``)."""
    if transform.d_in > LEAST_SQUARES_MAX_INPUTS:
        return None
    return least_squares_stats(transform, ((v["a"], v["b"]) for _, v in views.batches()))


def _loss(spec: StitchSection, stitch: Stitch, views: Views, has_labels: bool) -> Callable:
    target = stitch_target(spec.target)

    def loss(transform, batch):
        index, y = batch
        v = views.get(index.cpu())
        t = transform(v["a"])
        logs: dict[str, float] = {}
        logits = None if target.on_activations else stitch.tail(t, v.get("x"))
        value = target(TargetBatch(logits, y if has_labels else None, v.get("front_logits"), v.get("end_logits"),
                                   t, v.get("b"), spec.temperature))
        logs["task_loss"] = value.item()
        if spec.l1:
            penalty = transform.l1()
            value = value + spec.l1 * penalty
            logs["l1"] = penalty.item()
        if spec.cka:
            similarity = cka(t, v["b"])
            value = value + spec.cka * similarity
            logs["train_cka"] = similarity.item()
        return value, logs

    return loss


# ----------------------------------------------------------------------------------------------------- files

def _copy_with(transform: StitchTransform, w: torch.Tensor, b: torch.Tensor) -> StitchTransform:
    """A full-rank copy of ``transform`` holding (w, b)."""
    copy = StitchTransform(transform.front, transform.end, kind=transform.kind, rank=None,
                           bias=transform.bias is not None, resize=transform.resize)
    copy.mask.copy_(transform.mask)
    copy.set_matrix(w, b)
    return copy.to(transform.mask.device)


def _save_transform(run: Run, name: str, transform: StitchTransform, spec: StitchSection, front_layer: str,
                    end_layer: str) -> None:
    meta = {"front_layer": front_layer, "end_layer": end_layer, "kind": transform.kind,
            "rank": str(transform.rank), "front_shape": str(list(transform.front.shape)),
            "end_shape": str(list(transform.end.shape))}
    run.save_weights(name, transform, metadata=meta)
    run.write_json(f"{name}.json", meta)


RESULT_COLUMNS = ["split", "variant", "acc", "rel_acc", "agreement", "ce_to_end", "kl_to_end", "rr", "rw", "wr", "ww",
                  "l2", "r2"]


def _write_table(path: Path, table: list[dict[str, Any]]) -> None:
    columns = [c for c in RESULT_COLUMNS if any(c in r for r in table)]
    columns += [k for r in table for k in r if k not in columns and k not in ("end_acc",)]
    columns = list(dict.fromkeys(columns))
    atomic_write_csv(path / "results.csv", table, columns)
    headline = "rel_acc" if any("rel_acc" in r for r in table) else "agreement"
    splits = dict.fromkeys(r["split"] for r in table)
    bars = {split: {r["variant"]: r.get(headline, float("nan")) for r in table if r["split"] == split}
            for split in splits}
    plot_bars(path / "results.png", bars, title=f"{headline} per variant", ylabel=headline)
    print(f"\nresults.csv ({path.name}):\n" + format_table([{c: _short(r.get(c, "")) for c in columns[:13]}
                                                           for r in table]))


def _short(value: Any) -> Any:
    return round(value, 4) if isinstance(value, float) else value


def write_matrix(path: Path, spec: StitchSection, rows: list[dict[str, Any]]) -> None:
    """matrix.csv and matrix.png: per (front, end) layer pair, the stitched function after training beside the CKA
    of the two layers and of the stitched activations."""
    headline = "val_after_rel_acc" if "val_after_rel_acc" in rows[0] else "val_after_agreement"
    columns = ["front_layer", "end_layer", headline, "val_ps_inv_rel_acc" if "val_ps_inv_rel_acc" in rows[0] else
               "val_ps_inv_agreement", "raw_cka", "val_after_cka"]
    columns = [c for c in columns if c in rows[0]]
    atomic_write_csv(path / "matrix.csv", rows, columns)
    fronts = list(dict.fromkeys(r["front_layer"] for r in rows))
    ends = list(dict.fromkeys(r["end_layer"] for r in rows))

    def grid(key):
        values = {(r["front_layer"], r["end_layer"]): r.get(key, float("nan")) for r in rows}
        return [[values.get((f, e), float("nan")) for e in ends] for f in fronts]

    label = headline.removeprefix("val_after_").replace("_", " ")
    plot_heatmaps(path / "matrix.png", {f"stitched {label} (after training)": grid(headline),
                                        "CKA(front layer, end layer)": grid("raw_cka"),
                                        "CKA(stitched, end layer)": grid("val_after_cka")},
                  rows=fronts, cols=ends, ylabel="front layer", xlabel="end layer")
    print("\nmatrix.csv:\n" + format_table([{c: _short(r.get(c, "")) for c in columns} for r in rows]))
