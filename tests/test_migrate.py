"""The original subnetwork-transfer code's YAML configs, run snapshots and checkpoints, run in instill.

Every one of the 50 public files (restated in tests/fixtures/original_configs) either validates after translation
or is refused with one line naming the feature; tiny end-to-end runs of a math base, ablate and transfer and a
vision preset after translation, with an HF Trainer checkpoint folder and a NeuroSurgeon mask file as inputs.
"""

from __future__ import annotations

import re

import csv
import json
import shutil
from pathlib import Path

import pytest
from PIL import Image
import torch
import yaml

from instill.config import read_yaml
from instill.migrate.instilling import SCRIPT_STAGE, script_of
from instill.run import is_finished
from tests.conftest import CONFIGS, forked_at_once, run_cli

ORIGINALS = Path(__file__).resolve().parent / "fixtures" / "original_configs"
FILES = sorted(ORIGINALS.rglob("*.yaml"))
# The files the translation refuses, with the feature their one line names.
REFUSED = {
    "math/configs/transfer_from_inverted_subnet.yaml": "inherit_from: 'subnet_inverted' is not an option",
    "vision/configs/ablate_alt.yaml": "train_configs.hf_pretrained: missing",
}
TINY_GPT = {"vocab_size": 21, "n_positions": 4, "n_embd": 16, "n_layer": 1, "n_head": 2}
SHRINK_DATA = ["--set", "data.max=20", "--set", "data.n_val=100", "--set", "data.n_test=100"]


# --validate checks that every input a config names is there; the originals name their own data folders and runs,
# which this machine does not have. Such a refusal must name one of the file's own paths.
MISSING_INPUT = re.compile(r"'?([^' ]+)'? (?:does not exist|is neither a run directory nor a config file)")


def stage_of(path: Path) -> str:
    return SCRIPT_STAGE[script_of(read_yaml(path))]


def validates_but_for_absent_inputs(code: int, out: str, err: str, original: str) -> bool:
    """Valid, or refused in one line only because an input the original names is not on this machine."""
    if code == 0 and "valid" in out:
        return True
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    missing = MISSING_INPUT.search(lines[0]) if code == 2 and len(lines) == 1 else None
    return missing is not None and any(part in original for part in missing.group(1).split("/") if len(part) > 3)


def test_there_are_the_50_public_files():
    assert len(FILES) == 50
    assert len([f for f in FILES if f.name == "configs.yaml"]) == 31


