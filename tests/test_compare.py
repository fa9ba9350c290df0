"""compare_models and the compare stage: self-comparison, agreement with instill.compare.similarity, hostile input."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from instill.compare.measures import compare_models, get_measure, lr_r2, measure_names
from instill.data import BatchLoader, Split
from instill.errors import UserError
from instill.compare.capture import FeatureCapture, select_layers
from instill.compare.similarity import cka, procrustes, rsa
from tests.conftest import run_cli

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "drfrankenstein"
TINY10 = {seed: str(FIXTURES / f"Tiny10/CIFAR10/in{seed}-gn{seed}/110000.pt") for seed in (0, 10)}


def _convnet(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2), nn.ReLU(),
                         nn.Conv2d(8, 6, 3), nn.Flatten(), nn.Linear(6 * 3 * 3, 5))


def _loader(n: int = 96, batch: int = 32, seed: int = 0) -> BatchLoader:
    x = torch.randn(n, 3, 12, 12, generator=torch.Generator().manual_seed(seed))
    return BatchLoader(Split(x, torch.zeros(n, dtype=torch.long)), batch, shuffle=True, seed=seed)


def test_a_model_compared_with_itself_gives_one_on_the_diagonal_for_every_measure():
    model = _convnet(0)
    result = compare_models(model, model, _loader(), layers_a=["0", "2", "4", "6"], measures=measure_names(),
                            spatial="mean")
    assert result.layers_a == result.layers_b == ["0", "2", "4", "6"]
    for measure in measure_names():
        diagonal = np.diag(result.matrix(measure))
        expected = 0.0 if get_measure(measure).distance else 1.0
        np.testing.assert_allclose(diagonal, expected, atol=1e-6, err_msg=measure)
    off = result.matrix("cka_minibatch")[0, 3]
    assert abs(off) < 0.9  # other layers are not the same (unbiased CKA may dip below 0)


class _Tied(nn.Module):
    """One block applied three times (a weight-tied stack), then a readout; ``steps`` can change between calls."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed, self.block, self.head = nn.Linear(6, 8), nn.Sequential(nn.Linear(8, 8), nn.Tanh()), nn.Linear(8, 3)
        self.steps = 3

    def forward(self, x):
        h = self.embed(x)
        for _ in range(self.steps):
            h = self.block(h)
        return self.head(h)


def _vectors(n: int = 96, batch: int = 32) -> BatchLoader:
    x = torch.randn(n, 6, generator=torch.Generator().manual_seed(0))
    return BatchLoader(Split(x, torch.zeros(n, dtype=torch.long)), batch, shuffle=True, seed=0)


def test_a_layer_called_several_times_gives_a_row_per_call():
    model = _Tied()
    result = compare_models(model, model, _vectors(), layers_a=["block", "head"], measures=["cka_minibatch", "cka"])
    assert result.layers_a == result.layers_b == ["block", "block@1", "block@2", "head"]
    for measure in ("cka_minibatch", "cka"):
        matrix = result.matrix(measure)
        np.testing.assert_allclose(np.diag(matrix), 1.0, atol=1e-6)
        assert matrix[0, 2] < 0.999  # the first and the third call see different inputs
    with FeatureCapture(model, ["block"]) as capture, torch.no_grad():
        model(_vectors().split.x[:32])
        third = capture.pop()["block@2"]
    with torch.no_grad():
        expected = model.block(model.block(model.block(model.embed(_vectors().split.x[:32]))))
    torch.testing.assert_close(third, expected)


def test_a_layer_whose_number_of_calls_changes_between_batches_is_refused():
    class Shrinking(_Tied):
        def forward(self, x):
            out = super().forward(x)
            self.steps = 2  # from the second batch on, one call fewer
            return out

    model = Shrinking()
    with pytest.raises(UserError, match=r"ran a different number of times in a later batch.*block@2"):
        compare_models(model, _Tied(), _vectors(), layers_a=["block"], measures=["cka_minibatch"])


