"""Each learning rule's update against a hand-written reference on small nets, and the alignment scores."""

import math

import pytest
import torch
import torch.nn.functional as F

from instill.align.scores import AlignmentBaseline, conv_score, dense_score, hutchinson_score, shuffled
from instill.errors import UserError
from instill.registry import MODELS
from instill.align import rules
from instill.steps import RuleContext, StepContext, build_rule

INFO = {"input_shape": (1, 3, 3), "num_classes": 4}
ADD_INFO = {"input_shape": (6,), "num_outputs": 6, "regression": True}  # the Add task (add_rnn reads none)


def mse(f, y):
    return (f - (F.one_hot(y, 4).float() - 0.1)).square().mean()


def _mlp(batch_norm=False, width=6):
    torch.manual_seed(0)
    return MODELS.build("ntk_mlp", INFO, {"depth": 2, "width": width, "batch_norm": batch_norm}).double()


def _moved(model):
    """Move the weights away from the initial network, so current and initial quantities differ."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))


def _grads(rule, model, x, y, seed=5):
    loss = lambda m, b: (mse(m(b[0]), b[1]), {})  # noqa: E731 - what the stage's objective would give
    provider = build_rule(rule, RuleContext(model, loss, mse, seed))
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    _moved(model)
    model.zero_grad(set_to_none=True)
    provider.gradients(model, (x, y), StepContext(scale=1.0))
    return provider, initial, {n: (p.grad if p.grad is not None else torch.zeros_like(p))
                               for n, p in model.named_parameters()}


def _forward(params, x):
    """The no-batch-norm MLP by hand: (inputs a_{l-1}, pre-activations z_l, logits)."""
    a, inputs, zs = x.flatten(1), [], []
    for i in range(2):
        w, b = params[f"blocks.{i}.layer.weight"], params[f"blocks.{i}.layer.bias"]
        inputs.append(a)
        z = a @ w.T / math.sqrt(w.shape[1]) + b
        zs.append(z)
        a = torch.relu(z)
    inputs.append(a)
    w, b = params["head.weight"], params["head.bias"]
    return inputs, zs, a @ w.T / math.sqrt(w.shape[1]) + b


def _error(f, y):
    f = f.detach().requires_grad_()
    (e,) = torch.autograd.grad(mse(f, y), f)
    return e


def _layer_grads(inputs, deltas, params):
    """dW_l = s_l δ_lᵀ a_{l-1}, db_l = Σ δ_l for the layers in order blocks.0, blocks.1, head."""
    names = ["blocks.0.layer", "blocks.1.layer", "head"]
    out = {}
    for name, a, d in zip(names, inputs, deltas):
        w = params[f"{name}.weight"]
        out[f"{name}.weight"] = d.T @ a / math.sqrt(w.shape[1])
        out[f"{name}.bias"] = d.sum(0)
    return out


def _backward(e, zs, params_for_feedback, derivative_zs):
    """δ_head = e, δ_l = (δ_{l+1} B_{l+1} s_{l+1}) ⊙ relu'(z_l) with B from ``params_for_feedback``."""
    deltas = [e]
    for i in (1, 0):
        name = "head" if i == 1 else "blocks.1.layer"
        b = params_for_feedback[f"{name}.weight"]
        deltas.insert(0, (deltas[0] @ b / math.sqrt(b.shape[1])) * (derivative_zs[i] > 0))
    return deltas


@pytest.fixture
def batch():
    torch.manual_seed(1)
    return torch.randn(7, 1, 3, 3, dtype=torch.float64), torch.randint(0, 4, (7,))


def test_backprop_align_prop_fa_against_hand_written(batch):
    x, y = batch
    for rule in ("backprop", "align_prop", "fa"):
        model = _mlp()
        provider, initial, got = _grads(rule, model, x, y)
        current = {n: p.detach() for n, p in model.named_parameters()}
        inputs, zs, f = _forward(current, x)
        feedback = {"backprop": current, "align_prop": initial}.get(rule) or {
            f"{n}.weight": m for n, m in provider.matrices.items()}
        want = _layer_grads(inputs, _backward(_error(f, y), zs, feedback, zs), current)
        for name, g in want.items():
            torch.testing.assert_close(got[name], g, msg=f"{rule} {name}")
    # fa's feedback is not the initial weight, and comes from the feedback stream, not the init stream
    assert not torch.allclose(provider.matrices["head"], initial["head.weight"])


