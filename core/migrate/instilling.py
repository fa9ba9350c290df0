"""Configs of the original "Instilling Inductive Biases with Subnetworks" code (github Rock-Z/instilling-inductive-bias)
translated into instill configs.

The original's four scripts each read one YAML file of ``*_configs`` sections: ``math/base.py`` (HF Trainer,
``trainer_configs`` + ``GPT_configs``), ``math/ablate.py`` and ``vision/vision_ablate.py`` (NeuroSurgeon
``circuit_configs`` on a frozen base), ``math/transfer.py`` and ``vision/vision_transfer.py`` (``model_paths`` or
``train_configs.original/subnet``, ``inherit_from``). ``translate`` recognises which script a file is for and gives
the instill config of that run; every key is translated (with the original's semantics where they differ from
instill's defaults: the l0 penalty as given, the original temperature schedule, the whole-sequence LM loss, the
HF Trainer's defaults, the sampled baselines that kept N - k weights) or noted as not honoured, and a key that would
change the results but has no instill equivalent stops with a UserError naming it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

from ..errors import UserError
from .translation import Keys, Translation, refuse_unknown

SOURCE = "Rock-Z/instilling-inductive-bias"
SECTIONS = ("reproducibility_configs", "data_configs", "dataloader_configs", "circuit_configs", "train_configs",
            "optim_configs", "trainer_configs", "GPT_configs", "model_paths", "lr_scheduler_configs")
SCRIPT_STAGE = {"math/base.py": "base", "math/ablate.py": "ablate", "math/transfer.py": "transfer",
                "vision/vision_ablate.py": "ablate", "vision/vision_transfer.py": "transfer"}
# The original's inherit_from names -> instill's transfer conditions (trainable variants where freeze_subnet: False)
CONDITION_OF = {"subnet": "subnet", "subnet_sampled": "sampled_subnet",
                "subnet_sampled_complement": "sampled_complement", "original": "full_model", "random": "random_init"}
SAMPLED = {"subnet_sampled", "subnet_sampled_complement"}
# hf_pretrained names -> (instill model, pixel normalisation of the name's HF feature extractor, layers the original
# masked). The images are resized to 224 as both feature extractors do.
VISION_MODELS = {
    "microsoft/resnet-18": ("torchvision:resnet18", "imagenet", ["Conv2d"]),
    "google/vit-base-patch16-224": ("timm:vit_base_patch16_224", "half", ["Conv2d", "Linear"]),
}
LOSS_NOTE = "the HF causal-LM loss of the original (every next token, labels = input_ids)"
WANDB_NOTE = ("the original logged to W&B online; instill logs every evaluation to metrics.jsonl (and to an offline "
              "W&B run with logging.wandb: true)")


def is_original(raw: Any) -> bool:
    """Whether a config mapping is in the original's schema (its ``*_configs`` sections, no instill ``data``)."""
    return (isinstance(raw, dict) and "data" not in raw and "stage" not in raw
            and any(key in SECTIONS for key in raw))


def script_of(raw: dict[str, Any]) -> str:
    """The original script that reads this config (``math/ablate.py``, ...), from the sections it has."""
    if "trainer_configs" in raw or "GPT_configs" in raw:
        return "math/base.py"
    train = raw.get("train_configs") or {}
    transfer = "model_paths" in raw or any(k in train for k in ("inherit_from", "original", "subnet"))
    if "data_configs" in raw or "model_paths" in raw:
        return "math/transfer.py" if transfer else "math/ablate.py"
    return "vision/vision_transfer.py" if transfer else "vision/vision_ablate.py"


