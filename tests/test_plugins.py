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
import torch.nn.functional as F
import yaml

from safetensors.torch import load_file

import instill
from instill.cli import list_entries
from instill.compare.measures import MEASURES
from instill.compare.similarity import SIMILARITIES
from instill.data import DataContext
from instill.models import load_model
from instill.registry import DATASETS, MODELS, RULES
from instill.stages import STAGES
from instill.guidance.guide import GUIDE_CONDITIONS, build_guide
from instill.stitching.init import INITS
from instill.stitching.stitch import TARGETS, TargetBatch, stitch_target
from instill.stages import load_stage_config
from instill.subnetworks.transplant import CONDITIONS
from instill.subnetworks.masks import MASK_METHODS
from tests.conftest import run_cli

PLUGINS = Path(__file__).resolve().parent / "fixtures" / "user_plugins"
REGISTRIES = (SIMILARITIES, MEASURES, MASK_METHODS, RULES, TARGETS, INITS, CONDITIONS, GUIDE_CONDITIONS, DATASETS,
              MODELS, STAGES)
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

    # transfer condition (entry point) with its own option: the transfer stage transplants and freezes about half
    # of the 32 kept entries
    transfer = {**base, "reproducibility": BASE["reproducibility"],
                "transfer": {"mask": "checkpoints/toy_ablate", "conditions": ["toy_part_of_subnet"],
                             "condition_options": {"toy_part_of_subnet": {"fraction": 0.5}}},
                "train": {**base["train"], "epochs": 1, "optimizer": {"name": "SGD", "lr": 0.1}}}
    assert run_cli("transfer", _config(workdir / "toy_transfer.yaml", transfer)) == 0
    (row,) = _summary("toy_transfer")["results"]
    assert row["condition"] == "toy_part_of_subnet" and 4 <= row["kept"] <= 28 and row["frozen_entries"] == row["kept"]

    # guide condition (entry point) with its own option, and the similarity with its option: the guide stage
    guide = {"data": BASE["data"], "model": BASE["model"], "reproducibility": BASE["reproducibility"],
             "guidance": {"conditions": ["toy_scaled_guide"], "guide": {"name": "toy_mlp", "hidden": 8},
                          "condition_options": {"toy_scaled_guide": {"scale": 3.0}}, "similarity": "toy_rv",
                          "similarity_options": {"toy_rv": {"power": 2.0}}, "target_layers": ["type:Linear"],
                          "guide_layers": ["type:Linear"], "layer_map": "uniform", "drop_last_layer": False},
             "train": {"epochs": 1, "batch_size": 32, "threads": 1, "progress": False}}
    assert run_cli("guide", _config(workdir / "toy_guide.yaml", guide)) == 0
    (row,) = _summary("toy_guide")["results"]
    assert row["condition"] == "toy_scaled_guide" and row["pairs"] == ["1~1", "3~3"]

    # similarity measure (entry point): the compare stage, a model against itself gives 1 on the diagonal
    compare = {**base, "compare": {"model_a": {"run": "checkpoints/toy_base"},
                                   "model_b": {"run": "checkpoints/toy_base"}, "layers_a": ["type:Linear"],
                                   "measures": ["toy_rv", "cka", "instill_toys.measures:uncentred_rv"],
                                   "measure_options": {"toy_rv": {"power": 2.0}}, "batch_size": 16}}
    assert run_cli("compare", _config(workdir / "toy_compare.yaml", compare)) == 0
    rows = [line.split(",") for line in Path("checkpoints/toy_compare/similarity.csv").read_text().splitlines()[1:]]
    values = {(a, b, measure): float(value) for a, b, measure, value, _ in rows}
    diagonal = [v for (a, b, measure), v in values.items() if measure == "toy_rv" and a == b]
    assert len(diagonal) == 2 and diagonal == pytest.approx([1.0, 1.0], abs=1e-9)
    off = [(a, b) for a, b, measure in values if measure == "toy_rv" and a != b]
    assert off and all(values[a, b, "toy_rv"] == pytest.approx(values[a, b, "instill_toys.measures:uncentred_rv"] ** 2,
                                                               rel=1e-9) for a, b in off)  # the option reached it

    # stitch target and init (entry points), the init with its option; the similarity as a stitch measure with its
    # option, beside the same function by import path without it: the stitch stage
    plain_rv = "instill_toys.measures:uncentred_rv"
    stitch = {**base, "stitch": {"front": {"run": "checkpoints/toy_base"}, "end": {"run": "checkpoints/toy_base"},
                                 "front_layers": ["1"], "end_layers": ["1"], "target": "toy_end_argmax",
                                 "init": "toy_scaled_identity",
                                 "init_options": {"toy_scaled_identity": {"scale": -1.0}},
                                 "measures": ["toy_rv", plain_rv], "measure_options": {"toy_rv": {"power": 2.0}},
                                 "similarity_samples": 32},
              "train": {"epochs": 4, "threads": 1, "progress": False, "batch_size": 32,
                        "optimizer": {"name": "AdamW", "lr": 0.05}, "schedule": {"name": "constant"}}}
    assert run_cli("stitch", _config(workdir / "toy_stitch.yaml", stitch)) == 0
    pair = _summary("toy_stitch")["pairs"][0]
    assert 0 < pair["val_after_toy_rv"] <= 1 + 1e-9
    assert pair["val_after_toy_rv"] == pytest.approx(pair[f"val_after_{plain_rv}"] ** 2, rel=1e-9)
    assert pair["val_after_agreement"] > max(0.8, pair["val_before_agreement"])
    (before,) = Path("checkpoints/toy_stitch").rglob("transform_before.safetensors")
    assert torch.equal(load_file(before)["weight"], -torch.eye(16))  # the init's option reached it


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


