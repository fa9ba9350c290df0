"""Transplants: what each condition starts from, frozen entries under real optimizers, sampled baselines."""

from __future__ import annotations

import pytest
import torch

from instill.errors import UserError
from instill.subnetworks.transplant import CONDITIONS, FrozenEntries, sample_mask, transplant

MASKED = ("transformer.h.0.attn.c_attn.weight", "transformer.h.0.mlp.c_fc.weight",
          "transformer.h.1.mlp.c_proj.weight")


def gpt2(seed, n_layer=2):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=30, n_positions=4, n_embd=16, n_layer=n_layer, n_head=2,
                                      bos_token_id=None, eos_token_id=None, use_cache=False))


def subnetwork(model, density=0.1, seed=0):
    g = torch.Generator().manual_seed(seed)
    params = dict(model.named_parameters())
    return {name: torch.rand(params[name].shape, generator=g) < density for name in MASKED}


def params_of(model):
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def train(model, after_step, optimizer, steps=4):
    x = torch.randint(0, 30, (6, 4), generator=torch.Generator().manual_seed(1))
    model.train()
    for _ in range(steps):
        optimizer.zero_grad()
        model(x, labels=x).loss.backward()
        optimizer.step()
        after_step()


@pytest.mark.parametrize("non_masked", ["inherit", "reinit"])
def test_subnet_starts_from_trained_entries_and_fresh_rest(non_masked):
    base, fresh = gpt2(0), gpt2(1)
    mask = subnetwork(base)
    base_p, fresh_p = params_of(base), params_of(fresh)
    moved = transplant("subnet", base, fresh, mask, non_masked=non_masked)
    assert moved.model is fresh
    for name, value in fresh.named_parameters():
        if name in mask:
            assert torch.equal(value[mask[name]], base_p[name][mask[name]])
            assert torch.equal(value[~mask[name]], fresh_p[name][~mask[name]])
        else:  # embeddings, norms, biases, unmasked weights
            assert torch.equal(value, base_p[name] if non_masked == "inherit" else fresh_p[name]), name
    assert moved.info["frozen_entries"] == sum(int(m.sum()) for m in mask.values())


def test_full_mask_reproduces_base_and_empty_mask_keeps_fresh_weights():
    base, x = gpt2(0), torch.randint(0, 30, (3, 4))
    full = {name: torch.ones_like(m) for name, m in subnetwork(base).items()}
    everything = {name: torch.ones_like(p, dtype=torch.bool) for name, p in base.named_parameters()}
    moved = transplant("subnet", base, gpt2(1), everything)
    base.eval(), moved.model.eval()
    torch.testing.assert_close(moved.model(x).logits, base(x).logits, rtol=0, atol=0)
    assert not any(p.requires_grad for p in moved.model.parameters())  # frozen whole: no hooks needed
    empty = {name: torch.zeros_like(m) for name, m in full.items()}
    fresh_p = params_of(gpt2(1))
    moved = transplant("subnet", base, gpt2(1), empty, non_masked="reinit")
    assert all(torch.equal(p, fresh_p[n]) for n, p in moved.model.named_parameters())


def test_full_model_and_random_init():
    base = gpt2(0)
    base_p, fresh_p = params_of(base), params_of(gpt2(1))
    full = transplant("full_model", base, gpt2(1), subnetwork(base))
    assert all(torch.equal(p, base_p[n]) for n, p in full.model.named_parameters())
    fresh = transplant("random_init", base, gpt2(1), subnetwork(base))
    assert all(torch.equal(p, fresh_p[n]) for n, p in fresh.model.named_parameters())
    assert full.frozen is None and fresh.frozen is None


