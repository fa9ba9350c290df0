"""Masks: selection on any model, the three methods, NeuroSurgeon as the oracle, freezing, schedule, artifacts."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from torch import nn

from instill.errors import UserError
from instill.subnetworks.masks import (MaskConfig, MaskedModel, base_run_of, load_mask, read_mask_meta, save_mask,
                                       select_targets, temperature_at, weights_hash)
from instill.subnetworks.neurosurgeon import neurosurgeon_logits, neurosurgeon_masks


def tiny_gpt2(seed=0, n_layer=2):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=40, n_positions=4, n_embd=16, n_layer=n_layer, n_head=2,
                                      bos_token_id=None, eos_token_id=None, use_cache=False))


class Mixed(nn.Module):
    """Every supported kind in one plain PyTorch model, plus dropout and batch norm."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(11, 8)
        self.conv1 = nn.Conv1d(8, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.drop = nn.Dropout(0.5)
        self.head = nn.Linear(8 + 4, 3)

    def forward(self, tokens, image):
        h = self.embed(tokens)
        h = self.conv1(h.transpose(1, 2)).transpose(1, 2)
        h, _ = self.attn(h, h, h)
        g = self.bn(self.conv2(image)).mean(dim=(2, 3))
        return self.head(self.drop(torch.cat([h.mean(1), g], dim=1)))


def mixed_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 11, (5, 6), generator=g), torch.randn(5, 1, 6, 6, generator=g)


def randomize(masked: MaskedModel, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in masked.logits:
            p.copy_(torch.randn(p.shape, generator=g) * scale)


# ----------------------------------------------------------------------------------------------------- selection

def test_select_by_type_glob_and_parameter_name():
    model = tiny_gpt2()
    names = [t.name for t in select_targets(model, ["Conv1D"])]
    assert len(names) == 8 and names[0] == "transformer.h.0.attn.c_attn.weight"
    assert [t.name for t in select_targets(model, ["transformer.h.*.attn.c_attn"])] == [
        "transformer.h.0.attn.c_attn.weight", "transformer.h.1.attn.c_attn.weight"]
    with_bias = [t.name for t in select_targets(model, ["transformer.h.1.mlp.c_fc"], mask_bias=True)]
    assert with_bias == ["transformer.h.1.mlp.c_fc.weight", "transformer.h.1.mlp.c_fc.bias"]
    assert [t.name for t in select_targets(model, ["*.wpe.weight"])] == ["transformer.wpe.weight"]
    # the LM head is tied to the token embedding: one canonical parameter, once
    assert [t.name for t in select_targets(model, ["Embedding", "lm_head"])] == [
        "transformer.wte.weight", "transformer.wpe.weight"]
    mixed = [t.name for t in select_targets(Mixed(), ["Linear", "Conv1d", "Conv2d", "MultiheadAttention",
                                                      "Embedding"])]
    assert mixed == ["embed.weight", "conv1.weight", "conv2.weight", "attn.in_proj_weight",
                     "attn.out_proj.weight", "head.weight"]


def test_selection_errors_are_one_line():
    model = tiny_gpt2()
    with pytest.raises(UserError) as err:
        select_targets(model, ["transformer.h.0.attn.c_atn"])
    assert "matches no maskable weight" in str(err.value) and "c_attn" in str(err.value)
    with pytest.raises(UserError, match="nearest names: Conv1D"):
        select_targets(model, ["Conv1Dx"])
    assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="GPT2Attention, which has no maskable weight"):
        select_targets(model, ["transformer.h.0.attn"])
    with pytest.raises(UserError, match="layers is empty"):
        MaskConfig(layers=())
    with pytest.raises(UserError, match="method 'lottery'"):
        MaskConfig(layers=("Linear",), method="lottery")


# ----------------------------------------------------------------------------------------------------- forward