def test_minibatch_cka_is_the_ratio_of_summed_unbiased_hsic():
    """Against a textbook HSIC_u (Song et al. 2012, eq. 5) in float64, summed over the same batches."""
    a, b = _convnet(0), _convnet(1)
    loader = _loader(n=70, batch=20)  # the last batch has 10 samples
    result = compare_models(a, b, loader, layers_a=["2"], layers_b=["4"], measures=["cka_minibatch"])

    def hsic_u(k, l):
        n = k.shape[0]
        k, l = k.clone(), l.clone()
        k.fill_diagonal_(0), l.fill_diagonal_(0)
        return ((k * l).sum() + k.sum() * l.sum() / ((n - 1) * (n - 2)) - 2 * (k.sum(0) @ l.sum(0)) / (n - 2)) / (
            n * (n - 3))

    sums = torch.zeros(3, dtype=torch.float64)
    with torch.no_grad(), FeatureCapture(a, ["2"]) as ca, FeatureCapture(b, ["4"]) as cb:
        for x, _ in loader:
            a(x), b(x)
            fa, fb = ca.pop()["2"].flatten(1).double(), cb.pop()["4"].flatten(1).double()
            k, l = fa @ fa.T, fb @ fb.T
            sums += torch.stack([hsic_u(k, l), hsic_u(k, k), hsic_u(l, l)])
    expected = (sums[0] / (sums[1] * sums[2]).sqrt()).item()
    # ours forms the Gram matrices in float32 (full precision), then centres and sums in float64
    assert result.value("cka_minibatch", "2", "4") == pytest.approx(expected, abs=1e-6)
    assert result.rows[0]["n"] == 70


def test_full_data_measures_are_instill_similarity_on_the_capped_samples():
    a, b = _convnet(0), _convnet(1)
    loader = [x for x, _ in _loader(n=96, batch=32)]
    result = compare_models(a, b, loader, layers_a=["2"], layers_b=["4"], full_samples=64,
                            measures=["cka", "rsa", "rsa_classic", "procrustes"])
    with torch.no_grad(), FeatureCapture(a, ["2"]) as ca, FeatureCapture(b, ["4"]) as cb:
        x = torch.cat(loader)[:64]
        a(x), b(x)
        fa, fb = ca.pop()["2"].double(), cb.pop()["4"].double()
    assert result.value("cka", "2", "4") == pytest.approx(cka(fa, fb).item(), abs=1e-9)
    assert result.value("rsa", "2", "4") == pytest.approx(rsa(fa, fb).item(), abs=1e-9)
    assert result.value("rsa_classic", "2", "4") == pytest.approx(rsa(fa, fb, "classic").item(), abs=1e-9)
    assert result.value("procrustes", "2", "4") == pytest.approx(procrustes(fa, fb).item(), abs=1e-9)
    assert {r["n"] for r in result.rows} == {64}
    with pytest.raises(UserError, match="needs more samples than features"):
        lr_r2(fa, fb)  # 200 features, 64 samples


def test_lr_r2_is_the_centred_regression_r2():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 5, generator=g, dtype=torch.float64)
    y = x @ torch.randn(5, 3, generator=g, dtype=torch.float64) + 7 + 0.5 * torch.randn(200, 3, generator=g,
                                                                                         dtype=torch.float64)
    design = torch.cat([x, torch.ones(200, 1, dtype=torch.float64)], 1)
    residual = y - design @ torch.linalg.lstsq(design, y).solution
    expected = 1 - residual.square().sum() / (y - y.mean(0)).square().sum()
    assert lr_r2(x, y).item() == pytest.approx(expected.item(), abs=1e-12)


def test_pairs_of_other_shapes_are_left_out_of_l2_and_channel_correlation():
    model = _convnet(0)
    result = compare_models(model, model, _loader(), layers_a=["0", "2"], measures=["l2", "channel_corr"])
    assert np.isnan(result.matrix("l2")[0, 1]) and result.matrix("l2")[0, 0] == 0
    assert any("0~2" in why for why in result.skipped["l2"])