@pytest.mark.parametrize("zero_grads", [False, True])
@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_frozen_entries_never_change_under_weight_decay(optimizer, zero_grads):
    base = gpt2(0)
    mask = subnetwork(base, density=0.3)
    moved = transplant("subnet", base, gpt2(1), mask, zero_grads=zero_grads)
    start = params_of(moved.model)
    params = moved.model.parameters()
    opt = (torch.optim.AdamW(params, lr=0.05, weight_decay=0.5) if optimizer == "adamw"
           else torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=0.5))
    train(moved.model, moved.after_step, opt)
    now = dict(moved.model.named_parameters())
    for name, m in mask.items():
        assert torch.equal(now[name][m], start[name][m])  # bit for bit
        assert not torch.equal(now[name][~m], start[name][~m])  # the rest trains
    x = torch.randint(0, 30, (6, 4))
    moved.model.zero_grad()
    moved.model(x, labels=x).loss.backward()
    for name, m in mask.items():  # with zero_grads the optimizer never sees a gradient there
        assert bool((now[name].grad[m] == 0).all()) == zero_grads


def test_zero_grads_trains_exactly_like_the_original_two_tensor_layers():
    """The original: W_eff = W_sub * M + W * (1 - M), W_sub a frozen copy, W trainable, AdamW, clipping here."""
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))
    fresh = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))
    g = torch.Generator().manual_seed(1)
    mask = {name: torch.rand(p.shape, generator=g) < 0.4 for name, p in base.named_parameters()
            if name.endswith("weight")}
    x, y = torch.randn(16, 5, generator=g), torch.randint(0, 3, (16,), generator=g)
    ours = transplant("subnet", base, fresh, mask, zero_grads=True)
    # the original's layers, built from the same start
    subnet = {name: dict(base.named_parameters())[name].detach().clone() for name in mask}
    free = {name: p.detach().clone().requires_grad_(True) for name, p in ours.model.named_parameters()}

    def original_forward(inputs):
        weights = {name: subnet[name] * mask[name] + free[name] * ~mask[name] if name in mask else free[name]
                   for name in free}
        return torch.func.functional_call(ours.model, weights, (inputs,))

    for model_params, forward, after in ((list(ours.model.parameters()), ours.model, ours.after_step),
                                         (list(free.values()), original_forward, lambda: None)):
        opt = torch.optim.AdamW(model_params, lr=0.05, weight_decay=0.1)
        for _ in range(5):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(forward(x), y).backward()
            torch.nn.utils.clip_grad_norm_(model_params, 0.05)
            opt.step()
            after()
    for name, p in ours.model.named_parameters():
        expected = free[name] if name not in mask else torch.where(mask[name], subnet[name], free[name])
        torch.testing.assert_close(p, expected, rtol=0, atol=1e-6)


def test_frozen_entries_survive_moving_the_model_after_transplant():
    base = gpt2(0)
    mask = subnetwork(base, density=0.3)
    moved = transplant("subnet", base, gpt2(1), mask)
    moved.model.double()  # new storage for every parameter, as .to(device) gives
    start = params_of(moved.model)
    train(moved.model, moved.after_step, torch.optim.AdamW(moved.model.parameters(), lr=0.05, weight_decay=0.5))
    now = dict(moved.model.named_parameters())
    for name, m in mask.items():
        assert torch.equal(now[name][m], start[name][m])


def reference_training(base, fresh, mask, make_optimizer, zero_grads, clip, steps=5):
    """The implementation before bit masks: frozen values saved, written back after every step (bench/masks.py's
    figures of 1.23 / 1.71x parameter memory were its price); gradients zeroed by a hook with ``zero_grads``."""
    model = transplant("subnet_trainable", base, fresh, mask).model  # the same start, nothing frozen
    params = dict(model.named_parameters())
    saved = {name: params[name].detach()[m].clone() for name, m in mask.items()}
    def zero_frozen_grad(param, m):
        param.grad.masked_fill_(m, 0)

    if zero_grads:
        for name, m in mask.items():
            params[name].register_post_accumulate_grad_hook(lambda p, m=m: zero_frozen_grad(p, m))
    return fit_steps(model, make_optimizer, clip, steps, after=lambda: [params[n].detach().masked_scatter_(m, saved[n])
                                                                        for n, m in mask.items()])


def fit_steps(model, make_optimizer, clip, steps, after=lambda: None):
    optimizer = make_optimizer(model.parameters())
    x = torch.randint(0, 30, (6, 4), generator=torch.Generator().manual_seed(1))
    model.train()
    for _ in range(steps):
        optimizer.zero_grad()
        model(x, labels=x).loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        after()
    return model, optimizer


