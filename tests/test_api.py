"""The Python API (instill.api, re-exported lazily by ``import instill``) and the examples built on it."""

from __future__ import annotations

import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import instill
from instill.errors import UserError
from instill.registry import MODELS

ROOT = Path(__file__).resolve().parents[1]


def test_import_instill_is_cheap_and_exposes_the_api_lazily():
    code = ("import sys, instill; assert 'torch' not in sys.modules, 'torch imported'; "
            "f = instill.measure_similarity; assert 'torch' in sys.modules; print(f.__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "measure_similarity"
    with pytest.raises(AttributeError):
        instill.no_such_name  # noqa: B018
    assert {"find_subnetwork", "alignment_loss", "transplant", "load_mask"} <= set(dir(instill))


def test_every_public_name_has_args_returns_raises_docs():
    from instill import api

    assert set(api.__all__) == instill._API_NAMES  # the lazy table and the API agree

    for name in ("find_subnetwork", "measure_similarity", "alignment_loss", "compare_models", "stitch_models",
                 "learning_rule", "alignment_scores"):
        doc = getattr(api, name).__doc__
        assert all(part in doc for part in ("Args:", "Returns:", "Raises:")), name


def test_measure_similarity_and_its_errors():
    x = torch.randn(30, 4)
    assert float(instill.measure_similarity(x, 2 * x)) == pytest.approx(1.0)
    assert "cka" in instill.measures()
    with pytest.raises(UserError, match="unknown similarity"):
        instill.measure_similarity(x, x, "ckaa")


def test_find_subnetwork_rejects_bad_options_and_batches():
    model = nn.Sequential(nn.Linear(4, 3))
    with pytest.raises(UserError, match="method"):
        instill.find_subnetwork(model, [], method="prune_everything")
    with pytest.raises(UserError, match="no_such_option"):
        instill.find_subnetwork(model, [], no_such_option=1)
    with pytest.raises(UserError, match=r"\(inputs, targets\)"):
        instill.find_subnetwork(model, [torch.randn(2, 4)], epochs=1)


def test_alignment_loss_pairs_by_name_and_rejects_unknown_layers():
    target = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2))
    guide = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2))
    x = torch.randn(8, 4)
    align = instill.alignment_loss(target, guide, [("0", "0", 2.0)])
    target(x)
    loss, sims = align(x)
    assert loss.requires_grad and list(sims) == ["sim/0~0"]
    align.close()
    with pytest.raises(UserError, match="unknown layer '9'"):
        instill.alignment_loss(target, guide, [("9", "0")])
    with pytest.raises(UserError, match="needs sample"):
        instill.alignment_loss(target, guide, "uniform")


def test_compare_models_is_the_compare_system():
    from instill.compare.measures import Comparison, compare_models

    assert instill.compare_models is compare_models and instill.Comparison is Comparison
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    result = instill.compare_models(model, model, [torch.randn(40, 4)], layers_a=["0", "2"], measures=["cka"])
    assert result.matrix("cka").diagonal().tolist() == pytest.approx([1.0, 1.0])
    with pytest.raises(UserError, match="unknown measure"):
        instill.compare_models(model, model, [torch.randn(40, 4)], layers_a=["0"], measures=["ckaa"])


def _mlp(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))


def _batches(n: int = 4) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    return [(torch.randn(32, 5, generator=generator), torch.randint(0, 3, (32,), generator=generator))
            for _ in range(n)]


def test_stitch_models_of_a_model_with_itself_is_the_model():
    model, loader = _mlp(0), _batches()
    stitched, metrics = instill.stitch_models(model, model, "1", "1", loader, epochs=0)
    x = loader[0][0]
    assert isinstance(stitched, instill.StitchedNet)
    assert torch.allclose(stitched(x), model(x), atol=1e-4)  # least squares finds the identity
    assert metrics["agreement"] == 1.0 and metrics["fit_r2"] == pytest.approx(1.0, abs=1e-6)
    assert metrics["acc"] == metrics["end_acc"]


def test_stitch_models_trains_only_the_transform_and_rejects_bad_input():
    front, end, loader = _mlp(1), _mlp(2), _batches()
    end_weights = [p.clone() for p in end.parameters()]
    stitched, metrics = instill.stitch_models(front, end, "1", "3", loader, init="random", epochs=2, lr=1e-2,
                                              target="soft_2")
    assert all(torch.equal(a, b) for a, b in zip(end_weights, end.parameters()))
    assert {"before_acc", "acc", "agreement", "kl_to_end"} <= set(metrics) and "fit_r2" not in metrics
    with pytest.raises(UserError, match="unknown layer '9'|'9'"):
        instill.stitch_models(front, end, "9", "1", loader)
    with pytest.raises(UserError, match="target match trains on activations alone"):
        instill.stitch_models(front, end, "1", "1", loader, target="match")
    with pytest.raises(UserError, match="unknown stitch target 'sfot_2' \\(did you mean 'soft_2'\\?\\)"):
        instill.stitch_models(front, end, "1", "1", loader, target="sfot_2")
    with pytest.raises(UserError, match="unknown stitch init"):
        instill.stitch_models(front, end, "1", "1", loader, init="eye")
    wide = nn.Sequential(nn.Linear(5, 8193), nn.ReLU(), nn.Linear(8193, 3))  # refused before any pass over the data
    with pytest.raises(UserError, match="^stitch_models: stitch init identity needs as many input as output channels, "
                                        "got 8193 -> 8$"):
        instill.stitch_models(wide, end, "1", "1", loader, init="identity")
    with pytest.raises(UserError, match="stitch init ps_inv: the least-squares fit has 8193 inputs, at most 8192"):
        instill.stitch_models(wide, end, "1", "1", loader)