def translate(raw: dict[str, Any], path: str | Path) -> Translation:
    """The instill config doing the run ``raw`` (read from ``path``) describes; UserError for what cannot be."""
    unknown = [k for k in raw if k not in SECTIONS]
    if unknown:
        raise UserError(f"{path}: {unknown[0]}: not a section of the original's configs (known: {', '.join(SECTIONS)})")
    script = script_of(raw)
    out = Translation(f"{SOURCE} {script} config {Path(path).name}", SCRIPT_STAGE[script], {})
    sections = {name: Keys(raw.get(name), name) for name in SECTIONS}
    out.config["stage"] = out.stage
    _seed(out, sections["reproducibility_configs"], "reproducibility_configs" in raw, path)
    {"math/base.py": _math_base, "math/ablate.py": _math_ablate, "math/transfer.py": _math_transfer,
     "vision/vision_ablate.py": _vision_ablate, "vision/vision_transfer.py": _vision_transfer}[script](out, sections)
    for name, section in sections.items():
        if name in raw:
            refuse_unknown(section, script)
    first = {k: out.config[k] for k in ("stage", "name", "output_dir") if k in out.config}
    out.config = {**first, **{k: v for k, v in out.config.items() if k not in first}}
    return out


# ----------------------------------------------------------------------------------------------------- shared

def _seed(out: Translation, repro: Keys, present: bool, path: str | Path) -> None:
    if not present:
        out.drop("reproducibility_configs", "missing (the original script stops with a KeyError); instill draws a "
                                            "fresh seed and records it in the run's config.yaml")
        return
    reproduce, seed = bool(repro.get("reproduce", False)), repro.get("random_seed")
    seed = None if seed in (None, "None", "none", "null") else seed
    if reproduce:
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise UserError(f"reproducibility_configs.random_seed: reproduce: True needs an integer seed, got {seed!r}")
        out.set("reproducibility.reproduce", True, "reproducibility_configs.reproduce")
        out.set("reproducibility.random_seed", seed, "reproducibility_configs.random_seed",
                "replayed with this seed under instill's own exactness rules; the original's numbers are not "
                "expected bit for bit (other data generator and initialisation order)")
        return
    out.set("reproducibility.reproduce", False, "reproducibility_configs.reproduce",
            "a fresh seed from os.urandom, recorded in the run's config.yaml (the original's seed.txt)")
    out.drop("reproducibility_configs.random_seed", "unused while reproduce is False (as in the original)")
    recorded = Path(path).parent / "seed.txt"
    if recorded.is_file():
        text = recorded.read_text().strip()
        out.drop("seed.txt", f"this snapshot's run used seed {text}: replay it with --set reproducibility.reproduce="
                             f"true --set reproducibility.random_seed={text}")


def _output(out: Translation, value: Any, key: str) -> None:
    if value is None:
        return
    out.set("output_dir", str(value), key, "the run directory (its config.yaml plays the original's configs.yaml)")
    out.config["name"] = Path(str(value)).name or "run"


def _drop_common(out: Translation, train: Keys) -> None:
    if "verbose" in train:
        train.get("verbose")
        out.drop(train.key("verbose"), "instill always prints each evaluation")
    if "wandb" in train:
        train.get("wandb")
        out.drop(train.key("wandb"), WANDB_NOTE)
    if "wandb_project" in train:
        out.set("logging.wandb_project", train.get("wandb_project"), train.key("wandb_project"),
                "used by an offline W&B run (logging.wandb: true); W&B stays off otherwise")


def _optimizer(out: Translation, optim: Keys, lr_list: bool = False, extra_kwargs: bool = True) -> None:
    name = optim.get("optim_name", "AdamW")
    out.set("train.optimizer.name", name, optim.key("optim_name"))
    lr = optim.need("lr")
    if isinstance(lr, list):
        if not lr_list:
            raise UserError(f"{optim.key('lr')}: a list of learning rates, but this script takes one")
        out.set("transfer.lrs", [float(x) for x in lr], optim.key("lr"),
                "each rate in turn, stopping once one reaches validation accuracy 1 (the original's break)")
        out.config.setdefault("train", {}).setdefault("optimizer", {})["lr"] = float(lr[0])
    else:
        out.set("train.optimizer.lr", float(lr), optim.key("lr"))
    rest = {k: optim.get(k) for k in optim.rest()}
    if not rest:
        return
    if not extra_kwargs:
        for key in rest:
            out.drop(optim.key(key), "math/transfer.py passes only lr to the optimizer: ignored there too")
        return
    out.set("train.optimizer.kwargs", rest, ", ".join(optim.key(k) for k in rest),
            "keyword arguments of the torch optimizer, as the original passed them")