OPTIMIZERS = {
    "adamw": lambda p: torch.optim.AdamW(p, lr=0.05, weight_decay=0.5),
    "adamw_fused": lambda p: torch.optim.AdamW(p, lr=0.05, weight_decay=0.5, fused=True),
    "adamw_single": lambda p: torch.optim.AdamW(p, lr=0.05, weight_decay=0.5, foreach=False),
    "adam_l2_amsgrad": lambda p: torch.optim.Adam(p, lr=0.05, weight_decay=0.3, amsgrad=True),
    "sgd_nesterov_maximize": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.5,
                                                       maximize=True),
    "rmsprop_centered": lambda p: torch.optim.RMSprop(p, lr=0.01, momentum=0.5, centered=True, weight_decay=0.2),
    "nadam_decoupled": lambda p: torch.optim.NAdam(p, lr=0.05, weight_decay=0.5, decoupled_weight_decay=True),
}


@pytest.mark.parametrize("zero_grads, clip", [(False, None), (True, 0.05), (False, 0.05)])
@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
def test_bit_masks_train_bit_for_bit_like_writing_saved_values_back(optimizer, zero_grads, clip):
    """Against the previous implementation on fixed seeds: every parameter equal bit for bit after 5 steps (weight
    decay, momentum, moments, maximize, clipping with and without the frozen entries' gradients in the norm)."""
    base = gpt2(0)
    mask = subnetwork(base, density=0.3)
    expected, _ = reference_training(base, gpt2(1), mask, OPTIMIZERS[optimizer], zero_grads, clip)
    moved = transplant("subnet", base, gpt2(1), mask, zero_grads=zero_grads)
    start = params_of(moved.model)
    model, opt = fit_steps(moved.model, OPTIMIZERS[optimizer], clip, 5)
    got, want = dict(model.named_parameters()), dict(expected.named_parameters())
    for name in got:
        assert torch.equal(got[name], want[name]), name
    for name, m in mask.items():
        assert torch.equal(got[name][m], start[name][m]) and not torch.equal(got[name][~m], start[name][~m])
    assert {g.get("weight_decay") for g in opt.param_groups} == {opt.defaults["weight_decay"]}  # given back


FAST_DECAY = {  # squares that decay below 1e-30 within 50 steps: the refill of frozen entries' squares is exercised
    "adam_amsgrad": lambda p: torch.optim.Adam(p, lr=0.01, betas=(0.9, 0.25), amsgrad=True),
    "adamw": lambda p: torch.optim.AdamW(p, lr=0.01, betas=(0.9, 0.25), weight_decay=0.5),
    "rmsprop": lambda p: torch.optim.RMSprop(p, lr=0.001, alpha=0.25),
    "adagrad": lambda p: torch.optim.Adagrad(p, lr=0.01),
}


@pytest.mark.parametrize("optimizer", sorted(FAST_DECAY))
def test_frozen_squares_kept_positive_change_no_trained_bit(optimizer):
    """The square-rooted state at frozen entries is set to 1 (torch's CPU square root of zero is ten times slower)
    and refilled when a look (every 16 steps) finds it below 1e-20: over 50 steps every parameter stays bit for bit
    what the write-back implementation gives, and no frozen square is ever zero or subnormal."""
    from instill.subnetworks.transplant import LOWEST_FROZEN_SQUARE, SQUARE_ROOTED_STATE, SQUARES_CHECKED_EVERY

    base = gpt2(0)
    mask = subnetwork(base, density=0.3)
    expected, _ = reference_training(base, gpt2(1), mask, FAST_DECAY[optimizer], False, None, steps=50)
    moved = transplant("subnet", base, gpt2(1), mask)
    made, lowest = [], []
    params = dict(moved.model.named_parameters())

    def record_lowest_frozen_square():
        state = made[0].state
        lowest.extend(state[params[name]][key][m].min().item() for name, m in mask.items()
                      for key in SQUARE_ROOTED_STATE if key in state[params[name]])

    model, _ = fit_steps(moved.model, lambda p: made.append(FAST_DECAY[optimizer](p)) or made[0], None, 50,
                         after=record_lowest_frozen_square)
    got, want = dict(model.named_parameters()), dict(expected.named_parameters())
    for name in got:
        assert torch.equal(got[name], want[name]), name
    # at most 16 steps of decay by 0.25 below the 1e-20 of a look; without the refill Adam's would reach 0.25^50 = 8e-31
    assert lowest and min(lowest) >= LOWEST_FROZEN_SQUARE * 0.25 ** SQUARES_CHECKED_EVERY


