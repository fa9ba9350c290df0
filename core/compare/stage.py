"""The ``compare`` stage: layer-by-layer similarity of two trained networks on one dataset split.

    compare:
      model_a: {name: tiny10, weights: tests/fixtures/drfrankenstein/Tiny10/CIFAR10/in0-gn0/110000.pt}
      model_b: {run: checkpoints/shapes_base}      # any stage's run directory (see instill.compare.sources)
      layers_a: ["bn*"]                            # names, glob patterns, type:Conv2d
      measures: [cka_minibatch, cka, procrustes]

The split streams in shuffled minibatches (seeded); each batch makes one forward pass of each model and updates
every measure for every pair of selected layers (``instill.compare.measures.compare_models``). Writes ``similarity.csv``
(layer_a, layer_b, measure, value, n), ``heatmap_<measure>.png`` per measure with layer names on both axes, and
``summary.json`` (the matrices, both models, the sample counts, pairs left out and why).

Before the run directory exists (``prepare``) the data are built, both models loaded and probed on a batch, so
these raise a UserError with nothing written: a model source that does not load (see ``instill.compare.sources``; a
weights file names its first mismatching key), a layer that is not in its model (with the nearest names), an
unknown measure, a full-data measure that needs more samples than the split and ``full_samples`` give, a batch
size too small for minibatch CKA.
"""

from __future__ import annotations

from typing import Any, Literal, Optional

from pydantic import Field, conlist, field_validator, model_validator

from ..dataset_info import DatasetInfo
from .measures import (UNBIASED_MIN_BATCH, Spatial, check_sample_counts, check_sketchable, chosen_measures,
                       compare_models, get_measure)
from ..config import RunConfig, Section
from ..data import BatchLoader
from ..errors import UserError, under_key
from .capture import probe
from ..plots import format_table
from ..files import atomic_write_text
from ..seeds import derive_seed, seed_everything
from .sources import LoadedModel, ModelSource, describe, load_model_source
from ..train import resolve_device
from ..stages.runner import STAGES, Context, Stage, build_data


class CompareSection(Section):
    model_a: ModelSource = Field(description="run directory, or registered name + weights file (compare.sources)")
    model_b: ModelSource = Field(description="the same for the second model (it may name the same model)")
    layers_a: conlist(str, min_length=1) = Field(description="layers of model_a: names, globs (bn*), type:Conv2d")
    layers_b: Optional[conlist(str, min_length=1)] = Field(None, description="layers of model_b (default: layers_a)")
    split: Literal["train", "val", "test"] = "val"
    measures: conlist(str, min_length=1) = Field(default_factory=lambda: ["cka_minibatch"],
                                                 description="compare measures or similarity measures "
                                                             "(instill list measures)")
    batch_size: int = Field(256, ge=1, description="samples per forward pass (minibatch CKA: per HSIC estimate)")
    max_samples: Optional[int] = Field(None, ge=1, description="compare at most this many samples of the split")
    full_samples: int = Field(2048, ge=2, description="cap on the samples kept for measures that need all at once "
                                                      "(cka, rsa, procrustes, the CCA family, lr_r2)")
    spatial: Spatial = Field("flatten", description="conv maps: flatten each sample's map, or "
                                                                       "average over positions first")
    sketch_features: Optional[int] = Field(None, ge=1, description="approximate mode (cka_minibatch): project each "
                                           "wider layer to this many features (random, from the run seed) first")
    measure_options: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="options of similarity measures, by name (a measure of your own: its "
                                          "keyword-only parameters)")

    @field_validator("measures")
    @classmethod
    def _known_measures(cls, names: list[str]) -> list[str]:
        for name in names:
            try:
                get_measure(name)
            except UserError as err:
                raise ValueError(str(err)) from None
        return list(dict.fromkeys(names))

    @model_validator(mode="after")
    def _options_of_listed_measures(self) -> "CompareSection":
        try:
            chosen_measures(self.measures, self.measure_options)
        except UserError as err:
            message = str(err)
            raise ValueError(message if message.startswith("measure_options") else f"measure_options: {message}"
                             ) from None
        return self

    @model_validator(mode="after")
    def _sketch_fits_measures(self) -> "CompareSection":
        if self.sketch_features is not None:
            try:
                check_sketchable(self.measures)
            except UserError as err:
                raise ValueError(str(err)) from None
        return self


class Config(RunConfig):
    compare: CompareSection

    @field_validator("model", mode="before")
    @classmethod
    def _no_model_section(cls, value):
        if value is not None:
            raise ValueError("the models come from compare.model_a and compare.model_b; remove the model section")
        return value