def _dataloader(out: Translation, loader: Keys) -> None:
    out.set("train.batch_size", int(loader.need("batch_size")), loader.key("batch_size"))
    if "shuffle" in loader and not loader.get("shuffle"):
        raise UserError(f"{loader.key('shuffle')}: False (unshuffled batches) is not offered: instill shuffles every "
                        "epoch; the run is refused rather than run shuffled")
    if "shuffle" in loader:
        out.note(loader.key("shuffle"), "train", "instill shuffles every epoch (from the run seed)")
    if "drop_last" in loader:
        out.set("train.drop_last", bool(loader.get("drop_last")), loader.key("drop_last"))
    for key in ("num_workers", "pin_memory", "persistent_workers", "prefetch_factor"):
        if key in loader:
            loader.get(key)
            out.drop(loader.key(key), "data-loading speed only")


def _mask(out: Translation, circuit: Keys, layers: list[str], ablate: bool) -> dict[str, Any]:
    """The mask section (ablate) from circuit_configs; for a transfer only the settings that read the mask file."""
    method = circuit.get("mask_method", "continuous_sparsification")
    if method != "continuous_sparsification":
        raise UserError(f"{circuit.key('mask_method')}: {method!r}: the original's NeuroSurgeon copy has only "
                        "continuous_sparsification")
    hp = Keys(circuit.get("mask_hparams", {}), circuit.key("mask_hparams"))
    ablation = hp.get("ablation", "none")
    if ablation != "none":
        raise UserError(f"{hp.key('ablation')}: {ablation!r}: NeuroSurgeon applies ablation modes to a found mask, "
                        "never while it trains; keep 'none' here and list the mode under the ablate stage's "
                        "ablations.modes (docs/neurosurgeon.md)")
    unit, bias, init = hp.get("mask_unit", "weight"), bool(hp.get("mask_bias", False)), hp.get("mask_init_value", 0.0)
    refuse_unknown(hp, "NeuroSurgeon's ContSparseLayer")
    if not ablate:
        for key in ("mask_method", "mask_hparams", "freeze_base", "add_l0", "l0_lambda"):
            if key in circuit:
                circuit.get(key)
                out.drop(circuit.key(key), "the transfer script only rebuilds the CircuitModel to read the mask "
                                           "file; instill reads the mask (unit, bias masks) from the file itself")
        return {}
    if not circuit.get("freeze_base", True):
        raise UserError(f"{circuit.key('freeze_base')}: False (the base trains with its mask) is not offered: the "
                        "ablate stage keeps the base frozen")
    out.note(circuit.key("freeze_base"), "mask", "the ablate stage always freezes the base (dropout off)")
    add_l0 = bool(circuit.get("add_l0", True))
    l0 = float(circuit.get("l0_lambda", 1e-8)) if add_l0 else 0.0
    out.note(circuit.key("mask_method"), "mask.method")
    out.note(hp.prefix, "mask", "mask_unit -> unit, mask_bias, mask_init_value as given")
    out.note(circuit.key("l0_lambda") + "/add_l0", "mask.l0_lambda",
             "the penalty as given (instill's presets use larger ones: see configs/math_2l_ablate.yaml)")
    return {"layers": layers, "method": method, "unit": unit, "mask_bias": bias, "mask_init_value": float(init),
            "l0_lambda": l0}


