"""DatasetInfo: the typed description every dataset gives (modality, input shape, classes or vocabulary)."""

from __future__ import annotations

import re

import pytest
import torch

from instill.data import DataBundle, DataContext, DatasetInfo, Split
from instill.errors import UserError
from instill.registry import DATASETS, MODELS
from tests.conftest import REPO

SMALL = {"digits": {}, "arithmetic": {"n_train": 8, "n_val": 4, "n_test": 4},
         "parity": {"n_train": 8, "n_val": 4, "n_test": 4}, "copy_paste": {"n_train": 8, "n_val": 4, "n_test": 4},
         "grammar": {"n_train": 2, "n_val": 2, "n_test": 2}, "add_task": {},
         "shapes": {"n_train": 8, "n_val": 4, "n_test": 4, "cache": False}}


@pytest.mark.parametrize("name", sorted(SMALL))
def test_every_dataset_describes_itself_with_a_dataset_info(name):
    data = DATASETS.build(name, DataContext(seed=3), SMALL[name])
    info = data.info
    assert isinstance(info, DatasetInfo) and tuple(data.train.x.shape[1:]) == info.input_shape
    expected = {"digits": "image", "shapes": "image", "add_task": "vector"}.get(name, "tokens")
    assert info.modality == expected
    assert (info.num_classes is not None) != (info.next_token or info.regression)
    assert DatasetInfo.from_dict(info.to_dict()) == info  # what a saved model records reads back the same


def test_a_users_mapping_becomes_a_dataset_info_and_bad_ones_are_user_errors():
    split = Split(torch.zeros(4, 5), torch.zeros(4, dtype=torch.long))
    bundle = DataBundle(split, split, split, info={"input_shape": [5], "num_classes": 3, "colour": "blue"})
    assert bundle.info == DatasetInfo((5,), num_classes=3, facts={"colour": "blue"})
    assert bundle.info.modality == "vector"
    built = MODELS.build("fcn", {"input_shape": (1, 8, 8), "num_classes": 4}, {"depth": 1, "width": 8})
    assert built.head.out_features == 4  # a model builder receives a DatasetInfo made from the mapping
    for bad, message in (({"num_classes": 3}, "input_shape is missing"),
                         ({"input_shape": (0, 3)}, "positive integers"),
                         ({"input_shape": (3,), "num_classes": 2, "class_names": ["a"]}, "1 class names for 2"),
                         (["input_shape"], "expected a DatasetInfo or a mapping")):
        with pytest.raises(UserError, match=message):
            DatasetInfo.of(bad)


def test_no_code_reads_dataset_facts_from_an_untyped_dict():
    untyped = re.compile(r"""info(\[["']|\.get\(["'])|["'](vocab_size|num_classes|input_shape)["'] (not )?in \w*info""")
    found = [f"{p.relative_to(REPO)}:{i}" for p in sorted((REPO / "core").rglob("*.py"))
             for i, line in enumerate(p.read_text().splitlines(), 1) if untyped.search(line)]
    assert found == []
