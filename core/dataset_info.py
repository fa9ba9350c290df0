"""``DatasetInfo``: the typed description of what a dataset provides, which sizes and checks the models built for it.

Every dataset builder returns it in its ``DataBundle`` (a user's builder may give a plain mapping of the same
names: the bundle turns it into a ``DatasetInfo``, with the names it does not know kept in ``facts``). A model
builder receives it as its first argument; a saved model records it (``to_dict``) beside its weights, so that a
later run can check that its own data fit (``from_dict``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping, Optional

from .errors import UserError

Modality = Literal["image", "tokens", "vector"]


@dataclass(frozen=True)
class DatasetInfo:
    """What the data give a model: inputs, targets, and the facts the stages read.

    Attributes:
        input_shape: one sample's input shape: (C, H, W) images, (T,) token ids, (D,) vectors.
        num_classes: classes of a labelled classification (a sequence classifier's too); None for next-token
            prediction and regression.
        vocab_size: token data: inputs are int64 ids in [0, vocab_size); None for real-valued inputs.
        seq_len: the longest sequence of token data.
        class_names: a name per class id, when the data name their classes.
        vocab: each token id's text, when the data list their vocabulary.
        pad_token: the id of padding (positions that carry no sample).
        answer_position: the position whose logits answer (arithmetic rows).
        num_outputs: outputs of a regression.
        regression: targets are real values (a mean squared error), not classes.
        labeled: whether the targets are labels to score (label-free crops are not).
        augmentation: inputs are drawn anew every time (nothing computed from them may be cached).
        cue_conflict_pairs: evaluation set scored by shape -> the same inputs scored by texture (shape bias).
        facts: further facts of one dataset (a modulus, a separator token, ...), recorded with a saved model.
    """

    input_shape: tuple[int, ...]
    num_classes: Optional[int] = None
    vocab_size: Optional[int] = None
    seq_len: Optional[int] = None
    class_names: Optional[tuple[str, ...]] = None
    vocab: Optional[tuple[str, ...]] = None
    pad_token: Optional[int] = None
    answer_position: Optional[int] = None
    num_outputs: Optional[int] = None
    regression: bool = False
    labeled: bool = True
    augmentation: bool = False
    cue_conflict_pairs: Mapping[str, str] = field(default_factory=dict)
    facts: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        for name in ("input_shape", "class_names", "vocab"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, tuple(value))
        if not all(isinstance(n, int) and n > 0 for n in self.input_shape):
            raise UserError(f"dataset info: input_shape must be positive integers, got {self.input_shape}")
        for name in ("num_classes", "vocab_size", "num_outputs"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, int) and value > 0):
                raise UserError(f"dataset info: {name} must be a positive integer, got {value!r}")
        if self.class_names is not None and self.num_classes is not None and \
                len(self.class_names) != self.num_classes:
            raise UserError(f"dataset info: {len(self.class_names)} class names for {self.num_classes} classes")
        object.__setattr__(self, "cue_conflict_pairs", dict(self.cue_conflict_pairs))
        object.__setattr__(self, "facts", dict(self.facts))

    @property
    def modality(self) -> Modality:
        """``tokens`` (int64 ids), ``image`` ((C, H, W) pixels) or ``vector`` (any other real-valued input)."""
        if self.vocab_size is not None:
            return "tokens"
        return "image" if len(self.input_shape) == 3 else "vector"

    @property
    def next_token(self) -> bool:
        """Token data whose targets are the next tokens (a language model's), not classes."""
        return self.vocab_size is not None and self.num_classes is None

    def to_dict(self) -> dict[str, Any]:
        """The JSON form a saved model records: the facts that are set, ``facts`` merged in at the top level.

        Returns:
            A mapping of JSON values (tuples become lists; values that JSON cannot hold are left out).
        """
        import json

        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "facts" or value == (f.default if f.default is not dataclasses.MISSING else {}):
                continue
            out[f.name] = list(value) if isinstance(value, tuple) else value
        for key, value in self.facts.items():
            value = list(value) if isinstance(value, tuple) else value
            try:
                json.dumps(value)
            except TypeError:
                continue
            out[key] = value
        return out

    @classmethod
    def from_dict(cls, mapping: Mapping[str, Any]) -> "DatasetInfo":
        """The description a mapping gives (``to_dict``'s form, a saved model's record, a user's dict).

        Args:
            mapping: at least ``input_shape``; names that are no attribute go to ``facts``.
        Returns:
            The typed description.
        Raises:
            UserError: no ``input_shape``, or a value of the wrong kind.
        """
        if "input_shape" not in mapping:
            raise UserError("dataset info: input_shape is missing")
        names = {f.name for f in dataclasses.fields(cls)} - {"facts"}
        known = {k: v for k, v in mapping.items() if k in names}
        facts = {**mapping.get("facts", {}), **{k: v for k, v in mapping.items() if k not in names | {"facts"}}}
        try:
            return cls(**known, facts=facts)
        except TypeError as err:
            raise UserError(f"dataset info: {err}") from None

    @classmethod
    def of(cls, value: "DatasetInfo | Mapping[str, Any]") -> "DatasetInfo":
        """``value`` itself, or the description its mapping gives (``from_dict``).

        Raises:
            UserError: ``value`` is neither a ``DatasetInfo`` nor a mapping, or its mapping does not describe data.
        """
        if isinstance(value, cls):
            return value
        if not isinstance(value, Mapping):
            raise UserError(f"dataset info: expected a DatasetInfo or a mapping, got {type(value).__name__}")
        return cls.from_dict(value)
