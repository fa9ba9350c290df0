"""Sequence and deep image models: shapes, gradients, documented module names, tying, causality, a tiny fit."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from instill.data import DataContext
from instill.errors import UserError
from instill.compare.capture import probe
from instill.registry import DATASETS, MODELS
from instill.train import classification_loss

COPY = dict(symbols=6, min_len=3, max_len=6, n_train=16, n_val=4, n_test=4)
PARITY = dict(min_len=2, max_len=10, n_train=16, n_val=4, n_test=4)
IMAGE_INFO = {"input_shape": (3, 16, 16), "num_classes": 5}

# (model, params, task, task params): every sequence model on the task it is made for
SEQUENCE_CASES = [
    ("rnn", {}, "copy_paste", COPY),
    ("rnn", {"cell": "lstm", "dropout": 0.1}, "copy_paste", COPY),
    ("lstm", {}, "copy_paste", COPY),
    ("gru", {}, "grammar", dict(seq_len=12, n_train=8, n_val=2, n_test=2)),
    ("transformer", {}, "copy_paste", COPY),
    ("transformer", {"tied": True, "norm_first": True}, "copy_paste", COPY),
    ("rnn_classifier", {"cell": "gru"}, "parity", PARITY),
    ("transformer_classifier", {"tied": True}, "parity", PARITY),
]


def data_for(task: str, params: dict, seed: int = 0):
    return DATASETS.build(task, DataContext(seed=seed), params)


@pytest.mark.parametrize("name, params, task, task_params", SEQUENCE_CASES)
def test_sequence_model_forward_backward(name, params, task, task_params):
    data = data_for(task, task_params)
    model = MODELS.build(name, data.info, params)
    x, y = data.train.x, data.train.y
    logits = model(x)
    expected = (len(x), data.info.num_classes) if task == "parity" else (*x.shape, data.info.vocab_size)
    assert logits.shape == expected
    classification_loss(logits, y).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)
    assert any(p.grad.abs().sum() > 0 for p in model.parameters())


@pytest.mark.parametrize("name, params, task, task_params", SEQUENCE_CASES)
def test_documented_module_names_capture_batch_first(name, params, task, task_params):
    data = data_for(task, task_params)
    model = MODELS.build(name, data.info, params)
    depth = 4 if "transformer" in name else 2
    stack = [f"layer@{i}" if i else "layer" for i in range(depth)] if params.get("tied") else \
        [f"layers.{i}" for i in range(depth)]
    layers = ["layer"] if params.get("tied") else stack
    shapes = probe(model, ["embedding", *layers, "head"], data.train.x[:5])
    assert list(shapes) == ["embedding", *stack, "head"]
    time = data.train.x.shape[1]
    assert all(tuple(shape[:2]) == (5, time) for key, shape in shapes.items() if key != "head" or task != "parity")


def test_tied_transformer_shares_one_layer_and_untied_does_not():
    info = data_for("copy_paste", COPY).info
    untied = MODELS.build("transformer", info, {"num_layers": 3})
    tied = MODELS.build("transformer", info, {"num_layers": 3, "tied": True})
    assert not hasattr(untied, "layer") and len(untied.layers) == 3
    assert untied.layers[0].linear1.weight.data_ptr() != untied.layers[1].linear1.weight.data_ptr()
    assert not hasattr(tied, "layers") and tied.applied_layers() == [tied.layer] * 3
    per_layer = sum(p.numel() for p in untied.layers[0].parameters())
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(untied) - count(tied) == 2 * per_layer
    with pytest.raises(UserError, match="unknown layer 'layers.1'"):
        probe(tied, ["layers.1"], torch.ones(2, 5, dtype=torch.long))


@pytest.mark.parametrize("name", ["rnn", "gru", "transformer"])
def test_language_models_are_causal(name):
    """The logits at position t must not depend on later tokens (copy-paste and LM targets are shifted)."""
    data = data_for("copy_paste", COPY)
    model = MODELS.build(name, data.info, {}).eval()
    x = data.train.x[:4].clone()
    changed = x.clone()
    changed[:, 6:] = (changed[:, 6:] % 6) + 1
    with torch.no_grad():
        before, after = model(x), model(changed)
    assert torch.allclose(before[:, :6], after[:, :6], atol=1e-5)
    assert not torch.allclose(before[:, 6:], after[:, 6:], atol=1e-3)


@pytest.mark.parametrize("name", ["rnn_classifier", "transformer_classifier"])
def test_classifiers_ignore_trailing_padding(name):
    data = data_for("parity", PARITY)
    model = MODELS.build(name, data.info, {}).eval()
    x = data.train.x[:6]
    longer = torch.cat([x, torch.zeros(6, 7, dtype=torch.long)], dim=1)
    with torch.no_grad():
        assert torch.allclose(model(x), model(longer), atol=1e-5)
        all_padding = model(torch.zeros(2, 10, dtype=torch.long))
    assert torch.isfinite(all_padding).all()


@pytest.mark.parametrize("name, task, message", [
    ("rnn", "parity", "labels whole sequences"),
    ("transformer", "parity", "labels whole sequences"),
    ("rnn_classifier", "copy_paste", "next-token prediction"),
])
def test_model_and_task_mismatch_is_a_user_error(name, task, message):
    info = data_for(task, COPY if task == "copy_paste" else PARITY).info
    with pytest.raises(UserError, match=message):
        MODELS.build(name, info, {})
    with pytest.raises(UserError, match="needs token data"):
        MODELS.build(name, IMAGE_INFO, {})


def test_heads_must_divide_width():
    with pytest.raises(UserError, match="d_model 30 is not divisible by nhead 4"):
        MODELS.build("transformer", data_for("copy_paste", COPY).info, {"d_model": 30})


def test_lstm_fits_twenty_copy_paste_examples():
    torch.manual_seed(0)
    data = data_for("copy_paste", dict(symbols=5, min_len=3, max_len=5, n_train=20, n_val=1, n_test=1))
    model = MODELS.build("lstm", data.info, {})
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, y = data.train.x, data.train.y
    for _ in range(80):
        loss = classification_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        scored = y != -100
        accuracy = (model.eval()(x).argmax(-1)[scored] == y[scored]).float().mean()
    assert accuracy == 1.0 and loss < 0.1


# ----------------------------------------------------------------------------------------------- deep image models

def test_deep_and_wide_fcn_are_fcn_presets():
    deep = MODELS.build("deep_fcn", IMAGE_INFO, {"depth": 12, "width": 16})
    assert [n for n, _ in deep.named_children()] == ["layers", "head"] and len(deep.layers) == 12
    assert sum(isinstance(m, nn.BatchNorm1d) for m in deep.modules()) == 12
    plain = MODELS.build("deep_fcn", IMAGE_INFO, {"depth": 12, "width": 16, "batch_norm": False})
    assert not any(isinstance(m, nn.BatchNorm1d) for m in plain.modules())
    wide = MODELS.build("wide_fcn", IMAGE_INFO, {"width": 64})
    assert [m.out_features for m in wide.modules() if isinstance(m, nn.Linear)] == [64, 64, 64, 5]
    images = torch.randn(4, 3, 16, 16)
    assert deep(images).shape == wide(images).shape == (4, 5)


@pytest.mark.parametrize("depth, blocks, convs", [(18, 8, 17), (34, 16, 33), (50, 16, 49)])
def test_noresnet_keeps_the_resnet_layout_without_skips(depth, blocks, convs):
    plain = MODELS.build("noresnet", IMAGE_INFO, {"depth": depth, "width": 4})
    residual = MODELS.build("noresnet", IMAGE_INFO, {"depth": depth, "width": 4, "residual": True})
    assert len(plain.layers) == len(residual.layers) == blocks
    count = lambda m: sum(isinstance(c, nn.Conv2d) for c in m.modules())  # noqa: E731
    assert count(plain) == convs  # the stem and the blocks' convs; no shortcut convs
    assert count(residual) == convs + (4 if depth == 50 else 3)  # torchvision's downsample convs
    images = torch.randn(2, 3, 16, 16)
    plain(images).sum().backward()
    shapes = probe(plain, ["stem", "layers.0", f"layers.{blocks - 1}", "pool"], images)
    assert tuple(shapes["stem"]) == (2, 4, 16, 16)  # the small-image stem keeps full resolution
    assert tuple(shapes[f"layers.{blocks - 1}"])[2:] == (2, 2)


def test_noresnet_block_adds_its_input_only_when_residual():
    info = {"input_shape": (4, 8, 8), "num_classes": 3}
    for residual in (False, True):
        model = MODELS.build("noresnet", info, {"width": 4, "residual": residual, "batch_norm": False})
        block = model.layers[0]  # 4 -> 4 channels, stride 1: an identity shortcut when residual
        nn.init.zeros_(block.conv2.weight)
        nn.init.zeros_(block.conv2.bias)
        x = torch.randn(2, 4, 8, 8)
        expected = torch.relu(x) if residual else torch.zeros_like(x)
        assert torch.allclose(block(x), expected)
