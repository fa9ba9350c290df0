"""One way to add any named thing: a user's package outside instill (tests/fixtures/user_plugins/instill_toys) adds
a similarity measure, a mask method, a learning rule, a stitch target, a dataset, a model and a stage, by entry point
and by import path, and each runs through its stage and through the Python API. docs/design.md ("Extending instill")
shows these very files."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import yaml

import instill
from instill.cli import list_entries
from instill.compare.similarity import SIMILARITIES
from instill.data import DataContext
from instill.models import load_model
from instill.registry import DATASETS, MODELS, RULES
from instill.stages import STAGES
from instill.stitching.stitch import TARGETS
from instill.subnetworks.masks import MASK_METHODS
from tests.conftest import run_cli

PLUGINS = Path(__file__).resolve().parent / "fixtures" / "user_plugins"
REGISTRIES = (SIMILARITIES, MASK_METHODS, RULES, TARGETS, DATASETS, MODELS, STAGES)
BASE = {"data": {"name": "toy_blobs", "n": 240}, "model": {"name": "toy_mlp", "hidden": 16},
        "reproducibility": {"reproduce": True, "random_seed": 7},
        "train": {"epochs": 3, "batch_size": 32, "threads": 1, "progress": False,
                  "optimizer": {"name": "SGD", "lr": 0.2}, "rule": "toy_scaled_backprop",
                  "rule_options": {"toy_scaled_backprop": {"factor": 0.5}}}}


@pytest.fixture(scope="module")
def toys():
    """The fixture package importable and its entry points visible, as after ``pip install``; forgotten after."""
    sys.path.insert(0, str(PLUGINS))
    yield
    sys.path.remove(str(PLUGINS))
    for registry in REGISTRIES:
        for name in [n for n in registry._entries if n.startswith(("toy_", "instill_toys"))]:
            del registry._entries[name]
    for module in [m for m in sys.modules if m.startswith("instill_toys")]:
        del sys.modules[module]


def _config(path: Path, body: dict) -> str:
    path.write_text(yaml.safe_dump(body))
    return str(path)


def _summary(run: str) -> dict:
    return json.loads((Path("checkpoints") / run / "summary.json").read_text())


def test_every_kind_of_plug_in_runs_through_its_stage(toys, workdir):
    # dataset, model and learning rule (entry points): the base stage. The rule's gradients are backprop's times
    # 0.5, so with plain SGD at twice the learning rate it trains bit for bit the weights backprop trains.
    assert run_cli("base", _config(workdir / "toy_base.yaml", BASE)) == 0
    assert run_cli("base", _config(workdir / "toy_backprop.yaml", BASE), "--set", "train.rule=backprop",
                   "--set", "train.optimizer.lr=0.1") == 0
    ours, theirs = (load_model(f"checkpoints/{run}") for run in ("toy_base", "toy_backprop"))
    assert ours.model_cfg == {"name": "toy_mlp", "hidden": 16}
    assert all(torch.equal(a, b) for a, b in zip(ours.model.state_dict().values(),
                                                 theirs.model.state_dict().values()))
    assert _summary("toy_base")["test_acc"] > 0.8  # three blobs 3 sigma apart
    base = {"data": BASE["data"], "train": {"threads": 1, "progress": False}}

    # mask method (entry point) with its own option: the ablate stage; 32 of the 128 Linear weights kept
    ablate = {**base, "base": "checkpoints/toy_base",
              "mask": {"layers": ["Linear"], "method": "toy_random_keep", "method_options": {"keep": 0.25}}}
    assert run_cli("ablate", _config(workdir / "toy_ablate.yaml", ablate)) == 0
    assert (_summary("toy_ablate")["kept"], _summary("toy_ablate")["total"]) == (32, 128)
    recorded = json.loads(Path("checkpoints/toy_ablate/mask.json").read_text())["hyperparameters"]
    assert (recorded["method"], recorded["method_options"]) == ("toy_random_keep", {"keep": 0.25, "seed": 0})

    # similarity measure (entry point): the compare stage, a model against itself gives 1 on the diagonal
    compare = {**base, "compare": {"model_a": {"run": "checkpoints/toy_base"},
                                   "model_b": {"run": "checkpoints/toy_base"}, "layers_a": ["type:Linear"],
                                   "measures": ["toy_rv", "cka"], "batch_size": 16}}
    assert run_cli("compare", _config(workdir / "toy_compare.yaml", compare)) == 0
    rows = [line.split(",") for line in Path("checkpoints/toy_compare/similarity.csv").read_text().splitlines()[1:]]
    diagonal = [float(value) for a, b, measure, value, _ in rows if measure == "toy_rv" and a == b]
    assert len(diagonal) == 2 and diagonal == pytest.approx([1.0, 1.0], abs=1e-9)

    # stitch target (entry point), and the similarity again as a stitch measure: the stitch stage
    stitch = {**base, "stitch": {"front": {"run": "checkpoints/toy_base"}, "end": {"run": "checkpoints/toy_base"},
                                 "front_layers": ["1"], "end_layers": ["1"], "target": "toy_end_argmax",
                                 "measures": ["toy_rv"], "similarity_samples": 32},
              "train": {"epochs": 4, "threads": 1, "progress": False, "batch_size": 32,
                        "optimizer": {"name": "AdamW", "lr": 0.05}, "schedule": {"name": "constant"}}}
    assert run_cli("stitch", _config(workdir / "toy_stitch.yaml", stitch)) == 0
    pair = _summary("toy_stitch")["pairs"][0]
    assert 0 < pair["val_after_toy_rv"] <= 1 + 1e-9
    assert pair["val_after_agreement"] > max(0.8, pair["val_before_agreement"])


def test_a_stage_of_your_own_runs_through_the_command_line_and_the_api(toys, workdir, capsys):
    from instill.cli import console_main
    from instill.stages import execute, load_stage_config
    from instill.sweep import _stage_of

    # by entry-point name, on the command line; its upstream base config runs first (resolve_upstream)
    base = _config(workdir / "toy_base.yaml", BASE)
    score = {"data": BASE["data"], "score": {"run": base}, "train": {"threads": 1},
             "reproducibility": BASE["reproducibility"]}  # the base run's seed: the same blobs
    with pytest.raises(SystemExit) as exit_:
        console_main(["toy_score", _config(workdir / "toy_score.yaml", score)])
    assert exit_.value.code == 0
    assert "score.run: checkpoints/toy_base is missing, so running" in capsys.readouterr().out
    clean = _summary("toy_score")
    assert clean["stage"] == "toy_score"
    assert clean["test_acc"] == pytest.approx(_summary("toy_base")["test_acc"], abs=1e-6)  # no noise
    assert yaml.safe_load(Path("checkpoints/toy_score/config.yaml").read_text())["score"]["run"] == \
        "checkpoints/toy_base"

    # by import path, through the Python API; noise an option of its own section; a replay gives the same figure
    noisy = {**score, "stage": "instill_toys.stage:score", "name": "toy_noisy",
             "score": {"run": "checkpoints/toy_base", "noise": 3.0}}
    path = _config(workdir / "toy_noisy.yaml", noisy)
    first = json.loads((execute(load_stage_config(path, "instill_toys.stage:score")) / "summary.json").read_text())
    assert first["test_acc"] < clean["test_acc"]
    again = execute(load_stage_config("checkpoints/toy_noisy/config.yaml", "instill_toys.stage:score",
                                      out=str(workdir / "replay")))
    assert json.loads((again / "summary.json").read_text())["test_acc"] == first["test_acc"]

    # its own section tells a config's stage (sweeps, upstream references), and --help lists it
    assert _stage_of(_config(workdir / "no_stage.yaml", {"data": BASE["data"], "score": {"run": "x"}})) == \
        "toy_score"
    with pytest.raises(SystemExit):
        console_main(["toy_score", "--help"])
    assert "\n  score: run, noise" in capsys.readouterr().out


def test_an_unknown_stage_or_a_bad_stage_section_is_one_line(toys, workdir, capsys):
    from instill.cli import console_main

    score = {"data": BASE["data"], "score": {"run": "checkpoints/none", "nois": 1.0}}
    for argv, message in ((["toy_scor", "x.yaml"], "unknown stage 'toy_scor' (did you mean 'toy_score'?)"),
                          (["toy_score", _config(workdir / "typo.yaml", score)],
                           "unknown key 'score.nois' (did you mean 'noise'?)")):
        with pytest.raises(SystemExit) as exit_:
            console_main(argv)
        err = capsys.readouterr().err.strip()
        assert exit_.value.code == 2 and message in err and len(err.splitlines()) == 1, err
    assert not Path("checkpoints/typo").exists()


def test_every_kind_of_plug_in_serves_the_python_api(toys):
    # dataset and model by import path; the same objects by entry-point name
    data = DATASETS.build("instill_toys.data:blobs", DataContext(seed=3), {"n": 120})
    model = MODELS.build("instill_toys.nets:mlp", data.info, {"hidden": 8})
    assert type(DATASETS.build("toy_blobs", DataContext(seed=3), {"n": 120})) is type(data)
    loader = [(data.train.x[i:i + 24], data.train.y[i:i + 24]) for i in range(0, len(data.train), 24)]

    # similarity measure, by name and by import path
    x, y = torch.randn(20, 6), torch.randn(20, 9)
    gx, gy = (x.double() @ x.double().T), (y.double() @ y.double().T)
    expected = (gx * gy).sum() / (gx.norm() * gy.norm())
    assert "toy_rv" in instill.measures()
    assert instill.measure_similarity(x, y, "toy_rv") == pytest.approx(expected.item(), abs=1e-12)
    assert instill.measure_similarity(x, x, "instill_toys.measures:uncentred_rv") == pytest.approx(1.0, abs=1e-12)

    # mask method by import path, its option passed through
    masked = instill.find_subnetwork(model, loader, layers=["Linear"], method="instill_toys.masks:RandomKeep",
                                     method_options={"keep": 0.25})
    assert instill.mask_density(masked.hard_masks())["kept"] == round(0.25 * 40) + round(0.25 * 24)
    with pytest.raises(instill.UserError, match="method_options: unknown key 'kep' \\(did you mean 'keep'\\?\\)"):
        instill.find_subnetwork(model, loader, method="toy_random_keep", method_options={"kep": 0.25})

    # learning rule: its gradients are half of backprop's (a fresh model: find_subnetwork froze the other)
    batch, model = loader[0], MODELS.build("toy_mlp", data.info, {"hidden": 8})
    rule = instill.learning_rule("toy_scaled_backprop", model, options={"factor": 0.5})
    model.zero_grad()
    rule.gradients(model, batch, instill.StepContext())
    halved = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    instill.learning_rule("backprop", model).gradients(model, batch, instill.StepContext())
    assert all(torch.equal(h, 0.5 * p.grad) for h, p in zip(halved, model.parameters()))

    # stitch target: with every label 0 it still learns the end model's decisions (it never reads the labels),
    # where the labels' own target learns to answer 0
    trained = MODELS.build("toy_mlp", data.info, {"hidden": 8})
    optimizer = torch.optim.SGD(trained.parameters(), lr=0.3)
    for _ in range(20):
        for xb, yb in loader:
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(trained(xb), yb).backward()
            optimizer.step()
    zeros = [(xb, torch.zeros_like(yb)) for xb, yb in loader]
    _, ours = instill.stitch_models(trained, trained, "1", "1", zeros, target="toy_end_argmax", epochs=15, lr=0.05)
    _, hard = instill.stitch_models(trained, trained, "1", "1", zeros, target="hard", epochs=15, lr=0.05)
    assert ours["agreement"] > 0.9 > hard["agreement"]


def test_instill_list_shows_the_plug_ins_with_their_options(toys):
    for kind, lines in {"similarities": ["toy_rv: Uncentred RV coefficient"],
                        "measures": ["toy_rv: Uncentred RV coefficient"],
                        "mask_methods": ["toy_random_keep: Keeps a random", "    keep: float = 0.5"],
                        "rules": ["toy_scaled_backprop: Back-propagation", "    factor: float = 0.5"],
                        "stitch_targets": ["toy_end_argmax: Cross-entropy with the end model's decisions"],
                        "datasets": ["toy_blobs: Gaussian blobs", "    n: int = 240"],
                        "models": ["toy_mlp: A one-hidden-layer MLP", "    hidden: int = 16"],
                        "stages": ["toy_score: Test accuracy of a trained model under Gaussian input noise"]}.items():
        text = list_entries(kind).splitlines()
        for line in lines:
            assert any(row.startswith(line) for row in text), (kind, line)


def test_a_broken_or_unknown_plug_in_is_one_line(toys, workdir, capsys):
    body = {**BASE, "train": {**BASE["train"], "rule": "toy_scaled_backprp", "rule_options": {}}}
    assert run_cli("base", _config(workdir / "bad.yaml", body)) == 2
    err = capsys.readouterr().err.strip()
    assert "unknown learning rule 'toy_scaled_backprp' (did you mean 'toy_scaled_backprop'?)" in err
    assert len(err.splitlines()) == 1 and not Path("checkpoints/bad").exists()
    with pytest.raises(instill.UserError, match="similarity 'instill_toys.measures:nope': instill_toys.measures "
                                                "has no 'nope'"):
        instill.measure_similarity(torch.randn(5, 2), torch.randn(5, 2), "instill_toys.measures:nope")


def test_shipped_entries_keep_what_recorded_runs_hold():
    """Replay compatibility: a shipped mask method records the same mask.json hyperparameters as before plug-ins had
    options, and the old name of cca_r2 still validates in a compare config."""
    from instill.compare.measures import get_measure
    from instill.subnetworks.masks import MaskConfig

    recorded = MaskConfig(layers=("Linear",), method="hard_concrete").hyperparameters()
    assert sorted(recorded) == ["concrete_temperature", "final_temp", "l0_lambda", "layers", "legacy_schedule",
                                "mask_bias", "mask_init_fraction", "mask_init_value", "method", "prune_fraction",
                                "stretch", "unit"]
    assert get_measure("cca_squared").pair is get_measure("cca_r2").pair