def test_every_kind_of_plug_in_serves_the_python_api(toys, workdir):
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
    assert instill.measure_similarity(x, y, "toy_rv", options={"power": 3}) == pytest.approx(expected.item() ** 3,
                                                                                           rel=1e-12)

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

    # stitch init and target options: the init's option sets the map; the target's option reaches its loss
    stitched, _ = instill.stitch_models(trained, trained, "1", "1", zeros, init="toy_scaled_identity",
                                        init_options={"scale": 0.5}, epochs=0)
    assert torch.equal(stitched.transform.matrix().detach(), 0.5 * torch.eye(8))
    batch = TargetBatch(torch.randn(6, 3), None, None, torch.randn(6, 3), torch.zeros(1), None, 1.0)
    smoothed = F.cross_entropy(batch.logits, batch.end_logits.argmax(-1), label_smoothing=0.2)
    assert stitch_target("toy_end_argmax", {"smoothing": 0.2})(batch) == smoothed

    # transfer condition with its option: a transplanted fraction of the subnetwork, frozen
    mask = {name: torch.ones_like(p, dtype=torch.bool) for name, p in model.named_parameters() if p.dim() == 2}
    start = instill.transplant("toy_part_of_subnet", model, MODELS.build("toy_mlp", data.info, {"hidden": 8}), mask,
                               options={"fraction": 0.25})
    assert 0 < start.info["kept"] < 0.5 * sum(m.numel() for m in mask.values())
    assert start.info["frozen_entries"] == start.info["kept"]

    # guide condition with its option: the guide is a fresh one times the scale
    cfg = load_stage_config(_config(Path.cwd() / "toy_guide_api.yaml", {
        "data": BASE["data"], "model": BASE["model"],
        "guidance": {"conditions": ["toy_scaled_guide"], "guide": {"name": "toy_mlp", "hidden": 8},
                     "condition_options": {"toy_scaled_guide": {"scale": 3.0}}}}), "guide")
    torch.manual_seed(5)  # the toy guide draws its fresh weights from torch's generator
    tripled = build_guide(cfg, 5, "toy_scaled_guide", data.info)
    cfg.guidance.condition_options = {"toy_scaled_guide": {"scale": 1.0}}
    torch.manual_seed(5)
    plain = build_guide(cfg, 5, "toy_scaled_guide", data.info)
    assert all(torch.equal(a, 3 * b) for a, b in zip(tripled.parameters(), plain.parameters()))


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