def _load(cfg: Config, seed: int, info: DatasetInfo) -> tuple[LoadedModel, LoadedModel]:
    """Both models; a fresh (weights-less) registered model is initialised from its own stream of the run seed."""
    loaded = []
    for key in ("model_a", "model_b"):
        seed_everything(derive_seed(seed, key), cfg.reproducibility.deterministic)
        loaded.append(load_model_source(getattr(cfg.compare, key), info, key=f"compare.{key}"))
    return loaded[0], loaded[1]


def _sample_counts(spec: CompareSection, split_size: int) -> tuple[int, int]:
    """(samples streamed, samples kept for full-data measures)."""
    n = split_size if spec.max_samples is None else min(split_size, spec.max_samples)
    return n, min(n, spec.full_samples)


def prepare(cfg: Config) -> None:
    """Check the models, layers, measures and sample counts on one batch (see the module docstring)."""
    spec = cfg.compare
    data = build_data(cfg, cfg.reproducibility.random_seed)
    split = getattr(data, spec.split)
    n, n_full = _sample_counts(spec, len(split))
    if n == 0:
        raise UserError(f"compare.split: the {spec.split} split of {cfg.data.name} is empty")
    if "cka_minibatch" in spec.measures and min(spec.batch_size, n) < UNBIASED_MIN_BATCH:
        raise UserError(f"measure cka_minibatch needs batches of at least {UNBIASED_MIN_BATCH} samples (unbiased "
                        f"HSIC), but compare.batch_size is {spec.batch_size} and {n} samples are compared")
    model_a, model_b = _load(cfg, cfg.reproducibility.random_seed, data.info)
    device = resolve_device(cfg.train.device)
    sample = split.head(4).to(device)
    features = []
    for key, loaded, layers in (("layers_a", model_a, spec.layers_a), ("layers_b", model_b, spec.layers_b or
                                                                          spec.layers_a)):
        try:
            with under_key(f"compare.{key}"):
                shapes = probe(loaded.model.to(device), layers, sample)
        except UserError:
            raise
        except (RuntimeError, ValueError) as err:  # the model's own forward rejects the inputs
            raise UserError(f"compare: {loaded.label} cannot take the {cfg.data.name} inputs of shape "
                            f"{tuple(sample.shape[1:])}: {(str(err).splitlines() or [''])[0][:160]}") from None
        pooled = {k: (s[1] if spec.spatial == "mean" and len(s) > 2 else _prod(s[1:])) for k, s in shapes.items()}
        features.append(pooled)
    full = [m for m in spec.measures if not get_measure(m).streaming]
    check_sample_counts(full, n_full, *features)


def _prod(shape) -> int:
    out = 1
    for size in shape:
        out *= size
    return out


def main(ctx: Context) -> dict[str, Any]:
    cfg, spec = ctx.cfg, ctx.cfg.compare
    data = ctx.build_data()
    model_a, model_b = _load(cfg, ctx.seed, data.info)
    split = getattr(data, spec.split)
    loader = BatchLoader(split, spec.batch_size, shuffle=True, seed=derive_seed(ctx.seed, "batches"))
    result = compare_models(model_a.model.to(ctx.device), model_b.model.to(ctx.device), loader,
                            layers_a=spec.layers_a, layers_b=spec.layers_b or spec.layers_a, measures=spec.measures,
                            full_samples=spec.full_samples, max_samples=spec.max_samples, spatial=spec.spatial,
                            device=ctx.device, labels=(model_a.label, model_b.label),
                            sketch_features=spec.sketch_features, seed=derive_seed(ctx.seed, "sketch"),
                            measure_options=spec.measure_options)
    matrices = {m: result.matrix(m).tolist() for m in result.measures}
    if ctx.run.writes:
        atomic_write_text(ctx.run.path / "similarity.csv", result.to_csv())
        for measure in result.measures:
            result.heatmap(measure, str(ctx.run.path / f"heatmap_{measure}.png"))
        for measure in result.measures:
            print(f"\n{measure} ({model_a.label} rows, {model_b.label} columns):")
            print(format_table([{"layer": a, **{b: _cell(v) for b, v in zip(result.layers_b, row)}}
                                for a, row in zip(result.layers_a, matrices[measure])]))
    n = {m: next((r["n"] for r in result.rows if r["measure"] == m), 0) for m in result.measures}
    return {"model_a": describe(model_a), "model_b": describe(model_b), "split": spec.split,
            "layers_a": result.layers_a, "layers_b": result.layers_b, "n": n, "matrices": matrices,
            "skipped": result.skipped, "device": str(ctx.device)}


def _cell(value: float) -> str:
    return "" if value != value else f"{value:.4f}"


STAGES.register("compare", doc=__doc__)(Stage(Config, main, prepare=prepare, sections=("compare",)))