def _ablate_train(out: Translation, train: Keys, mask: dict[str, Any]) -> None:
    out.set("train.epochs", int(train.need("n_epochs")), train.key("n_epochs"))
    mask["final_temp"] = float(train.get("final_temp", 1))
    mask["legacy_schedule"] = True
    out.config["mask"] = mask
    out.note(train.key("final_temp"), "mask.final_temp",
             "with legacy_schedule: true, the original's schedule (epoch 1 at 1, epoch k >= 2 at final_temp^(k/n))")
    out.set("train.select_ties", "last", "(script) eval_acc >= best_acc",
            "the last epoch reaching the best accuracy keeps its mask")
    out.set("base", str(train.need("model_path")), train.key("model_path"),
            "a base run directory, or the HF Trainer checkpoint folder the original wrote (imported when run)")
    _output(out, train.get("output_path"), train.key("output_path"))
    _drop_common(out, train)


# ----------------------------------------------------------------------------------------------------- math

def _math_base(out: Translation, s: dict[str, Keys]) -> None:
    data, gpt, trainer = s["data_configs"], s["GPT_configs"], s["trainer_configs"]
    numbers, modulus = int(data.need("max")), int(data.need("p"))
    out.config["data"] = {"name": "arithmetic", "task": "a+ab", "modulus": modulus, "max": numbers,
                          "n_train": int(data.need("n_samples")), "n_val": 1000, "n_test": 1000}
    out.note("data_configs", "data", "n_samples -> n_train, p -> modulus, max; task a+ab as math/base.py; "
                                     "1000 validation rows as the original's eval set (plus 1000 test rows)")
    if "computation" in data or "ambiguous" in data:
        raise UserError("data_configs.computation/ambiguous: math/base.py fixes the task to a + ab (the original "
                        "stops with a TypeError when the file names one)")
    _gpt(out, gpt, numbers)
    _trainer(out, trainer)
    out.set("loss_scope", "sequence", "(script) Trainer on GPT2LMHeadModel", LOSS_NOTE)


GPT_DEFAULTS = {"n_embd": 768, "n_layer": 12, "n_head": 12, "resid_pdrop": 0.1, "embd_pdrop": 0.1, "attn_pdrop": 0.1,
                "activation_function": "gelu_new", "initializer_range": 0.02}  # transformers' GPT2Config


def _gpt(out: Translation, gpt: Keys, numbers: int) -> None:
    vocab = gpt.get("vocab_size", 50257)
    if vocab != numbers + 1:
        raise UserError(f"{gpt.key('vocab_size')}: {vocab}, but instill sizes the vocabulary from the data "
                        f"(max + 1 = {numbers + 1}); a different size cannot be honoured")
    positions = gpt.get("n_positions", 1024)
    if positions != 4:
        raise UserError(f"{gpt.key('n_positions')}: {positions}, but the sequences have 4 tokens and instill sizes "
                        "the position table from them")
    v = {k: gpt.get(k, d) for k, d in GPT_DEFAULTS.items()}
    if v["resid_pdrop"] != v["embd_pdrop"]:
        raise UserError(f"{gpt.key('resid_pdrop')}/embd_pdrop: {v['resid_pdrop']} vs {v['embd_pdrop']}: instill's "
                        "gpt2 has one dropout for both")
    out.config["model"] = {"name": "gpt2", "n_layer": v["n_layer"], "n_embd": v["n_embd"], "n_head": v["n_head"],
                           "dropout": v["resid_pdrop"], "attn_dropout": v["attn_pdrop"],
                           "activation": v["activation_function"], "init_std": v["initializer_range"]}
    out.note("GPT_configs", "model", "GPT2Config's own defaults where the file gives none (12 layers, width 768, "
                                     "dropout 0.1); vocab_size and n_positions checked against the data")


