"""Learning rules as gradient providers: ``train.rule`` picks how the training loop gets a batch's gradients.

Every rule leaves its update in ``param.grad`` (scaled by ``StepContext.scale`` for gradient accumulation), computed
from its own process's batch: under torchrun back-propagation runs through DistributedDataParallel, and for every
other rule the loop averages ``.grad`` over the ranks before the optimizer step (``dist.average_gradients``). The
optimizer, schedule, evaluation, checkpoints, resume and replay stay the training loop's. The rules follow
Boopathy & Fiete (2022) and their code's stop-gradient surrogates exactly (θ0 is the network at the start of
training, e the error dL/df of the *current* network's logits):

- ``backprop``: the stage's own loss, back-propagated (the loop's behaviour before rules existed).
- ``align_zero``: ΔW = -η (∂f_θ0(x)/∂θ)ᵀ e: the initial network's Jacobian (its activations, ReLU derivatives and
  batch statistics on this batch) driven by the current error; surrogate loss (sg(f) + f0 - sg(f0) - y)².
- ``align_ada``: current presynaptic activity; the error goes back through the initial network (θ0's weights and
  nonlinearity derivatives) to each block's output, then through the current block's own batch norm into W_l; the
  readout learns locally. Surrogate: the initial network's block l+1 reads z0_l + z_l - sg(z_l), the current
  network reads sg(z_l); the last block's output enters through the readout's input instead (a0 + a - sg(a) after
  the current activation and pooling, as the original); loss (f + f0 - sg(f0) - y)². The RNN injects every state
  into the linearised recurrence (its readout reads the linearised states), as the original.
- ``align_prop``: back-propagation with every layer's weight replaced by its initial value in the backward pass
  (feedback alignment with B = W0), current derivatives and batch norm.
- ``fa``: the same with independent random feedback drawn like the weights (NTK-scaled).
- ``dfa``: each block output's gradient is act'(z_l) ⊙ B_l e with B_l ~ N(0, 1/dim(z_l)) of shape dim(z_l) x K
  (dense over positions and channels, as the original; option ``feedback: per_channel`` or ``pooled`` for a C x K
  B_l on conv blocks, see ``DirectFeedback``; ``regenerate: true`` draws B_l from its seed at every step instead
  of keeping it); every layer's input is stop-gradient, the readout local.
- ``last_layer``: only the readout (``model.readout_parameters()``) learns.

Options of a rule are its builder's keywords (``train.rule_options: {dfa: {feedback: pooled}}``).

The initial network is copied when training starts and saved with the loop's state (a resumed run keeps its θ0);
random feedback comes from its own seeded generators, so every rule starts from the same initial weights (the
original drew FA/DFA feedback between the forward weights). Rules other than backprop and align_zero need a model
that the rules can tap (``ntk_mlp``, ``ntk_cnn``, ``add_rnn``); dfa needs the blocks of ``ntk_mlp``/``ntk_cnn``.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import nn
from torch.func import functional_call

from ..errors import UserError
from .ntk import ACTIVATIONS
from ..registry import RULES
from ..seeds import derive_seed
from ..steps import Criterion, GradientProvider, RuleContext

# ---------------------------------------------------------------------------------------------------------------
# Shared pieces


def full(t: torch.Tensor) -> torch.Tensor:
    """``t`` in float32 when autocast made it half precision (losses are computed in full precision)."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def output_error(logits: torch.Tensor, y: torch.Tensor, criterion: Criterion) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, e = dloss/dlogits) at the given logits."""
    f = full(logits.detach()).requires_grad_()
    loss = criterion(f, y)
    (e,) = torch.autograd.grad(loss, f)
    return loss.detach(), e


def add_gradients(params: list[nn.Parameter], grads, scale: float) -> None:
    """param.grad += scale * grad (the training loop averages them over ranks under torchrun)."""
    for p, g in zip(params, grads):
        if g is None:
            continue
        g = g * scale
        p.grad = g if p.grad is None else p.grad + g