def test_resumed_state_with_momentum_at_frozen_entries_cannot_move_them():
    base = gpt2(0)
    mask = subnetwork(base, density=0.3)
    _, trained = fit_steps(transplant("subnet_trainable", base, gpt2(1), mask).model, OPTIMIZERS["adamw"], None, 2)
    moved = transplant("subnet", base, gpt2(1), mask)
    start = params_of(moved.model)
    optimizer = torch.optim.AdamW(moved.model.parameters(), lr=0.05, weight_decay=0.5)
    optimizer.load_state_dict(trained.state_dict())  # moments everywhere, the frozen entries' included
    fit_steps(moved.model, lambda _: optimizer, None, 2)
    for name, p in moved.model.named_parameters():
        if name in mask:
            assert torch.equal(p[mask[name]], start[name][mask[name]])


def test_optimizers_that_could_move_frozen_entries_are_refused():
    base = gpt2(0)
    moved = transplant("subnet", base, gpt2(1), subnetwork(base))
    start = params_of(moved.model)
    with pytest.raises(UserError, match="ASGD cannot train a model with frozen entries"):
        fit_steps(moved.model, lambda p: torch.optim.ASGD(p, lr=0.05), None, 1)
    assert all(torch.equal(p, start[n]) for n, p in moved.model.named_parameters())  # refused before any change
    fit_steps(gpt2(2), lambda p: torch.optim.ASGD(p, lr=0.05), None, 1)  # models without frozen entries: fine


def test_subnet_trainable_moves_its_entries():
    base = gpt2(0)
    mask = subnetwork(base)
    moved = transplant("subnet_trainable", base, gpt2(1), mask)
    start = params_of(moved.model)
    train(moved.model, moved.after_step, torch.optim.AdamW(moved.model.parameters(), lr=0.05))
    name = MASKED[1]
    assert moved.frozen is None
    assert not torch.equal(dict(moved.model.named_parameters())[name][mask[name]], start[name][mask[name]])


def test_sampled_baselines_keep_the_right_number_of_entries():
    base = gpt2(0)
    mask = subnetwork(base, density=0.2)
    for condition in ("sampled_subnet", "sampled_complement"):
        moved = transplant(condition, base, gpt2(1), mask, seed=3)
        again = transplant(condition, base, gpt2(1), mask, seed=3)
        other = transplant(condition, base, gpt2(1), mask, seed=4)
        for name, m in mask.items():
            kept = moved.kept[name]
            assert int(kept.sum()) == int(m.sum())  # exactly k per layer
            assert not torch.equal(kept, m) and torch.equal(kept, again.kept[name])
            assert not torch.equal(kept, other.kept[name])
            if condition == "sampled_complement":
                assert not bool((kept & m).any())
        assert moved.frozen is not None and moved.frozen.count == sum(int(m.sum()) for m in mask.values())
    assert transplant("sampled_subnet", base, gpt2(1), mask, freeze=False).frozen is None


def test_neuron_masks_are_sampled_in_whole_units():
    from instill.subnetworks.masks import unit_masks

    base = gpt2(0)
    generator = torch.Generator().manual_seed(5)
    params = dict(base.named_parameters())
    # HF Conv1D weights are (in, out): a neuron (output unit) is a column
    mask = {name: (torch.rand(params[name].shape[1], generator=generator) < 0.3).expand(params[name].shape).clone()
            for name in MASKED}
    units = unit_masks(base, mask, "neuron")
    for condition in ("sampled_subnet", "sampled_complement"):
        moved = transplant(condition, base, gpt2(1), mask, seed=3, unit="neuron")
        drawn = unit_masks(base, moved.kept, "neuron")  # raises unless every unit is kept or dropped whole
        for name in MASKED:
            assert int(drawn[name].sum()) == int(units[name].sum())  # as many units as the subnetwork keeps
            assert int(moved.kept[name].sum()) == int(mask[name].sum())
            if condition == "sampled_complement":
                assert not bool((drawn[name] & units[name]).any())
    by_weight = transplant("sampled_subnet", base, gpt2(1), mask, seed=3).kept  # the default draws single weights
    with pytest.raises(UserError, match="mix"):
        unit_masks(base, by_weight, "neuron")


