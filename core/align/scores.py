"""Input-weight alignment scores (Boopathy & Fiete 2022) and the online baseline they compare against.

For a layer whose weight changed by D = W(t) - W(0) under back-propagation, the baseline D_b accumulates, in
lock-step with the same run, the Align-zero updates driven by the back-propagating network's own errors:
D_b = Σ_s -η_s (∂f_θ0(x_s)/∂W)ᵀ e_s (the original's ``train_align``, here computed online instead of by a second
training run and per-epoch pickles). The score is the cosine similarity of the two input-space Gram operators,

    score = tr(M_Dᵀ M_D M_bᵀ M_b) / (||M_Dᵀ M_D||_F ||M_bᵀ M_b||_F),

which for a dense layer is exactly ||D D_bᵀ||_F² / (||D Dᵀ||_F ||D_b D_bᵀ||_F). For a convolution M_D is the conv
operator on the layer's input map; ``exact`` evaluates it in the Fourier domain with circular boundaries (strided
convs through their aliasing groups: per coarse frequency A = [K̂(ω_1) ... K̂(ω_s²)], score from Σ||A A_bᴴ||²),
``hutchinson`` is the original's seeded probe estimator on the zero-padded conv (optionally with its per-batch
mean-|.| renormalisation). On a dense layer both score the same operator. On a convolution they score different
ones (zero padding against circular boundaries; ``exact`` also takes a side that is not a multiple of the stride up to
one that is): measured on random updates (``studies/hutchinson_error.py``, docs/results.md), at most 0.012 apart where
the side is a multiple of the stride and up to 0.043 for a stride-2 conv on a 7x7 map, while the estimate stayed
within 0.0031 (dense) and 0.0007 (conv) of its own operator's exact score at 100 probes x 100 iterations.
Chance controls: ``shuffled_weights`` (the original's: the trained weight's entries permuted, minus W(0)) and
``shuffled_update`` (D's own entries permuted).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError, under_key, unknown_name
from .. import dist
from ..steps import Backprop
from .rules import InitialNetwork, full, output_error
from ..seeds import derive_seed

CHANCE = ("shuffled_weights", "shuffled_update")


def dense_score(d: torch.Tensor, d_b: torch.Tensor) -> float:
    """||D D_bᵀ||_F² / (||D Dᵀ||_F ||D_b D_bᵀ||_F) for (out, in) matrices; raises on a zero update."""
    d, d_b = d.flatten(1), d_b.flatten(1)
    out, inp = d.shape
    if 2 * inp * inp * out <= 3 * out * out * inp:  # input-side Grams: ||D D_bᵀ||² = <DᵀD, D_bᵀD_b>, 2 matmuls
        gram, gram_b = d.T @ d, d_b.T @ d_b
        cross, own, base = (gram.double() * gram_b.double()).sum(), gram.double().norm(), gram_b.double().norm()
    else:  # output-side, 3 matmuls of out x out
        cross = (d @ d_b.T).double().square().sum()
        own, base = (d @ d.T).double().norm(), (d_b @ d_b.T).double().norm()
    return _ratio(cross, own, base)


def _ratio(cross, own, base) -> float:
    if not own > 0:
        raise UserError("alignment score: the layer's weights have not changed (no gradient reached it: dead units, "
                        "or nothing was trained yet)")
    if not base > 0:
        raise UserError("alignment score: the baseline update is zero (no error reached the layer through the "
                        "initial network: dead units)")
    value = float(cross / (own * base))
    if value != value:
        raise UserError("alignment score: not finite (the weights diverged)")
    return value


def conv_score(d: torch.Tensor, d_b: torch.Tensor, stride: int, size: tuple[int, int]) -> float:
    """The exact score of two (C_out, C_in, k, k) kernels as circular convs with ``stride`` on a ``size`` map.

    A side that is not a multiple of the stride (or smaller than the kernel) is taken up to the next one that is:
    the circular operator needs whole aliasing groups."""
    k = d.shape[-1]
    h, w = (-(-max(n, k) // stride) * stride for n in size)
    grams = []
    for kernel in (d, d_b):
        k_hat = torch.fft.fft2(kernel.double(), s=(h, w))  # (C_out, C_in, h, w)
        c_out, c_in = k_hat.shape[:2]
        aliases = k_hat.reshape(c_out, c_in, stride, h // stride, stride, w // stride)
        grams.append(aliases.permute(3, 5, 0, 1, 2, 4).reshape(h // stride, w // stride, c_out, -1))
    a, a_b = grams
    cross = (a @ a_b.conj().transpose(-1, -2)).abs().square().sum()
    own = (a @ a.conj().transpose(-1, -2)).abs().square().sum().sqrt()
    base = (a_b @ a_b.conj().transpose(-1, -2)).abs().square().sum().sqrt()
    return _ratio(cross, own, base)


def hutchinson_score(d: torch.Tensor, d_b: torch.Tensor, *, seed: int, stride: int = 1,
                     size: Optional[tuple[int, int]] = None, probes: int = 100, iterations: int = 100,
                     normalise: bool = True) -> float:
    """The original's estimator: p = M_Dᵀ M_D u / C_out for Gaussian probes u, optionally renormalised by the batch
    mean of |p|; score = Σ mean<p, p_b> / sqrt(Σ mean<p, p> Σ mean<p_b, p_b>). Seeded.

    Measured error against the exact score of the same operator at the defaults: at most 0.0031 (dense) and 0.0007
    (conv) over 360 values; 0.0057 at 100 probes x 30 iterations (docs/results.md). An observation on random
    updates, not a guaranteed bound."""
    gen = torch.Generator().manual_seed(seed)
    conv = d.dim() == 4
    shape = (probes, d.shape[1], *size) if conv else (probes, d.shape[1])
    pad = d.shape[-1] // 2 if conv else 0

    def gram(kernel, u):
        if not conv:
            return u @ kernel.T @ kernel / kernel.shape[0]
        out = F.conv2d(u, kernel, stride=stride, padding=pad)
        back = F.conv_transpose2d(out, kernel, stride=stride, padding=pad,
                                  output_padding=_output_padding(u.shape[-2:], out.shape[-2:], kernel, stride, pad))
        return back / kernel.shape[0]

    cross = own = base = 0.0
    for _ in range(iterations):
        u = torch.randn(shape, generator=gen, dtype=torch.float64)
        p, p_b = gram(d.double(), u), gram(d_b.double(), u)
        if normalise:
            p, p_b = p / p.abs().mean(), p_b / p_b.abs().mean()
        if not (torch.isfinite(p).all() and torch.isfinite(p_b).all()):
            continue  # the original skips iterations with NaN
        cross += float((p * p_b).flatten(1).sum(1).mean())
        own += float((p * p).flatten(1).sum(1).mean())
        base += float((p_b * p_b).flatten(1).sum(1).mean())
    return _ratio(torch.tensor(cross), torch.tensor(own) ** 0.5, torch.tensor(base) ** 0.5)


def _output_padding(in_size, out_size, kernel, stride, pad) -> tuple[int, int]:
    k = kernel.shape[-1]
    return tuple(int(n - ((m - 1) * stride - 2 * pad + k)) for n, m in zip(in_size, out_size))


def shuffled(t: torch.Tensor, seed: int) -> torch.Tensor:
    """``t``'s entries in a seeded random order."""
    perm = torch.randperm(t.numel(), generator=torch.Generator().manual_seed(seed))
    return t.flatten()[perm.to(t.device)].reshape(t.shape)