def test_align_zero_and_ada_against_hand_written(batch):
    x, y = batch
    model = _mlp()
    _, initial, got = _grads("align_zero", model, x, y)
    current = {n: p.detach() for n, p in model.named_parameters()}
    e = _error(_forward(current, x)[2], y)
    inputs0, zs0, _ = _forward(initial, x)
    want = _layer_grads(inputs0, _backward(e, zs0, initial, zs0), initial)
    for name, g in want.items():
        torch.testing.assert_close(got[name], g, msg=f"align_zero {name}")

    model = _mlp()
    _, initial, got = _grads("align_ada", model, x, y)
    current = {n: p.detach() for n, p in model.named_parameters()}
    inputs, zs, f = _forward(current, x)
    # current activity, error through the initial weights and the initial ReLU derivatives, except the last hidden
    # layer's current derivative (it reaches the readout's input through the current activation, as the original)
    e = _error(f, y)
    lin = _backward(e, zs0, initial, zs0)
    w3 = initial["head.weight"]
    last = (e @ w3 / math.sqrt(w3.shape[1])) * (zs[1] > 0)
    want = _layer_grads(inputs, [lin[0], last, e], current)
    for name, g in want.items():
        torch.testing.assert_close(got[name], g, msg=f"align_ada {name}")


def test_dfa_and_last_layer_against_hand_written(batch):
    x, y = batch
    model = _mlp()
    provider, _, got = _grads("dfa", model, x, y)
    current = {n: p.detach() for n, p in model.named_parameters()}
    inputs, zs, f = _forward(current, x)
    e = _error(f, y)
    deltas = [(e @ provider.matrices[i].T) * (zs[i] > 0) for i in range(2)] + [e]
    for name, g in _layer_grads(inputs, deltas, current).items():
        torch.testing.assert_close(got[name], g, msg=f"dfa {name}")
    assert abs(provider.matrices[0].std().item() - 1 / math.sqrt(6)) < 0.25  # N(0, 1/dim)

    model = _mlp()
    _, _, got = _grads("last_layer", model, x, y)
    current = {n: p.detach() for n, p in model.named_parameters()}
    inputs, zs, f = _forward(current, x)
    w = current["head.weight"]
    e = _error(f, y)
    torch.testing.assert_close(got["head.weight"], e.T @ inputs[2] / math.sqrt(w.shape[1]))
    assert not got["blocks.0.layer.weight"].any() and all(p.requires_grad for p in model.parameters())


def test_align_zero_with_batch_norm_is_the_initial_jacobian(batch):
    """With batch-statistics norm: the update is J_θ0(x)ᵀ e, J computed by torch.func.jacrev independently."""
    x, y = batch
    model = _mlp(batch_norm=True)
    _, initial, got = _grads("align_zero", model, x, y)
    e = _error(model(x), y)
    jac = torch.func.jacrev(lambda p: torch.func.functional_call(model, p, (x,)))(initial)
    for name, j in jac.items():
        torch.testing.assert_close(got[name], torch.einsum("nk,nk...->...", e, j), msg=name)