TRAINER_DROPPED = {
    "logging_strategy": "instill logs every evaluation", "logging_steps": "instill logs every evaluation",
    "save_strategy": "instill keeps the best and the last weights and the state to resume",
    "save_total_limit": "instill keeps the best and the last weights and the state to resume",
    "save_steps": "instill keeps the best and the last weights and the state to resume",
    "report_to": WANDB_NOTE, "run_name": "the run name is the output folder's", "logging_dir": "metrics.jsonl",
    "disable_tqdm": "train.progress", "dataloader_num_workers": "data-loading speed only",
    "overwrite_output_dir": "instill never writes into a finished run",
}


def _trainer(out: Translation, t: Keys) -> None:
    """HF TrainingArguments, with the Trainer's defaults where the file gives none."""
    if "output_dir" in t:
        _output(out, t.get("output_dir"), t.key("output_dir"))
    out.set("train.optimizer.name", "AdamW", "(Trainer default) optim adamw_torch")
    out.set("train.optimizer.lr", float(t.get("learning_rate", 5e-5)), t.key("learning_rate"))
    betas = [float(t.get("adam_beta1", 0.9)), float(t.get("adam_beta2", 0.999))]
    out.set("train.optimizer.kwargs", {"weight_decay": float(t.get("weight_decay", 0.0)), "betas": betas,
                                       "eps": float(t.get("adam_epsilon", 1e-8))},
            t.key("weight_decay/adam_*"), "the Trainer's defaults (weight decay 0, not torch's 0.01)")
    out.set("train.epochs", int(t.get("num_train_epochs", 3)), t.key("num_train_epochs"))
    if t.get("max_steps", -1) not in (-1, None):
        out.set("train.max_steps", int(t.get("max_steps")), t.key("max_steps"))
    out.set("train.batch_size", int(t.get("per_device_train_batch_size", 8)), t.key("per_device_train_batch_size"),
            "per device in the original: with k GPUs its batch was k times this (set train.batch_size)")
    out.set("train.eval_batch_size", int(t.get("per_device_eval_batch_size", 8)), t.key("per_device_eval_batch_size"))
    out.set("train.grad_clip", float(t.get("max_grad_norm", 1.0)), t.key("max_grad_norm"), "the Trainer's default 1.0")
    out.set("train.grad_accum", int(t.get("gradient_accumulation_steps", 1)), t.key("gradient_accumulation_steps"))
    schedule = t.get("lr_scheduler_type", "linear")
    if schedule not in ("linear", "constant"):
        raise UserError(f"{t.key('lr_scheduler_type')}: {schedule!r}: only linear and constant are translated")
    out.set("train.schedule", {"name": schedule, "warmup_steps": int(t.get("warmup_steps", 0))},
            t.key("lr_scheduler_type/warmup_steps"), "the Trainer's default: linear decay to 0 over the run")
    if t.get("warmup_ratio", 0):
        raise UserError(f"{t.key('warmup_ratio')}: not translated; give warmup_steps")
    strategy = t.get("evaluation_strategy", t.get("eval_strategy", "no"))
    if strategy == "epoch":
        out.set("train.eval_unit", "epoch", t.key("evaluation_strategy"))
    elif strategy == "steps":
        out.set("train.eval_unit", "step", t.key("evaluation_strategy"))
        out.set("train.eval_every", int(t.get("eval_steps") or t.get("logging_steps", 500)), t.key("eval_steps"))
    else:
        raise UserError(f"{t.key('evaluation_strategy')}: {strategy!r}: math/base.py's early stopping needs "
                        "evaluations (epoch or steps)")
    if not t.get("load_best_model_at_end", False):
        raise UserError(f"{t.key('load_best_model_at_end')}: False (keep the last weights) is not translated: "
                        "instill's base stage hands the best checkpoint to later stages")
    out.note(t.key("load_best_model_at_end"), "train.select_metric", "the best checkpoint is model.safetensors")
    metric = str(t.get("metric_for_best_model", "loss")).removeprefix("eval_")
    if metric not in ("loss", "accuracy"):
        raise UserError(f"{t.key('metric_for_best_model')}: {metric!r}: only loss and accuracy are translated")
    t.get("greater_is_better")
    out.set("train.select_metric", "val_loss" if metric == "loss" else "val_acc", t.key("metric_for_best_model"),
            "the Trainer's default: the best checkpoint by validation loss (instill's: over the answer)")
    out.config["train"]["select_mode"] = "min" if metric == "loss" else "max"
    out.set("train.early_stop", {"patience": 10}, "(script) EarlyStoppingCallback(early_stopping_patience=10)")
    seed_key = t.key("seed") if "seed" in t else "(Trainer default) seed 42"
    t.get("seed")
    out.drop(seed_key, "the Trainer re-seeded torch with its seed (default 42) after the model was built; "
                            "instill uses the run seed throughout")
    if t.get("fp16", False):
        raise UserError(f"{t.key('fp16')}: not offered (train.precision: bf16 is)")
    if t.get("bf16", False):
        out.set("train.precision", "bf16", t.key("bf16"))
    for key, why in TRAINER_DROPPED.items():
        if key in t:
            t.get(key)
            out.drop(t.key(key), why)