def check_layers(requested: Optional[list[str]], available: list[str]) -> list[str]:
    """The layers to score: ``requested`` (checked, nearest names suggested) or every available one."""
    if not requested:
        return list(available)
    for name in requested:
        if name not in available:
            raise unknown_name("layer", name, available, where=" in the model", suggestions=3, limit=len(available))
    return list(requested)


class AlignmentBaseline(Backprop):
    """Back-propagation that also accumulates, per scored layer, the Align-zero baseline D_b from the
    back-propagating network's own errors, and scores D = W(t) - W(0) against it.

    Args:
        model: the network at the start of training (its weights are W(0)).
        criterion: loss of (logits, targets).
        layers: names of the weight layers to score (modules with a ``weight``).
        method: ``exact`` or ``hutchinson``; chance: controls to report (subset of CHANCE); seed: probes and shuffles.
    """

    def __init__(self, model: nn.Module, criterion, layers: list[str], *, method: str = "exact",
                 chance: tuple[str, ...] = CHANCE, seed: int = 0, hutchinson: Optional[dict[str, Any]] = None):
        super().__init__(None)
        self.criterion, self.layers, self.method, self.chance, self.seed = criterion, layers, method, chance, seed
        self.hutchinson = hutchinson or {}
        self.initial = InitialNetwork(model)
        self.weights = [f"{name}.weight" for name in layers]
        self.baseline = {w: torch.zeros_like(self.initial.tensors[w]) for w in self.weights}
        self.input_sizes: dict[str, tuple[int, int]] = {}
        modules = dict(model.named_modules())
        self.modules = {name: modules[name] for name in layers}

    def gradients(self, model, batch, step):
        x, y = batch
        hooks = [m.register_forward_hook(self._size_hook(n)) for n, m in self.modules.items()
                 if n not in self.input_sizes and m.weight.dim() == 4]
        try:
            with step.autocast():
                logits = model(x)
        finally:
            for h in hooks:
                h.remove()
        loss, e = output_error(logits, y, self.criterion)
        full(logits).backward(e * step.scale)
        with step.autocast():
            f0, inputs = self.initial.forward(dist.unwrap(model), x, grad_of=self.weights)
        grads = torch.autograd.grad(full(f0), inputs, e, allow_unused=True)
        for w, g in zip(self.weights, grads):
            if g is None:
                continue
            if dist.world_size() > 1:  # every rank keeps the same baseline, as DDP keeps the same weights
                torch.distributed.all_reduce(g)
                g = g / dist.world_size()
            self.baseline[w] -= step.lr * step.scale * g
        return loss, {}

    def _size_hook(self, name):
        def hook(module, args, output):
            self.input_sizes[name] = tuple(args[0].shape[-2:])
        return hook

    def score(self, name: str, d: torch.Tensor, d_b: torch.Tensor) -> float:
        module = self.modules[name]
        if self.method == "hutchinson":
            return hutchinson_score(d, d_b, seed=self.seed, stride=getattr(module, "stride", 1),
                                    size=self.input_sizes.get(name), **self.hutchinson)
        if d.dim() == 4:
            return conv_score(d, d_b, module.stride, self.input_sizes[name])
        return dense_score(d, d_b)

    def scores(self, model: nn.Module) -> dict[str, float]:
        """``align/<layer>`` and ``align_<control>/<layer>`` for every scored layer, at the model's weights."""
        params = dict(model.named_parameters())
        out = {}
        for name, w in zip(self.layers, self.weights):
            current, start, d_b = params[w].detach(), self.initial.tensors[w], self.baseline[w]
            d = current - start
            seed = derive_seed(self.seed, "shuffle", name)
            with under_key(f"layer {name}"):
                out[f"align/{name}"] = self.score(name, d, d_b)
                if "shuffled_weights" in self.chance:
                    out[f"align_shuffled_weights/{name}"] = self.score(name, shuffled(current, seed) - start, d_b)
                if "shuffled_update" in self.chance:
                    out[f"align_shuffled_update/{name}"] = self.score(name, shuffled(d, seed), d_b)
        return out

    def state_dict(self):
        return {**self.initial.state_dict(), "baseline": self.baseline, "input_sizes": self.input_sizes}

    def load_state_dict(self, state):
        self.initial.load_state_dict(state)
        self.baseline = state.get("baseline", self.baseline)
        self.input_sizes = state.get("input_sizes", self.input_sizes)
