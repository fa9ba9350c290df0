"""Guidance: layer maps (the original's overwriting stretch, every pair kept) and the alignment loss: token-wise
variants against direct computations, hooks of shared layers, the end of guidance, and the fast-path switch."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from instill.data.sequences import real_positions
from instill.errors import UserError
from instill.guidance.loss import AlignmentLoss, LayerPair, compared_rows, stretch_map
from instill.compare.similarity import DegenerateActivations, cka


def names(prefix: str, n: int) -> list[str]:
    return [f"{prefix}{i}" for i in range(n)]


def test_repo_map_reproduces_the_originals_surviving_terms():
    # ResNet-18 (20 convs + avgpool) -> Wide FCN (3 linears): only 3 of 21 terms survive the dict overwrite.
    pairs = stretch_map(names("lin", 3), names("g", 21), "repo")
    assert [(p.target, p.guide) for p in pairs] == [("lin0", "g5"), ("lin1", "g14"), ("lin2", "g20")]
    # Transformer (32 captured layers) -> 4-layer RNN on copy-paste: 4 terms, guides 5, 15, 25, 31.
    pairs = stretch_map(names("rnn", 4), names("g", 32), "repo")
    assert [p.guide for p in pairs] == ["g5", "g15", "g25", "g31"]


def test_uniform_map_keeps_every_pair():
    pairs = stretch_map(names("lin", 3), names("g", 21), "uniform")
    assert len(pairs) == 21 and pairs[0] == LayerPair("lin0", "g0") and pairs[-1] == LayerPair("lin2", "g20")
    assert stretch_map(names("t", 5), ["only"], "uniform") == [LayerPair("t0", "only")]
    assert stretch_map([], ["g"], "repo") == []


# ----------------------------------------------------------------------------------------------------- alignment

class TokenModel(nn.Module):
    """(batch, time) ids -> (batch, time, d) features: ``embed`` then ``mix`` (tanh), one feature map per token."""

    def __init__(self, d: int, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(8, d)
        self.mix = nn.Linear(d, d)

    def forward(self, x):
        return torch.tanh(self.mix(self.embed(x)))


def padded_tokens(lengths: list[int], length: int = 6, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(1, 8, (len(lengths), length), generator=g)
    return x.masked_fill(torch.arange(length) >= torch.tensor(lengths)[:, None], 0)


def tokenwise_alignment(tokenwise, similarity="cka", **options):
    target, guide = TokenModel(5, seed=1), TokenModel(3, seed=2)
    pairs = [LayerPair("mix", "embed")]
    return target, AlignmentLoss(target, guide, pairs, similarity=similarity, tokenwise=tokenwise, **options)


def test_tokenwise_positions_sums_one_minus_cka_per_position_over_real_samples():
    x = padded_tokens([6, 6, 5, 4, 4, 2, 1, 6])  # position 5: three real samples; position 4: four
    y = torch.full_like(x, -100)
    real = real_positions(x, y)
    target, alignment = tokenwise_alignment("positions", similarity="cka_unbiased")
    target(x)
    features = target.mix(target.embed(x))  # what the hook on ``mix`` saw
    loss, logs = alignment(x, real)
    alignment.close()
    with torch.no_grad():
        guide_features = alignment.guide.embed(x)
    kept = [t for t in range(x.shape[1]) if real[:, t].sum() >= 4]  # unbiased CKA needs 4 samples
    assert kept == [0, 1, 2, 3, 4]
    sims = [cka(features[real[:, t], t].double(), guide_features[real[:, t], t].double(), unbiased=True)
            for t in kept]
    assert loss.item() == pytest.approx(sum(1 - s.item() for s in sims), rel=1e-5)
    assert logs["sim/mix~embed"] == pytest.approx(torch.stack(sims).mean().item(), rel=1e-5)
    loss.backward()
    assert target.mix.weight.grad.abs().sum() > 0


def test_tokenwise_rows_is_one_cka_over_the_real_sample_token_rows():
    x = padded_tokens([6, 3, 5, 2, 6])
    real = real_positions(x, torch.full_like(x, -100))
    target, alignment = tokenwise_alignment("rows")
    target(x)
    features = target.mix(target.embed(x))
    loss, _ = alignment(x, real)
    alignment.close()
    with torch.no_grad():
        expected = 1 - cka(features[real].double(), alignment.guide.embed(x)[real].double())
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert real.sum() == 22 and compared_rows((5, 6, 3), "rows") == (5, 6) and compared_rows((5, 3), "rows") == (5,)


def test_closing_an_alignment_restores_the_fast_path_and_removes_every_hook():
    info = {"input_shape": (5,), "vocab_size": 6, "seq_len": 5}
    from instill.registry import MODELS

    target = MODELS.build("transformer", info, {"d_model": 8, "nhead": 2, "num_layers": 2, "dim_feedforward": 8})
    guide = MODELS.build("transformer", info, {"d_model": 8, "nhead": 2, "num_layers": 2, "dim_feedforward": 8})
    before = torch.backends.mha.get_fastpath_enabled()
    alignment = AlignmentLoss(target, guide, [LayerPair("layers.0", "layers.1")])
    assert not torch.backends.mha.get_fastpath_enabled()
    with alignment.paused():  # evaluation: the target's hooks are off, the guide's still need the fast path off
        assert not target.layers[0]._forward_hooks and not torch.backends.mha.get_fastpath_enabled()
    assert target.layers[0]._forward_hooks
    alignment.close()
    assert torch.backends.mha.get_fastpath_enabled() == before
    assert not target.layers[0]._forward_hooks and not guide.layers[1]._forward_hooks


def test_a_tied_guide_summarizes_only_its_paired_applications():
    info = {"input_shape": (5,), "vocab_size": 6, "seq_len": 5}
    from instill.registry import MODELS

    target = MODELS.build("rnn", info, {"embed_dim": 4, "hidden_size": 4})
    guide = MODELS.build("transformer", info, {"d_model": 8, "nhead": 2, "num_layers": 4, "dim_feedforward": 8,
                                               "tied": True})
    alignment = AlignmentLoss(target, guide, [LayerPair("layers.0", "layer@1"), LayerPair("layers.1", "layer@3")])
    summarized = []
    measure = alignment.measure
    alignment.measure = dataclasses.replace(measure, summarize=lambda t: summarized.append(t) or measure.summarize(t))
    x = torch.randint(1, 6, (4, 5))
    target(x)
    _, logs = alignment(x)
    alignment.close()
    assert len(summarized) == 2 and list(logs) == ["sim/layers.0~layer@1", "sim/layers.1~layer@3"]


def test_guidance_steps_close_the_hooks_once_guidance_ends():
    target, alignment = tokenwise_alignment(None, steps=2)
    assert alignment.active(0) and alignment.active(1)
    assert target.mix._forward_hooks
    assert not alignment.active(2) and not alignment.active(1)  # over for good
    assert not target.mix._forward_hooks and not alignment.guide.embed._forward_hooks
    target(padded_tokens([3, 3]))
    assert alignment.target_capture.pop() == {}
    with alignment.paused():  # evaluation does not reopen them
        pass
    assert not target.mix._forward_hooks


# ----------------------------------------------------------------------------------------------------- user loops

def mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3))


def test_an_evaluation_forward_between_training_steps_leaves_no_stale_capture():
    # A user's loop evaluates under no_grad, then trains: the alignment term must come from the training forward.
    target, guide = mlp(0), mlp(1)
    alignment = AlignmentLoss(target, guide, [LayerPair("2", "2")])
    x = torch.randn(16, 6)
    with torch.no_grad():
        target(torch.randn(32, 6))  # evaluation on another batch size
    target(x)
    loss, _ = alignment(x)
    assert loss.requires_grad
    loss.backward()
    assert target[2].weight.grad is not None and target[2].weight.grad.abs().sum() > 0
    expected = 1 - cka(target[2](target[1](target[0](x))), guide[2](guide[1](guide[0](x))))
    assert torch.allclose(loss.detach(), expected.detach(), atol=1e-6)
    alignment.close()


def test_an_alignment_loss_after_a_no_grad_forward_raises_instead_of_training_nothing():
    target, guide = mlp(0), mlp(1)
    alignment = AlignmentLoss(target, guide, [LayerPair("2", "2")])
    x = torch.randn(16, 6)
    target(x)
    with torch.no_grad():
        target(x)  # the last forward before the loss carries no gradient
    with pytest.raises(UserError, match="without gradients"):
        alignment(x)
    with pytest.raises(UserError, match="no capture"):
        alignment(x)  # and no forward at all since the last call
    with torch.no_grad():  # a loss evaluated under no_grad on purpose (a check, a validation figure) is fine
        target(x)
        assert not alignment(x)[0].requires_grad
    alignment.close()
    assert not target._forward_pre_hooks
def guided_training(make_models, batches, guide_first: bool, **options) -> tuple[list, list, dict]:
    """A few AdamW steps of task loss + alignment; the guide run after the target's forward (``align(x, real)``,
    the order before ``run_guide`` existed) or before it (``run_guide(x, real)``, then ``align()``)."""
    target, guide = make_models()
    alignment = AlignmentLoss(target, guide, **options)
    optimizer = torch.optim.AdamW(target.parameters(), lr=0.05)
    losses, logs = [], []
    for x, real in batches:
        if guide_first:
            alignment.run_guide(x, real)
        task = target(x).square().mean()
        align, sims = alignment() if guide_first else alignment(x, real)
        optimizer.zero_grad()
        (task + align).backward()
        optimizer.step()
        losses.append(align.detach())
        logs.append(sims)
    alignment.close()
    return losses, logs, target.state_dict()


@pytest.mark.parametrize("case", ["mlp", "tokenwise"])
def test_running_the_guide_before_the_targets_forward_trains_the_same_weights_bit_for_bit(case):
    if case == "mlp":
        make = lambda: (mlp(0), mlp(1))  # noqa: E731
        batches = [(torch.randn(16, 6, generator=torch.Generator().manual_seed(i)), None) for i in range(4)]
        options = {"pairs": [LayerPair("0", "2"), LayerPair("2", "0", 0.5)]}
    else:  # token-wise with padding: the real rows are indexed in run_guide and used by both sides
        make = lambda: (TokenModel(5, seed=1), TokenModel(3, seed=2))  # noqa: E731
        batches = []
        for i in range(4):
            x = padded_tokens([6, 6, 5, 4, 4, 2, 1, 6, 6, 5, 6, 3], seed=i)
            batches.append((x, real_positions(x, torch.full_like(x, -100))))
        options = {"pairs": [LayerPair("mix", "embed")], "tokenwise": "positions"}
    after_losses, after_logs, after_weights = guided_training(make, batches, guide_first=False, **options)
    first_losses, first_logs, first_weights = guided_training(make, batches, guide_first=True, **options)
    assert all(torch.equal(a, b) for a, b in zip(after_losses, first_losses))
    assert after_logs == first_logs
    assert after_weights.keys() == first_weights.keys()
    assert all(torch.equal(after_weights[k], first_weights[k]) for k in after_weights)
    assert not torch.equal(after_weights["mix.weight" if case == "tokenwise" else "0.weight"],
                           make()[0].state_dict()["mix.weight" if case == "tokenwise" else "0.weight"])  # it trained


def test_the_guide_run_ahead_serves_one_call_and_misuse_is_one_clear_error():
    target, guide = mlp(0), mlp(1)
    alignment = AlignmentLoss(target, guide, [LayerPair("2", "2")])
    x = torch.randn(16, 6)
    target(x)
    with pytest.raises(UserError, match="no guide input"):
        alignment()
    alignment.run_guide(x)
    target(x)
    loss, _ = alignment()
    target(x)
    with pytest.raises(UserError, match="no guide input"):
        alignment()  # this step's guide summaries were used by the call before
    alignment.run_guide(x)
    target(x)
    with pytest.raises(UserError, match="real positions go to run_guide"):
        alignment(None, torch.ones(16, 1, dtype=torch.bool))
    alignment.run_guide(torch.randn(16, 6))  # a guide input given to the call wins over the one run ahead
    target(x)
    assert torch.equal(alignment(x)[0], loss)
    with torch.no_grad():
        alignment.guide[0].weight.fill_(float("nan"))
    alignment.run_guide(x)  # non-finite guide activations: the NaN term the training loop's guard stops on
    target(x)
    bad, logs = alignment()
    assert bad.isnan() and all(value != value for value in logs.values())
    alignment.close()


# ----------------------------------------------------------------------------------------------------- bad layers

class Branched(nn.Module):
    """A classifier with a side branch ``aux`` that the alignment watches and the logits do not use."""

    def __init__(self, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.hidden, self.aux, self.out = nn.Linear(4, 8), nn.Linear(8, 6), nn.Linear(8, 2)

    def forward(self, x):
        h = torch.tanh(self.hidden(x))
        self.aux(h)
        return self.out(h)


def branched_alignment():
    target, guide = Branched(0), Branched(1)
    return target, AlignmentLoss(target, guide, [LayerPair("aux", "hidden")])


def test_a_constant_layer_in_guidance_is_an_error_naming_the_layer():
    x = torch.randn(16, 4)
    target, alignment = branched_alignment()
    with torch.no_grad():
        target.aux.weight.zero_()  # a dead layer: its output is its bias for every sample
    target(x)
    with pytest.raises(DegenerateActivations, match=r"target layer 'aux' \(paired with guide layer 'hidden'\): "
                                                     r"similarity: x is constant over the 16 samples"):
        alignment(x)
    with torch.no_grad():
        target.aux.weight.normal_()
        alignment.guide.hidden.weight.zero_()
    target(x)
    with pytest.raises(DegenerateActivations, match="guide layer 'hidden': similarity: y is constant"):
        alignment(x)
    alignment.close()


def test_non_finite_activations_in_guidance_stop_training_with_the_nan_guard(tmp_path):
    from instill.data import Split
    from instill.run import Run
    from instill.train import DivergedError, Objective, TrainConfig, classification_loss, fit

    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, generator=g)
    data = Split(x, (x[:, 0] > 0).long())
    target, alignment = branched_alignment()
    calls = {"n": 0}

    def loss(model, batch):
        calls["n"] += 1
        if calls["n"] == 6:  # the watched branch breaks; the logits stay finite
            with torch.no_grad():
                target.aux.weight.fill_(float("nan"))
        inputs, labels = batch
        task = classification_loss(model(inputs), labels)
        assert torch.isfinite(task)
        align, logs = alignment(inputs)
        return task + align, logs

    (tmp_path / "r").mkdir()
    objective = Objective(loss, lambda m: {"val_acc": 0.0})
    with pytest.raises(DivergedError, match=r"the loss became nan at step 6 \(epoch 2\)"):
        fit(target, objective, data, TrainConfig(epochs=3, batch_size=16, select_metric="val_acc"), Run(tmp_path / "r"),
            seed=0, device=torch.device("cpu"))
    alignment.close()