def test_a_full_data_measure_needing_more_samples_says_so():
    model = _convnet(0)
    with pytest.raises(UserError, match=r"measure cca needs more samples than features: layer '0' has 1152 "
                                         r"features but only 96 samples"):
        compare_models(model, model, _loader(), layers_a=["0"], measures=["cca"])


def test_the_sketch_approximates_minibatch_cka_and_replays_from_its_seed():
    """The approximate mode: layers wider than k projected by matrices drawn from the seed. The same seed gives the
    same values bit for bit, another seed other values; narrower layers stay exact; a model against itself keeps 1
    on the diagonal (one projection per width). Random convnets on noise are the sketch's worst case (near-white
    features of 72 to 1,152 dimensions, 32 samples a batch): when this test was written, k = 512 missed the exact
    values by at most 0.014, 0.035, 0.040 (seeds 0-2), k = 64 by 0.11-0.59, and k = 16 estimated a self-HSIC below 0
    for seed 2, which is refused with a line that names sketch_features."""
    a, b, layers = _convnet(0), _convnet(1), ["0", "2", "4"]
    exact = compare_models(a, b, _loader(), layers_a=layers).matrix("cka_minibatch")
    sketched = [compare_models(a, b, _loader(), layers_a=layers, sketch_features=512, seed=seed).matrix("cka_minibatch")
                for seed in (0, 1)]
    np.testing.assert_array_equal(sketched[0], compare_models(a, b, _loader(), layers_a=layers, sketch_features=512,
                                                              seed=0).matrix("cka_minibatch"))
    assert not np.array_equal(sketched[0], sketched[1])
    assert max(np.abs(s - exact).max() for s in sketched) < 0.1
    narrow = compare_models(a, b, _loader(), layers_a=["4"], sketch_features=2000, seed=0).matrix("cka_minibatch")
    np.testing.assert_allclose(narrow, exact[2:, 2:], atol=1e-12)  # 54 features <= 2000: not projected
    itself = compare_models(a, a, _loader(), layers_a=layers, sketch_features=16).matrix("cka_minibatch")
    np.testing.assert_allclose(np.diag(itself), 1.0, atol=1e-6)
    with pytest.raises(UserError, match="too few sketch_features"):
        compare_models(a, b, _loader(), layers_a=layers, sketch_features=16, seed=2)
    with pytest.raises(UserError, match="cka cannot use it"):
        compare_models(a, b, _loader(), layers_a=layers, measures=["cka_minibatch", "cka"], sketch_features=16)
    with pytest.raises(UserError, match="sketch_features must be an even whole number"):
        compare_models(a, b, _loader(), layers_a=layers, sketch_features=15)


def test_layer_globs_and_unknown_layers():
    model = nn.Sequential()
    model.add_module("bn1", nn.BatchNorm2d(3))
    model.add_module("conv", nn.Conv2d(3, 3, 1))
    model.add_module("bn2", nn.BatchNorm2d(3))
    assert list(select_layers(model, ["bn*"])) == ["bn1", "bn2"]
    with pytest.raises(UserError, match="no layer matches 'fc\\*'"):
        select_layers(model, ["fc*"])
    with pytest.raises(UserError, match="did you mean 'bn2' or 'bn1'"):
        compare_models(model, model, [torch.zeros(4, 3, 2, 2)], layers_a=["bn3"])


# ----------------------------------------------------------------------------------------------------- stage

def _write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


TINY10_CONFIG = f"""
data: {{name: crops, n_train: 8, n_val: 64, n_test: 8}}
compare:
  model_a: {{name: tiny10, weights: {TINY10[0]}}}
  model_b: {{name: tiny10, weights: {TINY10[10]}}}
  layers_a: ["bn*"]
  measures: [cka_minibatch, cka, l2]
  batch_size: 32
train: {{threads: 1}}
"""


