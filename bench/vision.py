"""Speed of the vision presets' input pipeline, measured side by side in one process.

For the fcn and convnet presets (``configs/vision_shapes_{fcn,convnet}_base.yaml``: their data, model and batch
size), prints:

* ``batch_share``: the seconds ``instill.data.BatchLoader`` takes to produce one epoch of batches on its own, over the
  seconds of a whole training epoch of the preset through ``instill.train.fit`` (the same loader, forward, backward,
  AdamW step, the per-epoch state save). Target < 0.20: batches are slices of in-memory tensors, so producing them
  should cost little next to the model.
* ``cache``: building the preset's dataset cold (rendered, then written to an empty cache directory) against
  building it again (read back from the cache), that the cached tensors equal the fresh ones, and that another seed
  or another setting gets a file of its own.

Loader and training epochs take turns (``repeats`` rounds after one warm-up round); each figure is the median
over rounds. Run it on a quiet
machine: ``python bench/vision.py [--quick] [--threads 1]``. The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch

from timing import synced_seconds

REPO = Path(__file__).resolve().parent.parent
PRESETS = {"fcn": "configs/vision_shapes_fcn_base.yaml", "convnet": "configs/vision_shapes_convnet_base.yaml"}
QUICK_SIZES = {"n_train": 1024, "n_val": 100, "n_test": 100}


def preset(name: str, quick: bool):
    """The preset's validated base config, shrunk for ``--quick``."""
    from instill.stages import load_stage_config

    overrides = [f"data.{k}={v}" for k, v in QUICK_SIZES.items()] if quick else []
    return load_stage_config(REPO / PRESETS[name], "base", overrides)


def build(cfg, seed: int, cache_dir: str, **changes):
    from instill.data import DataContext
    from instill.registry import DATASETS

    return DATASETS.build(cfg.data.name, DataContext(seed=seed, cache_dir=cache_dir), {**cfg.data.params, **changes})


def timed(fn, device: torch.device = torch.device("cpu")) -> float:
    return synced_seconds(fn, device)


def loader_epoch(train, batch_size: int, device: torch.device) -> None:
    """Every batch of one epoch, as the training loop receives them (moved to the device), and nothing else."""
    from instill.data import BatchLoader

    for x, y in BatchLoader(train, batch_size, shuffle=True, seed=0):
        x.to(device, non_blocking=True), y.to(device, non_blocking=True)


def training_epoch(cfg, data, device: torch.device, seed: int) -> None:
    """One epoch of ``instill.train.fit`` on the preset (evaluation left out: it is not part of producing batches)."""
    from instill.registry import MODELS
    from instill.run import Run
    from instill.stages.task import make_loss
    from instill.train import Objective, fit

    torch.manual_seed(seed)
    model = MODELS.build(cfg.model.name, data.info, cfg.model.params)
    train_cfg = cfg.train.model_copy(update={"epochs": 1, "progress": False})
    objective = Objective(make_loss("answer"), evaluate=lambda m: {"val_acc": 0.0})
    with tempfile.TemporaryDirectory() as tmp:
        fit(model, objective, data.train, train_cfg, Run(Path(tmp)), seed=seed, device=device, restore_best=False)


def batch_share(name: str, quick: bool, repeats: int, cache_dir: str, device: torch.device) -> dict:
    cfg = preset(name, quick)
    data = build(cfg, seed=0, cache_dir=cache_dir)
    loader_s, train_s = [], []
    for round_ in range(repeats + 1):  # round 0 warms up (allocator, kernels) and is not counted
        loader_s.append(timed(lambda: loader_epoch(data.train, cfg.train.batch_size, device), device))
        with contextlib.redirect_stdout(io.StringIO()):  # the loop's per-epoch line
            train_s.append(timed(lambda: training_epoch(cfg, data, device, seed=round_), device))
    loader, train = statistics.median(loader_s[1:]), statistics.median(train_s[1:])
    return {"images": len(data.train), "batch_size": cfg.train.batch_size, "loader_epoch_s": round(loader, 4),
            "train_epoch_s": round(train, 3), "batch_share": round(loader / train, 4)}


def cache(quick: bool) -> dict:
    """Cold build against cached build of the fcn preset's data; one cache file per (seed, settings)."""
    cfg = preset("fcn", quick)
    with tempfile.TemporaryDirectory() as cache_dir:
        fresh: list = []
        cold = timed(lambda: fresh.append(build(cfg, seed=1, cache_dir=cache_dir)))
        again: list = []
        cached = timed(lambda: again.append(build(cfg, seed=1, cache_dir=cache_dir)))
        identical = all(torch.equal(a.x, b.x) and torch.equal(a.y, b.y)
                        for a, b in zip(fresh[0].eval_sets().values(), again[0].eval_sets().values())) and \
            torch.equal(fresh[0].train.x, again[0].train.x)
        files_one = len(list(Path(cache_dir).iterdir()))
        build(cfg, seed=2, cache_dir=cache_dir)
        build(cfg, seed=1, cache_dir=cache_dir, texture_contrast=cfg.data.params["texture_contrast"] / 2)
        files_three = len(list(Path(cache_dir).iterdir()))
    return {"cold_build_s": round(cold, 3), "cached_build_s": round(cached, 3), "speedup": round(cold / cached, 1),
            "cached_equals_fresh": identical, "files_after_one_build": files_one,
            "files_after_other_seed_and_setting": files_three}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1,024 training images, one round: seconds")
    parser.add_argument("--repeats", type=int, default=None, help="rounds of loader and training epochs (default 3)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--device", default="cpu", help="where the training epochs run and batches go (cuda: "
                                                        "synchronised at the end of each)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    repeats = args.repeats or (1 if args.quick else 3)
    figures: dict = {"quick": args.quick, "threads": torch.get_num_threads(), "repeats": repeats,
                     "device": args.device}
    with tempfile.TemporaryDirectory() as cache_dir:
        for name in PRESETS:
            figures[name] = batch_share(name, args.quick, repeats, cache_dir, torch.device(args.device))
            f = figures[name]
            print(f"{name}: batches {f['loader_epoch_s']:.4f} s of a {f['train_epoch_s']:.3f} s training epoch "
                  f"({f['images']} images, batch {f['batch_size']}): share {f['batch_share']:.2%} (target < 20%)")
    figures["cache"] = c = cache(args.quick)
    print(f"data cache: cold build {c['cold_build_s']:.3f} s, cached {c['cached_build_s']:.3f} s "
          f"({c['speedup']}x); cached equals fresh: {c['cached_equals_fresh']}; files: {c['files_after_one_build']} "
          f"after one build, {c['files_after_other_seed_and_setting']} after another seed and another setting")
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