def test_legacy_sampling_reproduces_the_inverted_masks():
    base = gpt2(0)
    mask = subnetwork(base, density=0.2)
    sampled = transplant("sampled_subnet", base, gpt2(1), mask, legacy_sampling=True, seed=3)
    complement = transplant("sampled_complement", base, gpt2(1), mask, legacy_sampling=True, seed=3)
    for name, m in mask.items():
        n, k = m.numel(), int(m.sum())
        assert int(sampled.kept[name].sum()) == n - k  # N - k random entries, not k
        kept = complement.kept[name]
        assert int(kept.sum()) == n - k and bool(kept[m].all())  # the subnetwork plus N - 2k others


def test_sample_mask_refuses_complement_of_a_majority_mask():
    dense = torch.rand(10, 10) < 0.8
    with pytest.raises(UserError, match="more than half"):
        sample_mask(dense, "complement", torch.Generator().manual_seed(0))


def test_check_condition_names_every_layer_a_complement_sample_cannot_fit():
    from instill.subnetworks.transplant import check_condition

    bias = torch.zeros(32, dtype=torch.bool)
    bias[:17] = True  # a neuron + bias mask whose bias layer keeps 17 of its 32 entries
    mask = {"fc.weight": torch.zeros(32, 8, dtype=torch.bool), "fc.bias": bias}
    mask["fc.weight"][:17] = True
    for condition in ("subnet", "sampled_subnet", "full_model"):
        check_condition(condition, mask)
    with pytest.raises(UserError) as err:
        check_condition("sampled_complement", mask)
    assert "2: fc.weight (136 of 256), fc.bias (17 of 32)" in str(err.value) and "\n" not in str(err.value)
    mask["fc.bias"][16] = False  # exactly half fits
    with pytest.raises(UserError, match="1: fc.weight"):
        check_condition("sampled_complement", mask)


def test_user_errors_are_one_line():
    base = gpt2(0)
    cases = [
        (lambda: transplant("subnetwork", base, gpt2(1), subnetwork(base)), "did you mean 'subnet'"),
        (lambda: transplant("subnet", base, gpt2(1, n_layer=1), subnetwork(base)), "architecture differs"),
        (lambda: transplant("subnet", base, gpt2(1), {"transformer.h.9.mlp.c_fc.weight": torch.ones(2)}),
         "not parameter(s) of the model"),
        (lambda: transplant("subnet", base, gpt2(1), subnetwork(base), non_masked="keep"), "non_masked 'keep'"),
    ]
    for action, message in cases:
        with pytest.raises(UserError) as err:
            action()
        assert message in str(err.value) and "\n" not in str(err.value)
    assert set(CONDITIONS.names()) == {"subnet", "subnet_trainable", "full_model", "random_init", "sampled_subnet",
                               "sampled_complement"}