STITCH = {"front": {"run": "checkpoints/toy_base"}, "end": {"run": "checkpoints/toy_base"}, "front_layers": ["1"],
          "end_layers": ["1"]}
GUIDANCE = {"guide": {"name": "toy_mlp"}}
COMPARE = {"model_a": {"run": "checkpoints/toy_base"}, "model_b": {"run": "checkpoints/toy_base"},
           "layers_a": ["type:Linear"]}


@pytest.mark.parametrize("stage, section, message", [
    ("stitch", {"stitch": {**STITCH, "target": "toy_end_argmax",
                           "target_options": {"toy_end_argmax": {"smothing": 1}}}},
     "stitch.target_options: toy_end_argmax: unknown key 'smothing' (did you mean 'smoothing'?); allowed: smoothing"),
    ("stitch", {"stitch": {**STITCH, "init_options": {"random": {"scale": 2}}}},
     "stitch.init_options: random: unknown key 'scale'"),  # a shipped init takes no option
    ("stitch", {"stitch": {**STITCH, "measure_options": {"toy_rw": {}}}},
     "stitch.measure_options: unknown similarity 'toy_rw' (did you mean 'toy_rv'?)"),
    ("transfer", {"transfer": {"mask": "m", "condition_options": {"subnet": {"fraction": 0.5}}}},
     "transfer.condition_options: subnet: unknown key 'fraction'"),
    ("guide", {"model": BASE["model"], "guidance": {**GUIDANCE, "condition_options": {"toy_scaled_gide": {}}}},
     "guidance.condition_options: unknown guide condition 'toy_scaled_gide' (did you mean 'toy_scaled_guide'?)"),
    ("compare", {"compare": {**COMPARE, "measures": ["toy_rv"], "measure_options": {"toy_rv": {"pwr": 2}}}},
     "compare: measure_options: similarity toy_rv: unknown key 'pwr' (did you mean 'power'?)"),
    ("compare", {"compare": {**COMPARE, "measure_options": {"toy_rv": {"power": 2}}}},
     "compare: measure_options names toy_rv, which measures does not list"),
    ("compare", {"compare": {**COMPARE, "measure_options": {"cka_minibatch": {"power": 2}}}},
     "compare: measure_options: measure cka_minibatch takes no options"),
    ("guide", {"model": BASE["model"], "guidance": {"conditions": ["toy_scaled_guide"]}},
     "condition toy_scaled_guide needs guidance.guide"),
    ("guide", {"model": BASE["model"], "guidance": {**GUIDANCE, "similarity": "toy_rv",
                                                    "similarity_options": {"toy_rv": {"power": "high"}}}},
     "guidance.similarity_options: toy_rv: power: Input should be a valid number"),
])
def test_an_unknown_option_or_name_of_a_plug_in_is_one_line(toys, workdir, capsys, stage, section, message):
    body = {"data": BASE["data"], **section}
    assert run_cli(stage, _config(workdir / "bad.yaml", body)) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not Path("checkpoints/bad").exists()


def test_an_option_the_entry_does_not_take_is_refused_by_the_api(toys):
    x = torch.randn(8, 3)
    with pytest.raises(instill.UserError, match="similarity cka: unknown key 'power'"):
        instill.measure_similarity(x, x, "cka", options={"power": 2})
    with pytest.raises(instill.UserError, match=r"similarity toy_rv: unknown key 'pwr' \(did you mean 'power'\?\)"):
        instill.measure_similarity(x, x, "toy_rv", options={"pwr": 2})


