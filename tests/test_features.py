"""Activation capture: selection by name and type, execution order, layouts, tuples, packed sequences, reuse,
in-place safety, transforms inside the hook, and errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from instill.errors import UserError
from instill.compare.capture import DEFAULT_TYPES, ORIGINAL_TYPES, FeatureCapture, batch_axes_of, probe, select_layers
from instill.compare.similarity import centered_gram, cka_with_gram


class Reordered(nn.Module):
    """Registration order (first, second) differs from execution order (second, first); ``act`` is in place."""

    def __init__(self, inplace: bool = True):
        super().__init__()
        self.first = nn.Linear(6, 5)
        self.second = nn.Linear(4, 6)
        self.act = nn.ReLU(inplace=inplace)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        return self.head(self.act(self.first(self.second(x))))


class Tied(nn.Module):
    """One layer applied three times, as the original's weight-tied transformers."""

    def __init__(self):
        super().__init__()
        block = nn.Linear(4, 4)
        self.blocks = nn.ModuleList([block for _ in range(3)])

    def forward(self, x):
        for block in self.blocks:
            x = torch.tanh(block(x))
        return x


def test_one_forward_gives_logits_and_features_in_execution_order():
    torch.manual_seed(0)
    model, x = Reordered(inplace=False), torch.randn(8, 4)
    expected_logits = model(x)
    with FeatureCapture(model, ["first", "second", "head"]) as capture:
        logits = model(x)
        features = capture.pop()
    assert list(features) == ["second", "first", "head"]
    torch.testing.assert_close(logits, expected_logits)
    torch.testing.assert_close(features["head"], logits)
    torch.testing.assert_close(features["first"], model.first(model.second(x)))
    assert capture.pop() == {}  # pop forgets


def test_gradients_flow_from_the_features_to_the_parameters():
    model, x = Reordered(inplace=False), torch.randn(16, 4)
    guide = centered_gram(torch.randn(16, 7))
    with FeatureCapture(model, ["second"]) as capture:
        logits = model(x)
        loss = logits.square().mean() + (1 - cka_with_gram(capture.pop()["second"], guide))
    loss.backward()
    assert model.second.weight.grad is not None and model.second.weight.grad.abs().sum() > 0


def test_in_place_operations_cannot_corrupt_a_capture():
    torch.manual_seed(0)
    model, x = Reordered(inplace=True), torch.randn(32, 4)
    with FeatureCapture(model, ["first"]) as capture:
        model(x)
        kept = capture.pop()["first"]
    assert (kept < 0).any()  # the ReLU(inplace=True) that followed did not reach the capture
    with FeatureCapture(model, ["first"], clone=False) as capture:
        model(x)
        with pytest.raises(UserError, match="changed in place.*clone=True"):
            capture.pop()


def test_selection_by_type_and_the_originals_resnet18_layer_count():
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.resnet18(num_classes=10).eval()
    shapes = probe(model, ORIGINAL_TYPES, torch.randn(2, 3, 32, 32))
    # the original captured 20 convs (stem, 16 block convs, 3 downsample convs), avgpool and fc; it then dropped fc
    assert len(shapes) == 22 and list(shapes)[:2] == ["conv1", "layer1.0.conv1"]
    assert list(shapes)[-2:] == ["avgpool", "fc"] and shapes["fc"] == (2, 10)
    assert sum(name.endswith("downsample.0") for name in shapes) == 3


def test_type_strings_from_configs_and_mixed_specs():
    model = Reordered()
    assert list(select_layers(model, "type:Linear")) == ["first", "second", "head"]
    assert list(select_layers(model, ["head", nn.ReLU])) == ["act", "head"]
    with pytest.raises(UserError, match="no module of the types Conv2d"):
        select_layers(model, [nn.Conv2d, "type:LSTM"])


def test_a_module_called_several_times_gives_one_capture_per_call():
    model, x = Tied(), torch.randn(5, 4)
    with FeatureCapture(model, ["blocks.1"]) as capture:  # an alias of the one shared module
        model(x)
        features = capture.pop()
    assert list(features) == ["blocks.1", "blocks.1@1", "blocks.1@2"]
    block = model.blocks[0]
    torch.testing.assert_close(features["blocks.1@1"], block(torch.tanh(block(x))))


def test_tuple_outputs_and_declared_layouts():
    lstm = nn.LSTM(3, 5, batch_first=False)
    attention = nn.MultiheadAttention(5, 1, batch_first=True)

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm, self.attention = lstm, attention

        def forward(self, x):  # x: (T, B, 3), sequence first
            out, _ = self.lstm(x)
            out = out.transpose(0, 1)
            return self.attention(out, out, out)[0]

    x = torch.randn(4, 4, 3)  # T == B: guessing the batch axis from sizes would be ambiguous
    with FeatureCapture(Model(), ["lstm", "attention"]) as capture:
        out = capture.model(x)
        features = capture.pop()
    torch.testing.assert_close(features["lstm"], lstm(x)[0].transpose(0, 1))  # moved to batch first
    torch.testing.assert_close(features["attention"], out)  # the values, not the attention weights


def test_sequence_first_models_declare_their_batch_axis():
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4))
    x = torch.randn(6, 2, 3)  # (T, B, d)
    assert batch_axes_of(model, 1)["1"] == 1
    with FeatureCapture(model, ["0", "1"], batch_axis=1, batch_axes={"0": 0}) as capture:
        out = model(x)
        features = capture.pop()
    assert features["1"].shape == (2, 6, 4) and features["0"].shape == (6, 2, 4)
    torch.testing.assert_close(features["1"], out.transpose(0, 1))