class InitialNetwork:
    """A frozen copy θ0 of a model's parameters and buffers, evaluated with ``torch.func.functional_call``.

    ``model.live_params`` (the RNN's trainable initial state) enter with their current value, as the original.
    """

    def __init__(self, model: nn.Module):
        self.tensors = {k: v.detach().clone() for k, v in {**dict(model.named_parameters()),
                                                            **dict(model.named_buffers())}.items()}
        self.live = set(getattr(model, "live_params", ()))

    def forward(self, model: nn.Module, x: torch.Tensor, *, grad_of: list[str] = (), live_grad: bool = False,
                tap=None, **options) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(θ0's output, the tensors of ``grad_of`` it was computed from, requiring grad)."""
        current = dict(model.named_parameters())
        values = {}
        for name, value in self.tensors.items():
            if name in self.live:
                values[name] = current[name] if live_grad else current[name].detach()
            else:
                values[name] = value.detach().requires_grad_(name in grad_of)
        kwargs = {**options, **({} if tap is None else {"tap": tap})}
        return functional_call(model, values, (x,), kwargs), [values[n] for n in grad_of]

    def state_dict(self) -> dict[str, Any]:
        return {"initial": self.tensors}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "initial" in state:
            self.tensors = state["initial"]


def _needs(model: nn.Module, rule: str, what: str, ok: bool) -> None:
    if not ok:
        raise UserError(f"{rule} needs {what}; model {type(model).__name__} has none (use ntk_mlp, "
                        f"ntk_cnn or add_rnn, or rule backprop / align_zero)")


def _tappable(model: nn.Module, rule: str) -> None:
    _needs(model, rule, "a model whose block outputs the rules can tap (a forward(x, tap=...))",
           hasattr(model, "layer_names") and hasattr(model, "readout_parameters"))


def _trainable(model: nn.Module) -> tuple[list[str], list[nn.Parameter]]:
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [n for n, _ in named], [p for _, p in named]


# ---------------------------------------------------------------------------------------------------------------
# Rules


class AlignZero(GradientProvider):
    def __init__(self, model: nn.Module, criterion: Criterion):
        self.initial, self.criterion = InitialNetwork(model), criterion

    def gradients(self, model, batch, step):
        x, y = batch
        with torch.no_grad(), step.autocast():
            logits = model(x)
        loss, e = output_error(logits, y, self.criterion)
        names, params = _trainable(model)
        with step.autocast():
            f0, inputs = self.initial.forward(model, x, grad_of=names, live_grad=True)
        # The live parameters are the model's own: their gradient lands in .grad through add_gradients only.
        grads = torch.autograd.grad(full(f0), inputs, e, allow_unused=True)
        add_gradients(params, grads, step.scale)
        return loss, {}

    def state_dict(self):
        return self.initial.state_dict()

    def load_state_dict(self, state):
        self.initial.load_state_dict(state)


@RULES.register("align_zero")
def align_zero(ctx: RuleContext) -> GradientProvider:
    """Align-zero: the initial network's Jacobian, transposed, times the current error."""
    return AlignZero(ctx.model, ctx.criterion)


class AlignAda(AlignZero):
    def gradients(self, model, batch, step):
        x, y = batch
        current = {}
        # As the original: the last block's output reaches the readout through the activation and pooling of the
        # current network, cut (and injected) at the readout's input; the other blocks are cut at their output.
        last = len(model.blocks) - 1 if hasattr(model, "blocks") else None

        def cut(i, z):  # the current network reads its block outputs through a stop-gradient
            current[i] = z
            return z if i == last else z.detach()

        def inject(i, z0):  # the initial network carries the current block output's gradient path
            return z0 if i == last else z0 + (current[i] - current[i].detach())

        with step.autocast():
            logits = model(x, tap=cut)
            f0, _ = self.initial.forward(model, x, tap=inject, **self._lin_options(model))
            surrogate = full(logits) + full(f0) - full(f0.detach())
        loss = self.criterion(surrogate, y)  # its value is the current network's loss
        (loss * step.scale).backward()
        return loss.detach(), {}

    @staticmethod
    def _lin_options(model) -> dict[str, Any]:
        """The RNN's linearised copy reads the current states in its recurrence only, as the original."""
        return {"tap_readout": False} if hasattr(model, "recurrent") else {}


@RULES.register("align_ada")
def align_ada(ctx: RuleContext) -> GradientProvider:
    """Align-ada: current activity, the error back-propagated through the initial network."""
    _tappable(ctx.model, "align_ada")
    return AlignAda(ctx.model, ctx.criterion)


def feedback_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The layers that can run with a feedback matrix, by name."""
    return {name: m for name, m in model.named_modules() if hasattr(m, "feedback") and hasattr(m, "weight")}


class Feedback(GradientProvider):
    """Back-propagation with fixed feedback matrices in place of the weights in the backward pass."""

    def __init__(self, model: nn.Module, criterion: Criterion, matrices: dict[str, torch.Tensor]):
        self.criterion, self.matrices = criterion, matrices

    def gradients(self, model, batch, step):
        x, y = batch
        layers = feedback_layers(model)
        try:
            for name, matrix in self.matrices.items():
                layers[name].feedback = matrix.to(layers[name].weight)
            with step.autocast():
                loss = self.criterion(full(model(x)), y)
            (loss * step.scale).backward()
        finally:
            for name in self.matrices:
                layers[name].feedback = None
        return loss.detach(), {}

    def state_dict(self):
        return {"feedback": self.matrices}

    def load_state_dict(self, state):
        self.matrices = state.get("feedback", self.matrices)


@RULES.register("align_prop")
def align_prop(ctx: RuleContext) -> GradientProvider:
    """Align-prop: feedback alignment whose feedback matrices are the initial forward weights."""
    layers = feedback_layers(ctx.model)
    _needs(ctx.model, "align_prop", "layers that take a feedback matrix", bool(layers))
    return Feedback(ctx.model, ctx.criterion, {n: m.weight.detach().clone() for n, m in layers.items()})


@RULES.register("fa")
def fa(ctx: RuleContext) -> GradientProvider:
    """Feedback alignment: fixed random feedback drawn like each layer's weights (from the feedback stream)."""
    layers = feedback_layers(ctx.model)
    _needs(ctx.model, "fa", "layers that take a feedback matrix", bool(layers))
    matrices = {}
    for name, m in layers.items():
        gen = torch.Generator().manual_seed(derive_seed(ctx.seed, "feedback", name))
        matrices[name] = (torch.randn(m.weight.shape, generator=gen, dtype=m.weight.dtype) * m.init_std).to(m.weight)
    return Feedback(ctx.model, ctx.criterion, matrices)


DirectFeedbackShape = Literal["dense", "pooled", "per_channel"]
FEEDBACK_CHUNK = 1 << 24  # entries of a regenerated B drawn at a time (64 MB of float32)


def feedback_pieces(seed: int, block: int, rows: int, classes: int) -> list[tuple[int, int]]:
    """DFA's B of one block as consecutive pieces of rows, [(rows, seed)], of at most ``FEEDBACK_CHUNK`` entries
    each; the first piece's seed is the kept B's."""
    step = max(1, FEEDBACK_CHUNK // classes)
    return [(min(step, rows - start), derive_seed(seed, "direct_feedback", block, *([j] if j else [])))
            for j, start in enumerate(range(0, rows, step))]


def draw_feedback(rows: int, classes: int, seed: int, spread: int, dtype: torch.dtype) -> torch.Tensor:
    """``rows`` x ``classes`` entries ~ N(0, 1/spread) from ``seed`` (on the CPU, so every device draws the same)."""
    normals = torch.randn(rows, classes, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    return normals.div_(spread ** 0.5)  # in place: a dense B is the largest tensor of a DFA step


class _RegeneratedFeedback(torch.autograd.Function):
    """Forward zeros (N, K): DFA's surrogate ``proj - sg(proj)`` is zero in value. Backward g B_lᵀ, with B_l drawn
    again piece by piece and never held whole."""

    @staticmethod
    def forward(ctx, activity, pieces, classes, spread):
        ctx.pieces, ctx.spread = pieces, spread
        return activity.new_zeros(activity.shape[0], classes)

    @staticmethod
    def backward(ctx, grad):
        parts = [grad @ draw_feedback(rows, grad.shape[1], seed, ctx.spread, grad.dtype).to(grad.device).T
                 for rows, seed in ctx.pieces]
        return torch.cat(parts, 1), None, None, None


class DirectFeedback(GradientProvider):
    """DFA: the readout learns locally; every block output z_l gets act'(z_l) ⊙ (B_l e) as its gradient, through
    the surrogate ``proj_l(a_l) - sg(proj_l(a_l))`` added to the logits (a_l = act(z_l), the layers' inputs cut).

    ``feedback`` says how B_l spans a conv block's (C, H, W) output (a dense block, H = W = 1, takes the same B
    under every option, so the MLPs' updates do not depend on it); K is the number of outputs:

    - ``dense`` (the original): proj = flatten(a) B, B ~ N(0, 1/(CHW)) of shape (C·H·W) x K: memory C·H·W·K floats
      per block (a CIFAR net at width 512: 32·32·512·10 = 5.2 M floats, 21 MB, per 32x32 block).
    - ``per_channel``: B ~ N(0, 1/(CHW)) of shape C x K, shared by every position: proj = (Σ_hw a) B, so every
      position of channel c receives (B e)_c, with the per-position magnitude of ``dense`` (its learning rates
      carry over); memory C·K.
    - ``pooled``: the global average pool first, then B ~ N(0, 1/C) of shape C x K: proj = mean_hw(a) B, a random
      readout of the block at the NTK scale of the model's own readout; every position receives (B e)_c / (HW);
      memory C·K. Its update is ``per_channel``'s direction scaled by 1/sqrt(HW) in expectation (a different
      draw).

    B_l comes from block l's own seeded generator (``derive_seed(seed, "direct_feedback", l)``), drawn the first
    time the block's output shape is known, and is saved with the loop's state. ``regenerate: true`` never holds
    B_l whole: the surrogate's backward draws it again, ``FEEDBACK_CHUNK`` entries of rows at a time, and multiplies
    the error by each piece, so a step holds one piece (64 MB) where ``dense`` would hold C·H·W·K floats (an
    ImageNet-sized 112x112x64 block with 1000 classes: 800 M floats, 3.2 GB), and nothing is saved; the price is a
    draw of B_l's normals per block and step. The first piece comes from block l's generator as above, so a B_l
    that fits in one piece (every MLP and CIFAR-sized block) is the kept one: the same updates up to float rounding
    (the kept B's surrogate adds a_l B_l to the logits and subtracts it again, which rounds; the regenerated one
    adds zeros); piece j > 0 from ``derive_seed(seed, "direct_feedback", l, j)``, another draw of the same law.
    """

    def __init__(self, model: nn.Module, criterion: Criterion, seed: int, feedback: DirectFeedbackShape = "dense",
                 regenerate: bool = False):
        self.criterion, self.seed, self.feedback, self.regenerate = criterion, seed, feedback, regenerate
        self.matrices: dict[int, torch.Tensor] = {}

    def _shape(self, z: torch.Tensor) -> tuple[int, int]:
        """(rows of B_l, spread) for block output ``z`` (N, C[, H, W]); B_l ~ N(0, 1/spread)."""
        channels, positions = z.shape[1], z[0, 0].numel()
        rows = channels * positions if self.feedback == "dense" else channels
        return rows, channels if self.feedback == "pooled" else channels * positions

    def _matrix(self, i: int, z: torch.Tensor, classes: int, like: torch.Tensor) -> torch.Tensor:
        """B_l, drawn from block l's own generator the first time."""
        if i not in self.matrices:
            rows, spread = self._shape(z)
            self.matrices[i] = draw_feedback(rows, classes, derive_seed(self.seed, "direct_feedback", i), spread,
                                             like.dtype)
        return self.matrices[i].to(like)

    def _projection(self, i: int, z: torch.Tensor, activity: torch.Tensor, classes: int) -> torch.Tensor:
        """(N, K) whose backward sends activity the gradient g B_lᵀ; its value only matters as ``proj - sg(proj)``."""
        if not self.regenerate:
            return activity @ self._matrix(i, z, classes, activity)
        rows, spread = self._shape(z)
        return _RegeneratedFeedback.apply(activity, feedback_pieces(self.seed, i, rows, classes), classes, spread)

    def _activity(self, a: torch.Tensor) -> torch.Tensor:
        """What B_l reads of a block's activation: every unit (dense), or per channel its sum or mean."""
        if a.dim() == 2 or self.feedback == "dense":
            return a.flatten(1)
        return a.sum((2, 3)) if self.feedback == "per_channel" else a.mean((2, 3))

    def gradients(self, model, batch, step):
        x, y = batch
        outputs = []

        def cut(i, z):
            if i < len(model.blocks):  # block outputs; the readout's input (index L) is already cut
                outputs.append(z)
            return z.detach()

        with step.autocast():
            logits = full(model(x, tap=cut))
            proj = sum(self._projection(i, z, self._activity(ACTIVATIONS[model.activation](z)).to(logits.dtype),
                                        logits.shape[1]) for i, z in enumerate(outputs))
        loss = self.criterion(logits + proj - proj.detach(), y)
        (loss * step.scale).backward()
        return loss.detach(), {}

    def state_dict(self):
        return {"direct_feedback": self.matrices}

    def load_state_dict(self, state):
        self.matrices = state.get("direct_feedback", self.matrices)


@RULES.register("dfa")
def dfa(ctx: RuleContext, *, feedback: DirectFeedbackShape = "dense", regenerate: bool = False) -> GradientProvider:
    """Direct feedback alignment: a fixed random projection of the output error to every block (``feedback``:
    dense over a conv block's positions and channels as the original, per_channel, or pooled; ``regenerate``:
    draw B from its seed at every step instead of keeping it)."""
    _needs(ctx.model, "dfa", "a registered readout fed by blocks (ntk_mlp or ntk_cnn)",
           hasattr(ctx.model, "blocks") and hasattr(ctx.model, "readout_parameters"))
    return DirectFeedback(ctx.model, ctx.criterion, ctx.seed, feedback, regenerate)


class LastLayer(GradientProvider):
    def __init__(self, criterion: Criterion):
        self.criterion = criterion

    def gradients(self, model, batch, step):
        x, y = batch
        readout = set(model.readout_parameters())
        frozen = [p for n, p in model.named_parameters() if n not in readout and p.requires_grad]
        try:
            for p in frozen:  # no graph through the frozen layers: the forward costs what inference costs
                p.requires_grad_(False)
            with step.autocast():
                loss = self.criterion(full(model(x)), y)
            (loss * step.scale).backward()
        finally:
            for p in frozen:
                p.requires_grad_(True)
        return loss.detach(), {}


@RULES.register("last_layer")
def last_layer(ctx: RuleContext) -> GradientProvider:
    """Only the readout learns (the RNN's readout and its trainable initial state)."""
    _needs(ctx.model, "last_layer", "a registered readout (readout_parameters)",
           hasattr(ctx.model, "readout_parameters"))
    return LastLayer(ctx.criterion)