def _math_data(out: Translation, data: Keys, transfer: bool) -> tuple[int, int]:
    numbers, modulus = int(data.need("max")), int(data.need("p"))
    if transfer:
        out.config["data"] = {"name": "arithmetic", "task": "a^2+ab", "modulus": modulus, "max": numbers,
                              "n_val": 1000, "n_test": 1000}
        out.note("data_configs", "data", "max, p -> modulus; task a^2 + ab as math/transfer.py; 1000 validation "
                                         "and 1000 test rows as the original")
        return numbers, modulus
    out.config["data"] = {"name": "arithmetic", "task": str(data.get("computation", "a^2 + ab")),
                          "modulus": modulus, "max": numbers, "n_train": int(data.need("n_samples")),
                          "ambiguous": bool(data.get("ambiguous", False)), "n_val": numbers, "n_test": numbers}
    out.note("data_configs", "data", "computation -> task, n_samples -> n_train, p -> modulus, max, ambiguous; "
                                     "max validation rows as the original's eval set")
    return numbers, modulus


def _math_ablate(out: Translation, s: dict[str, Keys]) -> None:
    _math_data(out, s["data_configs"], transfer=False)
    _dataloader(out, s["dataloader_configs"])
    mask = _mask(out, s["circuit_configs"], ["Conv1D"], ablate=True)
    _ablate_train(out, s["train_configs"], mask)
    _optimizer(out, s["optim_configs"])
    out.set("loss_scope", "sequence", "(script) circuit_model(input_ids, labels=input_ids)", LOSS_NOTE)
    out.drop("(script) WANDB = True", WANDB_NOTE)


def _inherit(out: Translation, train: Keys, freeze: bool) -> list[str]:
    names = train.need("inherit_from")
    names = names if isinstance(names, list) else [names]
    bad = [n for n in names if n not in CONDITION_OF]
    if bad:
        raise UserError(f"{train.key('inherit_from')}: {bad[0]!r} is not an option of the original's transfer script "
                        f"(its assertion allows {', '.join(CONDITION_OF)})")
    conditions = [("subnet_trainable" if n == "subnet" and not freeze else CONDITION_OF[n]) for n in names]
    out.set("transfer.conditions", conditions, train.key("inherit_from"),
            ", ".join(f"{a} -> {b}" for a, b in zip(names, conditions)))
    if SAMPLED & set(names):
        out.set("transfer.legacy_sampling", True, train.key("inherit_from") + " (subnet_sampled*)",
                "the original's sampled baselines kept N - k random weights, not k (legacy_sampling: false "
                "corrects it)")
    return conditions