def test_rnn_align_zero_and_ada_against_unrolled_reference():
    torch.manual_seed(0)
    model = MODELS.build("add_rnn", ADD_INFO, {"width": 5, "batch_slots": 3}).double()
    x, y = torch.randint(0, 2, (3, 6)).double(), torch.rand(3, 6).double()
    crit = lambda out, t: (out - t).square().sum(1).mean()  # noqa: E731

    def unroll(p, x, state_in=None):
        """The original's loop; ``state_in(t, h)`` lets the linearised copy read the real state."""
        n = p["recurrent.weight"].shape[0]
        h, outs = p["init_state"], []
        for t in range(x.shape[1]):
            h = torch.relu(x[:, t:t + 1] @ p["input.weight"].T + p["input.bias"] + h @ p["recurrent.weight"].T
                           / math.sqrt(n))
            h = h if state_in is None else state_in(t + 1, h)
            outs.append(h @ p["head.weight"].T / math.sqrt(n) + p["head.bias"])
        return torch.cat(outs, 1)

    for rule in ("align_zero", "align_ada"):
        provider = build_rule(rule, RuleContext(model, None, crit, 0))
        initial = {n: p.detach().clone() for n, p in model.named_parameters()}
        _moved(model)
        model.zero_grad(set_to_none=True)
        provider.gradients(model, (x, y), StepContext())
        params = dict(model.named_parameters())
        if rule == "align_zero":  # (sg(f) + f0 - sg(f0) - y)², grads of θ0 applied to θ; θ0's init state is live
            lin = {**{n: v.clone().requires_grad_() for n, v in initial.items()}, "init_state": params["init_state"]}
            f, f0 = unroll(params, x).detach(), unroll(lin, x)
            grads = torch.autograd.grad(crit(f + f0 - f0.detach(), y), list(lin.values()))
            want = dict(zip(lin, grads))
        else:  # real states through stop-gradients, the linearised recurrence reads h0 + h - sg(h)
            real = {}
            p = dict(params)

            def cut(t, h):
                real[t] = h
                return h.detach()

            f = model(x, tap=cut)
            lin = {**initial, "init_state": params["init_state"].detach()}

            def inject(t, h):
                return h + real[t] - real[t].detach()

            n = lin["recurrent.weight"].shape[0]
            h, outs = inject(0, lin["init_state"]), []
            for t in range(x.shape[1]):  # the original: the readout reads the linearised state itself
                raw = torch.relu(x[:, t:t + 1] @ lin["input.weight"].T + lin["input.bias"]
                                 + h @ lin["recurrent.weight"].T / math.sqrt(n))
                h = inject(t + 1, raw)
                outs.append(raw @ lin["head.weight"].T / math.sqrt(n) + lin["head.bias"])
            f0 = torch.cat(outs, 1)
            grads = torch.autograd.grad(crit(f + f0 - f0.detach(), y), list(p.values()))
            want = dict(zip(p, grads))
        for name, prm in model.named_parameters():
            torch.testing.assert_close(prm.grad, want[name], msg=f"{rule} {name}")


def test_rules_the_model_cannot_take():
    rnn = MODELS.build("add_rnn", ADD_INFO, {"width": 4, "batch_slots": 2})
    with pytest.raises(UserError, match="dfa needs"):
        build_rule("dfa", RuleContext(rnn, None, mse, 0))
    fcn = MODELS.build("fcn", INFO, {"width": 4, "depth": 1})
    for rule in ("dfa", "align_ada", "last_layer", "fa"):
        with pytest.raises(UserError, match=f"{rule} needs"):
            build_rule(rule, RuleContext(fcn, None, mse, 0))
    build_rule("align_zero", RuleContext(fcn, None, mse, 0))  # any model has an initial Jacobian


def test_dense_score_formula_and_chance():
    torch.manual_seed(0)
    d = torch.randn(5, 9)
    assert dense_score(d, d) == pytest.approx(1.0)
    assert dense_score(d, 3 * d @ torch.linalg.qr(torch.randn(9, 9))[0]) < 0.99  # input-side rotation changes it
    q = torch.linalg.qr(torch.randn(5, 5))[0]
    assert dense_score(q @ d, 2 * d) == pytest.approx(1.0)  # output-side rotation and scale do not
    d_b = torch.randn(5, 9)
    ref = (d @ d_b.T).norm() ** 2 / ((d @ d.T).norm() * (d_b @ d_b.T).norm())
    assert dense_score(d, d_b) == pytest.approx(float(ref))
    with pytest.raises(UserError, match="weights have not changed"):
        dense_score(torch.zeros(5, 9), d)
    with pytest.raises(UserError, match="baseline update is zero"):
        dense_score(d, torch.zeros(5, 9))
    assert sorted(shuffled(d, 1).flatten().tolist()) == sorted(d.flatten().tolist())


