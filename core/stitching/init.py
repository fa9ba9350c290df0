"""The stitching map's initialisations and masks (``INITS``, ``MASKS``), and the one way a stitch is initialised:
``initialise`` masks the transform and loads its initial map, for the stage and ``stitch_models`` alike.

    stats = least_squares_stats(transform, activations)        # one pass: (front, end) activation batches
    fitted = initialise(transform, "ps_inv", "semi_match", generator, stats)

The generator's draws come in one fixed order (the mask's, then the init's), so a seed gives the same map wherever
the stitch is built. Inits and masks that read the least-squares statistics (``needs_stats``) need a map of at most
``LEAST_SQUARES_MAX_INPUTS`` inputs: the normal equations grow with the square of that width.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional

import torch
from torch import Tensor

from ..errors import UserError
from ..registry import Registry
from .stitch import LinearStats, StitchTransform

LEAST_SQUARES_MAX_INPUTS = 8192  # (d_in + 1)^2 float64 normal equations: 0.5 GB at this width


@dataclass(frozen=True)
class InitContext:
    """What a stitch initialisation or mask is built from: the map's size, the generator of its random draws, and
    (where the entry ``needs_stats``) the least-squares statistics of the training split; an init also gets the mask."""

    d_out: int
    d_in: int
    generator: torch.Generator
    stats: Optional[LinearStats] = None
    mask: Optional[Tensor] = None


@dataclass(frozen=True)
class StitchChoice:
    """A stitch initialisation (``build(ctx)`` -> (W, b)) or mask (``build(ctx)`` -> a (d_out, d_in) 0/1 mask, or
    None for none); ``square``: only for maps with as many inputs as outputs; ``needs_stats``: reads the statistics."""

    build: Callable[[InitContext], Any]
    square: bool = False
    needs_stats: bool = False

    def __call__(self, ctx: InitContext) -> Any:
        return self.build(ctx)


# Initialisations and masks of the stitching map, by name: a ``StitchChoice`` or a plain function ``build(ctx:
# InitContext)``. Add one with ``@INITS.register("name")`` / ``@MASKS.register("name")``, an import path, or an entry
# point of group ``instill.stitch_inits`` / ``instill.stitch_masks``; ``instill list stitch_inits`` lists them.
INITS = Registry("stitch init")
MASKS = Registry("stitch mask")


def _random_init(ctx: InitContext) -> tuple[Tensor, None]:
    w = torch.empty(ctx.d_out, ctx.d_in)
    bound = 1 / math.sqrt(ctx.d_in)  # kaiming_uniform(a=sqrt(5)), drawn from our generator
    return w.uniform_(-bound, bound, generator=ctx.generator), None


def _least_squares(solve: Callable[[InitContext], Any]) -> Callable[[InitContext], Any]:
    def build(ctx: InitContext):
        if ctx.stats is None:
            raise ValueError("this init needs least-squares statistics")
        return solve(ctx)

    return build


for _name, _choice, _doc in (
    ("random", StitchChoice(_random_init), "uniform in +-1/sqrt(d_in), as nn.Linear initialises"),
    ("identity", StitchChoice(lambda ctx: (torch.eye(ctx.d_out), None), square=True), "the identity map"),
    ("perm", StitchChoice(lambda ctx: (torch.eye(ctx.d_out)[torch.randperm(ctx.d_out, generator=ctx.generator)],
                                       None), square=True), "a random permutation of the channels"),
    ("ones_zeros", StitchChoice(lambda ctx: (torch.ones(ctx.d_out, ctx.d_in), None)), "every weight 1"),
    ("ps_inv", StitchChoice(_least_squares(lambda ctx: ctx.stats.solve(ctx.mask)), needs_stats=True),
     "the least-squares fit (pseudo-inverse) of the end activations, within the mask"),
    ("procrustes", StitchChoice(_least_squares(lambda ctx: ctx.stats.procrustes()), needs_stats=True),
     "the orthogonal Procrustes fit of the end activations"),
):
    INITS.register(_name, doc=_doc)(_choice)


def _picked(choose: Callable[[InitContext], Tensor]) -> Callable[[InitContext], Tensor]:
    """A mask keeping, for each output channel, the one input channel ``choose`` picks."""
    def build(ctx: InitContext) -> Tensor:
        mask = torch.zeros(ctx.d_out, ctx.d_in)
        mask[torch.arange(ctx.d_out), choose(ctx)] = 1
        return mask

    return build


def _best_correlated(absolute: bool) -> Callable[[InitContext], Tensor]:
    def choose(ctx: InitContext) -> Tensor:
        if ctx.stats is None:
            raise ValueError("this mask needs the correlation statistics")
        corr = ctx.stats.correlation()
        return (corr.abs() if absolute else corr).argmax(1)

    return choose


for _name, _choice, _doc in (
    ("identity", StitchChoice(lambda ctx: None), "nothing masked"),
    ("semi_match", StitchChoice(_picked(_best_correlated(False)), needs_stats=True),
     "each output channel keeps the input channel it correlates best with (on the training split)"),
    ("abs_semi_match", StitchChoice(_picked(_best_correlated(True)), needs_stats=True),
     "the same in absolute correlation"),
    ("random_permutation", StitchChoice(_picked(lambda ctx: torch.randperm(ctx.d_in, generator=ctx.generator)),
                                        square=True), "a true random permutation"),
    ("random_semi_match_legacy", StitchChoice(_picked(lambda ctx: torch.rand(ctx.d_out, ctx.d_in,
                                                                             generator=ctx.generator).argmax(1))),
     "the original's \"random permutation\": an argmax of a random row per output (inputs may repeat)"),
):
    MASKS.register(_name, doc=_doc)(_choice)


def stitch_choice(registry: Registry, name: str) -> StitchChoice:
    """The init or mask ``name`` names in ``registry`` (``INITS`` or ``MASKS``); a UserError otherwise."""
    entry = registry.get(name)
    return entry.build if isinstance(entry.build, StitchChoice) else StitchChoice(entry.build)


def _square_checked(registry: Registry, name: str, d_in: int, d_out: int) -> StitchChoice:
    choice = stitch_choice(registry, name)
    if choice.square and d_in != d_out:
        raise UserError(f"{registry.kind} {name} needs as many input as output channels, got {d_in} -> {d_out}")
    return choice


def _built(registry: Registry, name: str, ctx: InitContext) -> Any:
    return _square_checked(registry, name, ctx.d_in, ctx.d_out)(ctx)


def init_matrix(name: str, d_out: int, d_in: int, generator: torch.Generator,
                stats: Optional[LinearStats] = None, mask: Optional[Tensor] = None
                ) -> tuple[Tensor, Optional[Tensor]]:
    """(W, b) of the init ``name`` (``INITS``); ``ps_inv`` and ``procrustes`` need the statistics.

    Raises:
        UserError: an unknown init; identity and permutation inits of a non-square map.
    """
    return _built(INITS, name, InitContext(d_out, d_in, generator, stats, mask))


def make_mask(name: str, d_out: int, d_in: int, generator: torch.Generator,
              stats: Optional[LinearStats] = None) -> Optional[Tensor]:
    """The (d_out, d_in) 0/1 mask ``name`` (``MASKS``; None for ``identity``: nothing masked).

    Raises:
        UserError: an unknown mask; a permutation of a non-square map.
    """
    return _built(MASKS, name, InitContext(d_out, d_in, generator, stats))


def check_fits(registry: Registry, name: str, d_in: int, d_out: int) -> None:
    """Refuse, before anything is fitted, an init or mask (``name`` in ``INITS`` or ``MASKS``) that a ``d_in`` ->
    ``d_out`` map cannot have.

    Raises:
        UserError: an unknown name; a square-only choice (identity, permutations) of a map with different widths;
            one that reads the least-squares statistics of a map wider than ``LEAST_SQUARES_MAX_INPUTS``.
    """
    if _square_checked(registry, name, d_in, d_out).needs_stats and d_in > LEAST_SQUARES_MAX_INPUTS:
        raise UserError(f"{registry.kind} {name}: the least-squares fit has {d_in} inputs, at most "
                        f"{LEAST_SQUARES_MAX_INPUTS} (an affine channel map has fewer than a flattened one)")


def least_squares_stats(transform: StitchTransform, activations: Iterable[tuple[Tensor, Tensor]]) -> LinearStats:
    """The least-squares statistics of the front rows against the end rows, in one pass over ``activations``
    (batches of (front activation, end activation)), as ``transform`` lays them out."""
    stats = LinearStats(transform.d_in, transform.d_out)
    with torch.no_grad():
        for a, b in activations:
            stats.update(*transform.fit_rows(a, b))
    return stats


def initialise(transform: StitchTransform, init: str, mask: str, generator: torch.Generator,
               stats: Optional[LinearStats] = None) -> Optional[tuple[Tensor, Tensor]]:
    """Mask ``transform`` and load its initial map, in place: the mask first, then the init (in this order they draw
    from ``generator``). ``ps_inv`` of a low-rank transform is reduced-rank regression; every other init of one is
    its best rank-r approximation (``StitchTransform.set_matrix``).

    Args:
        transform: the stitching layer to initialise.
        init: a name in ``INITS``; mask: a name in ``MASKS`` (``identity``: nothing masked).
        generator: the random draws of the init and the mask.
        stats: the least-squares statistics (``least_squares_stats``); needed where the init or mask ``needs_stats``.
    Returns:
        With ``stats``: the least-squares map (W, b) within the mask, the ``ps_inv`` init's (solved once: a stage
        also evaluates it as a variant of its own); without: None.
    Raises:
        UserError: an unknown init or mask, one the map's size does not allow (``check_fits``).
    """
    keep = make_mask(mask, transform.d_out, transform.d_in, generator, stats)
    fitted = None if stats is None else stats.solve(keep)
    if init == "ps_inv" and transform.rank is not None:
        transform.set_factors(*stats.reduced_rank(transform.rank))
    elif init == "ps_inv" and fitted is not None:
        transform.set_matrix(*fitted)  # init_matrix would solve the same normal equations a second time
    else:
        transform.set_matrix(*init_matrix(init, transform.d_out, transform.d_in, generator, stats, keep))
    if keep is not None:
        transform.set_mask(keep)
    return fitted
