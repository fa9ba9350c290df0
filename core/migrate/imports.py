"""What the original code wrote, imported as instill runs when a stage first needs it.

* An HF Trainer checkpoint folder (``checkpoints/12layers_val/base``, ``.../checkpoint-17000``: ``config.json`` and
  ``model.safetensors`` or ``pytorch_model.bin``) of a GPT-2 becomes a base run directory (``model.safetensors`` +
  ``model.json`` + a finished ``summary.json``) that the ablate and transfer stages read as ``base``.
* A NeuroSurgeon ``best_circuit_model.pt`` (with the base it was found on) becomes a mask directory, by the
  existing converter (``instill.subnetworks.neurosurgeon.import_neurosurgeon``).

Imports go to ``checkpoints/imported/<folder>-<content hash>``: the same files give the same directory, made once
and reused (another file, another directory). ``.bin`` files load with ``torch.load(weights_only=True)``; nothing
else is unpickled. Weights of another architecture (an HF ResNet or ViT image classifier) are refused in one line.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional

from ..errors import UserError

IMPORT_ROOT = Path("checkpoints") / "imported"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
NEUROSURGEON_FILE = "best_circuit_model.pt"


def hf_weights(folder: str | Path) -> Optional[Path]:
    """The weights file of an HF checkpoint folder (config.json beside it), or None when it is no such folder."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        return None
    return next((folder / name for name in WEIGHT_FILES if (folder / name).is_file()), None)


def _digest(*paths: Path) -> str:
    sha = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                sha.update(block)
    return sha.hexdigest()[:12]


def _made_once(target: Path, make) -> str:
    """``target`` made by ``make(tmp_dir)`` in a temporary sibling and renamed into place (never half-written);
    an existing ``target`` is reused. One process at a time makes it (two launches importing the same files: the
    second waits and reuses it), and the one that makes it first removes what a killed maker left. Under
    ``--validate`` a missing ``target`` is made in the validation's scratch folder instead: the import is checked
    and nothing is written under checkpoints/."""
    from ..run import is_finished
    from ..stages.runner import validation_scratch
    from ..stages.upstream import producer_lock

    if is_finished(target):
        return str(target)
    scratch = validation_scratch()
    if scratch is not None:
        target = scratch / target.name
    with producer_lock(str(target)):
        if is_finished(target):  # made meanwhile by the launch we waited for
            return str(target)
        for stale in target.parent.glob(f".{target.name}.*"):  # a killed maker's half-made copy (not our lock)
            if stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        try:
            make(tmp)
            os.replace(tmp, target)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    if scratch is None:
        print(f"imported into {target}", flush=True)
    return str(target)


def import_hf_checkpoint(folder: str | Path, key: str = "base") -> str:
    """The base run directory holding the GPT-2 of HF checkpoint ``folder`` (made on first use)."""
    folder = Path(folder)
    weights = hf_weights(folder)
    if weights is None:
        raise UserError(f"{key}: {folder} holds no HF checkpoint (config.json with {' or '.join(WEIGHT_FILES)})")
    config = _read_config(folder / "config.json", key)
    if config.get("model_type") != "gpt2":
        kind = (config.get("architectures") or [config.get("model_type")])[0]
        raise UserError(f"{key}: {folder} is an HF {kind} checkpoint; only GPT-2 (the original's math models) is "
                        "imported: train the vision base with vision/vision_base.py (configs/paper)")
    target = IMPORT_ROOT / f"{folder.resolve().name}-{_digest(folder / 'config.json', weights)}"
    return _made_once(target, lambda tmp: _write_gpt2_run(tmp, config, weights, key))


def _read_config(path: Path, key: str) -> dict:
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"{key}: {path} is not readable JSON ({err.__class__.__name__})") from None
    if not isinstance(config, dict):
        raise UserError(f"{key}: {path} is not an HF model config")
    return config