def _circular_matrix(kernel, stride, size):
    """The conv operator as a matrix: circular padding, then every stride-th output."""
    c_in, (h, w) = kernel.shape[1], size
    cols = []
    for i in range(c_in * h * w):
        u = torch.zeros(c_in * h * w, dtype=torch.float64)
        u[i] = 1
        u = u.reshape(1, c_in, h, w)
        p = kernel.shape[-1] // 2
        out = F.conv2d(F.pad(u, (p, p, p, p), mode="circular"), kernel)[..., ::stride, ::stride]
        cols.append(out.flatten())
    return torch.stack(cols, 1)


@pytest.mark.parametrize("stride", [1, 2])
def test_conv_score_is_exact_for_circular_convs(stride):
    torch.manual_seed(stride)
    d, d_b = torch.randn(3, 2, 3, 3, dtype=torch.float64), torch.randn(3, 2, 3, 3, dtype=torch.float64)
    m, m_b = _circular_matrix(d, stride, (4, 4)), _circular_matrix(d_b, stride, (4, 4))
    g, g_b = m.T @ m, m_b.T @ m_b
    want = float((g * g_b).sum() / (g.norm() * g_b.norm()))
    assert conv_score(d, d_b, stride, (4, 4)) == pytest.approx(want, rel=1e-9)


def test_hutchinson_estimates_the_exact_score():
    torch.manual_seed(0)
    d, d_b = torch.randn(20, 30), torch.randn(20, 30) + torch.randn(20, 30)
    exact = dense_score(d, d + d_b)
    got = hutchinson_score(d, d + d_b, seed=3, probes=100, iterations=30, normalise=False)
    assert got == pytest.approx(exact, abs=0.03)
    assert hutchinson_score(d, d + d_b, seed=3, iterations=3) == hutchinson_score(d, d + d_b, seed=3, iterations=3)


