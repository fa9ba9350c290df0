"""Model stitching (Csiszarik et al. 2021): the front model up to a layer, a stitching transform, the end model from
a layer on.

    head = split_front(front_model, "layers.1", sample)      # x -> front activation A, nothing after the cut
    tail = split_end(end_model, "layers.1", sample)          # B-shaped input -> logits, nothing before the cut
    transform = StitchTransform(head_shape, tail.input_shape)  # 1x1-conv affine, resized / re-laid out as needed
    stitched = StitchedNet(head, transform, tail)              # only the transform trains

Splitting. Models are split with ``torch.fx``: the graph up to the cut layer's call (the head), and the graph after
it with the cut's output as the new input (the tail); dead code is eliminated, so neither side does work the
stitched network does not need. The cut layer is traced as one call even when it is a container (``layers.1`` of a
Sequential). A model falls back to forward hooks when it does not trace (data-dependent control flow), when the
cut layer runs more than once in a forward, or, for the end model, when later layers also read values from before
the cut (a layer inside a residual block: its skip connection bypasses the cut). The hook head stops the forward
at the cut (an exception carries the activation out, so nothing after the cut runs); the hook tail runs the whole
end model on the input and replaces the cut layer's output, the original's method, which also runs the end model's
layers before the cut. ``Tail.traced`` / ``Head.traced`` say which was used. Of the shipped models, ResNet-20's tail
falls back inside its residual blocks (51 of 86 modules; the blocks themselves split), ``noresnet`` at its
``relu`` and ``shortcut`` modules (called twice per block); Tiny10, LeNet, ``convnet`` and ``fcn`` split everywhere.

Transforms (``StitchTransform``). Activations have a layout: ``map`` (C, H, W), ``tokens`` (T, D) with an optional
class token, or ``vector`` (D,). The front activation is brought onto the end activation's grid of positions
(bilinear/nearest/area resizing when the two maps differ in size; token sequences are read as a square grid of
positions, after their class token, so CNN maps and ViT-style tokens connect both ways) and a channel map shared
over positions (the 1x1-convolution affine) gives the end's channels; the end's class token, when it has one, is
the mean of the mapped positions. ``flatten`` is one linear map over all of C x H x W. ``rank`` restricts the
channel map to W = U V; every init is honoured (the least-squares init becomes reduced-rank regression, every other
init its best rank-r approximation).

Least squares (``LinearStats``). One pass over the training data accumulates, in float64, X^T X, X^T Y, the column
sums and the squared norms of Y, with one row per position (X with a column of ones for the bias): memory
O((C1 + 1)^2 + C1 C2), independent of the number of samples. From these come the exact least-squares map (the
minimum-norm solution, as ``torch.linalg.lstsq`` on all rows), the same fit restricted to a mask, reduced-rank
regression, orthogonal Procrustes, the channel correlation matrix (semi-match masks) and R^2 of any map.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Literal, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from ..errors import UserError
from ..registry import Registry
from ..compare.capture import select_layers

Layout = Literal["map", "tokens", "vector"]


# ----------------------------------------------------------------------------------------------------- splitting

class _CutTracer(fx.Tracer):
    """Traces the cut layer as one call, even when it is a container."""

    def __init__(self, layer: str):
        super().__init__()
        self.layer = layer

    def is_leaf_module(self, module: nn.Module, qualname: str) -> bool:
        return qualname == self.layer or super().is_leaf_module(module, qualname)


def _traced_cut(model: nn.Module, layer: str) -> Optional[tuple[fx.Graph, fx.Node]]:
    """(graph, the cut layer's node), or None when the model does not trace or calls the layer more than once."""
    try:
        graph = _CutTracer(layer).trace(model)
    except Exception:  # noqa: BLE001 - any tracing failure means: use hooks
        return None
    calls = [n for n in graph.nodes if n.op == "call_module" and n.target == layer]
    return (graph, calls[0]) if len(calls) == 1 else None


def _module(model: nn.Module, layer: str) -> nn.Module:
    return next(iter(select_layers(model, layer).values()))  # a UserError naming the nearest names


def _pruned(model: nn.Module, graph: fx.Graph) -> fx.GraphModule:
    """The graph as a module without dead code or the submodules only dead code called (weights shared)."""
    net = fx.GraphModule(model, graph)
    net.graph.eliminate_dead_code()
    net.recompile()
    net.delete_all_unused_submodules()
    return net


class _Stop(Exception):
    def __init__(self, value: Tensor):
        super().__init__()
        self.value = value


class Head(nn.Module):
    """The front model up to and including its cut layer: ``x -> A``. ``traced`` is False for the hook fallback."""

    def __init__(self, model: nn.Module, layer: str):
        super().__init__()
        self.layer = layer
        _module(model, layer)
        cut = _traced_cut(model, layer)
        self.traced = cut is not None
        if cut is not None:
            graph, node = cut
            output = next(n for n in graph.nodes if n.op == "output")
            output.args = (node,)
            self.net = _pruned(model, graph)
        else:
            self.net = model

    def forward(self, x: Tensor) -> Tensor:
        if self.traced:
            return _tensor(self.net(x), self.layer)
        module = _module(self.net, self.layer)

        def stop(mod, args, output):
            raise _Stop(_tensor(output, self.layer))

        handle = module.register_forward_hook(stop)
        try:
            self.net(x)
        except _Stop as caught:
            return caught.value
        finally:
            handle.remove()
        raise UserError(f"layer {self.layer!r} did not run in the front model's forward pass")


class Tail(nn.Module):
    """The end model from just after its cut layer: ``(B-shaped input, x) -> logits``. The traced tail ignores
    ``x``; the hook fallback runs the end model on ``x`` and replaces the cut layer's output."""

    def __init__(self, model: nn.Module, layer: str):
        super().__init__()
        self.layer = layer
        _module(model, layer)
        self.net, self.traced = model, False
        cut = _traced_cut(model, layer)
        if cut is None:
            return
        graph, node = cut
        inputs = [n for n in graph.nodes if n.op == "placeholder"]
        with graph.inserting_before(inputs[0]):
            stitched = graph.placeholder("stitched")
        node.replace_all_uses_with(stitched)
        graph.erase_node(node)
        net = _pruned(model, graph)
        if any(n.users for n in net.graph.nodes if n.op == "placeholder" and n.name != stitched.name):
            return  # a later layer reads something from before the cut (a skip connection)
        for n in [n for n in net.graph.nodes if n.op == "placeholder" and n.name != stitched.name]:
            net.graph.erase_node(n)
        net.recompile()
        self.net, self.traced = net, True

    def forward(self, a: Tensor, x: Optional[Tensor] = None) -> Tensor:
        if self.traced:
            return self.net(a)
        if x is None:
            raise UserError(f"the end model does not split at {self.layer!r} (it does not trace, or later layers "
                            f"read values from before the cut), so its tail needs the input too")
        module = _module(self.net, self.layer)
        handle = module.register_forward_hook(lambda mod, args, output: a)
        try:
            return self.net(x)
        finally:
            handle.remove()


def _tensor(output: Any, layer: str) -> Tensor:
    if not isinstance(output, Tensor):
        raise UserError(f"layer {layer!r} returns {type(output).__name__}, not a tensor: choose a submodule")
    return output


def freeze(model: nn.Module) -> nn.Module:
    """Evaluation mode and no gradients, for good: the frozen models of a stitch are never put back in training."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


# ----------------------------------------------------------------------------------------------------- layouts

def layout_of(shape: tuple[int, ...], declared: str = "auto") -> Layout:
    """The layout of a per-sample activation shape: 3 axes a map, 2 a token sequence, 1 a vector (or as declared)."""
    if declared != "auto":
        wanted = {"map": 3, "tokens": 2, "vector": 1}[declared]
        if len(shape) != wanted:
            raise UserError(f"layout {declared} needs {wanted} axes per sample, the activation has shape {shape}")
        return declared  # type: ignore[return-value]
    if len(shape) not in (1, 2, 3):
        raise UserError(f"activation shape {shape}: stitching handles maps (C, H, W), tokens (T, D) and vectors")
    return ("vector", "tokens", "map")[len(shape) - 1]  # type: ignore[return-value]


@dataclass(frozen=True)
class Side:
    """An activation's per-sample shape, layout and grid of positions (a class token left out)."""

    shape: tuple[int, ...]
    layout: Layout

    @property
    def channels(self) -> int:
        return self.shape[0] if self.layout == "map" else self.shape[-1]

    @property
    def cls_token(self) -> bool:
        return self.layout == "tokens" and _square_side(self.shape[0]) is None and \
            _square_side(self.shape[0] - 1) is not None

    @property
    def grid(self) -> tuple[int, int]:
        if self.layout == "map":
            return self.shape[1], self.shape[2]
        if self.layout == "vector":
            return 1, 1
        side = _square_side(self.shape[0] - (1 if self.cls_token else 0))
        if side is None:
            raise UserError(f"token sequence of length {self.shape[0]}: stitching reads tokens as a square grid of "
                            f"positions (with or without one class token)")
        return side, side

    def to_grid(self, a: Tensor) -> Tensor:
        """(N, *shape) -> (N, C, h, w) channel-first on this side's own grid; a class token dropped."""
        if self.layout == "map":
            return a
        if self.layout == "vector":
            return a[:, :, None, None]
        tokens = a[:, 1:] if self.cls_token else a
        return tokens.transpose(1, 2).reshape(a.shape[0], self.channels, *self.grid)

    def from_grid(self, g: Tensor) -> Tensor:
        """(N, C, h, w) on this side's grid -> (N, *shape); a class token is the mean of the positions."""
        if self.layout == "map":
            return g
        if self.layout == "vector":
            return g[:, :, 0, 0]
        tokens = g.flatten(2).transpose(1, 2)
        return torch.cat([tokens.mean(1, keepdim=True), tokens], 1) if self.cls_token else tokens


def _square_side(n: int) -> Optional[int]:
    side = math.isqrt(n) if n > 0 else 0
    return side if side and side * side == n else None


def rows(g: Tensor) -> Tensor:
    """(N, C, h, w) -> (N h w, C): one row per position."""
    return g.permute(0, 2, 3, 1).reshape(-1, g.shape[1])


# ----------------------------------------------------------------------------------------------------- transform

class StitchTransform(nn.Module):
    """The stitching layer between a front activation and the end model's (see the module docstring).

    Args:
        front: the front activation's ``Side``; end: the end activation's.
        kind: ``affine`` (channel map shared over positions, a 1x1 convolution on maps) or ``flatten`` (one linear
            map over everything).
        rank: restrict the matrix to W = U V of this rank.
        bias: learn a bias.
        resize: how a front grid is brought onto the end's grid when they differ.
    Raises:
        UserError: the two activations are not connected by this kind of transform.
    """

    def __init__(self, front: Side, end: Side, kind: Literal["affine", "flatten"] = "affine",
                 rank: Optional[int] = None, bias: bool = True, resize: str = "bilinear"):
        super().__init__()
        self.front, self.end, self.kind, self.rank, self.resize = front, end, kind, rank, resize
        if kind == "affine":
            if (front.layout == "vector") != (end.layout == "vector"):
                raise UserError(f"front activation {front.shape} ({front.layout}) and end activation {end.shape} "
                                f"({end.layout}): no affine channel map connects a vector with a grid of positions; "
                                f"use transform: flatten")
            front.grid, end.grid  # noqa: B018 - raises for token counts that are no square grid
            self.d_in, self.d_out = front.channels, end.channels
        else:
            self.d_in, self.d_out = math.prod(front.shape), math.prod(end.shape)
        if rank is not None and rank > min(self.d_in, self.d_out):
            raise UserError(f"rank {rank} exceeds the map's {self.d_out} x {self.d_in} matrix")
        if rank is None:
            self.weight = nn.Parameter(torch.empty(self.d_out, self.d_in))
        else:
            self.u = nn.Parameter(torch.empty(self.d_out, rank))
            self.v = nn.Parameter(torch.empty(rank, self.d_in))
        self.bias = nn.Parameter(torch.zeros(self.d_out)) if bias else None
        self.register_buffer("mask", torch.ones(self.d_out, self.d_in))
        self.set_matrix(default_weight(self.d_out, self.d_in), None)

    # --- the matrix -----------------------------------------------------------------------------------------

    def matrix(self) -> Tensor:
        """The effective (d_out, d_in) matrix: U V or W, times the mask."""
        w = self.weight if self.rank is None else self.u @ self.v
        return w * self.mask

    @torch.no_grad()
    def set_matrix(self, w: Tensor, b: Optional[Tensor]) -> None:
        """Load a full matrix (and bias); with a rank, its best rank-r approximation (truncated SVD)."""
        w = w.to(torch.float64)
        if self.rank is None:
            self.weight.copy_(w)
        else:
            u, s, vh = torch.linalg.svd(w, full_matrices=False)
            root = s[: self.rank].sqrt()
            self.u.copy_(u[:, : self.rank] * root)
            self.v.copy_(root[:, None] * vh[: self.rank])
        if self.bias is not None:
            self.bias.copy_(torch.zeros(self.d_out) if b is None else b)

    @torch.no_grad()
    def set_factors(self, u: Tensor, v: Tensor, b: Optional[Tensor]) -> None:
        """Load W = U V directly (reduced-rank regression gives the factors)."""
        self.u.copy_(u)
        self.v.copy_(v)
        if self.bias is not None:
            self.bias.copy_(torch.zeros(self.d_out) if b is None else b)

    def set_mask(self, mask: Tensor) -> None:
        if self.rank is not None:
            raise UserError("a mask restricts single entries of W; a low-rank W = U V has none to restrict")
        self.mask.copy_(mask)

    # --- the map ------------------------------------------------------------------------------------------------

    def align(self, a: Tensor) -> Tensor:
        """The front activation as the transform's input rows' layout: (N, C1, h, w) on the end's grid (affine),
        or (N, D1) (flatten)."""
        if self.kind == "flatten":
            return a.flatten(1)
        g = self.front.to_grid(a)
        size = self.end.grid
        if tuple(g.shape[-2:]) != size:
            g = F.interpolate(g, size=size, mode=self.resize,
                              **({"align_corners": False} if self.resize == "bilinear" else {}))
        return g

    def target(self, b: Tensor) -> Tensor:
        """The end activation in the same layout as ``align`` gives (no class token: it is not fitted)."""
        return b.flatten(1) if self.kind == "flatten" else self.end.to_grid(b)

    def apply_aligned(self, g: Tensor) -> Tensor:
        w = self.matrix()
        if self.kind == "flatten":
            return F.linear(g, w, self.bias)
        return F.conv2d(g, w[:, :, None, None], self.bias)

    def restore(self, y: Tensor) -> Tensor:
        if self.kind == "flatten":
            return y.reshape(-1, *self.end.shape)
        return self.end.from_grid(y)

    def forward(self, a: Tensor) -> Tensor:
        return self.restore(self.apply_aligned(self.align(a)))

    def fit_rows(self, a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
        """(X rows, Y rows) of a batch for the least-squares statistics."""
        x, y = self.align(a), self.target(b)
        if self.kind == "flatten":
            return x, y
        return rows(x), rows(y)

    def l1(self) -> Tensor:
        return self.matrix().abs().mean()


def default_weight(d_out: int, d_in: int) -> Tensor:
    """PyTorch's default init of a Conv2d/Linear weight (the original's ``random`` init)."""
    w = torch.empty(d_out, d_in)
    nn.init.kaiming_uniform_(w, a=math.sqrt(5))
    return w


class StitchedNet(nn.Module):
    """``tail(transform(head(x)))``; only the transform trains, the head and tail stay frozen in eval mode."""

    def __init__(self, head: Head, transform: StitchTransform, tail: Tail):
        super().__init__()
        self.head, self.transform, self.tail = head, transform, tail

    def train(self, mode: bool = True) -> "StitchedNet":
        self.training = mode
        self.transform.train(mode)  # the frozen models stay in eval mode whatever the caller asks
        return self

    def forward(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            a = self.head(x)
        return self.tail(self.transform(a), x)


# ----------------------------------------------------------------------------------------------------- statistics

class LinearStats:
    """Streaming normal equations of Y ~ X W^T + b in float64 (see the module docstring).

    Args:
        d_in, d_out: the widths of X and Y rows.
    """

    def __init__(self, d_in: int, d_out: int):
        self.d_in, self.d_out = d_in, d_out
        self.xx = torch.zeros(d_in + 1, d_in + 1, dtype=torch.float64)  # [X, 1]^T [X, 1]
        self.xy = torch.zeros(d_in + 1, d_out, dtype=torch.float64)  # [X, 1]^T Y
        self.y_sq = torch.zeros(d_out, dtype=torch.float64)  # per output: sum of y^2
        self.n = 0

    def update(self, x: Tensor, y: Tensor) -> None:
        """Add rows ``x`` (m, d_in) and ``y`` (m, d_out)."""
        x, y = x.detach().to("cpu", torch.float64), y.detach().to("cpu", torch.float64)
        xa = torch.cat([x, torch.ones(len(x), 1, dtype=torch.float64)], 1)
        self.xx += xa.T @ xa
        self.xy += xa.T @ y
        self.y_sq += (y * y).sum(0)
        self.n += len(x)

    @property
    def y_sum(self) -> Tensor:
        return self.xy[-1]

    @property
    def x_sum(self) -> Tensor:
        return self.xx[-1, :-1]

    def _check(self) -> None:
        if self.n < 2:
            raise UserError(f"a least-squares fit needs at least 2 rows, got {self.n}")

    def solve(self, mask: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        """(W (d_out, d_in), b (d_out,)): the minimum-norm least-squares map, each output restricted to the inputs
        its mask row keeps (the bias always)."""
        self._check()
        if mask is None or bool(mask.all()):
            wa = pinv_psd(self.xx) @ self.xy
            return wa[:-1].T.contiguous(), wa[-1].clone()
        w = torch.zeros(self.d_out, self.d_in, dtype=torch.float64)
        b = torch.zeros(self.d_out, dtype=torch.float64)
        for j in range(self.d_out):
            keep = torch.cat([mask[j].nonzero().flatten(), torch.tensor([self.d_in])])
            coef = pinv_psd(self.xx[keep][:, keep]) @ self.xy[keep, j]
            w[j, keep[:-1]], b[j] = coef[:-1], coef[-1]
        return w, b

    def reduced_rank(self, rank: int) -> tuple[Tensor, Tensor, Tensor]:
        """(U, V, b) of reduced-rank regression: the least-squares map projected on the top ``rank`` directions of
        its fitted values (centred), W = U V."""
        w, b = self.solve()
        wa = torch.cat([w.T, b[None]], 0)  # (d_in + 1, d_out)
        fitted = wa.T @ self.xx @ wa  # Yhat^T Yhat
        mean = (wa.T @ self.xx[-1]) / self.n
        _, vecs = torch.linalg.eigh(fitted - self.n * torch.outer(mean, mean))
        top = vecs[:, -rank:]  # (d_out, r)
        return top, top.T @ w, top @ (top.T @ b)

    def correlation(self) -> Tensor:
        """Pearson correlation of every (output, input) pair of channels over all rows: (d_out, d_in)."""
        self._check()
        n, mx, my = self.n, self.x_sum / self.n, self.y_sum / self.n
        cov = self.xy[:-1].T / n - torch.outer(my, mx)
        var_x = self.xx.diagonal()[:-1] / n - mx * mx
        var_y = self.y_sq / n - my * my
        return cov / (torch.outer(var_y, var_x).clamp_min(1e-300)).sqrt()

    def procrustes(self) -> tuple[Tensor, Tensor]:
        """Orthogonal Procrustes on centred rows: W with orthonormal rows or columns maximising <Y_c, X_c W^T>,
        b = mean(Y) - W mean(X)."""
        self._check()
        mx, my = self.x_sum / self.n, self.y_sum / self.n
        cross = self.xy[:-1] - self.n * torch.outer(mx, my)  # X_c^T Y_c (d_in, d_out)
        u, _, vh = torch.linalg.svd(cross, full_matrices=False)
        w = (u @ vh).T
        return w, my - w @ mx

    def r2(self, w: Tensor, b: Optional[Tensor]) -> float:
        """R^2 of Y ~ X W^T + b over all rows and outputs (pooled: 1 - SS_res / SS_tot)."""
        self._check()
        w = w.detach().to("cpu", torch.float64)
        b = torch.zeros(self.d_out, dtype=torch.float64) if b is None else b.detach().to("cpu", torch.float64)
        wa = torch.cat([w.T, b[None]], 0)
        res = self.y_sq.sum() - 2 * (wa * self.xy).sum() + (wa * (self.xx @ wa)).sum()
        tot = self.y_sq.sum() - (self.y_sum ** 2).sum() / self.n
        if tot <= 0:
            raise UserError("the end activation is constant over the fitting data: R^2 is undefined")
        return float(1 - res / tot)


def pinv_psd(g: Tensor) -> Tensor:
    """Pseudo-inverse of a symmetric positive semi-definite matrix (X^T X): eigenvalues below
    ``max * size * eps`` count as zero, so ``pinv(X^T X) X^T Y`` is the minimum-norm solution ``pinv(X) Y``."""
    vals, vecs = torch.linalg.eigh(g)
    keep = vals > vals.max().clamp_min(0) * g.shape[0] * torch.finfo(g.dtype).eps
    inv = torch.where(keep, 1 / vals.where(keep, torch.ones_like(vals)), torch.zeros_like(vals))
    return (vecs * inv) @ vecs.T


# ----------------------------------------------------------------------------------------------------- objectives

def soft_cross_entropy(logits: Tensor, target_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """-mean_n sum_k softmax(t / T) log softmax(z / T), as the original (no T^2 factor)."""
    return -(F.softmax(target_logits / temperature, -1) * F.log_softmax(logits / temperature, -1)).sum(-1).mean()


@dataclass(frozen=True)
class TargetBatch:
    """What a stitch target's loss sees of one batch (a tensor is None where the target does not need it)."""

    logits: Optional[Tensor]  # the stitched network's output (None for a target on activations)
    labels: Optional[Tensor]
    front_logits: Optional[Tensor]  # the front model's output on the batch
    end_logits: Optional[Tensor]  # the end model's output on the batch
    transformed: Tensor  # the stitched activation, T(front activation)
    end_activation: Optional[Tensor]  # the end model's activation at the stitched layer
    temperature: float


@dataclass(frozen=True)
class StitchTarget:
    """A stitch's training objective: ``loss(batch)`` of a ``TargetBatch``.

    ``needs`` names the models' outputs it reads (each is computed only where some target needs it); ``labels``:
    it needs the data's labels; ``on_activations``: it compares activations, so the end model's tail never runs.
    """

    loss: Callable[[TargetBatch], Tensor]
    needs: frozenset[str] = frozenset({"front_logits", "end_logits"})
    labels: bool = False
    on_activations: bool = False

    def __call__(self, batch: TargetBatch) -> Tensor:
        return self.loss(batch)


# Stitch targets, by name: a ``StitchTarget``, or a plain function ``loss(batch: TargetBatch) -> Tensor`` (it is then
# given both models' logits). Add one with ``@TARGETS.register("name")``, an import path or an entry point of group
# ``instill.stitch_targets`` (docs/design.md, "Extending instill"); ``instill list stitch_targets`` lists them.
TARGETS = Registry("stitch target")


def _soft(teacher: Callable[[TargetBatch], Tensor]) -> Callable[[TargetBatch], Tensor]:
    return lambda b: soft_cross_entropy(b.logits, teacher(b), b.temperature)


for _name, _target, _doc in (
    ("hard", StitchTarget(lambda b: F.cross_entropy(b.logits, b.labels), frozenset(), labels=True),
     "cross-entropy with the labels"),
    ("soft_1", StitchTarget(_soft(lambda b: b.front_logits), frozenset({"front_logits"})),
     "soft cross-entropy with the front model's output"),
    ("soft_2", StitchTarget(_soft(lambda b: b.end_logits), frozenset({"end_logits"})),
     "soft cross-entropy with the end model's output"),
    ("soft_12", StitchTarget(lambda b: 0.5 * (soft_cross_entropy(b.logits, b.front_logits, b.temperature)
                                              + soft_cross_entropy(b.logits, b.end_logits, b.temperature))),
     "the mean of soft_1 and soft_2"),
    ("soft_1_plus_2", StitchTarget(_soft(lambda b: 0.5 * (b.front_logits + b.end_logits))),
     "soft cross-entropy with the mean of both models' outputs"),
    ("match", StitchTarget(lambda b: F.mse_loss(b.transformed, b.end_activation), frozenset(), on_activations=True),
     "mean squared difference of the stitched and the end activation (no task term)"),
):
    TARGETS.register(_name, doc=_doc)(_target)


def stitch_target(name: str) -> StitchTarget:
    """The target ``name`` names (registered, import path, entry point); a UserError otherwise."""
    entry = TARGETS.get(name)
    return entry.build if isinstance(entry.build, StitchTarget) else StitchTarget(entry.build)


def agreement_metrics(logits: Tensor, end_logits: Tensor, y: Optional[Tensor]) -> dict[str, Tensor]:
    """Per-batch sums: agreement with the end model's argmax, CE and KL to its softmax, and with labels the
    accuracy and the right/wrong overlap counts (rr: both right, rw: end right, stitched wrong, ...)."""
    pred, end_pred = logits.argmax(-1), end_logits.argmax(-1)
    log_p, log_q = F.log_softmax(logits.float(), -1), F.log_softmax(end_logits.float(), -1)
    q = log_q.exp()
    sums = {"agreement": (pred == end_pred).sum(), "ce_to_end": -(q * log_p).sum(),
            "kl_to_end": (q * (log_q - log_p)).sum()}
    if y is not None:
        right, end_right = pred == y, end_pred == y
        sums.update(acc=right.sum(), end_acc=end_right.sum(), rr=(end_right & right).sum(),
                    rw=(end_right & ~right).sum(), wr=(~end_right & right).sum(), ww=(~end_right & ~right).sum())
    return sums
