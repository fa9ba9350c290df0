"""One way to add any named thing: a user's package outside instill (tests/fixtures/user_plugins/instill_toys) adds
a similarity measure, a mask method, a learning rule, a stitch target, a dataset and a model, by entry point and by
import path, and each runs through its stage and through the Python API. docs/design.md ("Extending instill")
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
from instill.stitching.stitch import TARGETS
from instill.subnetworks.masks import MASK_METHODS
from tests.conftest import run_cli

PLUGINS = Path(__file__).resolve().parent / "fixtures" / "user_plugins"
REGISTRIES = (SIMILARITIES, MASK_METHODS, RULES, TARGETS, DATASETS, MODELS)
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
                        "models": ["toy_mlp: A one-hidden-layer MLP", "    hidden: int = 16"]}.items():
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
