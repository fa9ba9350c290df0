"""``instill convert --from``: command lines of the flag-driven originals become instill configs that run."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
import yaml

from instill.migrate.convert import main as convert
from instill.run import is_finished
from tests.conftest import run_cli

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "drfrankenstein"
QUIET = ["--set", "train.threads=1", "--set", "train.progress=false"]


def converted(original: str, command: str, out: str = "converted.yaml", *extra: str) -> dict:
    assert convert(["--from", original, "-o", out, *extra, "--", *shlex.split(command)]) == 0
    return yaml.safe_load(Path(out).read_text())


def test_drfrankenstein_stitch_command_runs_on_the_shipped_weights(workdir, capsys):
    front, end = FIXTURES / "Tiny10/CIFAR10/in0-gn0/110000.pt", FIXTURES / "Tiny10/CIFAR10/in10-gn10/110000.pt"
    Path("config").mkdir()
    Path("config/default.env").write_text("[dataset_root]\npytorch = '/cache/data/pytorch'\nceleba = '/c'\n")
    cfg = converted("drfrankenstein", f"python stitch_nets.py {front} {end} bn3 bn3 -d cifar10 -i ps_inv -e 1 "
                                      "--run-name tiny --target-type soft_2")
    assert cfg["data"]["root"] == "/cache/data/pytorch"  # from config/default.env
    assert cfg["stitch"]["front"] == {"name": "tiny10", "weights": str(front)} and cfg["stitch"]["init"] == "ps_inv"
    assert cfg["output_dir"] == "results/tiny" and cfg["reproducibility"]["random_seed"] == 0
    text = Path("converted.yaml").read_text()
    assert "#   -s/--save-frequency:" in text and "#   config/default.env [dataset_root] celeba:" in text
    shrink = ["--set", "data.name=crops", "--set", "data.n_train=128", "--set", "data.n_val=128",
              "--set", "data.n_test=64", "--set", "stitch.similarity_samples=64", "--set", "stitch.measures=[cka]",
              "--set", "train.batch_size=64",
              "--out", "stitched", *QUIET]
    assert run_cli("stitch", "converted.yaml", *shrink) == 0
    assert is_finished("stitched") and Path("stitched/results.csv").exists()


def test_drfrankenstein_train_model_translates_its_trainer(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = converted("drfrankenstein", "python train_model.py -m resnet20_w2 -d cifar100 -i 3 -g 3 -e 30")
    assert cfg["model"] == {"name": "resnet20", "width": 2} and cfg["data"]["name"] == "cifar100"
    assert cfg["train"]["schedule"] == {"name": "step", "step_epochs": 10, "gamma": 0.1}
    assert cfg["train"]["optimizer"]["kwargs"] == {"momentum": 0.9, "nesterov": True, "weight_decay": 1e-4}
    assert cfg["output_dir"] == "snapshots/resnet20_w2/CIFAR100/in3-gn3"


def test_wide_network_alignment_add_task_runs_shrunk(workdir, capsys):
    cfg = converted("wide-network-alignment", "python3 train_add.py")
    assert cfg["align"]["widths"][-1] == 4096 and cfg["align"]["rules"][-1] == "last_layer"
    shrink = ["--set", "align.widths=[8]", "--set", "align.rules=[backprop,align_zero]", "--set", "model.width=8",
              "--set", "train.epochs=2", "--set", "train.eval_every=1", "--set", "data.train=100",
              "--set", "data.length=20", "--out", "add", *QUIET]
    assert run_cli("align", "converted.yaml", *shrink) == 0
    assert is_finished("add")


@pytest.mark.parametrize("part, expect", [
    (1, {"lrs": [5.0, 2.0, 1.0], "rules": ["backprop", "align_ada", "dfa", "align_zero", "fa", "last_layer"]}),
    (4, {"data_limits": [45, 150, 450, 1500, 4500, 15000, 45000]}),
    (5, {"rules": ["align_prop"]}),
])
def test_wide_network_alignment_cifar_parts_are_their_grids(tmp_path, monkeypatch, part, expect):
    monkeypatch.chdir(tmp_path)
    align = converted("wide-network-alignment", f"python3 train_cifar.py {part}")["align"]
    assert {k: align[k] for k in expect} == expect


def test_guidance_copy_paste_command_runs_shrunk(workdir, capsys):
    cfg = converted("guidance", "python -m language_modeling.language_model --exp_name cp --task copy-paste "
                                "--student_model RNN --rep_sim --untrained --alpha 0.5")
    assert cfg["guidance"]["conditions"] == ["guided_untrained"] and cfg["guidance"]["alpha"] == 0.5
    assert cfg["model"]["hidden_size"] == 512 and cfg["guidance"]["guide"]["d_model"] == 512
    shrink = ["--set", "data.n_train=64", "--set", "data.n_val=32", "--set", "data.n_test=32",
              "--set", "data.min_len=3", "--set", "data.max_len=5", "--set", "model.hidden_size=16",
              "--set", "model.embed_dim=8", "--set", "model.num_layers=1", "--set", "guidance.guide.d_model=16",
              "--set", "guidance.guide.nhead=2", "--set", "guidance.guide.num_layers=2",
              "--set", "guidance.guide.dim_feedforward=16", "--set", "train.epochs=1", "--set", "train.batch_size=32",
              "--out", "cp", *QUIET]
    assert run_cli("guide", "converted.yaml", *shrink) == 0
    assert is_finished("cp")


@pytest.mark.parametrize("original, command, message", [
    ("drfrankenstein", "python layer_info.py tiny10", "python -m instill.layers"),
    ("drfrankenstein", "python train_model.py -m dense", "-m/--model dense: not available"),
    ("drfrankenstein", "python train_model.py -i 1 -g 2", "separate seeds"),
    ("drfrankenstein", "python train_model.py --bogus 1", "--bogus: not a flag of the original script"),
    ("wide-network-alignment", "python3 train_kmnist.py 2", "KMNIST is not available"),
    ("wide-network-alignment", "python3 train_cifar.py 7", "timing"),
    ("guidance", "python -m imagenet-comparison.image_class --exp_name x --rep_sim", "never downloads"),
    ("guidance", "python -m language_modeling.language_model --exp_name x", "WikiText-103"),
])
def test_what_cannot_be_honoured_is_one_line(tmp_path, monkeypatch, capsys, original, command, message):
    monkeypatch.chdir(tmp_path)
    assert convert(["--from", original, "-o", "c.yaml", "--", *shlex.split(command)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and not Path("c.yaml").exists()