def gpt2_model_config(config: dict, key: str = "base") -> dict:
    """instill's gpt2 model section for an HF ``GPT2Config`` mapping; UserError for what instill's gpt2 cannot be."""
    if config.get("n_positions", 1024) != 4:
        raise UserError(f"{key}: GPT-2 with n_positions {config.get('n_positions')}: the arithmetic rows have 4 tokens")
    resid, embd = config.get("resid_pdrop", 0.1), config.get("embd_pdrop", 0.1)
    if resid != embd:
        raise UserError(f"{key}: resid_pdrop {resid} != embd_pdrop {embd}: instill's gpt2 has one dropout for both")
    return {"name": "gpt2", "n_layer": config.get("n_layer", 12), "n_embd": config.get("n_embd", 768),
            "n_head": config.get("n_head", 12), "dropout": resid, "attn_dropout": config.get("attn_pdrop", 0.1),
            "activation": config.get("activation_function", "gelu_new"),
            "init_std": config.get("initializer_range", 0.02)}


def _write_gpt2_run(tmp: Path, config: dict, weights: Path, key: str) -> None:
    from safetensors.torch import save_model

    from ..data.arithmetic import info
    from ..models import build_fresh
    from ..compare.sources import read_state_dict
    from ..files import atomic_write_json

    model_cfg = gpt2_model_config(config, key)
    data_info = info(task="a+ab", modulus=7, numbers=int(config.get("vocab_size", 50257)) - 1,
                     imported_from=str(weights))
    model = build_fresh(model_cfg, data_info)
    state = read_state_dict(weights, key)  # torch.load(weights_only=True) for .bin
    state = {k: v for k, v in state.items() if not k.endswith((".attn.bias", ".attn.masked_bias"))}  # causal buffers
    shapes = model.state_dict()
    wrong = next((k for k, v in state.items() if k in shapes and v.shape != shapes[k].shape), None)
    if wrong is not None:  # load_state_dict would raise a multi-line RuntimeError
        raise UserError(f"{key}: {weights} does not fit GPT-2 {model_cfg}: {wrong} has shape "
                        f"{tuple(state[wrong].shape)}, the config's model {tuple(shapes[wrong].shape)}")
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]  # tied to the token embedding, stored once
    if missing or unexpected:
        raise UserError(f"{key}: {weights} does not fit GPT-2 {model_cfg}: "
                        + (f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}"))
    model.tie_weights()
    save_model(model, str(tmp / "model.safetensors"), metadata={"model": "gpt2"})
    atomic_write_json(tmp / "model.json", {"model": model_cfg, "info": data_info.to_dict()})
    atomic_write_json(tmp / "summary.json", {"status": "finished", "stage": "import-hf-checkpoint",
                                             "source": str(weights)})


def neurosurgeon_file(ref: str | Path) -> Optional[Path]:
    """The NeuroSurgeon state dict ``ref`` names (a ``.pt`` file, or a folder holding best_circuit_model.pt)."""
    path = Path(ref)
    if path.is_dir() and (path / NEUROSURGEON_FILE).is_file():
        return path / NEUROSURGEON_FILE
    return path if path.suffix == ".pt" else None


def import_neurosurgeon_mask(state_file: Path, base: str, key: str = "transfer.mask") -> str:
    """The mask directory of NeuroSurgeon state dict ``state_file`` over base run ``base`` (made on first use)."""
    from ..subnetworks.neurosurgeon import import_neurosurgeon

    if not state_file.is_file():
        raise UserError(f"{key}: {state_file} not found")
    digest = _digest(state_file, Path(base) / "model.safetensors")
    target = IMPORT_ROOT / f"mask-{state_file.resolve().parent.name}-{digest}"
    return _made_once(target, lambda tmp: import_neurosurgeon(state_file, base, tmp))


def resolve_imported(ref: str, stage: str, key: str, mask_base: Optional[str] = None) -> Optional[str]:
    """The run or mask directory an original's file becomes, or None when ``ref`` names none (an instill run or
    config: resolved as usual)."""
    from ..stages.upstream import resolve_upstream

    if stage == "base" and hf_weights(ref) is not None:
        return import_hf_checkpoint(ref, key)
    state = neurosurgeon_file(ref) if stage == "ablate" else None
    if state is None:
        return None
    if mask_base is None:
        raise UserError(f"{key}: {ref} is a NeuroSurgeon state dict; name the base model it was found on with "
                        "transfer.mask_base")
    return import_neurosurgeon_mask(state, resolve_upstream(mask_base, "base", "transfer.mask_base"), key)