def _math_transfer(out: Translation, s: dict[str, Keys]) -> None:
    data, train, paths = s["data_configs"], s["train_configs"], s["model_paths"]
    _math_data(out, data, transfer=True)
    out.set("transfer.n_disambiguation", [int(n) for n in data.need("n_disambiguation")],
            data.key("n_disambiguation"))
    for key in data.rest():
        data.get(key)
        out.drop(data.key(key), "math/transfer.py reads only max, p and n_disambiguation")
    out.set("transfer.mask", str(paths.need("subnet")), paths.key("subnet"),
            "the NeuroSurgeon best_circuit_model.pt (imported when run), or an ablate run directory")
    out.set("transfer.mask_base", str(paths.need("original")), paths.key("original"),
            "the base the mask was found on: the HF Trainer checkpoint folder (imported when run) or a base run")
    if "freeze_subnet" in train:
        freeze = bool(train.get("freeze_subnet"))
        out.set("transfer.freeze", freeze, train.key("freeze_subnet"))
    else:
        freeze = True
        out.set("transfer.freeze", True, train.key("freeze_subnet"),
                "missing (math/transfer.py stops with a KeyError); load_model's default True")
    _inherit(out, train, freeze)
    out.config["transfer"]["non_masked"] = "inherit"
    out.note("(script) load_model", "transfer.non_masked", "inherit: embeddings, LayerNorms and biases come "
                                                            "from the base, as the original")
    out.set("train.epochs", int(train.need("n_epochs")), train.key("n_epochs"))
    out.set("train.batch_size", int(train.need("batch_size")), train.key("batch_size"))
    out.set("train.select_ties", "last", "(script) eval_acc >= best_acc",
            "selection on the unambiguous validation accuracy, the later epoch on a tie")
    _output(out, train.get("output_path"), train.key("output_path"))
    _drop_common(out, train)
    _mask(out, s["circuit_configs"], [], ablate=False)
    _optimizer(out, s["optim_configs"], lr_list=True, extra_kwargs=False)
    if "lrs" not in out.config.get("transfer", {}):
        out.config["transfer"]["lrs"] = [out.config["train"]["optimizer"]["lr"]]
    out.set("loss_scope", "sequence", "(script) transfer_model(input_ids, labels=input_ids)", LOSS_NOTE)


# ----------------------------------------------------------------------------------------------------- vision

def hf_cache_roots() -> list[Path]:
    """Where the local Hugging Face hub cache is looked for (never downloaded from)."""
    roots = [os.environ.get("HF_HUB_CACHE"), os.environ.get("HUGGINGFACE_HUB_CACHE")]
    home = os.environ.get("HF_HOME")
    roots.append(os.path.join(home, "hub") if home else os.path.expanduser("~/.cache/huggingface/hub"))
    return [Path(r) for r in roots if r]


def hf_cached(name: str) -> Optional[Path]:
    """The newest local snapshot of HF model ``name`` (``org/name``), or None."""
    for root in hf_cache_roots():
        snapshots = sorted((root / f"models--{name.replace('/', '--')}" / "snapshots").glob("*"),
                           key=lambda p: p.stat().st_mtime)
        if snapshots:
            return snapshots[-1]
    return None


def _vision_model(out: Translation, train: Keys) -> tuple[str, str, list[str]]:
    name = train.need("hf_pretrained")
    cached = hf_cached(name)
    if name not in VISION_MODELS:
        if cached is None:
            raise UserError(f"{train.key('hf_pretrained')}: {name!r} is not in the local Hugging Face cache (looked "
                            f"in {', '.join(map(str, hf_cache_roots()))}); instill never downloads")
        raise UserError(f"{train.key('hf_pretrained')}: {name!r} (found in {cached}) has no instill architecture; "
                        f"translated: {', '.join(VISION_MODELS)}")
    model, normalize, layers = VISION_MODELS[name]
    where = f"read from the local HF cache ({cached})" if cached else "the name's known settings (no weights needed)"
    out.note(train.key("hf_pretrained"), "data", f"{model}; preprocessing of its feature extractor (224 px, "
                                                 f"normalize {normalize}): {where}")
    return model, normalize, layers


