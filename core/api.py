"""instill's Python API: its systems on your own ``nn.Module`` and ``DataLoader``, without a config or a run directory.

Everything here is also importable from the top level (``import instill; instill.measure_similarity(x, y)``); the
package imports it lazily, so ``import instill`` costs nothing until a name is used. These names are the stable surface;
the modules behind them (``instill.masks``, ``instill.guidance``, ...) hold the details and may change.

Masks (subnetwork discovery and transfer, ``instill.masks`` and ``instill.transfer``)::

    masked = instill.find_subnetwork(model, loader, layers=["Linear"], epochs=5)   # a trained MaskedModel
    masked.save("my_mask")                                   # mask.safetensors + mask.json
    mask = instill.load_mask("my_mask", model)               # {parameter name: bool tensor}, checked
    start = instill.transplant("subnet", model, fresh, mask)  # train start.model; frozen entries stay fixed

Similarity (``instill.similarity``)::

    instill.measure_similarity(x, y, "cka")                  # a 0-dim tensor; differentiable in x and y

Guidance (``instill.guidance``), an alignment loss for your own training loop::

    align = instill.alignment_loss(model, guide, [("layers.0", "conv1"), ("layers.1", "layer1")])
    for x, y in loader:
        loss = F.cross_entropy(model(x), y) + align(x)[0]    # the model's forward first, then the loss

Comparison (``instill.compare``), every selected layer of one model against every one of another::

    result = instill.compare_models(model_a, model_b, loader, layers_a=["type:Linear"])
    result.matrix("cka_minibatch"); result.heatmap("cka_minibatch", "cka.png")

Stitching (``instill.stitching``)::

    stitched, metrics = instill.stitch_models(front, end, "layers.1", "layers.1", loader, epochs=2)

Align learning rules (``instill.rules``, ``instill.alignment``), in your own training loop::

    rule = instill.learning_rule("align_zero", model)         # built at the start of training: theta0 = model now
    for x, y in loader:
        optimizer.zero_grad(); rule.gradients(model, (x, y), instill.StepContext(lr=lr)); optimizer.step()

How the pieces fit and why they are built as they are: ``docs/design.md``.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Literal, Optional, Sequence

import torch
from torch import nn

from .alignment import CHANCE, AlignmentBaseline, check_layers
from .compare import Comparison, compare_models
from .errors import UserError
from .rules import GradientProvider, RuleContext, StepContext, build_rule
from .stitching import (INITS, Head, LinearStats, Side, StitchedNet, StitchTransform, Tail, agreement_metrics, freeze,
                        init_matrix, layout_of, target_loss)
from .features import DEFAULT_TYPES, FeatureCapture, probe
from .guidance import AlignmentLoss, LayerPair, resolve_pairs
from .masks import MaskConfig, MaskedModel, load_mask, mask_density
from .similarity import SIMILARITIES, get_similarity
from .transfer import CONDITIONS as TRANSFER_CONDITIONS
from .transfer import Transplant, transplant
from .train import logits_of

__all__ = [
    # masks: find a subnetwork, save and load it, transplant it
    "MaskConfig", "MaskedModel", "find_subnetwork", "load_mask", "mask_density", "transplant", "Transplant",
    "TRANSFER_CONDITIONS",
    # similarity: a measure on two tensors
    "measure_similarity", "measures",
    # guidance: an alignment loss for your own training loop
    "alignment_loss", "AlignmentLoss", "LayerPair", "FeatureCapture", "probe",
    # comparison: a layer-by-layer matrix of two models over a data loader, with a heatmap
    "compare_models", "Comparison",
    # stitching: the front model up to a layer, a trained stitching transform, the end model from a layer on
    "stitch_models", "StitchedNet", "StitchTransform",
    # Align learning rules: a rule's gradients for your own model and batch, and the alignment scores
    "learning_rule", "learning_rules", "GradientProvider", "StepContext", "alignment_scores", "AlignmentBaseline",
    "UserError",
]


# ----------------------------------------------------------------------------------------------------- masks

def _device_of(model: nn.Module) -> torch.device:
    param = next(iter(model.parameters()), None)
    return param.device if param is not None else torch.device("cpu")


def _pair(batch: Any) -> tuple[Any, Any]:
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[0], batch[1]
    raise UserError(f"the data loader must yield (inputs, targets) batches, got {type(batch).__name__}")


def _cross_entropy(output: Any, target: torch.Tensor) -> torch.Tensor:
    logits = logits_of(output)
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), target.reshape(-1),
                                       ignore_index=-100)


def find_subnetwork(model: nn.Module, loader: Iterable, *, layers: Sequence[str] = ("Linear",),
                    method: Literal["continuous_sparsification", "hard_concrete", "magnitude"] =
                    "continuous_sparsification", epochs: int = 5, lr: float = 0.01, l0_lambda: float = 1e-6,
                    loss_fn: Optional[Callable[[Any, torch.Tensor], torch.Tensor]] = None,
                    **mask_options: Any) -> MaskedModel:
    """Train a mask over ``model``'s weights that keeps the subnetwork doing the task ``loader`` shows.

    The mask logits train with AdamW on ``loss_fn(model output, targets) + l0_lambda * L0(mask)`` while the
    continuous-sparsification temperature anneals over ``epochs``; ``magnitude`` masks train nothing. The model
    itself is frozen (``requires_grad`` off) and kept in evaluation mode; its weights never change.

    Args:
        model: a trained network; batches go to the device its parameters are on.
        loader: yields ``(inputs, targets)`` batches (a ``torch.utils.data.DataLoader``, or any iterable).
        layers: what to mask: layer types (``Linear``, ``Conv2d``, ``Conv1D``, ``Embedding``, ...), globs over module
            names (``layers.*``) or over parameter names (``*.in_proj_weight``).
        method: ``continuous_sparsification``, ``hard_concrete`` or ``magnitude``.
        epochs: passes over ``loader``.
        lr: AdamW learning rate of the mask logits.
        l0_lambda: weight of the L0 (density) penalty: larger gives sparser masks.
        loss_fn: ``loss_fn(output, targets)``; default cross-entropy on the output's logits (-100 targets ignored).
        **mask_options: further ``MaskConfig`` fields (``unit``, ``mask_bias``, ``final_temp``, ``prune_fraction``,
            ...).

    Returns:
        The trained ``MaskedModel`` in evaluation mode: ``hard_masks()`` gives ``{parameter name: bool tensor}``,
        ``save(directory)`` writes the mask artifact that ``load_mask`` reads, and calling it runs the subnetwork.

    Raises:
        UserError: an unknown method or option, a layer selection that matches no weight, or batches that are not
            ``(inputs, targets)`` pairs.
    """
    try:
        config = MaskConfig(layers=tuple(layers), method=method, l0_lambda=l0_lambda, **mask_options)
    except TypeError as err:
        raise UserError(f"find_subnetwork: {err}") from None
    loss_fn = loss_fn or _cross_entropy
    device = _device_of(model)
    masked = MaskedModel(model, config).to(device)
    if masked.method.trainable:
        optimizer = torch.optim.AdamW(masked.logits.parameters(), lr=lr)
        for epoch in range(epochs):
            masked.set_epoch(epoch, epochs)
            masked.train()
            for batch in loader:
                x, y = _pair(batch)
                loss = loss_fn(masked(x.to(device)), y.to(device)) + masked.penalty()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
    return masked.eval()


# ----------------------------------------------------------------------------------------------------- similarity

def measure_similarity(x: torch.Tensor, y: torch.Tensor, measure: str = "cka") -> torch.Tensor:
    """How similar two sets of activations of the same samples are.

    Args:
        x: (n, ...) activations of n samples (features are flattened).
        y: (n, ...) activations of the same n samples, from another layer or network.
        measure: one of ``measures()``: ``cka``, ``cka_unbiased``, ``rsa``, ``rsa_classic``, ``procrustes``,
            ``cca``, ``cca_squared``, ``svcca``, ``pwcca``.

    Returns:
        A 0-dim tensor (1 for identical representations up to the measure's invariances); differentiable.

    Raises:
        UserError: an unknown measure, sample counts that differ, or too few samples for an estimate.
    """
    return get_similarity(measure)(x, y)


def measures() -> list[str]:
    """The names ``measure_similarity`` and ``alignment_loss`` accept.

    Returns:
        The measure names, sorted.
    """
    return sorted(SIMILARITIES)


# ----------------------------------------------------------------------------------------------------- guidance

PairSpec = Sequence[str | float]


def alignment_loss(target: nn.Module, guide: nn.Module,
                   pairs: Sequence[PairSpec] | Literal["uniform", "repo"], *, sample: Optional[torch.Tensor] = None,
                   target_layers: Sequence[Any] = DEFAULT_TYPES, guide_layers: Sequence[Any] = DEFAULT_TYPES,
                   similarity: str = "cka", alpha: float = 1.0, reduce: Literal["sum", "mean"] = "sum",
                   tokenwise: Optional[Literal["positions", "rows"]] = None, steps: Optional[int] = None
                   ) -> AlignmentLoss:
    """A representational-alignment loss that pulls ``target``'s layers towards a frozen ``guide``'s.

    ``loss = alpha * reduce over pairs of weight * (1 - similarity(target layer, guide layer))``. Hooks record the
    paired target layers during the target's own forward, so call the target first and the loss right after::

        output = target(x)
        align_loss, sims = align(x)        # the guide runs on x under no_grad; sims: each pair's similarity

    An evaluation forward in between is harmless (each forward starts a fresh capture); a loss whose last target
    forward ran under ``no_grad`` raises instead of silently training nothing. Wrap evaluations in
    ``align.paused()`` to skip the hooks' copies; call ``align.close()`` when training ends.

    Args:
        target: the network being trained.
        guide: the guide network; it is put in evaluation mode and frozen.
        pairs: ``[(target layer, guide layer)]`` or ``[(target layer, guide layer, weight)]`` by module name
            (``name@k`` for the (k+1)-th call of a shared module), or ``"uniform"`` / ``"repo"``: the original
            code's stretch of the guide's layers over the target's (``repo`` keeps its overwriting), over the layers
            ``target_layers`` / ``guide_layers`` select, the last (logits) layer of each left out.
        sample: a batch of inputs; needed for ``"uniform"`` / ``"repo"`` (one probe forward lists the layers).
        target_layers: module names or types for the stretch maps (default: linear, conv, pooling, recurrent,
            attention, norm and transformer layers).
        guide_layers: the same for the guide.
        similarity: one of ``measures()``.
        alpha: the loss weight.
        reduce: ``sum`` or ``mean`` over pairs.
        tokenwise: for (batch, time, ...) sequence captures: ``positions`` (sum over positions) or ``rows``.
        steps: guidance only for the first N optimizer steps (see ``AlignmentLoss.active``).

    Returns:
        The ``AlignmentLoss``; calling it with the guide's input gives ``(loss, {pair: similarity})``.

    Raises:
        UserError: a layer name that is not in the model (with the nearest names), an unknown measure, a stretch
            map without ``sample`` or that pairs no layers.
    """
    if isinstance(pairs, str):
        if sample is None:
            raise UserError(f"alignment_loss: pairs={pairs!r} needs sample=<a batch of inputs> to list the layers")
        target_keys = list(probe(target, list(target_layers), sample))[:-1]
        guide_keys = list(probe(guide, list(guide_layers), sample))[:-1]
        resolved = resolve_pairs(pairs, target_keys, guide_keys)
    else:
        resolved = []
        for pair in pairs:
            if isinstance(pair, LayerPair):
                resolved.append(pair)
            elif isinstance(pair, (tuple, list)) and len(pair) in (2, 3):
                resolved.append(LayerPair(str(pair[0]), str(pair[1]), float(pair[2]) if len(pair) == 3 else 1.0))
            else:
                raise UserError(f"alignment_loss: a pair is (target layer, guide layer[, weight]), got {pair!r}")
    if not resolved:
        raise UserError("alignment_loss: no layer pairs (does each side capture at least two layers?)")
    return AlignmentLoss(target, guide, resolved, similarity=similarity, alpha=alpha, reduce=reduce,
                         tokenwise=tokenwise, steps=steps)


# ----------------------------------------------------------------------------------------------------- stitching

def _stitch_transform(head: Head, end_head: Head, tail: Tail, sample: torch.Tensor, transform: str,
                      rank: Optional[int], bias: bool, resize: str) -> StitchTransform:
    with torch.no_grad():
        a, b = head(sample), end_head(sample)
    sides = [Side(tuple(t.shape[1:]), layout_of(tuple(t.shape[1:]))) for t in (a, b)]
    built = StitchTransform(*sides, kind=transform, rank=rank, bias=bias, resize=resize).to(sample.device)
    with torch.no_grad():
        tail(built(a), sample)  # the end model's tail takes the mapped activation
    return built


@torch.no_grad()
def _stitch_metrics(stitched: StitchedNet, end: nn.Module, loader: Iterable, device: torch.device
                    ) -> dict[str, float]:
    sums: dict[str, float] = {}
    n = 0
    for batch in loader:
        x, y = (t.to(device) for t in _pair(batch))
        for key, value in agreement_metrics(stitched(x), end(x), y).items():
            sums[key] = sums.get(key, 0.0) + float(value)
        n += len(x)
    if n == 0:
        raise UserError("stitch_models: the evaluation loader yielded no samples")
    keys = ("acc", "end_acc", "agreement", "ce_to_end", "kl_to_end")
    return {key: sums[key] / n for key in keys}


def stitch_models(front: nn.Module, end: nn.Module, front_layer: str, end_layer: str, loader: Iterable, *,
                  transform: Literal["affine", "flatten"] = "affine", init: str = "ps_inv", rank: Optional[int] = None,
                  bias: bool = True, resize: str = "bilinear", target: str = "hard", temperature: float = 1.0,
                  epochs: int = 1, lr: float = 1e-3, eval_loader: Optional[Iterable] = None, seed: int = 0
                  ) -> tuple[StitchedNet, dict[str, float]]:
    """Stitch ``front`` up to ``front_layer`` into ``end`` from ``end_layer`` on, and train the stitching layer.

    The two models are split (``instill.stitching.Head`` / ``Tail``), a ``StitchTransform`` maps the front
    activation onto the end activation's shape, is initialised (``ps_inv``: the least-squares map from one pass over
    ``loader``) and then trained with Adam on ``target``'s loss while both models stay frozen.

    Args:
        front: the network that gives the first part; put in evaluation mode and frozen (``requires_grad`` off).
        end: the network that gives the rest; frozen the same way.
        front_layer: the module name in ``front`` to cut after.
        end_layer: the module name in ``end`` whose output the stitched activation replaces.
        loader: yields ``(inputs, targets)`` batches; the least-squares fit and the training use it.
        transform: ``affine`` (a 1x1 convolution / channel map shared over positions) or ``flatten``.
        init: one of ``instill.stitching.INITS``: ``random``, ``identity``, ``perm``, ``ones_zeros``, ``ps_inv``,
            ``procrustes``.
        rank: restrict the channel map to this rank (``ps_inv`` then becomes reduced-rank regression).
        bias: learn a bias.
        resize: how a front map is brought onto the end's grid when their sizes differ.
        target: one of ``instill.stitching.TARGETS`` other than ``match``: ``hard`` (labels), ``soft_1``,
            ``soft_2``, ``soft_12``, ``soft_1_plus_2`` (the models' softened outputs).
        temperature: of the soft targets.
        epochs: training passes over ``loader`` (0: keep the initialisation).
        lr: Adam's learning rate.
        eval_loader: the batches the metrics are measured on (default ``loader``).
        seed: seeds the random inits.

    Returns:
        ``(stitched, metrics)``: the ``StitchedNet`` in evaluation mode (``stitched.transform`` holds the map) and
        ``{acc, end_acc, agreement, ce_to_end, kl_to_end}`` of the trained stitch on ``eval_loader``, the same with a
        ``before_`` prefix for the initialised one, and ``fit_r2`` (the R^2 of the trained map against the end
        activations on ``loader``) when a least-squares pass ran.

    Raises:
        UserError: an unknown layer (nearest names listed), activations no transform of this kind connects, an
            unknown init or target, an init the shapes do not allow, batches that are not ``(inputs, targets)``.
    """
    if target == "match" or target not in ("hard", "soft_1", "soft_2", "soft_12", "soft_1_plus_2"):
        raise UserError(f"stitch_models: unknown target {target!r}; known: hard, soft_1, soft_2, soft_12, "
                        f"soft_1_plus_2")
    if init not in INITS:
        raise UserError(f"stitch_models: unknown init {init!r}; known: {', '.join(INITS)}")
    device = _device_of(front)
    freeze(front), freeze(end)
    head, end_head, tail = Head(front, front_layer), Head(end, end_layer), Tail(end, end_layer)
    first = next(iter(loader), None)
    if first is None:
        raise UserError("stitch_models: the loader yielded no batches")
    sample = _pair(first)[0][:4].to(device)
    stitch = _stitch_transform(head, end_head, tail, sample, transform, rank, bias, resize)
    stats = None
    if init in ("ps_inv", "procrustes"):
        stats = LinearStats(stitch.d_in, stitch.d_out)
        with torch.no_grad():
            for batch in loader:
                x = _pair(batch)[0].to(device)
                stats.update(*stitch.fit_rows(head(x), end_head(x)))
    generator = torch.Generator().manual_seed(seed)
    if init == "ps_inv" and rank is not None:
        stitch.set_factors(*stats.reduced_rank(rank))
    else:
        stitch.set_matrix(*init_matrix(init, stitch.d_out, stitch.d_in, generator, stats))
    stitched = StitchedNet(head, stitch, tail).to(device)
    evaluate_on = loader if eval_loader is None else eval_loader
    metrics = {f"before_{k}": v for k, v in _stitch_metrics(stitched.eval(), end, evaluate_on, device).items()}
    optimizer = torch.optim.Adam(stitch.parameters(), lr=lr)
    for _ in range(epochs):
        stitched.train()
        for batch in loader:
            x, y = (t.to(device) for t in _pair(batch))
            with torch.no_grad():
                front_logits = logits_of(front(x)) if target in ("soft_1", "soft_12", "soft_1_plus_2") else None
                end_logits = logits_of(end(x)) if target in ("soft_2", "soft_12", "soft_1_plus_2") else None
            loss = target_loss(target, stitched(x), y, front_logits, end_logits, temperature)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    metrics.update(_stitch_metrics(stitched.eval(), end, evaluate_on, device))
    if stats is not None:
        metrics["fit_r2"] = stats.r2(stitch.matrix().detach(), None if stitch.bias is None else stitch.bias.detach())
    return stitched, metrics


# ----------------------------------------------------------------------------------------------------- Align rules

def learning_rules() -> list[str]:
    """The names ``learning_rule`` accepts (``instill list rules`` shows each with its help).

    Returns:
        The rule names, sorted.
    """
    from . import rules as _rules  # noqa: F401 - registers the rules
    from .registry import RULES

    return RULES.names()


def learning_rule(name: str, model: nn.Module, *, criterion: Optional[Callable[[torch.Tensor, torch.Tensor],
                  torch.Tensor]] = None, seed: int = 0, options: Optional[dict[str, Any]] = None
                  ) -> GradientProvider:
    """A learning rule (Boopathy & Fiete 2022) that puts a batch's update into your model's ``.grad``.

    Build it when training starts: the rules that need the initial network copy ``model``'s weights now (theta0).
    Then, per step::

        optimizer.zero_grad()
        loss, logs = rule.gradients(model, (x, y), instill.StepContext(lr=optimizer.param_groups[0]["lr"]))
        optimizer.step()

    Args:
        name: one of ``learning_rules()``: ``backprop``, ``align_zero`` (any model), ``align_ada``, ``align_prop``,
            ``fa``, ``dfa``, ``last_layer`` (models the rules can tap: ``ntk_mlp``, ``ntk_cnn``, ``add_rnn`` of
            ``instill.models``).
        model: the network at the start of training.
        criterion: ``criterion(logits, targets)``; default cross-entropy.
        seed: seeds the random feedback of ``fa`` and ``dfa``.
        options: the rule's options (``instill list rules``), e.g. ``{"feedback": "pooled"}`` for ``dfa``.

    Returns:
        The ``GradientProvider``: ``gradients(model, (inputs, targets), StepContext)`` returns ``(loss, logs)``;
        ``state_dict()`` / ``load_state_dict()`` keep theta0 and the feedback for a resumed run.

    Raises:
        UserError: an unknown rule (nearest names listed) or option, or a model the rule cannot tap.
    """
    criterion = criterion or (lambda logits, y: nn.functional.cross_entropy(logits, y))

    def loss(net: nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, float]]:
        x, y = _pair(batch)
        return criterion(logits_of(net(x)), y), {}

    learning_rules()  # registers the rules before the lookup
    return build_rule(name, RuleContext(model, loss, criterion, seed), options)


def alignment_scores(model: nn.Module, layers: Optional[Sequence[str]] = None, *,
                     criterion: Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = None,
                     method: Literal["exact", "hutchinson"] = "exact", chance: Sequence[str] = CHANCE,
                     seed: int = 0) -> AlignmentBaseline:
    """Back-propagation that also tracks the Align-zero baseline, to score how input-aligned the updates are.

    Use it as the learning rule of a back-propagation run (``gradients`` as for ``learning_rule``), then call
    ``scores(model)`` at any time: ``align/<layer>`` is the input-weight alignment score of the layer's weight
    change against the baseline, ``align_<control>/<layer>`` the chance controls.

    Args:
        model: the network at the start of training (its weights are W(0)).
        layers: module names of the weight layers to score (default: every linear and conv weight, or the
            model's ``layer_names()``).
        criterion: ``criterion(logits, targets)``; default cross-entropy.
        method: ``exact`` or ``hutchinson`` (for convolutions).
        chance: controls to report, a subset of ``shuffled_weights`` and ``shuffled_update``.
        seed: seeds probes and shuffles.

    Returns:
        The ``AlignmentBaseline``; ``scores(model)`` gives ``{name: score}``.

    Raises:
        UserError: a layer that is not a weight layer of the model (nearest names listed), an unknown control.
    """
    if hasattr(model, "layer_names"):
        available = model.layer_names()
    else:
        available = [n for n, m in model.named_modules()
                     if isinstance(getattr(m, "weight", None), nn.Parameter) and m.weight.dim() in (2, 4)]
    unknown = set(chance) - set(CHANCE)
    if unknown:
        raise UserError(f"alignment_scores: unknown chance control {sorted(unknown)}; known: {', '.join(CHANCE)}")
    criterion = criterion or (lambda logits, y: nn.functional.cross_entropy(logits, y))
    return AlignmentBaseline(model, criterion, check_layers(list(layers or []), available), method=method,
                             chance=tuple(chance), seed=seed)