def test_extending_instill_shows_the_plug_ins_as_they_are():
    """docs/design.md shows each file of the user package whole, and the entry points it declares."""
    doc = (Path(__file__).resolve().parents[1] / "docs" / "design.md").read_text()
    for path in sorted((PLUGINS / "instill_toys").glob("*.py")):
        if path.name != "__init__.py":
            assert f"```python\n{path.read_text()}```" in doc, path.name
    for line in (PLUGINS / "instill_toys-0.1.dist-info" / "entry_points.txt").read_text().splitlines():
        if line.startswith("["):
            assert f"[project.entry-points.\"{line[1:-1]}\"]" in doc, line
        elif line:
            name, _, value = line.partition(" = ")
            assert f'{name} = "{value}"' in doc, line


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


class _NormCorrelation:
    """A user's streaming measure: Pearson correlation of the samples' squared norms in two layers, from running
    sums (``start`` gets the first batch's summaries; ``update`` every batch; ``value(i, j)`` at the end)."""

    def __init__(self, norms_a, norms_b):
        self.pairs = [(i, j) for i in range(len(norms_a)) for j in range(len(norms_b))]
        self.sums, self.n = {}, 0

    def update(self, norms_a, norms_b):
        for i, j in self.pairs:
            a, b = norms_a[i].double(), norms_b[j].double()
            new = torch.stack([a.sum(), b.sum(), (a * a).sum(), (b * b).sum(), (a * b).sum()])
            self.sums[i, j] = self.sums.get((i, j), 0) + new
        self.n += len(norms_a[0])

    def value(self, i, j):
        s_a, s_b, s_aa, s_bb, s_ab = (self.sums[i, j] / self.n).tolist()
        return (s_ab - s_a * s_b) / ((s_aa - s_a ** 2) * (s_bb - s_b ** 2)) ** 0.5


def test_a_streaming_measure_of_ones_own_plugs_in_like_the_shipped_ones():
    """A ``Measure`` with ``start`` (and a ``summarize`` its hooks keep instead of the activation) registered in
    ``MEASURES`` runs through compare_models alone (summaries made in the hooks) and beside a shipped streaming
    measure (summaries made from the kept activations), with the values of the statistic over all samples."""
    from instill.compare.capture import FeatureCapture
    from instill.compare.measures import MEASURES, Measure, compare_models

    measure = Measure("toy_norm_corr", "correlation of the samples' squared norms", start=_NormCorrelation,
                      summarize=lambda x: x.flatten(1).square().sum(1))
    MEASURES.register(measure.name, doc=measure.description)(measure)
    try:
        torch.manual_seed(0)
        model_a, model_b = (torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
                            for _ in range(2))
        batches = [torch.randn(16, 6) for _ in range(3)]
        alone = compare_models(model_a, model_b, batches, layers_a=["0", "2"], measures=["toy_norm_corr"])
        beside = compare_models(model_a, model_b, batches, layers_a=["0", "2"], measures=["toy_norm_corr", "l2"])
        with torch.no_grad(), FeatureCapture(model_a, ["0", "2"]) as capture_a, \
                FeatureCapture(model_b, ["0", "2"]) as capture_b:
            model_a(torch.cat(batches)), model_b(torch.cat(batches))
            norms_a = {k: v.square().sum(1).double() for k, v in capture_a.pop().items()}
            norms_b = {k: v.square().sum(1).double() for k, v in capture_b.pop().items()}
        for a in ("0", "2"):
            for b in ("0", "2"):
                expected = torch.corrcoef(torch.stack([norms_a[a], norms_b[b]]))[0, 1].item()
                assert alone.value("toy_norm_corr", a, b) == pytest.approx(expected, abs=1e-6)
                assert beside.value("toy_norm_corr", a, b) == pytest.approx(expected, abs=1e-6)
        assert beside.matrix("l2").shape == (2, 2) and alone.rows[0]["n"] == 48
    finally:
        MEASURES._entries.pop("toy_norm_corr")
