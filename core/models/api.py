"""The model registry's part of the Python API: build any model a config can name, as ``timm.create_model`` does."""

from __future__ import annotations

from typing import Any, Optional

from torch import nn

from ..dataset_info import DatasetInfo
from ..errors import UserError
from ..registry import MODELS

__all__ = ["create_model", "list_models"]


def create_model(name: str, *, input_shape: tuple[int, ...] = (3, 32, 32), num_classes: Optional[int] = 10,
                 vocab_size: Optional[int] = None, seq_len: Optional[int] = None, **options: Any) -> nn.Module:
    """A freshly initialised model from the registry configs use (``model: {name: ..., <options>}``).

    Args:
        name: a name from ``list_models()``: a shipped model (``fcn``, ``convnet``, ``gpt2``, ...), ``timm:<name>``,
            ``torchvision:<name>``, an import path ``package.module:Builder`` or an entry point.
        input_shape: one sample's shape, (C, H, W) for images, (T,) for token ids, as the data would give it.
        num_classes: the classes the model's head predicts.
        vocab_size, seq_len: token models: the vocabulary and the longest sequence.
        **options: the entry's options (``instill list models`` shows them with their defaults).

    Returns:
        The ``nn.Module``, sized for the inputs and classes given.

    Raises:
        UserError: an unknown name (the nearest listed) or option, or a value the entry refuses.
    """
    info = DatasetInfo(tuple(input_shape), num_classes=num_classes, vocab_size=vocab_size, seq_len=seq_len)
    try:
        MODELS.check(name, options)
        return MODELS.build(name, info, options)
    except ValueError as err:  # an option the entry's signature refuses (UserError is a ValueError too)
        raise UserError(f"model {name}: {err}" if not isinstance(err, UserError) else str(err)) from None


def list_models(pattern: str = "*") -> list[str]:
    """The names ``create_model`` (and a config's ``model.name``) accept, matching a glob ``pattern``.

    Args:
        pattern: e.g. ``"*fcn*"``; ``timm:<name>`` and ``torchvision:<name>`` stand for every model of that library.

    Returns:
        The names, sorted.

    Raises:
        UserError: a shipped entry point that cannot be loaded.
    """
    import fnmatch

    return [entry.name for entry in MODELS.entries() if fnmatch.fnmatch(entry.name, pattern)]
