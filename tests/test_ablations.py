"""Causal ablations (instill.subnetworks.ablations, instill.ablate_subnetwork) against NeuroSurgeon 0.1.0's modes."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import instill
from instill.errors import UserError
from instill.subnetworks.ablations import (ablated_weights, fresh_values, run_ablations, unit_masks,
                                           weights_replaced)
from instill.subnetworks.masks import MaskConfig, MaskedModel
from tests.test_masks import neurosurgeon_circuit, randomize, tiny_gpt2


def conv1d_targets(model):
    return [n for n, m in model.named_modules() if type(m).__name__ == "Conv1D"]


def found_mask(model, unit="weight", seed=3, shift=0.0):
    """A MaskedModel over every Conv1D with random logits N(-shift, 1) and its hard masks (shift 0: about half kept,
    shift 1: about 16%)."""
    masked = MaskedModel(model, MaskConfig(layers=("Conv1D",), unit=unit))
    randomize(masked, seed=seed)
    with torch.no_grad():
        for logits in masked.logits:
            logits.sub_(shift)
    return masked, masked.hard_masks()


def output_under(model, weights, x):
    with weights_replaced(model, weights), torch.no_grad():
        return model(x).logits


@pytest.mark.parametrize("unit", ["weight", "neuron"])
def test_deterministic_modes_match_neurosurgeon(unit):
    """subnetwork, zero_ablate and full_model give NeuroSurgeon's outputs for none, zero_ablate and use_masks(False)."""
    model = tiny_gpt2(seed=11)
    circuit = neurosurgeon_circuit(copy.deepcopy(model), conv1d_targets(model), unit)
    masked, masks = found_mask(model, unit)
    with torch.no_grad():
        for name, logits in zip(masked.names, masked.logits):
            circuit.wrapped_model.get_submodule(name.rsplit(".", 1)[0]).weight_mask_params.copy_(logits)
    circuit.train(False)
    units = unit_masks(model, masks, unit)
    x = torch.randint(0, 40, (3, 4), generator=torch.Generator().manual_seed(0))
    for ours, theirs in (("subnetwork", "none"), ("zero_ablate", "zero_ablate")):
        circuit.set_ablate_mode(theirs)
        expected = circuit(input_ids=x).logits
        torch.testing.assert_close(output_under(model, ablated_weights(ours, model, masks, units), x), expected,
                                   rtol=0, atol=1e-6)
    circuit.use_masks(False)
    torch.testing.assert_close(output_under(model, ablated_weights("full_model", model, masks, units), x),
                               circuit(input_ids=x).logits, rtol=0, atol=1e-6)


@pytest.mark.parametrize("unit", ["weight", "neuron"])
def test_sampled_modes_remove_as_many_units_as_neurosurgeon(unit):
    """Per layer, randomly_sampled and complement_sampled zero exactly k units (k = the subnetwork's), the latter
    outside the subnetwork only, as NeuroSurgeon's sampled masks do; neuron masks remove whole units."""
    model = tiny_gpt2(seed=12)
    circuit = neurosurgeon_circuit(copy.deepcopy(model), conv1d_targets(model), unit, init=-1.0)
    masked, masks = found_mask(model, unit, seed=4, shift=1.0)  # the complement is larger everywhere
    with torch.no_grad():
        for name, logits in zip(masked.names, masked.logits):
            circuit.wrapped_model.get_submodule(name.rsplit(".", 1)[0]).weight_mask_params.copy_(logits)
    circuit.train(False)
    units = unit_masks(model, masks, unit)
    params = dict(model.named_parameters())
    for mode in ("randomly_sampled", "complement_sampled"):
        circuit.set_ablate_mode(mode)
        weights = ablated_weights(mode, model, masks, units, seed=5)
        for name, weight in weights.items():
            removed = (weight == 0) & (params[name] != 0)
            layer = circuit.wrapped_model.get_submodule(name.rsplit(".", 1)[0])
            theirs = layer._compute_mask("weight_mask_params") == 0  # NeuroSurgeon's sampled removal
            assert int(removed.sum()) == int(theirs.sum()) == int(masks[name].sum())
            if mode == "complement_sampled":
                assert not (removed & masks[name]).any()
            if unit == "neuron":  # whole output units (Conv1D: columns)
                assert torch.equal(removed.any(0, keepdim=True).expand_as(removed), removed)


