"""Guidance: layer maps between a target and a frozen guide, and the representational-alignment loss.

    loss = task_loss + alpha * reduce_over_pairs(weight * (1 - similarity(target layer, guide layer)))

Layer maps:
- ``repo``: the original code's uniform stretch, guide layer i -> target layer min(round(i * step), n_t - 1) with
  Python's banker's rounding, where a later guide layer mapped to the same target layer overwrites the earlier
  one. This reproduces the paper's numbers (ResNet-18 -> Wide FCN keeps 3 of 21 terms).
- ``uniform``: the same stretch, every mapped pair kept.
- explicit ``{target: name, guide: name, weight: w}`` pairs.

Names are capture keys (``instill.compare.capture``): a module name, ``name@k`` for its (k+1)-th call in one forward.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from functools import partial
from typing import Any, Iterator, Literal, Mapping, Optional, Sequence

import torch
from torch import nn

from ..errors import UserError, unknown_name
from ..compare.similarity import DegenerateActivations, NonFiniteActivations


@dataclass(frozen=True)
class LayerPair:
    """One aligned pair: a target layer, a guide layer (capture keys) and the weight of its term."""

    target: str
    guide: str
    weight: float = 1.0


LayerMap = Literal["repo", "uniform"]
Reduce = Literal["sum", "mean"]


def stretch_map(targets: Sequence[str], guides: Sequence[str], mode: LayerMap) -> list[LayerPair]:
    """Pairs from the original's uniform mapping of guide layers onto target layers."""
    if not targets or not guides:
        return []
    step = (len(targets) - 1) / (len(guides) - 1) if len(guides) > 1 else 1.0
    pairs = [LayerPair(targets[min(round(i * step), len(targets) - 1)], guide) for i, guide in enumerate(guides)]
    if mode == "uniform":
        return pairs
    last_per_target: dict[str, LayerPair] = {}
    for pair in pairs:  # the original stored terms in a dict keyed by the target layer
        last_per_target[pair.target] = pair
    return list(last_per_target.values())


def resolve_pairs(spec: str | Sequence[Mapping[str, Any]], target_keys: Sequence[str], guide_keys: Sequence[str]
                  ) -> list[LayerPair]:
    """The layer pairs a config asks for: ``repo`` / ``uniform`` over the captured keys, or explicit pairs."""
    if isinstance(spec, str):
        return stretch_map(target_keys, guide_keys, spec)
    pairs = [LayerPair(p["target"], p["guide"], float(p.get("weight", 1.0))) for p in spec]
    for side, keys, attr in (("target", target_keys, "target"), ("guide", guide_keys, "guide")):
        for pair in pairs:
            if getattr(pair, attr) not in keys:
                raise unknown_name(f"{side} layer", getattr(pair, attr), keys, where=" (not captured)",
                                   suggestions=3)
    return pairs


Tokenwise = Optional[Literal["positions", "rows"]]


def compared_rows(shape: Sequence[int], tokenwise: Tokenwise) -> tuple[int, ...]:
    """The sample axes of a capture of ``shape`` that the similarity compares: (batch,), or token-wise of a
    (batch, time, ...) capture, (batch, time). Both sides of a pair must agree."""
    return tuple(shape[:2]) if tokenwise and len(shape) >= 3 else tuple(shape[:1])