def test_learning_rule_fills_grad_for_a_users_model():
    model, (x, y) = _mlp(0), _batches(1)[0]
    backprop = instill.learning_rule("backprop", model)
    loss, _ = backprop.gradients(model, (x, y), instill.StepContext(lr=0.1))
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    assert all(torch.allclose(a, p.grad) for a, p in zip(grads, model.parameters()))
    model.zero_grad()
    align_zero = instill.learning_rule("align_zero", model)  # at theta0 align_zero is back-propagation
    align_zero.gradients(model, (x, y), instill.StepContext(lr=0.1))
    assert all(torch.allclose(a, p.grad, atol=1e-6) for a, p in zip(grads, model.parameters()))
    assert "align_zero" in instill.learning_rules()
    with pytest.raises(UserError, match="align_zer"):
        instill.learning_rule("align_zer", model)
    with pytest.raises(UserError, match="needs"):
        instill.learning_rule("dfa", model)  # a plain Sequential has no blocks the rule can tap
    cnn = MODELS.build("ntk_cnn", {"input_shape": (1, 4, 4), "num_classes": 3}, {"width": 2})
    pooled = instill.learning_rule("dfa", cnn, criterion=lambda f, t: f.square().mean(), options={"feedback": "pooled"})
    pooled.gradients(cnn, (torch.randn(4, 1, 4, 4), torch.zeros(4, dtype=torch.long)), instill.StepContext())
    assert [tuple(b.shape) for b in pooled.matrices.values()] == [(2, 3)] * 3  # C x K per block, not (C·H·W) x K
    with pytest.raises(UserError, match="rule dfa: feedback: Input should be"):
        instill.learning_rule("dfa", cnn, options={"feedback": "sparse"})


def test_alignment_scores_track_backprop_and_reject_unknown_layers():
    model, loader = _mlp(0), _batches()
    tracker = instill.alignment_scores(model, ["0", "4"], chance=["shuffled_update"])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for batch in loader:
        optimizer.zero_grad()
        tracker.gradients(model, batch, instill.StepContext(lr=0.1))
        optimizer.step()
    scores = tracker.scores(model)
    assert set(scores) == {"align/0", "align/4", "align_shuffled_update/0", "align_shuffled_update/4"}
    assert all(0.0 <= value <= 1.0 + 1e-9 for value in scores.values())
    with pytest.raises(UserError, match="unknown layer '7'"):
        instill.alignment_scores(model, ["7"])
    with pytest.raises(UserError, match="chance"):
        instill.alignment_scores(model, chance=["shuffled"])


@pytest.mark.parametrize("example", ["masks", "similarity", "guidance", "compare", "stitch", "align"])
def test_example_runs_end_to_end(example, tmp_path, monkeypatch, capsys):
    torch.set_num_threads(1)
    argument = str(tmp_path / ("heatmap.png" if example == "compare" else "mask"))
    monkeypatch.setattr(sys, "argv", [f"examples/{example}.py", argument])
    runpy.run_path(str(ROOT / "examples" / f"{example}.py"), run_name="__main__")
    out = capsys.readouterr().out
    expected = {"masks": "after 2 epochs: accuracy", "similarity": "cka: layer 2 against a rotation of itself = 1.000",
                "guidance": "epoch 4:", "compare": "a model against itself, layer 2: cka = 1.000",
                "stitch": "init ps_inv: test accuracy", "align": "align_zero: test accuracy"}[example]
    assert expected in out
    if example == "compare":
        assert (tmp_path / "heatmap.png").stat().st_size > 0
    if example == "masks":
        assert (tmp_path / "mask" / "mask.safetensors").is_file() and (tmp_path / "mask" / "mask.json").is_file()


def test_create_model_and_list_models_share_the_registry_configs_use():
    assert instill.list_models("*fcn*") == ["deep_fcn", "fcn", "wide_fcn"]
    assert set(instill.list_models()) == set(MODELS.names())
    net = instill.create_model("convnet", input_shape=(1, 8, 8), num_classes=10, channels=[16, 32])
    assert net(torch.zeros(2, 1, 8, 8)).shape == (2, 10)
    with pytest.raises(UserError, match="unknown key 'chanels' \\(did you mean 'channels'\\?\\)"):
        instill.create_model("convnet", chanels=[16])
    with pytest.raises(UserError, match="unknown model 'convnt' \\(did you mean 'convnet'\\?\\)"):
        instill.create_model("convnt")