def test_compare_stage_writes_csv_heatmaps_and_summary(workdir):
    config = _write(workdir / "t10.yaml", TINY10_CONFIG)
    assert run_cli("compare", config) == 0
    out = workdir / "checkpoints" / "t10"
    with open(out / "similarity.csv") as f:
        rows = list(csv.DictReader(f))
    assert set(rows[0]) == {"layer_a", "layer_b", "measure", "value", "n"}
    assert len([r for r in rows if r["measure"] == "cka_minibatch"]) == 64
    assert {r["n"] for r in rows if r["measure"] == "cka"} == {"64"}
    for measure in ("cka_minibatch", "cka", "l2"):
        assert (out / f"heatmap_{measure}.png").stat().st_size > 0
    summary = json.loads((out / "summary.json").read_text())
    matrix = np.array(summary["matrices"]["cka_minibatch"])
    assert matrix.shape == (8, 8) and summary["layers_a"] == [f"bn{i}" for i in range(1, 9)]
    # two seeds of one architecture: bn3..bn6 match. Over 5 crop draws (64 crops each) these four values ranged
    # 0.855-0.994, and one earlier draw gave 0.7999; unrelated layers score 0.28-0.44 (the bn1/bn2 rows).
    assert np.all(np.diag(matrix)[2:6] > 0.7)


@pytest.mark.parametrize("change, message", [
    ("layers_a: [bn9]", "compare.layers_a: unknown layer 'bn9' in Tiny10 (did you mean 'bn8'"),
    (f"model_b: {{name: resnet20, weights: {TINY10[10]}}}", "first mismatching key 'layer1.0.conv1.weight' is missing"),
    ("measures: [cka_minibatch, cca]", "measure cca needs more samples than features"),
    ("measures: [ckaa]", "unknown measure 'ckaa'"),
    ("batch_size: 2", "needs batches of at least 4"),
    ("sketch_features: 16", "sketch_features approximates measures computed from Gram matrices alone (cka_minibatch); "
                            "cka, l2 cannot use it"),
    ("sketch_features: 0", "compare.sketch_features"),
])
def test_compare_stage_bad_input_is_one_line_and_writes_nothing(workdir, capsys, change, message):
    key = change.split(":")[0]
    lines = [line for line in TINY10_CONFIG.splitlines() if not line.strip().startswith(f"{key}:")]
    text = "\n".join(lines).replace("compare:\n", f"compare:\n  {change}\n")
    config = _write(workdir / "bad.yaml", text)
    assert run_cli("compare", config) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (workdir / "checkpoints" / "bad").exists()


def test_compare_stage_with_a_missing_cifar_folder_writes_nothing(workdir, capsys):
    text = TINY10_CONFIG.replace("data: {name: crops, n_train: 8, n_val: 64, n_test: 8}",
                                 f"data: {{name: cifar10, root: {workdir / 'nowhere'}}}")
    assert run_cli("compare", _write(workdir / "nocifar.yaml", text)) == 2
    err = capsys.readouterr().err.strip()
    assert "cifar-10-batches-py not found" in err and len(err.splitlines()) == 1
    assert not (workdir / "checkpoints").exists()


def test_without_layers_every_leaf_module_is_compared_and_many_are_thinned_with_a_warning():
    model = _convnet(0)
    result = compare_models(model, _convnet(1), _loader())
    assert result.layers_a == result.layers_b == ["0", "1", "2", "3", "4", "5", "6"]
    deep = nn.Sequential(*[nn.Linear(6, 6) for _ in range(120)])
    for layer in deep:  # identity layers: the signal neither fades nor explodes over 120 of them
        nn.init.eye_(layer.weight), nn.init.zeros_(layer.bias)
    with pytest.warns(UserWarning, match="120 leaf modules; comparing 50 evenly spaced ones from 0 to 119"):
        result = compare_models(deep, deep, _vectors())
    assert len(result.layers_a) == 50 and result.layers_a[0] == "0" and result.layers_a[-1] == "119"
