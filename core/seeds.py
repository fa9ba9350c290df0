"""Seeds: drawn from the operating system, derived per purpose, set everywhere, saved and restored with a run.

A derived seed depends only on the run's seed and its labels, so every part of a run draws its own stream and a
replay draws the same ones."""
from __future__ import annotations

import hashlib
import os
import random
from typing import Any, Callable, Literal, Optional

import numpy as np
import torch



# ---------------------------------------------------------------------------------------------------------------
# Seeds


def draw_seed() -> int:
    """A fresh seed from the operating system's entropy (63 bits, so it fits every RNG we seed)."""
    return int.from_bytes(os.urandom(8), "little") >> 1


_GOLDEN = 0x9E3779B97F4A7C15  # odd 64-bit constant: multiples of it spread small integers over all bits


def _text_seed(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") & (2**63 - 1)


# Formulas that parts of instill used before they all came here, frozen so that recorded runs replay bit for bit.
# New code uses the default; never change one of these.
_LEGACY: dict[str, Callable[..., int]] = {
    "epoch": lambda seed, epoch: (seed ^ ((epoch + 1) * _GOLDEN)) % 2**63,  # BatchLoader's shuffle per epoch
    "offset": lambda seed, offset: (seed + offset * _GOLDEN) % 2**63,  # natural images' split streams
    "stream": lambda seed, name: _text_seed(f"{seed}:{name}"),  # shapes' named streams
    "sampled": lambda seed, name: _text_seed(f"sampled:{seed}:{name}"),  # transfer's sampled masks per parameter
}
LegacySeed = Literal["epoch", "offset", "stream", "sampled"]


def derive_seed(seed: int, *labels: Any, legacy: Optional[LegacySeed] = None) -> int:
    """A 63-bit seed for one purpose of a run (a sub-run's initialisation, its batches, ...): stable across runs.

    The one place that derives seeds from a run seed, so that two purposes never share a stream by accident.

    Args:
        seed: the run's seed.
        labels: what the seed is for (strings, numbers); distinct labels give independent seeds.
        legacy: one of the frozen earlier formulas (``epoch``, ``offset``, ``stream``, ``sampled``; each takes one
            label) that existing data streams keep using so old runs replay; ``None`` for new purposes.

    Returns:
        An integer in [0, 2**63).
    """
    if legacy is not None:
        return _LEGACY[legacy](seed, *labels)
    digest = hashlib.sha256(repr((seed, *labels)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def seed_everything(seed: int, deterministic: bool = True) -> None:
    """Seed python ``random``, NumPy and torch (all devices); optionally ask for deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


# What state.pt holds besides tensors and plain values: NumPy's generator state (an array of its dtype).
STATE_GLOBALS = [np.ndarray, np.dtype, type(np.dtype(np.uint32)),
                  getattr(np, "_core", getattr(np, "core", None)).multiarray._reconstruct]


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
