"""End to end: base -> ablate -> transfer on tiny arithmetic configs, upstream configs run first, bad input."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch

from instill.subnetworks.masks import load_mask
from instill.models import load_model
from instill.run import is_finished, read_metrics
from tests.conftest import CONFIGS, run_cli


@pytest.fixture
def transferred(workdir):
    assert run_cli("transfer", "configs/tiny_math_transfer.yaml") == 0
    return workdir


def test_transfer_runs_its_upstream_configs_first(transferred, capsys):
    for name in ("tiny_math_base", "tiny_math_ablate", "tiny_math_transfer"):
        assert is_finished(Path("checkpoints", name)), name
    with open("checkpoints/tiny_math_transfer/accuracy_logs.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["condition"] for r in rows] == ["subnet", "full_model", "random_init", "sampled_subnet"] * 2
    assert set(rows[0]) == {"n_disambiguation", "condition", "lr", "best_eval_acc", "test_acc", "seed"}
    assert Path("checkpoints/tiny_math_transfer/accuracy_vs_n.png").exists()
    snapshot = Path("checkpoints/tiny_math_transfer/config.yaml").read_text()
    assert "mask: checkpoints/tiny_math_ablate" in snapshot  # the replay uses the very same upstream run


def test_ablation_logs_and_mask_artifact(transferred):
    rows = read_metrics("checkpoints/tiny_math_ablate")
    assert [r["temperature"] for r in rows] == sorted(r["temperature"] for r in rows)
    assert {"val_acc", "density", "mean_logit", "density/transformer.h.0.attn.c_attn.weight"} <= set(rows[0])
    meta = json.loads(Path("checkpoints/tiny_math_ablate/mask.json").read_text())
    assert 0 < meta["density"] < 1 and meta["base_run"] == "../tiny_math_base"
    base = load_model("checkpoints/tiny_math_base").model
    masks = load_mask("checkpoints/tiny_math_ablate", base)
    assert all(m.dtype == torch.bool for m in masks.values())
    assert Path("checkpoints/tiny_math_ablate/mask_density.png").exists()


def test_subnet_weights_stay_frozen_at_the_base_values(transferred):
    base = load_model("checkpoints/tiny_math_base").model
    masks = load_mask("checkpoints/tiny_math_ablate", base)
    trained = torch.load("checkpoints/tiny_math_transfer/n40-subnet-lr0.003/state.pt", weights_only=False)["model"]
    base_state = base.state_dict()
    for name, mask in masks.items():
        assert torch.equal(trained[name][mask], base_state[name][mask]), name
        assert not torch.equal(trained[name][~mask], base_state[name][~mask]), name


def test_replaying_the_transfer_matches(transferred, capsys):
    assert run_cli("transfer", "checkpoints/tiny_math_transfer/config.yaml") == 0
    replay = json.loads(Path("checkpoints/tiny_math_transfer-replay-1/replay.json").read_text())
    assert replay["matches"] is True, replay


@pytest.mark.parametrize("override, message", [
    ("transfer.conditions=[subnet, random]", "unknown transfer condition 'random'"),
    ("transfer.n_disambiguation=[]", "transfer.n_disambiguation"),
    ("transfer.mask=nowhere", "neither a run directory nor a config file"),
])
def test_transfer_bad_input(workdir, capsys, override, message):
    assert run_cli("transfer", "configs/tiny_math_transfer.yaml", "--set", override) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not Path("checkpoints").exists()


def test_ablate_bad_input(workdir, capsys):
    assert run_cli("base", "configs/tiny_math_base.yaml") == 0
    capsys.readouterr()
    cases = [("mask.layers=[Conv2d]", "matches no maskable weight"),
             ("data.max=30", "vocab_size"),
             ("mask.methd=magnitude", "mask.methd")]
    for override, message in cases:
        assert run_cli("ablate", "configs/tiny_math_ablate.yaml", "--set", override) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
    assert not Path("checkpoints/tiny_math_ablate").exists()


def test_sequence_loss_scope_is_the_hugging_face_causal_lm_loss():
    from instill.data import DataContext
    from instill.registry import DATASETS, MODELS
    from instill.stages.task import make_loss

    data = DATASETS.build("arithmetic", DataContext(seed=0), {"max": 20, "n_train": 64})
    model = MODELS.build("gpt2", data.info, {"n_layer": 1, "n_embd": 16, "n_head": 2}).eval()
    x, y = data.train.x[:32], data.train.y[:32]
    ours, _ = make_loss("sequence")(model, (x, y))
    assert ours.item() == pytest.approx(model(x, labels=x).loss.item(), rel=1e-5)
    answer, _ = make_loss("answer")(model, (x, y))
    logits = model(x).logits[:, 2]
    assert answer.item() == pytest.approx(torch.nn.functional.cross_entropy(logits, x[:, 3]).item(), rel=1e-5)


# --------------------------------------------------------------------------- one base + mask, many small transfers

SEEDED = "reproducibility={reproduce: true, random_seed: 1}"
ABLATE = "checkpoints/tiny_math_ablate"
ONE_RUN = ["transfer.n_disambiguation=[40]", "transfer.lrs=[0.01]"]


@pytest.fixture(scope="module")
def upstream(tmp_path_factory):
    """A working directory holding a finished tiny base run and its tiny mask (seeded: the same every time)."""
    root = tmp_path_factory.mktemp("math")
    shutil.copytree(CONFIGS, root / "configs")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        for stage in ("base", "ablate"):
            assert run_cli(stage, f"configs/tiny_math_{stage}.yaml", "--set", SEEDED) == 0
    return root


@pytest.fixture
def in_upstream(upstream, monkeypatch):
    monkeypatch.chdir(upstream)
    return upstream


def transfer(out: str, *overrides: str, mask: str = ABLATE) -> int:
    args = ["configs/tiny_math_transfer.yaml", "--out", out, "--set", f"transfer.mask={mask}", "--set", SEEDED]
    for override in overrides:
        args += ["--set", override]
    return run_cli("transfer", *args)


def start_of(out: str, condition: str) -> dict[str, torch.Tensor]:
    """The weights a sub-run started from (it ran with train.epochs=0)."""
    return torch.load(Path(out, f"n40-{condition}-lr0.01", "state.pt"), weights_only=False)["model"]


def base_and_mask(mask_dir: str = ABLATE):
    base = load_model("checkpoints/tiny_math_base").model
    return base.state_dict(), load_mask(mask_dir, base)


def edited_mask(name: str, edit) -> str:
    """A copy of the tiny mask directory with ``edit(masks, meta)`` applied; returns its path."""
    from safetensors.torch import load_file, save_file

    copy = Path("checkpoints", name)
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(ABLATE, copy)
    masks, meta = load_file(copy / "mask.safetensors"), json.loads((copy / "mask.json").read_text())
    edit(masks, meta)
    save_file(masks, copy / "mask.safetensors")
    (copy / "mask.json").write_text(json.dumps(meta))
    return str(copy)


def one_line_error(capsys, message: str) -> str:
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    return err


@pytest.mark.parametrize("edit, message", [
    (lambda masks, meta: masks.pop("transformer.h.0.attn.c_attn.weight"),
     "missing 1: transformer.h.0.attn.c_attn.weight"),
    (lambda masks, meta: masks.update({"transformer.wte.weight": torch.ones(21, 32, dtype=torch.bool)}),
     "extra 1: transformer.wte.weight"),
    (lambda masks, meta: meta.update({"base_hash": "0" * 64}), "the mask was found on other base weights"),
])
def test_a_mask_that_does_not_match_its_base_stops_the_transfer(in_upstream, capsys, edit, message):
    mask = edited_mask("edited", edit)
    assert transfer("checkpoints/bad", mask=mask) == 2
    one_line_error(capsys, message)
    assert not Path("checkpoints/bad").exists()


def test_an_infeasible_sampled_complement_stops_before_the_first_sub_run(in_upstream, capsys):
    def dense_layer(masks, meta):
        from instill.subnetworks.masks import mask_density, tensors_hash

        masks["transformer.h.0.mlp.c_fc.weight"][:] = True
        masks["transformer.h.0.mlp.c_fc.weight"][0, :3] = False
        density = mask_density(masks)  # recorded as a discovery of this mask would (else its integrity check stops it)
        meta.update({key: density[key] for key in ("kept", "total", "density", "layers")},
                    mask_hash=tensors_hash(masks))

    mask = edited_mask("dense", dense_layer)
    code = transfer("checkpoints/bad", "transfer.conditions=[subnet, sampled_complement]", mask=mask)
    assert code == 2
    one_line_error(capsys, "more than half of the entries of 1: transformer.h.0.mlp.c_fc.weight (4093 of 4096)")
    assert not Path("checkpoints/bad").exists()  # the subnet sub-runs before it did not run either


@pytest.mark.parametrize("stage, config", [("ablate", "tiny_math_ablate"), ("transfer", "tiny_math_transfer")])
def test_a_model_section_is_an_error_where_the_model_comes_from_the_base(workdir, capsys, stage, config):
    assert run_cli(stage, f"configs/{config}.yaml", "--set", "model={name: gpt2, n_layer: 4}") == 2
    one_line_error(capsys, "model: the model comes from the base run")
    assert not Path("checkpoints").exists()


def test_transfer_runs_from_another_working_directory(upstream, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # mask.json names its base run relative to the mask directory
    code = run_cli("transfer", str(upstream / "configs/tiny_math_transfer.yaml"), "--out", "elsewhere",
                   "--set", f"transfer.mask={upstream / ABLATE}", "--set", "transfer.conditions=[subnet]",
                   *[a for o in ONE_RUN + ["train.epochs=0"] for a in ("--set", o)])
    assert code == 0 and is_finished("elsewhere")


def test_ablate_keeps_the_last_epoch_of_the_best_accuracy_by_default(tmp_path):
    from instill.stages import load_stage_config

    plain = tmp_path / "ablate.yaml"
    plain.write_text("base: somewhere\ndata: {name: arithmetic}\nmask: {layers: [Conv1D]}\ntrain: {epochs: 1}\n")
    assert load_stage_config(plain, "ablate").train.select_ties == "last"
    assert load_stage_config(plain, "ablate", ["train.select_ties=first"]).train.select_ties == "first"


def test_subnet_trainable_trains_its_transplanted_entries(in_upstream):
    out = "checkpoints/trainable"
    assert transfer(out, "transfer.conditions=[subnet_trainable]", *ONE_RUN) == 0
    trained = torch.load(Path(out, "n40-subnet_trainable-lr0.01/state.pt"), weights_only=False)["model"]
    base, masks = base_and_mask()
    for name, mask in masks.items():
        if mask.any():
            assert not torch.equal(trained[name][mask], base[name][mask]), name
    assert json.loads(Path(out, "n40-subnet_trainable-lr0.01/summary.json").read_text())["frozen_entries"] == 0


@pytest.mark.parametrize("condition, legacy", [("sampled_subnet", False), ("sampled_subnet", True),
                                               ("sampled_complement", False)])
def test_sampled_conditions_in_a_run_start_from_the_right_entries(in_upstream, condition, legacy):
    out = f"checkpoints/{condition}-{legacy}"
    assert transfer(out, f"transfer.conditions=[{condition}]", f"transfer.legacy_sampling={legacy}",
                    "train.epochs=0", *ONE_RUN) == 0
    start = start_of(out, condition)
    base, masks = base_and_mask()
    for name, mask in masks.items():
        from_base = start[name] == base[name]  # a fresh draw never equals a trained weight exactly
        k = int(mask.sum())
        assert int(from_base.sum()) == (mask.numel() - k if legacy else k), name
        if condition == "sampled_complement":
            assert not (from_base & mask).any(), name


@pytest.mark.parametrize("non_masked", ["inherit", "reinit"])
def test_non_masked_parameters_in_a_run(in_upstream, non_masked):
    out = f"checkpoints/{non_masked}"
    assert transfer(out, "transfer.conditions=[subnet]", f"transfer.non_masked={non_masked}", "train.epochs=0",
                    *ONE_RUN) == 0
    start = start_of(out, "subnet")
    base, masks = base_and_mask()
    for name in ("transformer.wte.weight", "transformer.h.0.ln_1.weight", "transformer.h.0.attn.c_attn.bias"):
        assert torch.equal(start[name], base[name]) == (non_masked == "inherit"), name
    for name, mask in masks.items():  # the subnetwork is transplanted either way
        assert torch.equal(start[name][mask], base[name][mask]) and not torch.equal(start[name], base[name])


def test_legacy_schedule_in_an_ablate_run(in_upstream):
    out = "checkpoints/legacy_schedule"
    assert run_cli("ablate", "configs/tiny_math_ablate.yaml", "--out", out, "--set", "base=checkpoints/tiny_math_base",
                   "--set", "mask.legacy_schedule=true") == 0
    r = 50 ** (1 / 3)  # final_temp 50 over 3 epochs: epoch 1 at 1, epoch e >= 2 at r^e, the last at exactly 50
    assert [row["temperature"] for row in read_metrics(out)] == pytest.approx([1.0, r ** 2, 50.0])


def test_the_lr_sweep_reports_the_best_rate_not_the_last(in_upstream):
    out = "checkpoints/sweep"
    assert transfer(out, "transfer.conditions=[random_init]", "transfer.n_disambiguation=[40]",
                    "transfer.lrs=[0.01, 1.0e-6]", "transfer.lr_stop_at=null") == 0
    accuracy = {lr: json.loads(Path(out, f"n40-random_init-lr{lr}/summary.json").read_text())["best_eval_acc"]
                for lr in ("0.01", "1e-06")}
    assert accuracy["0.01"] > accuracy["1e-06"]  # a rate that learns, then one that does not: the first is best
    with open(Path(out, "accuracy_logs.csv")) as f:
        row, = csv.DictReader(f)
    assert float(row["lr"]) == 0.01 and float(row["best_eval_acc"]) == pytest.approx(accuracy["0.01"])


@pytest.mark.parametrize("method", ["hard_concrete", "magnitude"])
def test_hard_concrete_and_magnitude_masks_through_both_stages(in_upstream, method):
    mask_dir = f"checkpoints/ablate-{method}"
    assert run_cli("ablate", "configs/tiny_math_ablate.yaml", "--out", mask_dir, "--set",
                   "base=checkpoints/tiny_math_base", "--set", f"mask.method={method}", "--set",
                   "mask.prune_fraction=0.75") == 0
    meta = json.loads(Path(mask_dir, "mask.json").read_text())
    assert meta["method"] == method and len(meta["layers"]) == 4
    if method == "magnitude":  # nothing trains: one evaluation, each layer keeps exactly its share
        assert len(read_metrics(mask_dir)) == 1
        assert all(layer["kept"] == round(0.25 * layer["total"]) for layer in meta["layers"].values())
    else:
        assert len(read_metrics(mask_dir)) == 3
    out = f"checkpoints/transfer-{method}"
    assert transfer(out, "transfer.conditions=[subnet]", "train.epochs=0", *ONE_RUN, mask=mask_dir) == 0
    start = start_of(out, "subnet")
    base, masks = base_and_mask(mask_dir)
    assert all(torch.equal(start[name][mask], base[name][mask]) for name, mask in masks.items())
    summary = json.loads(Path(out, "n40-subnet-lr0.01/summary.json").read_text())
    assert summary["frozen_entries"] == meta["kept"]


# --------------------------------------------------------------------------- NeuroSurgeon masks into a transfer

def neurosurgeon_state(model, prefix: str, seed: int = 3) -> dict[str, torch.Tensor]:
    """A real NeuroSurgeon 0.1.0 CircuitModel over ``model`` (every Conv1D), random logits, its state dict under
    ``prefix`` (``wrapped_model.`` upstream, ``root_model.`` in the research code's vendored copy)."""
    import copy

    from NeuroSurgeon.Models.circuit_model import CircuitModel
    from NeuroSurgeon.Models.model_configs import CircuitConfig

    targets = [n for n, m in model.named_modules() if type(m).__name__ == "Conv1D"]
    config = CircuitConfig(mask_method="continuous_sparsification", target_layers=targets, freeze_base=True,
                           add_l0=False, mask_hparams={"ablation": "none", "mask_unit": "weight",
                                                       "mask_bias": False, "mask_init_value": -0.1})
    circuit = CircuitModel(config, copy.deepcopy(model))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in circuit.named_parameters():
            if name.endswith("weight_mask_params"):
                p.copy_(torch.randn(p.shape, generator=g))
    return {prefix + k.removeprefix("wrapped_model."): v for k, v in circuit.state_dict().items()}


@pytest.mark.parametrize("prefix", ["wrapped_model.", "root_model."])
def test_neurosurgeon_state_dict_imports_into_a_mask_the_transfer_takes(in_upstream, capsys, prefix):
    from instill.subnetworks.neurosurgeon import main as import_cli
    from instill.subnetworks.masks import select_targets, weights_hash

    base = load_model("checkpoints/tiny_math_base").model
    state = neurosurgeon_state(base, prefix)
    torch.save(state, "circuit.pt")
    out = f"checkpoints/imported-{prefix.rstrip('.')}"
    assert import_cli(["circuit.pt", "--base", "checkpoints/tiny_math_base", "--out", out]) == 0
    masks = load_mask(out, base)
    assert list(masks) == [t.name for t in select_targets(base, ["Conv1D"])]
    for name, mask in masks.items():
        assert torch.equal(mask, state[prefix + name.removesuffix("weight") + "weight_mask_params"] > 0), name
    meta = json.loads(Path(out, "mask.json").read_text())
    assert meta["base_hash"] == weights_hash(base) and meta["base_run"] == "../tiny_math_base"
    assert transfer("checkpoints/from-neurosurgeon", "transfer.conditions=[subnet]", "train.epochs=0", *ONE_RUN,
                    mask=out) == 0
    start, base_state = start_of("checkpoints/from-neurosurgeon", "subnet"), base.state_dict()
    assert all(torch.equal(start[name][mask], base_state[name][mask]) for name, mask in masks.items())
    shutil.rmtree("checkpoints/from-neurosurgeon")


def test_the_neurosurgeon_import_command_line(in_upstream):
    import subprocess
    import sys

    from tests.conftest import python_env

    base = load_model("checkpoints/tiny_math_base").model
    torch.save(neurosurgeon_state(base, "wrapped_model."), "circuit.pt")
    command = [sys.executable, "-c", "import sys; from instill.cli import console_main; console_main(sys.argv[1:])",
               "import-neurosurgeon", "circuit.pt", "--base", "checkpoints/tiny_math_base", "--out",
               "checkpoints/imported-cli"]
    done = subprocess.run(command, env=python_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "density" in done.stdout, done.stderr
    assert load_mask("checkpoints/imported-cli", base).keys()


def test_bad_neurosurgeon_imports_are_one_line_errors_and_write_nothing(in_upstream, capsys):
    from instill.subnetworks.neurosurgeon import main as import_cli

    base = load_model("checkpoints/tiny_math_base").model
    other = load_model("checkpoints/tiny_math_base").model
    with torch.no_grad():
        other.transformer.h[0].mlp.c_fc.weight.add_(1.0)
    torch.save(neurosurgeon_state(other, "root_model."), "other_base.pt")
    Path("garbage.pt").write_bytes(b"not a torch file")
    torch.save({"wrapped_model.transformer.wte.weight": base.transformer.wte.weight.detach()}, "no_masks.pt")
    cases = [("no_masks.pt", ABLATE, "already exists and is not an empty directory"),
             ("garbage.pt", "checkpoints/tiny_math_base", "cannot read a NeuroSurgeon state dict"),
             ("missing.pt", "checkpoints/tiny_math_base", "NeuroSurgeon state dict not found"),
             ("no_masks.pt", "checkpoints/tiny_math_base", "holds no *_mask_params"),
             ("other_base.pt", "checkpoints/tiny_math_base",
              "base weights differ from the base model's: 1: transformer.h.0.mlp.c_fc.weight"),
             ("other_base.pt", "configs", "is not a finished run directory")]
    before = sorted(Path("checkpoints").iterdir())
    for state, base_dir, message in cases:
        out = ABLATE if "already" in message else "checkpoints/never"
        assert import_cli([state, "--base", base_dir, "--out", out]) == 2
        one_line_error(capsys, message)
    assert sorted(Path("checkpoints").iterdir()) == before
    # A finished base run as --out: its summary.json was overwritten (issue 11, item 3).
    torch.save(neurosurgeon_state(base, "wrapped_model."), "circuit.pt")
    summary = Path("checkpoints/tiny_math_base/summary.json").read_bytes()
    assert import_cli(["circuit.pt", "--base", "checkpoints/tiny_math_base", "--out",
                      "checkpoints/tiny_math_base"]) == 2
    one_line_error(capsys, "already exists and is not an empty directory")
    assert Path("checkpoints/tiny_math_base/summary.json").read_bytes() == summary
    assert not Path("checkpoints/tiny_math_base/mask.json").exists()


# --------------------------------------------------------------------------- causal ablations at the end of ablate

def ablate(out: str, *overrides: str) -> int:
    args = ["configs/tiny_math_ablate.yaml", "--out", out, "--set", "base=checkpoints/tiny_math_base",
            "--set", SEEDED, "--set", "train.epochs=1"]
    for override in overrides:
        args += ["--set", override]
    return run_cli("ablate", *args)


def test_ablate_tests_its_mask_causally_on_the_subtask_and_the_base_task(in_upstream):
    from instill.subnetworks.ablations import MODES

    with open(Path(ABLATE, "ablations.csv")) as f:
        rows = list(csv.DictReader(f))
    assert [r["mode"] for r in rows] == [m for m in MODES for _ in range(5 if m.endswith(("ed", "random_ablate"))
                                                                         and m != "zero_ablate" else 1)]
    summary = json.loads(Path(ABLATE, "summary.json").read_text())
    ablations = summary["ablations"]["modes"]
    assert list(ablations) == list(MODES) and Path(ABLATE, "ablations.png").stat().st_size > 0
    # the subnetwork alone is the mask the stage found, scored on the same test split
    assert ablations["subnetwork"]["subtask_acc"]["mean"] == summary["test_acc"]
    # the base task is the base run's own test split: the whole model scores what the base run reported
    base = json.loads(Path("checkpoints/tiny_math_base/summary.json").read_text())
    assert ablations["full_model"]["base_task_acc"]["mean"] == base["test_acc"]
    drawn = ablations["randomly_sampled"]["subtask_acc"]
    assert len(drawn["values"]) == 5 and drawn["min"] <= drawn["mean"] <= drawn["max"]
    assert summary["ablation/randomly_sampled/subtask_acc"] == drawn["mean"]  # flat, for sweep tables


def test_ablations_can_be_switched_off_or_cut_to_the_subtask(in_upstream):
    assert ablate("checkpoints/off", "ablations.enabled=false") == 0
    assert "ablations" not in json.loads(Path("checkpoints/off/summary.json").read_text())
    assert not Path("checkpoints/off/ablations.csv").exists()
    assert ablate("checkpoints/subtask_only", "ablations.base_task=false", "ablations.draws=2",
                  "ablations.modes=[zero_ablate, randomly_sampled]") == 0
    with open("checkpoints/subtask_only/ablations.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["mode"], r["draw"]) for r in rows] == [("zero_ablate", "0"), ("randomly_sampled", "0"),
                                                      ("randomly_sampled", "1")]
    assert set(rows[0]) == {"mode", "draw", "subtask_acc", "subtask_loss"}


@pytest.mark.parametrize("override, message", [
    ("ablations.modes=[zero_ablation]", "did you mean 'zero_ablate'"),
    ("ablations.draws=0", "ablations.draws"),
])
def test_bad_ablation_settings_stop_before_the_run_directory(in_upstream, capsys, override, message):
    assert ablate("checkpoints/bad", override) == 2
    one_line_error(capsys, message)
    assert not Path("checkpoints/bad").exists()


def test_a_base_run_without_its_config_skips_the_base_task_unless_it_is_asked_for(in_upstream, capsys):
    """An imported base run records no data: by default the base task is skipped with a note; base_task: true stops
    before training."""
    shutil.copytree("checkpoints/tiny_math_base", "checkpoints/bare_base", dirs_exist_ok=True)
    Path("checkpoints/bare_base/config.yaml").unlink()
    args = ["configs/tiny_math_ablate.yaml", "--set", "base=checkpoints/bare_base", "--set", SEEDED]
    assert run_cli("ablate", *args, "--out", "checkpoints/bad", "--set", "ablations.base_task=true") == 2
    one_line_error(capsys, "set ablations.base_task: false (or null)")
    assert not Path("checkpoints/bad").exists()
    assert run_cli("ablate", *args, "--out", "checkpoints/bare_ablate", "--set", "train.epochs=1",
                   "--set", "ablations.modes=[zero_ablate]") == 0
    ablations = json.loads(Path("checkpoints/bare_ablate/summary.json").read_text())["ablations"]
    assert list(ablations["modes"]["zero_ablate"]) == ["subtask_acc", "subtask_loss"]
    assert ablations["notes"][0].startswith("base task skipped")


@pytest.mark.parametrize("method", ["continuous_sparsification", "hard_concrete", "magnitude"])
def test_neuron_masks_of_every_method_run_end_to_end(in_upstream, method):
    """mask.unit: neuron through the stage: one logit per output unit, whole units in the artifact, and the
    ablations remove whole units."""
    from instill.subnetworks.ablations import unit_masks

    out = f"checkpoints/neuron-{method}"
    assert ablate(out, "mask.unit=neuron", f"mask.method={method}", "ablations.draws=1",
                  "ablations.modes=[zero_ablate, randomly_sampled]") == 0
    meta = json.loads(Path(out, "mask.json").read_text())
    assert meta["method"] == method and meta["hyperparameters"]["unit"] == "neuron"
    base = load_model("checkpoints/tiny_math_base").model
    masks = load_mask(out, base)
    units = unit_masks(base, masks, "neuron")  # raises unless every unit is kept or dropped whole
    assert all(u.shape[0] == 1 and u.shape[1] == m.shape[1] for u, m in zip(units.values(), masks.values()))
    assert "randomly_sampled" in json.loads(Path(out, "summary.json").read_text())["ablations"]["modes"]