def test_continuous_sparsification_on_every_layer_kind_matches_manual_masking():
    model = Mixed()
    reference = copy.deepcopy(model).eval()
    masked = MaskedModel(model, MaskConfig(layers=("Linear", "Conv1d", "Conv2d", "MultiheadAttention",
                                                   "Embedding"), mask_bias=True))
    randomize(masked, seed=1)
    masked.temperature = 2.5
    inputs = mixed_inputs()
    for training in (True, False):
        masked.train(training)
        out = masked(*inputs)
        params = dict(reference.named_parameters())
        with torch.no_grad():
            for name, logits in zip(masked.names, masked.logits):
                mask = torch.sigmoid(2.5 * logits) if training else (logits > 0).float()
                params[name].copy_(dict(model.named_parameters())[name] * mask)
            expected = reference(*inputs)
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
        with torch.no_grad():
            soft_total = sum(torch.sigmoid(2.5 * p).sum() for p in masked.logits)
            hard_total = sum((p > 0).sum() for p in masked.logits)
        expected_l0 = float(soft_total if training else hard_total)
        assert masked.l0().detach().item() == pytest.approx(expected_l0, rel=1e-5)


def test_base_stays_frozen_and_in_eval_mode_while_masks_train():
    model = Mixed()
    before = copy.deepcopy(model.state_dict())
    masked = MaskedModel(model, MaskConfig(layers=("Linear", "Conv2d"), l0_lambda=1e-3))
    optimizer = torch.optim.AdamW(masked.parameters(), lr=0.1, weight_decay=0.1)
    assert {id(p) for p in optimizer.param_groups[0]["params"] if p.requires_grad} == {
        id(p) for p in masked.logits}
    masked.train()
    inputs = mixed_inputs()
    assert torch.equal(masked(*inputs), masked(*inputs))  # dropout is off although the wrapper trains
    for _ in range(3):
        loss = masked(*inputs).square().mean() + masked.penalty()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert not model.training and not any(m.training for m in model.modules())
    for key, value in model.state_dict().items():  # weights and BN running statistics untouched
        assert torch.equal(value, before[key]), key
    assert not torch.equal(masked.logits[0], torch.full_like(masked.logits[0], -0.1))
    assert all(isinstance(p, nn.Parameter) for p in model.parameters())  # slots given back after forward


def test_penalty_gradient_is_l0_lambda_times_soft_mask_derivative():
    masked = MaskedModel(tiny_gpt2(), MaskConfig(layers=("Conv1D",), l0_lambda=0.5))
    randomize(masked, seed=3)
    masked.temperature = 1.7
    masked.train()
    masked(torch.zeros(2, 4, dtype=torch.long))
    masked.penalty().backward()
    s = masked.logits[0].detach()
    sig = torch.sigmoid(1.7 * s)
    torch.testing.assert_close(masked.logits[0].grad, 0.5 * 1.7 * sig * (1 - sig))


def test_neuron_masks_broadcast_over_output_units_and_count_weights():
    model = tiny_gpt2()
    masked = MaskedModel(model, MaskConfig(layers=("transformer.h.0.mlp.c_fc",), unit="neuron"))
    assert tuple(masked.logits[0].shape) == (1, 64)  # Conv1D weight is (in, out)
    randomize(masked, seed=4)
    masked.eval()
    hard = masked.hard_masks()["transformer.h.0.mlp.c_fc.weight"]
    assert hard.shape == (16, 64) and torch.equal(hard, (masked.logits[0] > 0).expand(16, 64))
    masked(torch.zeros(1, 4, dtype=torch.long))
    assert masked.l0().item() == int(hard.sum())
    masked.double()  # new parameter storage: the wrapper re-binds its slots
    assert masked(torch.zeros(1, 4, dtype=torch.long)).logits.dtype == torch.float64
    assert torch.equal(masked.hard_masks()["transformer.h.0.mlp.c_fc.weight"], hard)


# ----------------------------------------------------------------------------------------------------- NeuroSurgeon

def neurosurgeon_circuit(model, targets, unit="weight", init=-0.1):
    from NeuroSurgeon.Models.circuit_model import CircuitModel
    from NeuroSurgeon.Models.model_configs import CircuitConfig

    config = CircuitConfig(mask_method="continuous_sparsification", target_layers=targets, freeze_base=True,
                           add_l0=False, mask_hparams={"ablation": "none", "mask_unit": unit, "mask_bias": False,
                                                       "mask_init_value": init})
    return CircuitModel(config, model)


