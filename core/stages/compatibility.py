"""Checks that a saved model and this run's data belong together, before any run directory exists."""

from __future__ import annotations

import torch
from pydantic import field_validator

from ..dataset_info import DatasetInfo
from ..config import RunConfig
from ..errors import UserError
from ..models.vision import check_accepts


class UsesBaseModel(RunConfig):
    """A stage whose model is the base run's (ablate, transfer): a ``model:`` section would be silently ignored."""

    @field_validator("model", mode="before")
    @classmethod
    def _no_model_section(cls, value):
        if value is not None:
            raise ValueError("the model comes from the base run (its model.json), so this stage takes no model "
                             "section; remove it (or set model: null)")
        return value


_KIND_WORDS = {"tokens": "token sequences", "image": "images", "vector": "vectors"}


def check_data_fits(model_info: DatasetInfo, data_info: DatasetInfo, model_desc: str, key: str = "data") -> None:
    """UserError unless this run's data have the inputs and classes a saved model was built for.

    Compared: ``vocab_size`` (and the vocabulary itself where both runs list one) for tokens, else ``input_shape``
    (sequence models read any length); ``num_classes`` always. Either description may be a mapping of the names of
    ``DatasetInfo`` (a saved ``model.json``'s ``info``).
    """
    model_info, data_info = DatasetInfo.of(model_info), DatasetInfo.of(data_info)
    kinds = [_KIND_WORDS[info.modality] for info in (model_info, data_info)]
    if kinds[0] != kinds[1]:
        raise UserError(f"{key}: these data are {kinds[1]}, but {model_desc} was built for {kinds[0]}")
    facts = ["vocab_size", "num_classes"] if data_info.modality == "tokens" else ["input_shape", "num_classes"]
    if model_info.vocab is not None and data_info.vocab is not None:
        facts.append("vocab")
    show = lambda fact, v: f"of {len(v)} tokens" if fact == "vocab" else v  # noqa: E731
    for fact in facts:
        theirs, ours = getattr(model_info, fact), getattr(data_info, fact)
        if theirs != ours:
            raise UserError(f"{key}: {fact} is {show(fact, ours)} but {model_desc} was built for "
                            f"{show(fact, theirs)}")


def check_compatible(model: torch.nn.Module, model_info: DatasetInfo, data_info: DatasetInfo) -> None:
    """UserError unless the data fit the base model: the inputs and classes it was built for, and a dry forward."""
    check_data_fits(model_info, data_info, "the base model")
    check_accepts(model, data_info)