def test_random_ablate_replaces_only_the_subnetwork_with_the_layer_types_initialisation():
    model = tiny_gpt2(seed=13)
    _, masks = found_mask(model)
    units = unit_masks(model, masks, "weight")
    params = dict(model.named_parameters())
    weights = ablated_weights("random_ablate", model, masks, units, seed=1)
    for name, weight in weights.items():
        outside = ~masks[name]
        assert torch.equal(weight[outside], params[name][outside])
        assert not torch.equal(weight[masks[name]], params[name][masks[name]])
    big = nn.Sequential(nn.Linear(400, 300), nn.Conv2d(8, 16, 3))
    g = torch.Generator().manual_seed(0)
    values = fresh_values(big, "0.weight", g)  # Linear: kaiming_uniform_(a=sqrt(5)), i.e. U(+-1/sqrt(fan_in))
    bound = 1 / math.sqrt(400)
    assert values.abs().max() <= bound and values.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.02)
    assert fresh_values(big, "1.weight", g).abs().max() <= 1 / math.sqrt(8 * 9)
    gpt = fresh_values(model, conv1d_targets(model)[0] + ".weight", g)  # Conv1D: N(0, 0.02), as NeuroSurgeon
    assert gpt.std().item() == pytest.approx(0.02, rel=0.1)