def test_no_extra_parameters_and_one_bit_per_entry():
    base = gpt2(0)
    mask = subnetwork(base)
    moved = transplant("subnet", base, gpt2(1), mask)
    assert moved.model.state_dict().keys() == gpt2(1).state_dict().keys()  # nothing added to the model
    params = dict(moved.model.named_parameters())
    assert moved.frozen.extra_bytes() == sum(-(-params[name].numel() // 8) for name in mask)
    frozen = FrozenEntries(gpt2(2), {MASKED[0]: torch.zeros(16, 48, dtype=torch.bool)})
    assert frozen.count == 0 and frozen.extra_bytes() == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("factor", [1 - 0.05 * 0.5, 1 - 3e-4 * 0.01, 0.3])  # 0.3: outside the shortcut's range
def test_decay_factors_multiply_like_torch_mul_by_the_scalar(dtype, factor):
    from instill.subnetworks.transplant import _decay_factors

    param = torch.randn(4096, generator=torch.Generator().manual_seed(0)).to(dtype)
    keep = (torch.rand(4096, generator=torch.Generator().manual_seed(1)) < 0.7).to(torch.uint8)
    got = param.clone().mul_(_decay_factors(keep.to(torch.promote_types(dtype, torch.float32)), factor))
    assert torch.equal(got[keep.bool()], param.clone().mul_(factor)[keep.bool()])
    assert torch.equal(got[~keep.bool()], param[~keep.bool()])


@pytest.mark.parametrize("shape, density", [((1000,), 0.3), ((3, 171), 1.0), ((64, 64), 0.002), ((7, 10_001), 0.9)])
def test_bit_masks_give_back_the_exact_mask(shape, density):
    from instill.subnetworks.transplant import _Bits

    mask = torch.rand(shape, generator=torch.Generator().manual_seed(shape[-1])) < density
    bits = _Bits(mask, zeroed_early=False)
    assert torch.equal(bits.mask(torch.device("cpu")), mask) and bits.count == int(mask.sum())
    assert bits.nbytes() == -(-mask.numel() // 8)


# ----------------------------------------------------------------------------------------------------- batch norm

def conv_bn(seed):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(), torch.nn.Flatten(),
                               torch.nn.Linear(4 * 4 * 4, 3))


def trained_statistics(model):
    """``model`` with running statistics away from the fresh ones, and affine batch-norm parameters as trained."""
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(8, 1, 6, 6) * 3 + 1)
        model[1].weight.add_(0.5)
    return model


@pytest.mark.parametrize("non_masked", ["inherit", "reinit"])
@pytest.mark.parametrize("batch_norm", ["inherit", "reset", "freeze"])
def test_batch_norm_statistics_follow_batch_norm_alone(batch_norm, non_masked):
    base = trained_statistics(conv_bn(0))
    mask = {"0.weight": torch.rand(4, 1, 3, 3, generator=torch.Generator().manual_seed(0)) < 0.5}
    moved = transplant("subnet", base, conv_bn(1), mask, non_masked=non_masked, batch_norm=batch_norm)
    norm, base_norm = moved.model[1], base[1]
    start = norm.running_mean.clone()
    if batch_norm == "reset":
        assert torch.equal(start, torch.zeros(4)) and torch.equal(norm.running_var, torch.ones(4))
    else:  # inherit and freeze copy the base's statistics, whatever happens to the parameters
        assert torch.equal(start, base_norm.running_mean) and torch.equal(norm.running_var, base_norm.running_var)
    assert torch.equal(norm.weight, base_norm.weight) == (non_masked == "inherit")  # affine: non_masked decides
    opt = torch.optim.SGD(moved.model.parameters(), lr=0.1)
    for _ in range(2):
        moved.train_mode(moved.model)
        opt.zero_grad()
        moved.model(torch.randn(8, 1, 6, 6)).sum().backward()
        opt.step()
        moved.after_step()
    assert torch.equal(norm.running_mean, start) == (batch_norm == "freeze")  # frozen: eval mode in training
    assert moved.model.training and norm.training == (batch_norm != "freeze")
    assert not torch.equal(norm.weight, base_norm.weight)  # its affine parameters train in every mode


def test_batch_norm_modes_for_full_model_and_random_init():
    base = trained_statistics(conv_bn(0))
    mask = {"0.weight": torch.ones(4, 1, 3, 3, dtype=torch.bool)}
    full = transplant("full_model", base, conv_bn(1), mask, batch_norm="reset")
    assert torch.equal(full.model[1].running_mean, torch.zeros(4)) and torch.equal(full.model[4].weight, base[4].weight)
    frozen = transplant("full_model", base, conv_bn(1), mask, batch_norm="freeze")
    assert frozen.fixed_norms == [frozen.model[1]]
    fresh = transplant("random_init", base, conv_bn(1), mask, batch_norm="freeze")  # fresh throughout
    assert fresh.fixed_norms == [] and torch.equal(fresh.model[1].running_mean, torch.zeros(4))
    with pytest.raises(UserError, match="batch_norm 'keep' is unknown; use inherit or reset or freeze"):
        transplant("subnet", base, conv_bn(1), mask, batch_norm="keep")
