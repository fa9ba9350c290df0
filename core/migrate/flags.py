"""Command lines of the flag-driven originals translated into instill configs (``instill convert --from ...``).

* ``drfrankenstein`` (renyi-ai/drfrankenstein): ``train_model.py`` (base), ``stitch_nets.py`` (stitch), with the
  dataset root of ``config/default.env``; its analysis scripts are named with the instill command to use.
* ``wide-network-alignment`` (FieteLab/Wide-Network-Alignment): ``train_<dataset>.py <part>`` and
  ``alignment_<dataset>.py <part>``: each part's hard-coded grid becomes one align config.
* ``guidance`` (Training the Untrainable): ``python -m imagenet-comparison.image_class`` and
  ``python -m language_modeling.language_model`` with their README flags.

Each original's parser is rebuilt here with its own flags and defaults, so a note says where every flag went
(given or default); an unknown flag, or one whose setting instill cannot honour, stops with one line.
"""

from __future__ import annotations

import argparse
import configparser
from pathlib import Path
from typing import Any, Callable, Optional

from ..errors import UserError
from .translation import Translation


class _Parser(argparse.ArgumentParser):
    """argparse that raises a UserError instead of exiting."""

    def error(self, message: str):
        raise UserError(f"{self.prog}: {message}")


def _parse(prog: str, specs: list[tuple], args: list[str]) -> argparse.Namespace:
    parser = _Parser(prog=prog, add_help=False)
    for flags, kwargs in specs:
        parser.add_argument(*flags, **kwargs)
    parsed, unknown = parser.parse_known_args(args)
    if unknown:
        raise UserError(f"{prog}: {unknown[0]}: not a flag of the original script")
    return parsed


def _script(command: list[str]) -> tuple[str, list[str]]:
    """(script or module name, its arguments) of ``python [-m] script args...``."""
    args = list(command)
    while args and (Path(args[0]).name.startswith("python") or args[0] in ("-u", "-O")):
        args.pop(0)
    if args and args[0] == "-m":
        args.pop(0)
    if not args:
        raise UserError("the command line names no script")
    return args[0], args[1:]


def translate_command(original: str, command: list[str], env: Optional[str] = None) -> Translation:
    script, args = _script(command)
    return ORIGINALS[original](script, args, env)


# ----------------------------------------------------------------------------------------------------- drfrankenstein

FRANK_DATA = {"cifar10": "cifar10", "cifar100": "cifar100"}
FRANK_OPT = {"sgd": ("SGD", {"momentum": 0.9, "nesterov": True}), "adam": ("Adam", {})}
FRANK_INIT = {"random": "random", "perm": "perm", "eye": "identity", "ps_inv": "ps_inv", "ones-zeros": "ones_zeros"}
FRANK_MASK = {"identity": "identity", "semi-match": "semi_match", "abs-semi-match": "abs_semi_match",
              "random-permutation": "random_permutation"}
FRANK_OTHER = {"layer_info.py": "python -m instill.layers MODEL", "compare_nets.py": "the compare stage (compare.py)",
               "compare_frank_m2.py": "the stitch stage's similarity measures (stitch.measures)",
               "eval_net.py": "the base stage's final evaluation (summary.json)",
               "eval_stitch.py": "the stitch stage's results.csv (before / after / ps_inv)"}


def _dataset_root(env: Optional[str], out: Translation) -> str:
    """config/default.env's [dataset_root] pytorch (the CIFAR root the original reads)."""
    path = Path(env) if env else Path("config/default.env")
    if not path.is_file():
        if env:
            raise UserError(f"--env {env}: not found")
        out.drop("config/default.env", "not found here: the dataset root is data/ (set data.root)")
        return "data"
    parser = configparser.ConfigParser()
    try:
        parser.read_string(path.read_text())
        root = parser["dataset_root"]["pytorch"].strip("'\"")
    except (configparser.Error, KeyError) as err:
        raise UserError(f"{path}: no [dataset_root] pytorch entry ({err.__class__.__name__})") from None
    out.note(f"{path} [dataset_root] pytorch", "data.root", "where torchvision's cifar-10-batches-py lies; instill "
                                                            "reads it there and never downloads")
    for key in parser["dataset_root"]:
        if key != "pytorch":
            out.drop(f"{path} [dataset_root] {key}", "CelebA is not available in instill")
    return root