def test_draws_replay_with_their_seed_and_weights_come_back():
    model = tiny_gpt2(seed=14)
    _, masks = found_mask(model, seed=6, shift=1.0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randint(0, 40, (8, 4), generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 40, (8, 4), generator=torch.Generator().manual_seed(2))

    def score(m):
        return {"data_acc": float((m(x).logits.argmax(-1) == y).float().mean()),
                "data_out": float(m(x).logits.sum())}

    first = run_ablations(model, masks, score, draws=3, seed=7)
    again = run_ablations(model, masks, score, draws=3, seed=7)
    other = run_ablations(model, masks, score, draws=3, seed=8)
    assert first.rows == again.rows and first.rows != other.rows
    drawn = [row["data_out"] for row in first.rows if row["mode"] == "randomly_sampled"]
    assert len(drawn) == 3 and len(set(drawn)) == 3  # three different draws
    assert first.summary()["randomly_sampled"]["data_out"]["values"] == drawn
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key

    def broken(m):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        run_ablations(model, masks, broken, modes=["zero_ablate"])
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def toy_task():
    """A linear classifier whose two weights w[0, 0] and w[1, 1] solve the task (inputs one-hot on 0 or 1) against
    the weaker cross weights w[0, 1] and w[1, 0]: without either circuit weight, half the inputs go wrong."""
    model = nn.Linear(10, 2, bias=False)
    with torch.no_grad():
        model.weight.fill_(0.01)  # weights 2-9 see no input
        model.weight[0, 0] = model.weight[1, 1] = 5.0
        model.weight[0, 1] = model.weight[1, 0] = 1.0
    x = torch.zeros(20, 10)
    y = torch.arange(20) % 2
    x[torch.arange(20), y] = 1.0
    mask = {"weight": torch.zeros(2, 10, dtype=torch.bool)}
    mask["weight"][0, 0] = mask["weight"][1, 1] = True
    return model, mask, [(x[:10], y[:10]), (x[10:], y[10:])]


def test_ablate_subnetwork_removing_the_circuit_destroys_the_task_a_random_removal_does_not():
    model, mask, loader = toy_task()
    result = instill.ablate_subnetwork(model, mask, {"subtask": loader}, draws=20, seed=0)
    summary = result.summary()
    assert summary["full_model"]["subtask_acc"]["mean"] == 1.0
    assert summary["subnetwork"]["subtask_acc"]["mean"] == 1.0
    assert summary["zero_ablate"]["subtask_acc"]["mean"] == 0.0  # only the cross weights are left
    assert summary["random_ablate"]["subtask_acc"]["mean"] < 1.0  # values of U(+-1/sqrt(10)) lose to the cross
    assert summary["complement_sampled"]["subtask_acc"]["values"] == [1.0] * 20
    # 2 of 20 weights removed at random: each circuit weight hit costs half the inputs; most draws hit neither
    random_values = summary["randomly_sampled"]["subtask_acc"]["values"]
    assert len(random_values) == 20 and set(random_values) <= {0.0, 0.5, 1.0}
    assert sum(v == 1.0 for v in random_values) > 10 and summary["randomly_sampled"]["subtask_acc"]["std"] > 0
    assert [row["mode"] for row in result.rows[:3]] == ["full_model", "subnetwork", "zero_ablate"]


def test_ablate_subnetwork_takes_a_masked_model_or_a_mask_directory(tmp_path):
    model = tiny_gpt2(seed=15)
    masked, masks = found_mask(model, unit="neuron", seed=8, shift=1.0)
    masked.save(tmp_path / "mask")
    loader = [(torch.randint(0, 40, (4, 4), generator=torch.Generator().manual_seed(3)),) * 2]
    kwargs = dict(modes=["zero_ablate", "randomly_sampled"], draws=2)
    from_model = instill.ablate_subnetwork(model, masked, loader, **kwargs)
    from_dir = instill.ablate_subnetwork(model, tmp_path / "mask", loader, **kwargs)
    from_dict = instill.ablate_subnetwork(model, masks, loader, unit="neuron", **kwargs)
    assert from_model.rows == from_dir.rows == from_dict.rows
    with pytest.raises(UserError, match="differs from the mask's own"):
        instill.ablate_subnetwork(model, masked, loader, unit="weight")
    with pytest.raises(UserError, match="mix"):  # neuron unit claimed for a weight mask
        instill.ablate_subnetwork(model, found_mask(model, seed=9)[1], loader, unit="neuron", **kwargs)


@pytest.mark.parametrize("call, message", [
    (lambda m, k, d: instill.ablate_subnetwork(m, k, d, modes=["zero_ablation"]), "did you mean 'zero_ablate'"),
    (lambda m, k, d: instill.ablate_subnetwork(m, k, d, draws=0), "draws must be an integer >= 1"),
    (lambda m, k, d: instill.ablate_subnetwork(m, k, []), "gave no target to score"),
    (lambda m, k, d: instill.ablate_subnetwork(m, {"weight": k["weight"].float()}, d), "must be bool"),
    (lambda m, k, d: instill.ablate_subnetwork(m, {"weight": torch.ones(2, 10, dtype=torch.bool)}, d,
                                               modes=["complement_sampled"]), "more than half"),
    (lambda m, k, d: instill.ablate_subnetwork(m, "no/such/mask", d), "not found"),
])
def test_ablate_subnetwork_bad_input_is_one_user_error(call, message):
    model, mask, loader = toy_task()
    with pytest.raises(UserError, match=message):
        call(model, mask, loader)


def test_random_ablate_of_an_unknown_layer_type_stops_before_scoring():
    class Scale(nn.Module):
        def __init__(self):
            super().__init__()
            self.gain = nn.Parameter(torch.ones(3))

        def forward(self, x):
            return x * self.gain

    model = nn.Sequential(Scale())
    calls = []
    with pytest.raises(UserError, match="no default initialisation is known for 0.gain"):
        run_ablations(model, {"0.gain": torch.tensor([True, False, False])}, lambda m: calls.append(1) or {})
    assert not calls