@pytest.mark.parametrize("unit", ["weight", "neuron"])
def test_matches_neurosurgeon_output_and_l0_on_gpt2(unit):
    model = tiny_gpt2(seed=5)
    targets = [n for n, m in model.named_modules() if type(m).__name__ == "Conv1D"]
    circuit = neurosurgeon_circuit(copy.deepcopy(model), targets, unit)
    ours = MaskedModel(model, MaskConfig(layers=("Conv1D",), unit=unit))
    randomize(ours, seed=6, scale=0.3)
    with torch.no_grad():
        for name, logits in zip(ours.names, ours.logits):
            layer = circuit.wrapped_model.get_submodule(name.rsplit(".", 1)[0])
            layer.weight_mask_params.copy_(logits)
    x = torch.randint(0, 40, (3, 4), generator=torch.Generator().manual_seed(0))
    for training, temperature in ((True, 1.0), (True, 37.5), (False, 37.5)):
        circuit.train(training)
        ours.train(training)
        circuit.temperature = temperature
        ours.temperature = temperature
        expected = circuit(input_ids=x).logits
        torch.testing.assert_close(ours(x).logits, expected, rtol=0, atol=1e-6)
        l0 = circuit.compute_l0_statistics()["total_l0"] if not training else circuit._compute_l0_loss()
        assert ours.l0().detach().item() == pytest.approx(float(torch.as_tensor(l0).detach()), rel=1e-6)


def test_matches_neurosurgeon_on_linear_and_conv2d():
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.Flatten(), nn.Linear(3 * 4 * 4, 5))
    circuit = neurosurgeon_circuit(copy.deepcopy(model), ["0", "2"])
    ours = MaskedModel(model, MaskConfig(layers=("Conv2d", "Linear")))
    randomize(ours, seed=7)
    with torch.no_grad():
        circuit.wrapped_model[0].weight_mask_params.copy_(ours.logits[0])
        circuit.wrapped_model[2].weight_mask_params.copy_(ours.logits[1])
    circuit.train(True)
    circuit.temperature = ours.temperature = 4.0
    ours.train()
    x = torch.randn(2, 1, 6, 6)
    torch.testing.assert_close(ours(x), circuit.wrapped_model(x), rtol=0, atol=1e-6)
    assert ours.l0().detach().item() == pytest.approx(float(circuit._compute_l0_loss().detach()), rel=1e-6)


@pytest.mark.parametrize("prefix", ["wrapped_model.", "root_model."])
def test_import_neurosurgeon_state_dict(prefix, tmp_path):
    model = tiny_gpt2(seed=8)
    targets = [n for n, m in model.named_modules() if type(m).__name__ == "Conv1D"]
    circuit = neurosurgeon_circuit(copy.deepcopy(model), targets)
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for name, p in circuit.named_parameters():
            if name.endswith("weight_mask_params"):
                p.copy_(torch.randn(p.shape, generator=g))
    state = {prefix + k.removeprefix("wrapped_model."): v for k, v in circuit.state_dict().items()}
    torch.save(state, tmp_path / "best_circuit_model.pt")
    ours = MaskedModel(model, MaskConfig(layers=("Conv1D",)))
    ours.load_logits(neurosurgeon_logits(tmp_path / "best_circuit_model.pt"))
    for name, mask in ours.hard_masks().items():
        layer = circuit.wrapped_model.get_submodule(name.rsplit(".", 1)[0])
        assert torch.equal(mask, layer.weight_mask_params.detach() > 0)
    partial = {k: v for k, v in neurosurgeon_logits(state).items() if ".h.0." in k}
    with pytest.raises(UserError, match="missing 4"):
        ours.load_logits(partial)


def conv_circuit(kernel, unit="neuron", seed=20):
    """A Conv2d + Linear model and NeuroSurgeon's CircuitModel over a copy of it, with random mask logits."""
    torch.manual_seed(seed)
    side = 6 - kernel + 1
    model = nn.Sequential(nn.Conv2d(2, 3, kernel), nn.Flatten(), nn.Linear(3 * side * side, 5))
    circuit = neurosurgeon_circuit(copy.deepcopy(model), ["0", "2"], unit)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in circuit.named_parameters():
            if name.endswith("mask_params"):
                p.copy_(torch.randn(p.shape, generator=g))
    return model, circuit


