"""Every module of a model with its output shape for the data's input (the original's ``layer_info.py``):

    python -m instill.layers tiny10                                   # a registered model, sized for --data
    python -m instill.layers resnet20 --set width=2 --data crops
    python -m instill.layers checkpoints/shapes_base                  # a run directory of any stage
    python -m instill.layers tests/fixtures/drfrankenstein/Tiny10/CIFAR10/in0-gn0/110000.pt   # a weights file

A weights file names its architecture with ``--model`` (and ``--set``), or the zoo model whose state dict it fits
exactly is found (``instill.compare.sources.guess_architecture``). Names are what configs use for ``layers_a`` /
``layers_b`` (compare), front and end layers (stitch) and activation capture. Shapes are per sample (batch
first dropped); a module called several times shows every call (``name@1``, ...); one that does not run in the
forward pass says so. Bad input: one line on stderr, exit code 2.
"""

from __future__ import annotations

if __name__ == "__main__":  # python -m instill.layers: nothing below runs in this copy
    from instill.errors import run_module

    run_module("instill.layers")

import argparse
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from torch import nn

from .dataset_info import DatasetInfo
from .errors import UserError


def describe_layers(model: nn.Module, sample: torch.Tensor) -> list[dict[str, Any]]:
    """One row per module call in execution order (name, type, output shape per sample, own parameters), then the
    modules that did not run.

    Args:
        model: the network (put in eval mode for the probe, its mode restored).
        sample: a batch of inputs (batch first).

    Returns:
        Rows ``{"layer", "type", "output", "params"}``.
    """
    from .compare.capture import probe

    modules = dict(model.named_modules())
    names = [name for name in modules if name]
    was_training = model.training
    model.eval()
    try:
        shapes = probe(model, names, sample) if names else {}
    finally:
        model.train(was_training)
    rows = []
    for key, shape in shapes.items():
        module = modules[key.split("@", 1)[0]]
        rows.append({"layer": key, "type": type(module).__name__, "output": "x".join(map(str, shape[1:])) or "-",
                     "params": sum(p.numel() for p in module.parameters(recurse=False))})
    ran = {key.split("@", 1)[0] for key in shapes}
    rows += [{"layer": name, "type": type(modules[name]).__name__, "output": "(not run)",
              "params": sum(p.numel() for p in modules[name].parameters(recurse=False))}
             for name in names if name not in ran]
    return rows


def _parse_sets(items: Sequence[str], what: str) -> dict[str, Any]:
    from .config import parse_yaml

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"{what} {item!r}: expected key=value")
        out[key.strip()] = parse_yaml(value)
    return out


def _data_info(name: str, params: dict[str, Any]) -> tuple[DatasetInfo, Optional[torch.Tensor]]:
    from .data import DataContext
    from .registry import DATASETS

    data = DATASETS.build(name, DataContext(seed=0), params)
    return data.info, data.train.head(2)


def _dummy(info: DatasetInfo) -> torch.Tensor:
    shape = tuple(info.input_shape)
    if info.vocab_size:
        return torch.zeros((2, *shape), dtype=torch.long)
    return torch.zeros((2, *shape))


def load_for_listing(spec: str, model: Optional[str], options: dict[str, Any], data: str,
                     data_options: dict[str, Any]) -> tuple[nn.Module, torch.Tensor, str]:
    """(model, input batch, description) for a registry name, a run directory or a weights file."""
    from .registry import MODELS
    from .compare.sources import guess_architecture, load_model_source, read_state_dict

    path = Path(spec)
    if path.is_dir():
        loaded = load_model_source({"run": spec}, None, key="SPEC", check_data=False)
        return loaded.model, _dummy(loaded.info), f"{loaded.label} ({loaded.model_cfg.get('name')})"
    info, sample = _data_info(data, data_options)
    if path.is_file():
        config = {"name": model, **options} if model else guess_architecture(read_state_dict(path, "SPEC"), info)
        if config is None:
            raise UserError(f"{spec}: no zoo model fits this weights file for data {data}; name its architecture "
                            f"with --model (and --set)")
        loaded = load_model_source({**config, "weights": spec}, info, key="SPEC")
        return loaded.model, sample, loaded.label
    if path.suffix in (".pt", ".pth", ".safetensors", ".bin") or "/" in spec:
        raise UserError(f"{spec}: no such file or directory")
    return MODELS.build(model or spec, info, options), sample, f"{spec} for {data}"


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m instill.layers",
                                     description="every module name of a model with its output shape")
    parser.add_argument("spec", help="a registered model name, a run directory, or a weights file")
    parser.add_argument("--model", help="the architecture of a weights file (default: the zoo model it fits)")
    parser.add_argument("--set", dest="options", action="append", default=[], metavar="KEY=VALUE",
                        help="a model builder option, e.g. --set width=2 (repeatable)")
    parser.add_argument("--data", default="crops", help="the dataset whose inputs size the model (default crops)")
    parser.add_argument("--data-set", dest="data_options", action="append", default=[], metavar="KEY=VALUE",
                        help="a dataset option, e.g. --data-set resolution=64 (repeatable)")
    args = parser.parse_args(argv)
    from .plots import format_table

    try:
        model, sample, label = load_for_listing(args.spec, args.model, _parse_sets(args.options, "--set"),
                                                args.data, _parse_sets(args.data_options, "--data-set"))
        try:
            rows = describe_layers(model, sample)
        except (RuntimeError, ValueError) as err:
            raise UserError(f"{label} cannot take inputs of shape {tuple(sample.shape[1:])}: "
                            f"{(str(err).splitlines() or [''])[0][:160]}") from None
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    print(f"{label}: input {'x'.join(map(str, sample.shape[1:]))}, "
          f"{sum(p.numel() for p in model.parameters())} parameters")
    print(format_table(rows))
    return 0