@pytest.mark.parametrize("path", FILES, ids=[str(f.relative_to(ORIGINALS)) for f in FILES])
def test_each_original_file_validates_or_is_refused_naming_the_feature(path, capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    stage = "base" if path.match("vision/configs/transfer_from_scratch.yaml") else stage_of(path)
    code = run_cli(stage, str(path), "--validate")
    out, err = capsys.readouterr()
    refusal = REFUSED.get(str(path.relative_to(ORIGINALS)))
    if refusal is None:
        assert validates_but_for_absent_inputs(code, out, err, path.read_text()), err
    else:
        lines = [line for line in err.splitlines() if line.startswith("error:")]
        assert code == 2 and len(lines) == 1 and refusal in lines[0], err
    assert not any(tmp_path.iterdir())  # validation writes nothing


def test_a_file_with_nothing_to_transplant_is_a_base_run_and_says_so(capsys):
    path = ORIGINALS / "vision/configs/transfer_from_scratch.yaml"
    assert run_cli("transfer", str(path), "--validate") == 2
    assert "this config is for stage 'base'" in capsys.readouterr().err


def test_print_config_shows_the_translation_with_the_originals_semantics(capsys):
    path = ORIGINALS / "math/checkpoints/12layers_val/transfer_1e-7_trainable/configs.yaml"
    assert run_cli("transfer", str(path), "--print-config") == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["transfer"]["conditions"] == ["subnet_trainable", "sampled_subnet", "sampled_complement",
                                             "full_model", "random_init"]
    assert cfg["transfer"]["freeze"] is False and cfg["transfer"]["legacy_sampling"] is True
    assert cfg["transfer"]["lrs"] == [2e-4] and len(cfg["transfer"]["n_disambiguation"]) == 16
    assert cfg["loss_scope"] == "sequence" and cfg["output_dir"] == "checkpoints/12layers_val/transfer_1e-7_trainable"


def test_the_ablate_translation_keeps_the_penalty_and_schedule_as_given(capsys):
    assert run_cli("ablate", str(ORIGINALS / "math/configs/ablate_12l.yaml"), "--print-config") == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["mask"]["l0_lambda"] == 1e-8 and cfg["mask"]["legacy_schedule"] is True
    assert cfg["mask"]["layers"] == ["Conv1D"] and cfg["mask"]["mask_init_value"] == -0.1
    assert cfg["train"]["optimizer"] == {"name": "AdamW", "lr": 2e-3, "kwargs": {}}
    assert cfg["base"] == "checkpoints/2layers_100epochs/base" and cfg["data"]["task"] == "ab"


def test_the_base_translation_carries_the_hf_trainer_defaults(capsys):
    assert run_cli("base", str(ORIGINALS / "math/configs/base.yaml"), "--print-config") == 0
    train = yaml.safe_load(capsys.readouterr().out)["train"]
    assert train["optimizer"]["kwargs"]["weight_decay"] == 0.0 and train["grad_clip"] == 1.0
    assert train["schedule"]["name"] == "linear" and train["early_stop"]["patience"] == 10
    assert (train["select_metric"], train["select_mode"]) == ("val_loss", "min")


def test_a_snapshot_with_reproduce_replays_its_seed(capsys):
    path = ORIGINALS / "math/configs/transfer_simple_reproduce.yaml"
    assert run_cli("transfer", str(path), "--print-config") == 0
    assert yaml.safe_load(capsys.readouterr().out)["reproducibility"] == {
        "reproduce": True, "random_seed": 74296238, "deterministic": True}


@pytest.mark.parametrize("edit, message", [
    ({"circuit_configs": {"mask_hparams": {"ablation": "zero_ablate"}}}, "mask_hparams.ablation: 'zero_ablate'"),
    ({"train_configs": {"gradient_checkpointing": True}}, "train_configs.gradient_checkpointing: not translated"),
    ({"dataloader_configs": {"shuffle": False}}, "dataloader_configs.shuffle: False"),
    ({"circuit_configs": {"freeze_base": False}}, "circuit_configs.freeze_base: False"),
    ({"wandb_configs": {}}, "wandb_configs: not a section"),
])
def test_a_key_that_would_change_the_science_stops_the_run(tmp_path, capsys, edit, message):
    raw = read_yaml(ORIGINALS / "math/configs/ablate_base.yaml")
    for section, values in edit.items():
        if isinstance(raw.get(section), dict):
            for key, value in values.items():
                if isinstance(value, dict):
                    raw[section][key].update(value)
                else:
                    raw[section][key] = value
        else:
            raw[section] = values
    path = tmp_path / "edited.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert run_cli("ablate", str(path), "--validate") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_convert_writes_a_commented_instill_yaml_and_never_overwrites(tmp_path, capsys):
    from instill.migrate.convert import main as convert

    out = tmp_path / "converted.yaml"
    source = ORIGINALS / "math/configs/transfer_base.yaml"
    assert convert([str(source), "-o", str(out)]) == 0
    text = out.read_text()
    assert "# train_configs.inherit_from -> transfer.conditions: subnet -> subnet" in text
    assert "#   train_configs.wandb: " in text  # not honoured, with the reason
    raw = yaml.safe_load(text)
    assert raw["stage"] == "transfer" and raw["transfer"]["mask_base"] == "checkpoints/12layers_val/base"
    code = run_cli("transfer", str(out), "--validate")  # the written file is an instill config
    assert validates_but_for_absent_inputs(code, *capsys.readouterr(), source.read_text())
    before = out.read_text()
    assert convert([str(source), "-o", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err and out.read_text() == before
    assert convert([str(CONFIGS / "tiny_math_base.yaml")]) == 2  # an instill config needs no conversion


def test_a_missing_hf_pretrained_name_names_the_cache_looked_in(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    raw = read_yaml(ORIGINALS / "vision/configs/ablate_base.yaml")
    raw["train_configs"]["hf_pretrained"] = "facebook/convnext-tiny-224"
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert run_cli("ablate", str(path), "--validate") == 2
    err = capsys.readouterr().err
    assert "not in the local Hugging Face cache" in err and str(tmp_path / "hf" / "hub") in err


# ----------------------------------------------------------------------------------------------------- end to end

def hf_checkpoint(folder: Path, safetensors: bool = True):
    """A tiny GPT-2 saved as the original's HF Trainer wrote it (config.json + weights)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(**TINY_GPT))
    if safetensors:
        model.save_pretrained(folder)
    else:  # the .bin format of older transformers: a torch.save'd state dict
        folder.mkdir(parents=True)
        model.config.to_json_file(folder / "config.json")
        torch.save(model.state_dict(), folder / "pytorch_model.bin")
    return model


def neurosurgeon_state(model, path: Path) -> None:
    """A best_circuit_model.pt as the original's ablate.py saved it: root_model.* weights and mask logits."""
    from transformers.pytorch_utils import Conv1D

    state = {f"root_model.{k}": v for k, v in model.state_dict().items()}
    generator = torch.Generator().manual_seed(1)
    for name, module in model.named_modules():
        if isinstance(module, Conv1D):
            state[f"root_model.{name}.weight_mask_params"] = torch.randn(module.weight.shape, generator=generator) - 1.5
    torch.save(state, path)


def test_math_base_from_the_original_config_runs_shrunk(workdir, capsys):
    shrink = [*SHRINK_DATA, "--set", "data.n_train=500", "--set", "model.n_layer=1", "--set", "model.n_embd=16",
              "--set", "model.n_head=2", "--set", "train.epochs=1", "--set", "train.threads=1",
              "--set", "train.progress=false", "--out", "base"]
    # the translation checks vocab_size against max before --set applies: shrink a copy's GPT_configs too
    raw = read_yaml(ORIGINALS / "math/configs/base.yaml")
    raw["data_configs"]["max"], raw["GPT_configs"]["vocab_size"] = 20, 21
    Path("base.yaml").write_text(yaml.safe_dump(raw))
    assert run_cli("base", "base.yaml", *shrink) == 0
    snapshot = yaml.safe_load(Path("base/config.yaml").read_text())
    assert snapshot["train"]["schedule"]["name"] == "linear" and snapshot["loss_scope"] == "sequence"
    assert is_finished("base") and Path("base/model.safetensors").exists()


def test_math_ablate_on_an_hf_trainer_checkpoint_folder(workdir, capsys):
    model = hf_checkpoint(workdir / "checkpoint-17000")
    shrink = [*SHRINK_DATA, "--set", "data.n_train=400", "--set", "base=checkpoint-17000", "--set", "train.epochs=2",
              "--set", "train.batch_size=100", "--set", "train.threads=1", "--set", "train.progress=false",
              "--out", "ablate"]
    assert run_cli("ablate", str(ORIGINALS / "math/checkpoints/2layers_val/subnet_1e-7/configs.yaml"), *shrink) == 0
    imported = Path(yaml.safe_load(Path("ablate/config.yaml").read_text())["base"])
    assert imported.parent == Path("checkpoints/imported") and is_finished(imported)
    from instill.models import load_model

    loaded = load_model(imported).model
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())
    summary = json.loads(Path("ablate/summary.json").read_text())
    assert 0 <= summary["density"] <= 1 and "val_acc" in summary


def test_validate_checks_an_hf_checkpoint_import_and_writes_nothing(workdir, capsys):
    hf_checkpoint(workdir / "checkpoint-17000")
    before = sorted(p for p in workdir.rglob("*"))
    path = ORIGINALS / "math/checkpoints/2layers_val/subnet_1e-7/configs.yaml"
    assert run_cli("ablate", str(path), *SHRINK_DATA, "--set", "base=checkpoint-17000", "--validate") == 0
    assert sorted(p for p in workdir.rglob("*")) == before  # imported into a scratch folder, then removed
    # the import is checked, not skipped: weights that do not fit the architecture fail validation
    config = json.loads((workdir / "checkpoint-17000/config.json").read_text())
    (workdir / "checkpoint-17000/config.json").write_text(json.dumps({**config, "n_embd": config["n_embd"] * 2}))
    assert run_cli("ablate", str(path), *SHRINK_DATA, "--set", "base=checkpoint-17000", "--validate") == 2
    assert "does not fit GPT-2" in capsys.readouterr().err
    assert not Path("checkpoints").exists()


def test_an_import_killed_part_way_then_launched_twice_at_once_is_made_once(workdir):
    import multiprocessing
    import os
    import signal
    import time

    from instill.migrate import imports

    model = hf_checkpoint(workdir / "checkpoint-17000")
    forked = multiprocessing.get_context("fork")
    imported = Path("checkpoints/imported")

    def killed_part_way():
        def half_written(tmp, *args):
            (tmp / "model.safetensors").write_bytes(b"half")
            time.sleep(60)

        imports._write_gpt2_run = half_written  # in the child only
        imports.import_hf_checkpoint("checkpoint-17000")

    child = forked.Process(target=killed_part_way)
    child.start()
    deadline = time.time() + 30
    while not any(p.is_dir() for p in imported.glob(".checkpoint-17000-*")) and time.time() < deadline:
        time.sleep(0.05)
    os.kill(child.pid, signal.SIGKILL)
    child.join()
    assert not any(is_finished(p) for p in imported.iterdir())  # nothing half-made passes for an import

    results = forked.Queue()
    assert forked_at_once(lambda: results.put(imports.import_hf_checkpoint("checkpoint-17000"))) == [0, 0]
    made = {results.get(timeout=5), results.get(timeout=5)}
    assert len(made) == 1 and is_finished(made := Path(made.pop()))
    assert list(imported.iterdir()) == [made]  # the killed copy and every lock gone
    from instill.models import load_model

    loaded = load_model(made).model
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())


def test_validate_without_room_for_its_scratch_folder_is_one_line(workdir, capsys, monkeypatch):
    import errno
    import tempfile

    hf_checkpoint(workdir / "checkpoint-17000")

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(tempfile, "mkdtemp", full_disk)
    path = ORIGINALS / "math/checkpoints/2layers_val/subnet_1e-7/configs.yaml"
    assert run_cli("ablate", str(path), *SHRINK_DATA, "--set", "base=checkpoint-17000", "--validate") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == ("error: --validate: cannot make a temporary folder to check an import in (No space left on "
                       "device)")
    assert not Path("checkpoints").exists()


def test_math_transfer_with_a_neurosurgeon_mask_on_a_bin_checkpoint(workdir, capsys):
    model = hf_checkpoint(workdir / "base_bin", safetensors=False)
    neurosurgeon_state(model, workdir / "best_circuit_model.pt")
    path = ORIGINALS / "math/checkpoints/2layers_val/transfer_1e-7_frozen/configs.yaml"
    shrink = [*SHRINK_DATA, "--set", "transfer.mask=best_circuit_model.pt", "--set", "transfer.mask_base=base_bin",
              "--set", "transfer.n_disambiguation=[10]", "--set", "transfer.conditions=[subnet,sampled_complement]",
              "--set", "train.epochs=1", "--set", "train.threads=1",
              "--set", "train.batch_size=16", "--set", "train.progress=false", "--out", "transfer"]
    assert run_cli("transfer", str(path), *shrink) == 0
    with open("transfer/accuracy_logs.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["condition"] for r in rows] == ["subnet", "sampled_complement"]
    mask_dir = Path(yaml.safe_load(Path("transfer/config.yaml").read_text())["transfer"]["mask"])
    meta = json.loads((mask_dir / "mask.json").read_text())
    logits = torch.load("best_circuit_model.pt", weights_only=True)
    kept = sum(int((v > 0).sum()) for k, v in logits.items() if k.endswith("weight_mask_params"))
    assert meta["kept"] == kept and meta["source"] == "NeuroSurgeon"  # the existing converter's artifact


def test_a_neurosurgeon_mask_without_its_base_is_one_line(workdir, capsys):
    path = ORIGINALS / "math/configs/transfer_simple.yaml"
    raw = read_yaml(path)
    del raw["model_paths"]["original"]
    Path("t.yaml").write_text(yaml.safe_dump(raw))
    assert run_cli("transfer", "t.yaml", "--validate") == 2
    assert "model_paths.original: missing" in capsys.readouterr().err


def test_an_hf_image_classifier_folder_is_refused_in_one_line(workdir, capsys):
    folder = workdir / "resnet18_16class"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "resnet", "architectures":
                                                    ["ResNetForImageClassification"]}))
    (folder / "model.safetensors").write_bytes(b"")
    images = workdir / "images"
    classes = ("airplane", "bear", "bicycle", "bird", "boat", "bottle", "car", "cat", "chair", "clock", "dog",
               "elephant", "keyboard", "knife", "oven", "truck")  # the 16 classes of the original's folders
    for split in ("train", "eval"):  # the data folders exist, so the checkpoint is what is refused
        for name in classes:
            (images / split / name).mkdir(parents=True)
            Image.new("RGB", (8, 8)).save(images / split / name / "a.png")
    path = ORIGINALS / "vision/configs/ablate_base.yaml"
    dirs = [f"--set=data.{key}={images}/{split}" for key, split in
            (("train_dir", "train"), ("val_dir", "eval"), ("test_dir", "eval"))]
    assert run_cli("ablate", str(path), "--set", "base=resnet18_16class", *dirs, "--out", "a") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "ResNetForImageClassification checkpoint" in err[-1] and not Path("a").exists()


def test_vision_ablate_preset_runs_shrunk_on_a_tiny_base(workdir, capsys):
    assert run_cli("base", "configs/tiny_shapes_base.yaml") == 0
    tiny = read_yaml(CONFIGS / "tiny_shapes_base.yaml")["data"]
    data = [f"--set=data.{k}={json.dumps(v)}" for k, v in {**tiny, "variant": "shape_only"}.items()]
    shrink = [*data, "--set", "base=checkpoints/tiny_shapes_base", "--set", "mask.l0_lambda=1e-6",
              "--set", "train.epochs=2", "--set", "train.batch_size=50", "--set", "train.threads=1",
              "--set", "train.progress=false", "--out", "vision_ablate"]
    assert run_cli("ablate", str(ORIGINALS / "vision/configs/ablate_base.yaml"), *shrink) == 0
    snapshot = yaml.safe_load(Path("vision_ablate/config.yaml").read_text())
    assert snapshot["mask"]["layers"] == ["Conv2d"] and snapshot["mask"]["legacy_schedule"] is True
    assert is_finished("vision_ablate")
    shutil.rmtree("checkpoints")