def test_neurosurgeon_conv_neuron_masks_are_per_kernel_position_and_import_exactly():
    model, circuit = conv_circuit(kernel=3)
    conv = circuit.wrapped_model[0]
    assert tuple(conv.weight_mask_params.shape) == (3, 1, 3, 3)  # NeuroSurgeon 0.1.0's conv "neuron" unit
    circuit.train(False)
    masks, selection = neurosurgeon_masks(circuit.state_dict(), model)
    assert torch.equal(masks["0.weight"], conv._compute_mask("weight_mask_params").bool())
    assert torch.equal(masks["2.weight"], circuit.wrapped_model[2]._compute_mask("weight_mask_params").bool())
    assert selection == {"layers": ["0", "2"], "mask_bias": False, "unit": "neuron",
                         "method": "continuous_sparsification"}
    with torch.no_grad():  # the imported hard masks give NeuroSurgeon's evaluation output
        for name, param in model.named_parameters():
            if name in masks:
                param.mul_(masks[name])
    x = torch.randn(4, 2, 6, 6)
    torch.testing.assert_close(model(x), circuit.wrapped_model(x), rtol=0, atol=1e-6)
    ours = MaskedModel(copy.deepcopy(model), MaskConfig(layers=("Conv2d", "Linear"), unit="neuron"))
    with pytest.raises(UserError, match="kernel position") as err:  # our neuron logits are per output channel
        ours.load_logits(neurosurgeon_logits(circuit.state_dict()))
    assert "\n" not in str(err.value)


def test_matches_neurosurgeon_on_1x1_conv_neurons():
    """With a 1x1 kernel NeuroSurgeon's conv neuron mask is one logit per output channel, as ours: same outputs."""
    model, circuit = conv_circuit(kernel=1)
    ours = MaskedModel(model, MaskConfig(layers=("Conv2d", "Linear"), unit="neuron"))
    ours.load_logits(neurosurgeon_logits(circuit.state_dict()))
    x = torch.randn(4, 2, 6, 6)
    for training, temperature in ((True, 3.0), (False, 3.0)):
        circuit.train(training)
        ours.train(training)
        circuit.temperature = ours.temperature = temperature
        torch.testing.assert_close(ours(x), circuit.wrapped_model(x), rtol=0, atol=1e-6)
    imported, _ = neurosurgeon_masks(circuit.state_dict(), model)
    assert all(torch.equal(ours.hard_masks()[name], mask) for name, mask in imported.items())


def test_neurosurgeon_masks_check_shapes_and_base_weights():
    model, circuit = conv_circuit(kernel=3, unit="weight")
    state = circuit.state_dict()
    other = copy.deepcopy(model)
    with torch.no_grad():
        other[2].weight.add_(1.0)
    with pytest.raises(UserError, match="base weights differ from the base model's: 1: 2.weight"):
        neurosurgeon_masks(state, other)
    bad = {**state, "wrapped_model.2.weight_mask_params": torch.zeros(5, 2)}
    with pytest.raises(UserError, match="do not fit their parameter: 1: 2.weight"):
        neurosurgeon_masks(bad, model)
    with pytest.raises(UserError, match="no \\*_mask_params"):
        neurosurgeon_masks({"wrapped_model.0.weight": model[0].weight}, model)
    with pytest.raises(UserError, match="cannot be imported"):
        neurosurgeon_masks(state, model, method="magnitude")
    concrete, _ = neurosurgeon_masks(state, model, method="hard_concrete")  # stretched sigmoid > 0.5
    logits = state["wrapped_model.0.weight_mask_params"]
    assert torch.equal(concrete["0.weight"], (torch.sigmoid(logits) * 1.2 - 0.1).clamp(0, 1) > 0.5)


# ----------------------------------------------------------------------------------------------------- methods

def test_hard_concrete_gates_l0_and_eval_mask():
    masked = MaskedModel(tiny_gpt2(), MaskConfig(layers=("Conv1D",), method="hard_concrete",
                                                 mask_init_fraction=0.9))
    assert torch.allclose(masked.logits[0], torch.full_like(masked.logits[0], math.log(9)))
    randomize(masked, seed=10, scale=2.0)
    masked.train()
    x = torch.zeros(2, 4, dtype=torch.long)
    masked(x)
    first = masked.l0().item()
    expected = sum(torch.sigmoid(p.detach() - (2 / 3) * math.log(0.1 / 1.1)).sum() for p in masked.logits)
    assert first == pytest.approx(float(expected), rel=1e-5)
    gates = [masked.method.gates(p.detach()) for p in masked.logits]
    assert all(float(g.min()) >= 0 and float(g.max()) <= 1 for g in gates)
    assert not torch.equal(gates[0], masked.method.gates(masked.logits[0].detach()))  # stochastic
    hard = masked.hard_masks()
    for name, logits in zip(masked.names, masked.logits):  # default stretch: gate > 0.5 iff log-alpha > 0
        assert torch.equal(hard[name], logits.detach() > 0)