def test_packed_sequences_are_padded_back_batch_first():
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = nn.RNN(2, 3)  # sequence first; its packed output is padded batch first whatever the layout

        def forward(self, packed):
            return self.rnn(packed)[0]

    model = Model()
    x, lengths = torch.randn(5, 3, 2), torch.tensor([5, 2, 4])
    with FeatureCapture(model, ["type:RNN"]) as capture:
        out = model(pack_padded_sequence(x, lengths, enforce_sorted=False))
        features = capture.pop()
    assert features["rnn"].shape == (3, 5, 3)
    torch.testing.assert_close(features["rnn"], pad_packed_sequence(out, batch_first=True)[0])


def test_transform_runs_inside_the_hook_and_can_differ_per_layer():
    model, x = Reordered(inplace=False), torch.randn(10, 4)
    seen = []

    def keep_gram(tensor):
        seen.append(tensor.shape)
        return centered_gram(tensor)

    with torch.no_grad(), FeatureCapture(model, ["second", "head"], transform={"second": keep_gram}) as capture:
        model(x)
        features = capture.pop()
    assert seen == [(10, 6)] and features["second"].shape == (10, 10) and features["head"].shape == (10, 3)
    torch.testing.assert_close(features["second"], centered_gram(model.second(x)))


def test_transformer_encoder_fast_path_is_off_while_capturing():
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
    model = nn.TransformerEncoder(layer, 2, enable_nested_tensor=True).eval()
    x, padding = torch.randn(3, 5, 8), torch.zeros(3, 5, dtype=torch.bool)
    padding[0, 3:] = True
    before = torch.backends.mha.get_fastpath_enabled()
    # eval + no_grad + a padding mask: the fast path would hand the layers nested tensors
    with torch.no_grad(), FeatureCapture(model, DEFAULT_TYPES) as capture:
        model(x, src_key_padding_mask=padding)
        features = capture.pop()
    assert sum(name.endswith("linear1") for name in features) == 2
    assert all(not tensor.is_nested for tensor in features.values()) and features["layers.1"].shape == (3, 5, 8)
    assert torch.backends.mha.get_fastpath_enabled() == before


def test_hooks_are_removed_on_exit_and_strict_pop():
    model = Reordered()
    with FeatureCapture(model, ["first", "head"]) as capture:
        assert len(model.first._forward_hooks) == 1
        model.first(torch.randn(2, 6))
        with pytest.raises(UserError, match=r"\['head'\] did not run"):
            capture.pop(strict=True)
    assert not model.first._forward_hooks and not model.head._forward_hooks


def test_unknown_layer_names_are_user_errors_with_nearest_names():
    model = Reordered()
    with pytest.raises(UserError, match="unknown layer 'frist'.*did you mean 'first'"):
        FeatureCapture(model, ["frist"])
    with pytest.raises(UserError, match="is a parameter, not a module: name its module 'head'"):
        FeatureCapture(model, ["head.weight"])

    class Wrapper(nn.Module):  # the shape of DDP / DataParallel: the model under ``module``
        def __init__(self):
            super().__init__()
            self.module = model

    assert list(select_layers(Wrapper(), ["first"])) == ["module.first"]


def test_fast_path_is_restored_whatever_order_captures_close_in():
    layer = nn.TransformerEncoderLayer(8, 2, 16, batch_first=True)
    first, second = nn.TransformerEncoder(layer, 1), nn.TransformerEncoder(layer, 1)
    before = torch.backends.mha.get_fastpath_enabled()
    for order in ("opening", "reverse"):
        captures = [FeatureCapture(first, DEFAULT_TYPES).open(), FeatureCapture(second, DEFAULT_TYPES).open()]
        assert not torch.backends.mha.get_fastpath_enabled()
        closing = captures if order == "opening" else captures[::-1]
        closing[0].close()
        assert not torch.backends.mha.get_fastpath_enabled()  # the other capture still needs it off
        closing[1].close()
        assert torch.backends.mha.get_fastpath_enabled() == before, order


def test_keys_keep_only_the_listed_calls_and_skip_the_others_work():
    model, x = Tied(), torch.randn(5, 4)
    seen = []
    with FeatureCapture(model, ["blocks.0"], keys=["blocks.0@1"], transform=lambda t: seen.append(t) or t) as capture:
        model(x)
        features = capture.pop()
        model(x)  # call numbers start again after a pop
        assert list(capture.pop()) == ["blocks.0@1"]
    assert list(features) == ["blocks.0@1"] and len(seen) == 2
    block = model.blocks[0]
    torch.testing.assert_close(features["blocks.0@1"], block(torch.tanh(block(x))))
    with pytest.raises(UserError, match=r"capture keys \['head@1'\] are not calls"):
        FeatureCapture(model, ["blocks.0"], keys=["head@1"])


def test_a_declared_batch_axis_holds_for_the_module_and_its_submodules():
    model = nn.Sequential(nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4)), nn.Linear(4, 2))
    x = torch.randn(6, 2, 3)  # (T, B, d): only the first block is sequence first in this test
    with FeatureCapture(model, ["0", "0.0", "0.1", "1"], batch_axes={"0": 1}) as capture:
        model(x)
        features = capture.pop()
    assert {name: tuple(t.shape) for name, t in features.items()} == {
        "0.0": (2, 6, 4), "0.1": (2, 6, 4), "0": (2, 6, 4), "1": (6, 2, 2)}
    with pytest.raises(UserError, match="unknown layer '00'"):
        FeatureCapture(model, ["0"], batch_axes={"00": 1})
    with FeatureCapture(model, ["1"], batch_axes={"1": 3}) as capture:
        with pytest.raises(UserError, match="layer '1': batch axis 3 declared, but its output has shape"):
            model(x)