def _frank_data(name: str, root: str, out: Translation) -> None:
    if name not in FRANK_DATA:
        raise UserError(f"-d/--dataset {name}: not available in instill (cifar10 and cifar100 are; fashion, mnist "
                        "and celeba are not)")
    out.set("data", {"name": FRANK_DATA[name], "root": root, "val_fraction": 0.1}, "-d/--dataset",
            "10% of the training images are held out to select on (the original validated on the test batch); "
            "the original's random-crop/flip augmentation is not available")


def _frank_model(name: str) -> dict[str, Any]:
    lowered = name.lower()
    if lowered in ("tiny10", "nbn_tiny10", "nbntiny10", "lenet"):
        return {"name": {"nbntiny10": "nbn_tiny10"}.get(lowered, lowered)}
    if lowered.startswith("resnet20_w") and lowered[10:].isdigit():
        return {"name": "resnet20", "width": int(lowered[10:])}
    raise UserError(f"-m/--model {name}: not available in instill (tiny10, nbn_tiny10, lenet, resnet20_w<k> are)")


def _frank_train(s: str, args: list[str], env: Optional[str]) -> Translation:
    a = _parse("train_model.py", [
        (("-m", "--model"), {"default": "tiny10"}), (("-i", "--init-noise"), {"type": int, "default": 0}),
        (("-g", "--gradient-noise"), {"type": int, "default": 0}), (("-o", "--out-dir"), {"default": "snapshots"}),
        (("-e", "--epochs"), {"type": int, "default": 300}), (("-b", "--batch-size"), {"type": int, "default": 128}),
        (("-lr", "--lr"), {"type": float, "default": 0.1}),
        (("-wd", "--weight-decay"), {"type": float, "default": 1e-4}),
        (("-opt", "--optimizer"), {"choices": ["adam", "sgd"], "default": "sgd"}),
        (("-s", "--save-frequency"), {"type": int, "default": 10000}),
        (("-d", "--dataset"), {"default": "cifar10"})], args)
    out = Translation(f"renyi-ai/drfrankenstein train_model.py {' '.join(args)}", "base", {"stage": "base"})
    out.set("model", _frank_model(a.model), "-m/--model")
    if a.init_noise != a.gradient_noise:
        raise UserError(f"-i {a.init_noise} -g {a.gradient_noise}: separate seeds for the initialisation and the "
                        "batch order are not offered (instill derives both from one run seed)")
    out.set("reproducibility", {"reproduce": True, "random_seed": a.init_noise}, "-i/--init-noise, -g/--gradient-noise",
            "one run seed for both (instill's own draws: the original's weights are not reproduced bit for bit)")
    out.set("output_dir", str(Path(a.out_dir) / a.model / a.dataset.upper() / f"in{a.init_noise}-gn{a.gradient_noise}"),
            "-o/--out-dir", "the original's <out>/<model>/<DATASET>/in<i>-gn<g> layout")
    _frank_data(a.dataset, _dataset_root(env, out), out)
    name, kwargs = FRANK_OPT[a.optimizer]
    out.set("train", {"epochs": a.epochs, "batch_size": a.batch_size, "drop_last": True,
                      "optimizer": {"name": name, "lr": a.lr, "kwargs": {**kwargs, "weight_decay": a.weight_decay}},
                      "schedule": {"name": "step", "step_epochs": max(1, -(-a.epochs // 3)), "gamma": 0.1}},
            "-e, -b, -lr, -wd, -opt", "the original's trainer: drop_last, lr x0.1 after 1/3 and 2/3 of the epochs"
                                      + (", SGD with Nesterov momentum 0.9" if a.optimizer == "sgd" else ""))
    out.drop("-s/--save-frequency", "instill saves the best and last weights and the state to resume every epoch")
    return out


def _weights_source(path: str) -> dict[str, Any]:
    """A model source for one of the original's weights files: the architecture from its folder layout
    (<out>/<Model>/<Dataset>/in<i>-gn<g>/<iter>.pt)."""
    for part in reversed(Path(path).parts[:-1]):
        try:
            return {**_frank_model(part), "weights": path}
        except UserError:
            continue
    raise UserError(f"{path}: cannot tell its architecture from its folders (expected .../<Model>/<Dataset>/"
                    "in<i>-gn<g>/<iter>.pt, as train_model.py writes)")


def _frank_stitch(s: str, args: list[str], env: Optional[str]) -> Translation:
    a = _parse("stitch_nets.py", [
        (("front_model",), {}), (("end_model",), {}), (("front_layer",), {}), (("end_layer",), {}),
        (("-o", "--out-dir"), {"default": "results/"}), (("--run-name",), {"default": None}),
        (("--optimizer",), {"choices": ["adam", "sgd"], "default": "adam"}),
        (("--seed",), {"type": int, "default": 0}), (("-e", "--epochs"), {"type": int, "default": 30}),
        (("-b", "--batch-size"), {"type": int, "default": 128}), (("-lr", "--lr"), {"type": float, "default": 1e-3}),
        (("-wd", "--weight-decay"), {"type": float, "default": 0.0}), (("--debug",), {"action": "store_true"}),
        (("--l1",), {"type": float, "default": 0.0}), (("--cka-reg",), {"type": float, "default": 0.0}),
        (("-r", "--low-rank"), {"type": int, "default": None}), (("--temperature",), {"type": float, "default": 1.0}),
        (("-d", "--dataset"), {"default": "cifar10"}), (("-s", "--save-frequency"), {"type": int, "default": 10}),
        (("-f", "--flatten"), {"action": "store_true"}),
        (("-i", "--init"), {"choices": list(FRANK_INIT), "default": "random"}),
        (("-m", "--mask"), {"choices": list(FRANK_MASK), "default": "identity"}),
        (("--target-type",), {"choices": ["hard", "soft_1", "soft_2", "soft_12", "soft_1_plus_2"],
                               "default": "hard"})], args)
    out = Translation(f"renyi-ai/drfrankenstein stitch_nets.py {' '.join(args)}", "stitch", {"stage": "stitch"})
    run = a.run_name or "stitch"
    out.set("output_dir", str(Path(a.out_dir) / run), "-o/--out-dir, --run-name",
            "" if a.run_name else "--run-name absent: the original used the date and time; here 'stitch'")
    out.set("reproducibility", {"reproduce": True, "random_seed": a.seed}, "--seed")
    _frank_data(a.dataset, _dataset_root(env, out), out)
    stitch = {"front": _weights_source(a.front_model), "end": _weights_source(a.end_model),
              "front_layers": [a.front_layer], "end_layers": [a.end_layer], "init": FRANK_INIT[a.init],
              "mask": FRANK_MASK[a.mask], "target": a.target_type, "temperature": a.temperature, "l1": a.l1,
              "cka": a.cka_reg, "transform": "flatten" if a.flatten else "affine"}
    if a.low_rank is not None:
        if a.init == "ps_inv":
            raise UserError("-i ps_inv -r: the original silently ignored ps_inv with a low rank (orthogonal init); "
                            "choose -i random with -r, or drop -r")
        stitch["rank"] = a.low_rank
    out.set("stitch", stitch, "front_model end_model front_layer end_layer -i -m --target-type --temperature --l1 "
                              "--cka-reg -r -f", "the models' architectures from their folders; the least-squares "
                                                 "fit (ps_inv) on the training split, not the validation set (a bug "
                                                 "of the original not copied)")
    name = {"adam": "Adam", "sgd": "SGD"}[a.optimizer]
    out.set("train", {"epochs": a.epochs, "batch_size": a.batch_size,
                      "optimizer": {"name": name, "lr": a.lr, "kwargs": {"weight_decay": a.weight_decay}}},
            "-e, -b, -lr, -wd, --optimizer", "drop_last and lr x0.1 after 1/3 and 2/3 of the epochs, as the original")
    out.drop("-s/--save-frequency", "the stitch's transform history is not kept; its final weights are")
    out.drop("--debug", "no debug mode")
    return out


def _drfrankenstein(script: str, args: list[str], env: Optional[str]) -> Translation:
    name = Path(script).name
    if name in FRANK_OTHER:
        raise UserError(f"{name}: an analysis of finished runs, not a run to convert; in instill: {FRANK_OTHER[name]}")
    handlers = {"train_model.py": _frank_train, "stitch_nets.py": _frank_stitch}
    if name not in handlers:
        raise UserError(f"{name}: not a script of drfrankenstein (train_model.py, stitch_nets.py, "
                        f"{', '.join(FRANK_OTHER)})")
    return handlers[name](name, args, env)


# ----------------------------------------------------------------------------------------- Wide-Network-Alignment

WIDTHS = [8, 16, 32, 64, 128, 256, 512]
PART_1_RULES = ["backprop", "align_ada", "dfa", "align_zero", "fa", "last_layer"]
WNA_CIFAR = {  # part -> (rules, widths, lrs, data limits, extra), from train_cifar.py's __main__
    1: (PART_1_RULES, WIDTHS, [5.0, 2.0, 1.0], None, {}),
    2: (["backprop", "dfa", "align_ada", "align_zero", "fa", "last_layer"], [8, 256],
        [0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0], None, {}),
    3: (["backprop", "align_ada", "align_zero"], WIDTHS,
        [0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5], None, {"adam": True}),
    4: (["backprop", "align_ada", "align_zero", "fa", "dfa"], WIDTHS, [5.0, 2.0, 1.0],
        [45, 150, 450, 1500, 4500, 15000, 45000], {}),
    5: (["align_prop"], WIDTHS, [5.0, 2.0, 1.0], None, {}),
}


def _wna(script: str, args: list[str], env: Optional[str]) -> Translation:
    name = Path(script).name
    if len(args) > 1:
        raise UserError(f"{name}: takes one argument, the part (got {' '.join(args)})")
    try:
        part = int(args[0]) if args else 1
    except ValueError:
        raise UserError(f"{name}: the part must be a number, got {args[0]!r}") from None
    out = Translation(f"FieteLab/Wide-Network-Alignment {name} {part}", "align", {"stage": "align"})
    out.set("name", f"{Path(name).stem}_part{part}", "(part)")
    out.set("reproducibility", {"reproduce": True, "random_seed": 99}, "(script) seed=99",
            "the original's fixed seed as instill's run seed (instill's own draws)")
    if name.endswith("kmnist.py"):
        raise UserError(f"{name}: KMNIST is not available in instill (nothing downloads); the CIFAR and Add-task "
                        "scripts convert")
    if name == "train_cifar.py":
        return _wna_cifar(out, part, scores=False)
    if name == "alignment_cifar.py":
        if part not in (1, 2, 3):
            raise UserError(f"alignment_cifar.py {part}: the script has parts 1-3")
        return _wna_cifar(out, part, scores=True)
    if name == "train_add.py":
        return _wna_add(out, part)
    if name == "train_imagenet.py":
        return _wna_imagenet(out, part)
    raise UserError(f"{name}: not a script of Wide-Network-Alignment (train_cifar.py, train_add.py, "
                    "train_imagenet.py, alignment_cifar.py; the KMNIST ones need KMNIST)")


def _wna_common(out: Translation, epochs: int, lr: float) -> None:
    out.set("train", {"epochs": epochs, "batch_size": 100, "eval_batch_size": 100,
                      "optimizer": {"name": "SGD", "lr": lr}}, "(script) epochs, batch_size=100, plain SGD")
    out.note("(script) loss", "align.loss", "MSE on one-hot - 0.1, as the original")


def _wna_cifar(out: Translation, part: int, scores: bool) -> Translation:
    out.set("data", {"name": "cifar10", "root": "data", "val_fraction": 0.1, "normalize": "none"}, "(script) CIFAR()",
            "CIFAR-10 from data/cifar-10-batches-py (never downloaded); a seeded 10% validation split (the original: "
            "the first 5,000), pixels in [0, 1]")
    if scores:  # alignment_cifar.py: backprop nets at lr 5 for 300 epochs, alignment scores along the way
        widths = [512] if part == 3 else WIDTHS
        out.set("model", {"name": "ntk_cnn", "shape": "cifar", "width": widths[-1], "batch_norm": True}, "(script)")
        _wna_common(out, 300, 5.0)
        out.set("align", {"rules": ["backprop"], "widths": widths, "loss": "mse", "scores": True},
                f"(part {part})", "alignment scores of the backprop nets at every evaluation (part 1 trains them, "
                                  "part 2 reads epoch 150 across widths, part 3 every epoch at width 512; the "
                                  "randomize control of part 3 is not offered)")
        return out
    if part == 6:
        raise UserError("train_cifar.py 6: part 1's rules at width 256 over seeds 100-104: convert part 1 and run "
                        "it once per seed with --set align.widths=[256] --set reproducibility.random_seed=<seed>")
    if part == 7:
        raise UserError("train_cifar.py 7: a one-epoch timing, not an experiment: instill's timings are in bench/")
    if part not in WNA_CIFAR:
        raise UserError(f"train_cifar.py {part}: the script has parts 1-7")
    rules, widths, lrs, limits, extra = WNA_CIFAR[part]
    model = {"name": "ntk_cnn", "shape": "cifar", "width": widths[-1], "batch_norm": True}
    if extra.get("adam"):
        model["parameterisation"] = "standard"
    out.set("model", model, "(script) filters, kernels 3, strides [1,1,1,2,1,2,1]")
    _wna_common(out, 150, lrs[0])
    if extra.get("adam"):
        out.config["train"]["optimizer"]["name"] = "Adam"
        out.note("(part 3) *_adam", "model.parameterisation", "standard parameterisation trained with Adam")
    align = {"rules": rules, "widths": widths, "lrs": lrs, "loss": "mse", "scores": False}
    if limits:
        align["data_limits"] = limits
    out.set("align", align, f"(part {part}) grid", "every rule x width x learning rate (x data limit) as the part's "
                                                    "loops")
    return out


def _wna_add(out: Translation, part: int) -> Translation:
    if part != 1:
        raise UserError(f"train_add.py {part}: the script has part 1 only")
    out.set("data", {"name": "add_task"}, "(script) Add task", "targets from past inputs only: the original's "
                                                               "generator let early targets see future inputs (use "
                                                               "data: legacy_add_data for it)")
    out.set("model", {"name": "add_rnn", "width": 4096, "batch_slots": 50}, "(script) n_hidden")
    out.set("train", {"epochs": 200, "batch_size": 50, "eval_batch_size": 50, "drop_last": True,
                      "optimizer": {"name": "SGD", "lr": 0.001}, "select_metric": "val_loss", "select_mode": "min"},
            "(script) epochs=200, batch 50, lr 1e-3", "the best validation loss, as the original reports it")
    out.set("align", {"rules": ["backprop", "align_ada", "align_zero", "last_layer"],
                      "widths": [8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096], "loss": "mse", "scores": False},
            "(part 1) widths x rules", "train_readout is last_layer")
    return out


def _wna_imagenet(out: Translation, part: int) -> Translation:
    if part != 1:
        raise UserError(f"train_imagenet.py {part}: the script has part 1 only")
    out.set("data", {"name": "image_folder", "train_dir": "../train", "val_dir": "../val", "test_dir": "../val",
                     "resolution": 224}, "(script) ../train, ../val", "ImageFolder layout as the original")
    out.set("model", {"name": "ntk_cnn", "shape": "imagenet", "width": 512, "batch_norm": True}, "(script)")
    _wna_common(out, 300, 5.0)
    out.set("align", {"rules": ["backprop", "align_ada", "align_zero", "dfa", "fa"], "widths": [512], "loss": "mse",
                      "scores": False}, "(part 1)", "the original's DFA on ImageNet is broken; instill's runs")
    return out


# ----------------------------------------------------------------------------------------------------- guidance

GUIDES = {"rn18": 18, "rn50": 50}
TARGETS = {"DeepMLP": {"name": "deep_fcn", "depth": 48, "width": 1024, "batch_norm": True, "dropout": 0.1},
           "WideMLP": {"name": "wide_fcn", "depth": 3, "width": 8192, "batch_norm": True},
           "NoResNet-50": {"name": "noresnet", "depth": 50, "width": 64, "stem": "imagenet"}}


def _guidance_common(a: argparse.Namespace, out: Translation) -> None:
    out.set("name", a.exp_name, "--exp_name", "the run name (and checkpoints/<name>)")
    out.set("reproducibility", {"reproduce": True, "random_seed": a.seed}, "--seed")
    if a.eval:
        raise UserError("--eval: evaluates a saved model, not a run to convert (a run's summary.json holds its "
                        "final evaluation)")
    if a.repdist != "CKA":
        raise UserError(f"--repdist {a.repdist}: only CKA works in the original")
    out.config["train"] = {"epochs": a.num_epochs, "batch_size": a.batch_size,
                           "optimizer": {"name": "Adam", "lr": a.lr}, "grad_accum": a.grad_acc}
    out.note("--num_epochs, --batch_size, --lr, --grad_acc", "train",
             "grad_accum averages the k batches (the original summed them without dividing by k: not copied)")
    out.drop("--num_workers", "data-loading speed only")
    out.drop("--logging", "instill writes config.yaml and summary.json in the run directory")


def _guided(a: argparse.Namespace, out: Translation, guide: dict[str, Any]) -> None:
    if not a.rep_sim:
        out.set("guidance.conditions", ["unguided"], "--rep_sim (absent)", "the task loss alone")
        return
    if a.pretrained:
        raise UserError("--rep_sim without --untrained: the original downloads torchvision's ImageNet weights for "
                        "the guide; instill never downloads: train the guide first and give it as guidance.guide_run "
                        "(condition guided_trained), or pass --untrained")
    out.set("guidance.conditions", ["guided_untrained"], "--rep_sim --untrained", "a randomly initialised guide")
    out.set("guidance.guide", guide, "--target_model", "the guide (the original's 'target_model')")
    out.set("guidance.alpha", a.alpha, "--alpha")
    if a.noise:
        out.set("guidance.noise_inputs", True, "--noise")
    if getattr(a, "early_stop", False):
        out.set("guidance.guidance_steps", 300, "--early_stop", "guidance for the first 300 steps, as the code")


def _guidance_vision(args: list[str]) -> Translation:
    a = _parse("imagenet-comparison.image_class", [
        (("--exp_name",), {"required": True}), (("--seed",), {"type": int, "default": 0}),
        (("--eval",), {"action": "store_true"}),
        (("--target_model",), {"choices": ["rn18", "rn50", "vitb"], "default": "rn50"}),
        (("--student_model",), {"choices": list(TARGETS), "default": "DeepMLP"}),
        (("--untrained",), {"dest": "pretrained", "action": "store_false"}),
        (("--num_workers",), {"type": int, "default": 4}), (("--batch_size",), {"type": int, "default": 64}),
        (("--num_epochs",), {"type": int, "default": 10}), (("--lr",), {"type": float, "default": 1e-3}),
        (("--grad_acc",), {"type": int, "default": 1}), (("--rep_sim",), {"action": "store_true"}),
        (("--repdist",), {"default": "CKA"}), (("--alpha",), {"type": float, "default": 1.0}),
        (("--noise",), {"action": "store_true"}), (("--logging",), {"default": "logs"}),
        (("--early_stop",), {"action": "store_true"})], args)
    out = Translation(f"Training the Untrainable imagenet-comparison.image_class {' '.join(args)}", "guide",
                      {"stage": "guide"})
    _guidance_common(a, out)
    out.set("data", {"name": "image_folder", "train_dir": "data/imagenet/train", "test_dir": "data/imagenet/val",
                     "val_fraction": 0.01, "test_fraction": 0.0, "resolution": 224, "normalize": "imagenet",
                     "workers": a.num_workers}, "(script) ImageNet-1k",
            "local ImageFolder copies (the original streamed HF's ILSVRC/imagenet-1k); no RandomResizedCrop/flip")
    out.set("model", TARGETS[a.student_model], "--student_model", "the network trained (the original's 'student')")
    if a.rep_sim and a.target_model == "vitb":
        raise UserError("--target_model vitb: the original crashes on it (its attention layers return tuples); "
                        "rn18 and rn50 convert")
    guide = {"name": "noresnet", "depth": GUIDES.get(a.target_model, 50), "width": 64, "residual": True,
             "stem": "imagenet"}
    _guided(a, out, guide)
    if a.rep_sim:
        out.config["guidance"].update({"target_layers": ["type:Linear"], "guide_layers": ["stem", "type:Block", "pool"],
                                       "drop_last_layer": True, "layer_map": "repo"})
        out.note("(script) layer_sim", "guidance.layer_map", "the original's mapping, its overwriting included")
    return out


def _guidance_language(args: list[str]) -> Translation:
    a = _parse("language_modeling.language_model", [
        (("--exp_name",), {"required": True}), (("--task",), {"default": "next-word"}),
        (("--seed",), {"type": int, "default": 0}), (("--eval",), {"action": "store_true"}),
        (("--target_model",), {"default": "transformer"}), (("--student_model",), {"default": "RNN"}),
        (("--context_length",), {"type": int, "default": 256}), (("--num_workers",), {"type": int, "default": 4}),
        (("--batch_size",), {"type": int, "default": 64}), (("--num_epochs",), {"type": int, "default": 10}),
        (("--lr",), {"type": float, "default": 1e-3}), (("--grad_acc",), {"type": int, "default": 1}),
        (("--embedding_dim",), {"type": int, "default": 256}), (("--hidden_dim",), {"type": int, "default": 512}),
        (("--num_layers",), {"type": int, "default": 4}), (("--fc_dim",), {"type": int, "default": 512}),
        (("--nheads",), {"type": int, "default": 12}), (("--kernel_size",), {"type": int, "default": 5}),
        (("--rep_sim",), {"action": "store_true"}), (("--repdist",), {"default": "CKA"}),
        (("--target_model_name",), {"default": None}), (("--alpha",), {"type": float, "default": 1.0}),
        (("--untrained",), {"dest": "pretrained", "action": "store_false"}),
        (("--noise",), {"action": "store_true"}), (("--logging",), {"default": "logs"}),
        (("--multi_gpu",), {"action": "store_true"}), (("--load_ckpt",), {"action": "store_true"}),
        (("--num_samples",), {"type": int, "default": 100000})], args)
    out = Translation(f"Training the Untrainable language_modeling.language_model {' '.join(args)}", "guide",
                      {"stage": "guide"})
    _guidance_common(a, out)
    if a.task == "next-word":
        raise UserError("--task next-word: WikiText-103 with BERT word pieces is not available offline; instill's "
                        "text dataset trains on a local corpus (configs/guide_lm.yaml)")
    n = a.num_samples
    if a.task == "copy-paste":
        out.set("data", {"name": "copy_paste", "symbols": 10, "min_len": 20, "max_len": 40, "n_train": int(n * 0.8),
                         "n_val": int(n * 0.2), "n_test": int(n * 0.2)}, "--task copy-paste, --num_samples",
                "fixed sampled sets (the original drew a fresh sample at every access) and symbols 1..10 (its 0 was "
                "also the ignored pad)")
        students = {"RNN": {"name": "rnn", "cell": "rnn", "embed_dim": a.embedding_dim, "hidden_size": a.hidden_dim,
                            "num_layers": a.num_layers},
                    "Transformer": {"name": "transformer", "d_model": a.hidden_dim, "nhead": a.nheads,
                                    "num_layers": a.num_layers, "dim_feedforward": a.fc_dim, "tied": True}}
        guide = {"name": "transformer", "d_model": 512, "nhead": 16, "num_layers": 4, "dim_feedforward": a.fc_dim,
                 "tied": True}
        layers = (["type:RNN"] if a.student_model == "RNN" else ["type:TransformerEncoderLayer"],
                  ["type:TransformerEncoderLayer"])
    elif a.task == "parity":
        out.set("data", {"name": "parity", "min_len": 2, "max_len": 50, "n_train": int(n * 0.8),
                         "n_val": int(n * 0.1), "n_test": int(n * 0.1)}, "--task parity, --num_samples",
                "fixed sampled sets (the original drew a fresh sample at every access)")
        students = {"TransEnc": {"name": "transformer_classifier", "d_model": a.hidden_dim, "nhead": a.nheads,
                                 "num_layers": a.num_layers, "tied": True},
                    "ParityRNN": {"name": "rnn_classifier", "cell": "rnn", "embed_dim": 3,
                                  "hidden_size": a.hidden_dim, "num_layers": a.num_layers}}
        guide = {"name": "rnn_classifier", "cell": "rnn", "embed_dim": 3, "hidden_size": a.hidden_dim,
                 "num_layers": a.num_layers}
        layers = (["type:MultiheadAttention"] if a.student_model == "TransEnc" else ["type:RNN"], ["type:RNN"])
        out.note("--target_model", "guidance.guide", "the parity guide is the ParityRNN (the original's choices "
                                                     "misspell it 'parity_rnn]', so it could not be chosen there)")
    else:
        raise UserError(f"--task {a.task}: the original's choices are next-word, copy-paste, parity")
    if a.student_model not in students:
        raise UserError(f"--student_model {a.student_model} with --task {a.task}: converts "
                        f"{', '.join(students)}")
    if a.hidden_dim % a.nheads and "d_model" in students[a.student_model]:
        raise UserError(f"--nheads {a.nheads}: {a.hidden_dim} is not divisible by it (the original crashes too)")
    out.set("model", students[a.student_model], "--student_model --embedding_dim --hidden_dim --num_layers --fc_dim "
                                                "--nheads")
    if a.rep_sim and a.target_model_name is not None:
        raise UserError("--target_model_name: the original's saved_models checkpoint is not importable; train the "
                        "guide with instill and give it as guidance.guide_run (condition guided_trained)")
    if a.rep_sim and a.pretrained:
        raise UserError("--rep_sim without --untrained and without --target_model_name: the original loads no "
                        "trained guide then; pass --untrained")
    if a.rep_sim:
        a.pretrained = False
    _guided(a, out, guide)
    if a.rep_sim:
        out.config["guidance"].update({"target_layers": layers[0], "guide_layers": layers[1],
                                       "drop_last_layer": False, "layer_map": "repo"})
    for flag in ("--context_length", "--kernel_size", "--multi_gpu", "--load_ckpt"):
        out.drop(flag, "unused by the copy-paste and parity paths of the original")
    return out


def _guidance(script: str, args: list[str], env: Optional[str]) -> Translation:
    name = script.replace("/", ".").removesuffix(".py")
    if name.endswith("image_class"):
        return _guidance_vision(args)
    if name.endswith("language_model"):
        return _guidance_language(args)
    raise UserError(f"{script}: not an entry point of the Guidance code (imagenet-comparison.image_class, "
                    "language_modeling.language_model)")


ORIGINALS: dict[str, Callable[[str, list[str], Optional[str]], Translation]] = {
    "drfrankenstein": _drfrankenstein, "wide-network-alignment": _wna, "guidance": _guidance}