def test_magnitude_keeps_the_largest_absolute_weights():
    model = nn.Sequential(nn.Linear(4, 5), nn.Linear(5, 2))
    with torch.no_grad():
        model[0].weight.copy_(torch.arange(20.0).reshape(5, 4) - 10)  # large negative weights must be kept
    masked = MaskedModel(model, MaskConfig(layers=("0",), method="magnitude", prune_fraction=0.75))
    assert len(list(masked.parameters())) == len(list(model.parameters()))  # nothing to train
    mask = masked.hard_masks()["0.weight"]
    assert int(mask.sum()) == 5
    assert set(model[0].weight[mask].tolist()) == {-10.0, -9.0, -8.0, 8.0, 9.0}
    neuron = MaskedModel(copy.deepcopy(model), MaskConfig(layers=("0",), method="magnitude", unit="neuron",
                                                           prune_fraction=0.6))
    rows = neuron.hard_masks()["0.weight"].all(dim=1)
    assert rows.tolist() == [True, False, False, False, True]  # the two rows of largest norm


def test_temperature_schedule_correct_and_legacy():
    r = 100 ** (1 / 50)
    assert temperature_at(0, 50, 100.0) == 1.0
    assert temperature_at(1, 50, 100.0) == pytest.approx(r)
    assert temperature_at(49, 50, 100.0) == pytest.approx(100 / r)
    legacy = [temperature_at(e, 50, 100.0, legacy=True) for e in range(50)]
    assert legacy[0] == 1.0 and legacy[1] == pytest.approx(r ** 2) and legacy[49] == pytest.approx(100.0)
    masked = MaskedModel(tiny_gpt2(), MaskConfig(layers=("Conv1D",), final_temp=8.0, legacy_schedule=True))
    assert masked.set_epoch(2, 3) == {"temperature": pytest.approx(8.0)} and masked.temperature == pytest.approx(8.0)
    concrete = MaskedModel(tiny_gpt2(), MaskConfig(layers=("Conv1D",), method="hard_concrete"))
    assert concrete.set_epoch(2, 3) == {}  # its concrete temperature is fixed


# ---------------------------------------------------------------------------------------------------- timm, torchvision

def test_masks_work_on_torchvision_and_timm_models():
    import timm
    import torchvision

    for model in (torchvision.models.resnet18(num_classes=3),
                  timm.create_model("vit_tiny_patch16_224", img_size=32, num_classes=3)):
        masked = MaskedModel(model, MaskConfig(layers=("Conv2d", "Linear"), mask_init_value=0.5))
        masked.train()
        masked(torch.randn(2, 3, 32, 32)).sum().backward()
        assert all(p.grad is not None for p in masked.logits)
        assert all(p.grad is None for p in model.parameters())


# ----------------------------------------------------------------------------------------------------- artifact

def test_artifact_round_trip_metadata_and_atomic_write(tmp_path):
    model = tiny_gpt2(seed=11)
    masked = MaskedModel(model, MaskConfig(layers=("Conv1D",), l0_lambda=1e-7))
    randomize(masked, seed=12)
    meta = masked.save(tmp_path / "subnet", epoch=7)
    assert sorted(p.name for p in (tmp_path / "subnet").iterdir()) == ["mask.json", "mask.safetensors"]
    on_disk = json.loads((tmp_path / "subnet" / "mask.json").read_text())
    assert on_disk == json.loads(json.dumps(meta)) and on_disk["epoch"] == 7
    assert on_disk["method"] == "continuous_sparsification" and on_disk["hyperparameters"]["l0_lambda"] == 1e-7
    assert on_disk["base_hash"] == weights_hash(model)
    hard = masked.hard_masks()
    kept = sum(int(m.sum()) for m in hard.values())
    assert on_disk["density"] == pytest.approx(kept / sum(m.numel() for m in hard.values()))
    layer = on_disk["layers"]["transformer.h.0.attn.c_attn.weight"]
    assert layer["kept"] == int(hard["transformer.h.0.attn.c_attn.weight"].sum()) and layer["total"] == 16 * 48
    loaded = load_mask(tmp_path / "subnet", tiny_gpt2(seed=11), expected=masked.names)
    assert loaded.keys() == hard.keys() and all(torch.equal(loaded[k], hard[k]) for k in hard)
    assert read_mask_meta(tmp_path / "subnet")["kept"] == kept


