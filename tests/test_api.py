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

    for name in ("find_subnetwork", "measure_similarity", "alignment_loss"):
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
    with pytest.raises(UserError, match="no layer '9'"):
        instill.alignment_loss(target, guide, [("9", "0")])
    with pytest.raises(UserError, match="needs sample"):
        instill.alignment_loss(target, guide, "uniform")


@pytest.mark.parametrize("example", ["masks", "similarity", "guidance"])
def test_example_runs_end_to_end(example, tmp_path, monkeypatch, capsys):
    torch.set_num_threads(1)
    monkeypatch.setattr(sys, "argv", [f"examples/{example}.py", str(tmp_path / "mask")])
    runpy.run_path(str(ROOT / "examples" / f"{example}.py"), run_name="__main__")
    out = capsys.readouterr().out
    expected = {"masks": "after 2 epochs: accuracy", "similarity": "cka: layer 2 against a rotation of itself = 1.000",
                "guidance": "epoch 4:"}[example]
    assert expected in out
    if example == "masks":
        assert (tmp_path / "mask" / "mask.safetensors").is_file() and (tmp_path / "mask" / "mask.json").is_file()