class AlignmentLoss:
    """alpha * reduce over pairs of weight * distance(target capture, guide summary).

    The guide runs under ``no_grad`` in evaluation mode; each of its paired layer calls keeps only its summary (an
    n x n Gram matrix for CKA), computed inside the hook; unpaired calls of a shared layer are skipped on both sides.
    The target's captures come from the same forward that gives its logits. The distance is ``1 - similarity`` of
    the (batch, ...) captures, or, for (batch, time, ...) sequence captures with ``tokenwise``:

    - ``positions`` (the original's token-wise CKA): the sum over positions t of ``1 - similarity(X[:, t], Y[:, t])``,
      each position over the samples that are real there (trailing padding left out), positions with fewer real
      samples than the measure needs (``Similarity.min_samples``) skipped; the log shows the mean similarity.
    - ``rows``: one similarity whose rows are all real (sample, token) pairs.

    ``real`` (a (batch, time) bool mask, ``instill.data.sequences.real_positions``) marks the real positions; without
    it every position is real. ``steps``: guidance only for the first N optimizer steps (``active``); then the
    hooks are removed, so the target's forwards copy nothing and the guide no longer runs.

    ``run_guide(input)`` before the target's forward runs the guide first (the same loss, less memory at once); the
    call after the forward then takes no input.

    Each forward of the target starts a fresh capture, and a loss whose last target forward ran without gradients
    raises (see ``__call__``): an evaluation forward in a user's loop can neither leave a stale capture nor make the
    loss silently train nothing. ``instill.alignment_loss`` builds one from layer names.

    Args:
        target: the network being trained.
        guide: the guide network (put in eval mode and frozen).
        pairs: the aligned layer pairs (capture keys of each side).
        similarity: a measure name (``instill.measures()``).
        similarity_options: the measure's own options (a measure function of your own: its keyword-only
            parameters).
        alpha: the loss weight; reduce: ``sum`` or ``mean`` over pairs; tokenwise: see above.
        target_batch_axes / guide_batch_axes: ``{layer: batch axis}`` for layers that are not batch first.
        steps: guide only the first N optimizer steps.

    Raises:
        UserError: a layer name that is not in its model, an unknown measure or option.
    """

    def __init__(self, target: nn.Module, guide: nn.Module, pairs: list[LayerPair], *, similarity: str = "cka",
                 similarity_options: Mapping[str, Any] | None = None, alpha: float = 1.0, reduce: Reduce = "sum",
                 tokenwise: Tokenwise = None,
                 target_batch_axes: Mapping[str, int] | None = None,
                 guide_batch_axes: Mapping[str, int] | None = None, steps: int | None = None):
        from ..compare.capture import FeatureCapture, module_of
        from ..compare.similarity import get_similarity

        self.pairs, self.alpha, self.reduce, self.tokenwise, self.steps = pairs, alpha, reduce, tokenwise, steps
        self.measure = get_similarity(similarity, dict(similarity_options or {}))
        self.guide = guide.eval().requires_grad_(False)
        self.closed = False
        self._real: torch.Tensor | None = None
        self._ahead: dict[str, list[Any]] | NonFiniteActivations | None = None  # what run_guide left for this step
        self._rows: Any = None  # token-wise, with padding: which rows are real in this step (see _set_real)
        target_keys, guide_keys = [p.target for p in pairs], [p.guide for p in pairs]
        self.target_capture = FeatureCapture(target, sorted({module_of(k) for k in target_keys}),
                                             batch_axes=target_batch_axes, keys=target_keys).open()
        guide_layers = sorted({module_of(k) for k in guide_keys})
        self.guide_capture = FeatureCapture(guide, guide_layers, batch_axes=guide_batch_axes, keys=guide_keys,
                                            transform={m: partial(self._summaries, m) for m in guide_layers}).open()
        # Each forward of the target starts afresh: a forward made outside a training step (an evaluation under
        # no_grad, say) would otherwise leave its captures in front of the next training forward's, whose calls
        # would then be counted as second calls and dropped, and the alignment term would carry no gradient.
        self._fresh_forward = target.register_forward_pre_hook(lambda module, args: self._discard_stale())
        self._target = target

    # --- what is compared --------------------------------------------------------------------------------------

    def _views(self, capture: torch.Tensor) -> list[torch.Tensor]:
        """The row sets a capture is compared on: itself, or token-wise its real rows or each position's."""
        if self.tokenwise is None:
            return [capture]
        if capture.dim() < 3 or (self._real is not None and capture.shape[:2] != self._real.shape):
            real = tuple(self._real.shape) if self._real is not None else ""
            raise UserError(f"tokenwise={self.tokenwise}: a capture of shape {tuple(capture.shape)} is not (batch, "
                            f"time, ...) like the input {real}")
        if self.tokenwise == "rows":
            rows = capture.flatten(0, 1)
            return [rows if self._rows is None else rows.index_select(0, self._rows)]
        if self._rows is None:
            return [capture[:, t] for t in range(capture.shape[1])]
        return [capture[:, t].index_select(0, samples) for t, samples in self._rows]

    def _summaries(self, layer: str, capture: torch.Tensor) -> list[Any]:
        try:
            return [self.measure.summarize(view) for view in self._views(capture)]
        except DegenerateActivations as err:
            raise DegenerateActivations(f"guide layer {layer!r}: {err}") from None

    def _set_real(self, real: torch.Tensor | None) -> None:
        """Index the real rows once per step (every pair and both sides use them): with padding, the flat indices
        of the real (sample, token) rows, or per compared position the indices of its real samples."""
        self._real = real
        self._rows = None
        if real is None or bool(real.all()):
            return
        if self.tokenwise == "rows":
            self._rows = real.flatten().nonzero().squeeze(1)
            return
        counts = real.sum(0).tolist()
        by_position = real.t().nonzero()[:, 1].split(counts)  # sample indices, grouped by position
        self._rows = [(t, samples) for t, samples in enumerate(by_position) if counts[t] >= self.measure.min_samples]
        if not self._rows:
            raise UserError(f"tokenwise=positions: no position has {self.measure.min_samples} real samples in a "
                            f"batch of {len(real)} (use a larger batch)")

    # --- the loss ----------------------------------------------------------------------------------------------

    def guide_summaries(self, guide_input: torch.Tensor) -> dict[str, list[Any]]:
        with torch.no_grad():
            self.guide(guide_input)
        return self.guide_capture.pop()

    def _discard_stale(self) -> None:
        self.target_capture.pop()  # what an earlier forward of the target left (nothing while paused or closed)

    def run_guide(self, guide_input: torch.Tensor, real: torch.Tensor | None = None) -> None:
        """Run the guide on this step's batch before the target's forward; the next ``self()`` uses its summaries.

        The loss is the same, bit for bit, as ``self(guide_input, real)`` after the forward (the guide runs in
        evaluation mode under ``no_grad`` either way); only the order changes. The guide's temporaries are then
        freed before the target's autograd graph is built rather than allocated on top of it: the step's peak
        memory is the larger of the two instead of their sum, and on the CPU the allocator reuses memory where it
        otherwise maps (and faults in) fresh pages for the guide's temporaries on every step: the largest cost of
        the guided step beyond its floor (bench/guidance.py). Non-finite guide activations give the NaN term at
        ``self()``.

        Args:
            guide_input: the guide's input for this batch (the target's input, or noise of its kind).
            real: token-wise only: a (batch, time) bool mask of the real (not padding) positions.
        """
        self._set_real(real)
        try:
            self._ahead = self.guide_summaries(guide_input)
        except NonFiniteActivations as err:
            self._ahead = err

    def __call__(self, guide_input: torch.Tensor | None = None, real: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, dict[str, float]]:
        """The alignment term for the target forward that just ran, and each pair's similarity for the log.

        Non-finite activations give a NaN term, so that the training loop's guard stops the run with its message
        (the step, the last saved state); a layer the measure cannot compare (constant over the batch, or too few
        samples) raises ``DegenerateActivations`` naming the pair.

        Args:
            guide_input: the guide's input for this batch (the target's input, or noise of its kind); None: use
                what ``run_guide`` computed for this step (a guide input given runs the guide on it instead).
            real: token-wise only: a (batch, time) bool mask of the real (not padding) positions (with
                ``run_guide``: give it there).

        Returns:
            (alpha-weighted alignment loss, {"sim/<target>~<guide>": similarity} for the log).

        Raises:
            UserError: the target ran no forward since the last call (or it was paused), or, with gradients
                enabled, its last forward ran without them (under ``torch.no_grad``), so the loss would train nothing;
                no guide input and no ``run_guide`` since the last call; ``real`` given without the guide input.
        """
        guides, self._ahead = self._ahead, None  # used once: a later step cannot read this step's guide
        if guide_input is None:
            if guides is None:
                raise UserError("alignment loss: no guide input: give the guide's input for this batch, or call "
                                "run_guide(input) before the target's forward")
            if real is not None:
                raise UserError("alignment loss: real positions go to run_guide, with the guide's input")
        else:
            guides = None
            self._set_real(real)
        targets = self.target_capture.pop()
        missing = [pair.target for pair in self.pairs if pair.target not in targets]
        if missing:
            raise UserError(f"alignment loss: no capture of target layer {missing[0]!r}: run the target's forward "
                            "on this batch right before the alignment loss (and not inside paused())")
        if torch.is_grad_enabled() and any(p.requires_grad for p in self._target.parameters()) and not any(
                targets[pair.target].requires_grad for pair in self.pairs):
            raise UserError("alignment loss: the target's last forward ran without gradients (under torch.no_grad, "
                            "an evaluation?), so this loss would train nothing: run the training forward on this "
                            "batch right before the alignment loss")
        if guides is None:
            try:
                guides = self.guide_summaries(guide_input)
            except NonFiniteActivations as err:
                guides = err
        if isinstance(guides, NonFiniteActivations):
            return self._non_finite()
        terms, logs = [], {}
        for pair in self.pairs:
            try:
                sims = [self.measure.with_summary(view, summary)
                        for view, summary in zip(self._views(targets[pair.target]), guides[pair.guide], strict=True)]
            except NonFiniteActivations:
                return self._non_finite()
            except DegenerateActivations as err:
                raise DegenerateActivations(f"target layer {pair.target!r} (paired with guide layer "
                                            f"{pair.guide!r}): {err}") from None
            terms.append(pair.weight * sum(1 - sim for sim in sims))
            logs[f"sim/{pair.target}~{pair.guide}"] = torch.stack(sims).mean().item()
        total = torch.stack(terms).sum() if self.reduce == "sum" else torch.stack(terms).mean()
        return self.alpha * total, logs

    def _non_finite(self) -> tuple[torch.Tensor, dict[str, float]]:
        nan = float("nan")
        return torch.tensor(nan), {f"sim/{p.target}~{p.guide}": nan for p in self.pairs}

    # --- hooks -------------------------------------------------------------------------------------------------

    def active(self, step: int) -> bool:
        """Whether optimizer step ``step`` (counted from 0) is guided; the first that is not closes the hooks."""
        if not self.closed and self.steps is not None and step >= self.steps:
            self.close()
        return not self.closed

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Target forwards that are not aligned (evaluation): no hooks, no copies meanwhile."""
        self.target_capture.close()
        try:
            yield
        finally:
            if not self.closed:
                self.target_capture.open()

    def close(self) -> None:
        """Remove both sides' hooks for good (guidance over)."""
        self.closed = True
        self._ahead = None
        self._fresh_forward.remove()
        self.guide_capture.close()
        self.target_capture.close()