def test_artifact_mismatches_are_named(tmp_path):
    model = tiny_gpt2(seed=13)
    selection = {"layers": ["transformer.h.0.attn.c_attn"]}
    masks = {"transformer.h.0.attn.c_attn.weight": torch.ones(16, 48, dtype=torch.bool)}
    save_mask(tmp_path, masks, model, method="continuous_sparsification", hyperparameters=selection)
    cases = [
        (lambda: load_mask(tmp_path, tiny_gpt2(seed=14)), "other base weights"),
        (lambda: load_mask(tmp_path, model, expected=list(masks) + ["transformer.h.1.attn.c_attn.weight"]),
         "missing 1: transformer.h.1.attn.c_attn.weight"),
        (lambda: load_mask(tmp_path, model, expected=[]), "extra 1: transformer.h.0.attn.c_attn.weight"),
        (lambda: load_mask(tmp_path, tiny_gpt2(seed=13, n_layer=1).transformer), "not parameter(s) of the model"),
        (lambda: save_mask(tmp_path, {"transformer.h.0.attn.c_attn.weight": torch.ones(48, 16, dtype=torch.bool)},
                           model, method="x", hyperparameters=selection), "shape mismatch"),
        (lambda: load_mask(tmp_path / "nowhere", model), "mask metadata not found"),
        # the names an artifact holds must be what its recorded selection gives, on saving and on loading
        (lambda: save_mask(tmp_path / "other", masks, model, method="x", hyperparameters={"layers": ["Conv1D"]}),
         "missing 7: transformer.h.0.attn.c_proj.weight"),
        (lambda: save_mask(tmp_path / "other", masks, model, method="x", hyperparameters={}),
         "does not record the layer selection"),
    ]
    for action, message in cases:
        with pytest.raises(UserError) as err:
            action()
        assert message in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "other").exists()