def _image_data(out: Translation, loader: Keys, normalize: str, train_dir: str, val_dir: str) -> None:
    out.config["data"] = {"name": "image_folder", "train_dir": train_dir, "val_dir": val_dir, "test_dir": val_dir,
                          "classes": "imagenet16", "resolution": 224, "normalize": normalize}
    out.note("(script) ImageNet16Class", "data", "the original's hard-coded folders, in ImageFolder layout under "
                                                 "data/ (see configs/paper/vision_resnet18_common.yaml)")
    if "num_workers" in loader:
        out.set("data.workers", int(loader.get("num_workers")), loader.key("num_workers"), "loading speed only")


def _vision_ablate(out: Translation, s: dict[str, Keys]) -> None:
    loader, train = s["dataloader_configs"], s["train_configs"]
    _, normalize, layers = _vision_model(out, train)
    _image_data(out, loader, normalize, "data/imagenet16-meanpooled/train", "data/imagenet16-meanpooled/eval")
    _dataloader(out, loader)
    mask = _mask(out, s["circuit_configs"], layers, ablate=True)
    _ablate_train(out, train, mask)
    _optimizer(out, s["optim_configs"])
    out.drop("(script) WANDB = True", WANDB_NOTE)


def _vision_transfer(out: Translation, s: dict[str, Keys]) -> None:
    loader, train = s["dataloader_configs"], s["train_configs"]
    model, normalize, _ = _vision_model(out, train)
    _image_data(out, loader, normalize, "data/imagenet16/train_full", "data/imagenet16/eval")
    _dataloader(out, loader)
    out.set("train.epochs", int(train.need("n_epochs")), train.key("n_epochs"))
    scratch = train.get("inherit_from") == "random"
    if scratch and "original" not in train:  # nothing to transplant: a fresh model trained on the data
        out.stage = out.config["stage"] = "base"
        out.set("model", {"name": model}, train.key("inherit_from"),
                "random: the architecture trained from scratch (run it with vision/vision_base.py)")
    else:
        out.set("transfer.mask", str(Path(str(train.need("subnet"))) / "best_circuit_model.pt"), train.key("subnet"),
                "the NeuroSurgeon best_circuit_model.pt in that folder (imported when run)")
        out.set("transfer.mask_base", str(train.need("original")), train.key("original"),
                "the base the mask was found on (a base run directory)")
        out.set("transfer.conditions", ["random_init" if scratch else "subnet"], train.key("inherit_from"),
                "random -> random_init; otherwise the frozen subnetwork with the rest trainable")
        out.config["transfer"]["batch_norm"] = "freeze"
        out.note("(script) init_subnet_transfer", "transfer.batch_norm",
                 "freeze: batch-norm statistics kept at the base's as the original (its affine parameters train "
                 "here); the original's vision_transfer.py stops on a ResNet ('Freezing embeds only work for ViT'), "
                 "instill runs it")
    _mask(out, s["circuit_configs"], [], ablate=False)
    _output(out, train.get("output_path"), train.key("output_path"))
    _drop_common(out, train)
    _optimizer(out, s["optim_configs"])
    sched = s["lr_scheduler_configs"]
    if sched.raw:
        for key in ("warmup", "decay"):
            if sched.get(key, "linear") != "linear":
                raise UserError(f"{sched.key(key)}: {sched.raw[key]!r}: only linear is translated")
        out.set("train.schedule", {"name": "linear" if "decay" in sched else "constant",
                                   "warmup_steps": int(sched.get("warmup_steps", 0))}, "lr_scheduler_configs")
    out.drop("(script) class-weighted CrossEntropyLoss, RandomCrop/flip augmentation",
             "not available: plain cross-entropy on resized images (docs/migrating.md)")
    out.drop("(script) 5 evaluations per epoch", "selection used the epoch-end one, as instill's per-epoch "
                                                 "evaluation; the mean-pooled eval set is not evaluated")
    out.drop("(script) WANDB = True", WANDB_NOTE)