def _zero_padded_matrix(kernel: torch.Tensor, stride: int, size: tuple[int, int]) -> torch.Tensor:
    """The conv operator of ``kernel`` with the zero padding hutchinson_score probes, as a dense matrix."""
    n_in = kernel.shape[1] * size[0] * size[1]
    basis = torch.eye(n_in, dtype=kernel.dtype).reshape(n_in, kernel.shape[1], *size)
    out = torch.nn.functional.conv2d(basis, kernel, stride=stride, padding=kernel.shape[-1] // 2)
    return out.reshape(n_in, -1).T


@pytest.mark.parametrize("stride, size", [(1, (5, 5)), (2, (6, 6)), (2, (7, 7))])
def test_hutchinson_on_a_convolution_estimates_the_zero_padded_operator(stride, size):
    torch.manual_seed(1)
    d, d_b = torch.randn(4, 2, 3, 3, dtype=torch.float64), torch.randn(4, 2, 3, 3, dtype=torch.float64)
    d_b = d + d_b
    m, m_b = _zero_padded_matrix(d, stride, size), _zero_padded_matrix(d_b, stride, size)
    g, g_b = m.T @ m, m_b.T @ m_b
    exact = float((g * g_b).sum() / (g.norm() * g_b.norm()))
    got = hutchinson_score(d.float(), d_b.float(), seed=3, stride=stride, size=size, normalise=False)
    assert got == pytest.approx(exact, abs=0.005)  # the circular operator is 0.017 away at stride 2 on 7x7


def test_baseline_accumulates_the_initial_jacobian_driven_by_backprop_errors(batch):
    x, y = batch
    model = _mlp(batch_norm=True)
    tracker = AlignmentBaseline(model, mse, ["blocks.0.layer", "head"])
    reference = build_rule("align_zero", RuleContext(model, None, mse, 0))
    _moved(model)
    model.zero_grad(set_to_none=True)
    reference.gradients(model, (x, y), StepContext())
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    tracker.gradients(model, (x, y), StepContext(scale=0.5, lr=2.0))
    torch.testing.assert_close(tracker.baseline["head.weight"], -1.0 * want["head.weight"])
    torch.testing.assert_close(tracker.baseline["blocks.0.layer.weight"], -1.0 * want["blocks.0.layer.weight"])
    jac = torch.func.jacrev(lambda p: mse(torch.func.functional_call(model, p, (x,)), y))(
        {n: p.detach() for n, p in model.named_parameters()})
    torch.testing.assert_close(model.head.weight.grad, 0.5 * jac["head.weight"])  # plain backprop, scaled
    scores = tracker.scores(model)
    assert set(scores) == {f"{k}/{n}" for k in ("align", "align_shuffled_weights", "align_shuffled_update")
                           for n in ("blocks.0.layer", "head")}


def test_dense_score_both_sides_agree():
    torch.manual_seed(2)
    for shape in ((9, 5), (5, 9)):
        d, d_b = torch.randn(shape, dtype=torch.float64), torch.randn(shape, dtype=torch.float64)
        ref = (d @ d_b.T).norm() ** 2 / ((d @ d.T).norm() * (d_b @ d_b.T).norm())
        assert dense_score(d, d_b) == pytest.approx(float(ref), rel=1e-9)


def test_cnn_rules_and_conv_scores():
    """Every rule runs on the NTK CNN, and the tracker scores its conv layers (exact and estimated)."""
    torch.manual_seed(0)
    info = {"input_shape": (1, 7, 7), "num_classes": 4}
    model = MODELS.build("ntk_cnn", info, {"shape": "custom", "strides": [1, 2], "width": 3})
    x, y = torch.randn(6, 1, 7, 7), torch.randint(0, 4, (6,))
    for rule in ("align_zero", "align_ada", "align_prop", "fa", "dfa", "last_layer"):
        model.zero_grad(set_to_none=True)
        build_rule(rule, RuleContext(model, None, mse, 0)).gradients(model, (x, y), StepContext())
        assert torch.isfinite(model.head.weight.grad).all() and model.head.weight.grad.any(), rule
    for method in ("exact", "hutchinson"):
        tracker = AlignmentBaseline(model, mse, model.layer_names(), method=method,
                                    hutchinson={"probes": 8, "iterations": 4})
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for _ in range(2):
            tracker.gradients(model, (x, y), StepContext(lr=0.1))
            opt.step()
            opt.zero_grad()
        scores = tracker.scores(model)
        assert tracker.input_sizes == {"blocks.0.layer": (7, 7), "blocks.1.layer": (7, 7)}
        assert all(0 < v <= 1 + 1e-9 for v in scores.values()), scores


def test_parameterisations():
    torch.manual_seed(0)
    ntk = MODELS.build("ntk_mlp", {"input_shape": (400,), "num_classes": 3}, {"depth": 1, "width": 300})
    std = MODELS.build("ntk_mlp", {"input_shape": (400,), "num_classes": 3},
                       {"depth": 1, "width": 300, "parameterisation": "standard"})
    layer, std_layer = ntk.blocks[0].layer, std.blocks[0].layer
    assert layer.weight.std().item() == pytest.approx(1.0, abs=0.02) and layer.scale == pytest.approx(1 / 20)
    assert std_layer.weight.std().item() == pytest.approx(1 / 20, abs=0.002) and std_layer.scale == 1.0
    assert not layer.bias.any()
    # batch-statistics norm at test time too: a sample's output depends on the rest of its batch
    x = torch.randn(5, 400)
    assert not torch.allclose(ntk.eval()(x)[:2], ntk(x[:2]))


def _conv_forward(params, x, strides):
    """The no-batch-norm NTK CNN by hand: (layer inputs, block outputs z_l, pooled readout input, logits)."""
    a, inputs, zs = x, [], []
    for i, stride in enumerate(strides):
        w, b = params[f"blocks.{i}.layer.weight"], params[f"blocks.{i}.layer.bias"]
        inputs.append(a)
        z = F.conv2d(a, w / math.sqrt(w[0].numel()), b, stride, w.shape[-1] // 2)
        zs.append(z)
        a = torch.relu(z)
    pooled = a.mean((2, 3))
    w = params["head.weight"]
    return inputs, zs, pooled, pooled @ w.T / math.sqrt(w.shape[1]) + params["head.bias"]


@pytest.mark.parametrize("feedback", ["dense", "per_channel", "pooled"])
def test_dfa_conv_feedback_options_against_hand_written(feedback):
    """dense: B of (C·H·W) x K; per_channel: C x K shared by every position; pooled: mean over positions, then
    C x K. The conv weight gradient by hand: Σ over samples and positions of δ times the input patch."""
    torch.manual_seed(0)
    info, strides = {"input_shape": (2, 5, 5), "num_classes": 4}, [1, 2]
    model = MODELS.build("ntk_cnn", info, {"shape": "custom", "strides": strides, "width": 3,
                                           "batch_norm": False}).double()
    x, y = torch.randn(6, 2, 5, 5, dtype=torch.float64), torch.randint(0, 4, (6,))
    provider = build_rule("dfa", RuleContext(model, None, mse, 5), {"feedback": feedback})
    _moved(model)
    model.zero_grad(set_to_none=True)
    provider.gradients(model, (x, y), StepContext())
    params = {n: p.detach() for n, p in model.named_parameters()}
    inputs, zs, pooled, f = _conv_forward(params, x, strides)
    e = _error(f, y)
    for i, (a, z) in enumerate(zip(inputs, zs)):
        n, c, h, w = z.shape
        b = provider.matrices[i]
        assert b.shape == ((c * h * w, 4) if feedback == "dense" else (c, 4))  # the memory of B_l
        if feedback == "dense":
            g = (e @ b.T).reshape(n, c, h, w)
        else:
            g = (e @ b.T)[:, :, None, None].expand(n, c, h, w) / (h * w if feedback == "pooled" else 1)
        delta = g * (z > 0)
        weight = params[f"blocks.{i}.layer.weight"]
        patches = F.unfold(a, weight.shape[-1], padding=weight.shape[-1] // 2, stride=strides[i])  # (N, C_in k², L)
        want_w = torch.einsum("ncl,nkl->ck", delta.flatten(2), patches).reshape(weight.shape)
        torch.testing.assert_close(model.blocks[i].layer.weight.grad, want_w / math.sqrt(weight[0].numel()),
                                   msg=f"{feedback} block {i} weight")
        torch.testing.assert_close(model.blocks[i].layer.bias.grad, delta.sum((0, 2, 3)), msg=f"{feedback} {i} bias")
    torch.testing.assert_close(model.head.weight.grad, e.T @ pooled / math.sqrt(3))  # the readout: local


def test_dfa_pooled_is_per_channel_scaled_and_mlps_ignore_the_option():
    """The same generator draws both C x K matrices: pooled's B (N(0, 1/C)) is per_channel's (N(0, 1/(CHW)))
    times sqrt(HW), so its conv updates are per_channel's divided by sqrt(HW) of each block; on an MLP every
    option is the dense rule."""
    torch.manual_seed(0)
    info = {"input_shape": (1, 6, 6), "num_classes": 4}
    x, y = torch.randn(5, 1, 6, 6, dtype=torch.float64), torch.randint(0, 4, (5,))
    grads, matrices = {}, {}
    for feedback in ("per_channel", "pooled"):
        torch.manual_seed(0)
        model = MODELS.build("ntk_cnn", info, {"shape": "custom", "strides": [1, 2], "width": 3}).double()
        provider = build_rule("dfa", RuleContext(model, None, mse, 9), {"feedback": feedback})
        provider.gradients(model, (x, y), StepContext())
        grads[feedback] = {n: p.grad.clone() for n, p in model.named_parameters()}
        matrices[feedback] = provider.matrices
    for i, positions in enumerate((36, 9)):  # 6x6, then 3x3 after the stride-2 conv
        torch.testing.assert_close(matrices["pooled"][i], matrices["per_channel"][i] * positions ** 0.5)
        torch.testing.assert_close(grads["pooled"][f"blocks.{i}.layer.weight"],
                                   grads["per_channel"][f"blocks.{i}.layer.weight"] / positions ** 0.5)
    x, y = torch.randn(7, 1, 3, 3, dtype=torch.float64), torch.randint(0, 4, (7,))
    mlp_grads = []
    for feedback in ("dense", "per_channel", "pooled"):
        model = _mlp(batch_norm=True)
        build_rule("dfa", RuleContext(model, None, mse, 5), {"feedback": feedback}).gradients(
            model, (x, y), StepContext())
        mlp_grads.append([p.grad for p in model.parameters()])
    for other in mlp_grads[1:]:
        for a, b in zip(mlp_grads[0], other):
            assert torch.equal(a, b)
    with pytest.raises(UserError, match="rule dfa: feedback: Input should be"):
        build_rule("dfa", RuleContext(model, None, mse, 5), {"feedback": "sparse"})


def _dfa_cnn_steps(options, steps=2, matrices=None):
    """Weights of a small NTK CNN after ``steps`` SGD steps of dfa with ``options`` (``matrices``: the kept B to
    use), and the provider."""
    info = {"input_shape": (2, 5, 5), "num_classes": 4}
    torch.manual_seed(0)
    model = MODELS.build("ntk_cnn", info, {"shape": "custom", "strides": [1, 2], "width": 4}).double()
    provider = build_rule("dfa", RuleContext(model, None, mse, 11), options)
    provider.matrices.update(matrices or {})
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x, y = torch.randn(6, 2, 5, 5, dtype=torch.float64, generator=gen), torch.randint(0, 4, (6,), generator=gen)
        provider.gradients(model, (x, y), StepContext())
        opt.step()
        opt.zero_grad()
    return model.state_dict(), provider


@pytest.mark.parametrize("feedback", ["dense", "pooled"])
def test_dfa_regenerating_b_gives_the_kept_b_updates_and_keeps_nothing(feedback):
    """regenerate: B_l is drawn again from block l's seed in every backward; a B_l of one piece is the kept one, so
    two SGD steps give the kept rule's weights (up to the rounding of the kept surrogate's a B - a B), and the
    provider holds and saves no matrix."""
    kept, kept_provider = _dfa_cnn_steps({"feedback": feedback})
    regenerated, provider = _dfa_cnn_steps({"feedback": feedback, "regenerate": True})
    assert len(kept_provider.matrices) == 2 and provider.matrices == {}
    assert provider.state_dict() == {"direct_feedback": {}}
    start, _ = _dfa_cnn_steps({"feedback": feedback}, steps=0)
    assert not torch.equal(start["blocks.0.layer.weight"], regenerated["blocks.0.layer.weight"])  # it trained
    for name, value in kept.items():
        torch.testing.assert_close(regenerated[name], value, rtol=1e-12, atol=1e-12, msg=name)


def test_dfa_regenerates_a_large_b_in_pieces_of_their_own_seeds(monkeypatch):
    """A B_l beyond FEEDBACK_CHUNK entries is drawn in pieces of rows, each from its own seed, never whole: the
    updates are those of the kept rule given the concatenated pieces as its B."""
    monkeypatch.setattr(rules, "FEEDBACK_CHUNK", 24)  # 6 rows of 4 classes per piece; block 0's B has 100 rows
    drawn = []
    real_draw = rules.draw_feedback
    monkeypatch.setattr(rules, "draw_feedback", lambda *a: drawn.append(a[0]) or real_draw(*a))
    regenerated, _ = _dfa_cnn_steps({"feedback": "dense", "regenerate": True}, steps=1)
    assert max(drawn) == 6 and len(drawn) == 17 + 6  # block 0: 4 x 5 x 5 = 100 rows; block 1: 4 x 3 x 3 = 36
    pieces = {i: torch.cat([real_draw(rows, 4, seed, spread, torch.float64)
                            for rows, seed in rules.feedback_pieces(11, i, spread, 4)])
              for i, spread in enumerate((100, 36))}
    seeds = [seed for _, seed in rules.feedback_pieces(11, 0, 100, 4)]
    assert len(set(seeds)) == 17 and seeds[0] == rules.derive_seed(11, "direct_feedback", 0)  # the kept B's first
    kept, _ = _dfa_cnn_steps({"feedback": "dense"}, steps=1, matrices=pieces)
    for name, value in kept.items():
        torch.testing.assert_close(regenerated[name], value, rtol=1e-12, atol=1e-12, msg=name)