@pytest.mark.parametrize("edit, message", [
    (lambda masks: masks.pop("transformer.h.0.attn.c_attn.weight"), "missing 1: transformer.h.0.attn.c_attn.weight"),
    (lambda masks: masks.update({"transformer.wte.weight": torch.ones(40, 16, dtype=torch.bool)}),
     "extra 1: transformer.wte.weight"),
])
def test_loading_checks_names_against_the_recorded_selection(tmp_path, edit, message):
    from safetensors.torch import load_file, save_file

    model = tiny_gpt2(seed=15)
    MaskedModel(model, MaskConfig(layers=("Conv1D",))).save(tmp_path)
    assert len(load_mask(tmp_path, model)) == 8
    masks = load_file(tmp_path / "mask.safetensors")
    edit(masks)
    save_file(masks, tmp_path / "mask.safetensors")
    with pytest.raises(UserError, match="do not match the layer selection") as err:
        load_mask(tmp_path, model)
    assert message in str(err.value)
    meta = json.loads((tmp_path / "mask.json").read_text())
    meta["hyperparameters"]["layers"] = ["Conv2d"]
    (tmp_path / "mask.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match="recorded layer selection does not fit the model"):
        load_mask(tmp_path, model)


def test_a_mask_changed_or_swapped_after_saving_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    model = tiny_gpt2(seed=17)
    for name, seed in (("a", 18), ("b", 19)):  # two discoveries on the same base
        masked = MaskedModel(model, MaskConfig(layers=("Conv1D",)))
        randomize(masked, seed=seed)
        masked.save(tmp_path / name)
    path = tmp_path / "a" / "mask.safetensors"
    original = path.read_bytes()
    meta = read_mask_meta(tmp_path / "a")
    assert meta["version"] == 2 and len(meta["mask_hash"]) == 64
    load_mask(tmp_path / "a", model)

    def refused(message):
        with pytest.raises(UserError, match=message) as err:
            load_mask(tmp_path / "a", model)
        assert "\n" not in str(err.value)

    masks = load_file(path)
    name = "transformer.h.0.attn.c_attn.weight"
    flat = masks[name].flatten()
    flat[(~flat).nonzero()[:300, 0]] = True  # 300 entries flipped on
    save_file({**masks, name: flat.reshape(masks[name].shape)}, path, metadata={"base_hash": meta["base_hash"]})
    refused(f"does not match mask.json: 1: {name} keeps")
    path.write_bytes(original)
    masks = load_file(path)
    flat = masks[name].flatten()
    i, j = flat.nonzero()[0].item(), (~flat).nonzero()[0].item()
    flat[i], flat[j] = False, True  # same kept count, different content
    save_file({**masks, name: flat.reshape(masks[name].shape)}, path, metadata={"base_hash": meta["base_hash"]})
    refused("content hash differs from mask_hash")
    path.write_bytes((tmp_path / "b" / "mask.safetensors").read_bytes())  # another run's mask swapped in
    refused("does not match mask.json")
    path.write_bytes(original)
    masks = load_file(path)
    save_file(masks, path, metadata={"base_hash": "0" * 64})  # the same masks, stamped for another base
    refused("saved for base weights 000000000000")
    # an artifact from before the content hash: accepted when its kept counts agree, refused otherwise
    path.write_bytes(original)
    old = {k: v for k, v in meta.items() if k != "mask_hash"}
    (tmp_path / "a" / "mask.json").write_text(json.dumps({**old, "version": 1}))
    assert load_mask(tmp_path / "a", model).keys() == masks.keys()
    path.write_bytes((tmp_path / "b" / "mask.safetensors").read_bytes())
    refused("keeps")


def test_base_run_is_stored_relative_to_the_mask_directory(tmp_path, monkeypatch):
    model = tiny_gpt2(seed=16)
    (tmp_path / "runs" / "base").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    MaskedModel(model, MaskConfig(layers=("Conv1D",))).save("runs/ablate", base_run="runs/base")
    assert read_mask_meta("runs/ablate")["base_run"] == "../base"
    assert base_run_of("runs/ablate") == "runs/base"
    monkeypatch.chdir(tmp_path / "runs")  # another working directory: the pair still finds each other
    assert base_run_of("ablate") == "base"
    meta = read_mask_meta("ablate")
    meta["base_run"] = "runs/base"  # an older artifact: relative to the working directory of its run
    (tmp_path / "runs" / "ablate" / "mask.json").write_text(json.dumps(meta))
    monkeypatch.chdir(tmp_path)
    assert base_run_of("runs/ablate") == "runs/base"
    meta["base_run"] = "gone"
    (tmp_path / "runs" / "ablate" / "mask.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match="base run 'gone' not found"):
        base_run_of("runs/ablate")


# ----------------------------------------------------------------------------------------------------- bench

def test_bench_functions_run_at_toy_size():
    from bench import masks as bench

    size = bench.Size(n_layer=1, n_embd=16, n_head=2, vocab=33, discovery_batch=8, transfer_batch=4, repeats=2,
                      warmup=1)
    result = bench.run(size)
    for key in ("discovery_vs_plain", "discovery_vs_neurosurgeon", "transfer_vs_plain",
                "transfer_vs_plain_fused_adamw", "transfer_zero_grads_vs_plain"):
        assert 0 < result[key] < 100
    for suffix in ("", "_high_density"):  # gradients and AdamW state dilute the freezing state
        assert 1 < result[f"transfer_training_memory_vs_plain{suffix}"] < result[f"transfer_memory_vs_plain{suffix}"]
    for kind in ("memory", "training_memory"):  # one bit per entry whatever the density
        assert result[f"transfer_{kind}_vs_plain"] == result[f"transfer_{kind}_vs_plain_high_density"]


def test_transplanted_memory_is_within_the_design_targets_at_the_preset():
    """The 2-layer preset's model at its subnetwork density and at the legacy baseline's: at most 1.05x the plain
    model's bytes in parameters, 1.03x at a training step (byte counts, not timings: exact on any machine)."""
    from bench import masks as bench

    size = bench.Size()
    assert (size.n_layer, size.n_embd, size.vocab, size.density) == (2, 128, 1001, 0.24)
    for density in (size.density, size.high_density):
        ratios = bench.memory_ratios(size, density)
        assert ratios["model"] <= 1.05 and ratios["training"] <= 1.03, ratios
        assert 1 < ratios["training"] < ratios["model"]
