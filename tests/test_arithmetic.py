"""Arithmetic sequences: formats, every computation, structured coverage, ambiguity, seeds, transfer data."""

from __future__ import annotations

import pytest
import torch

from instill.data import DataContext
from instill.data import arithmetic as ar
from instill.errors import UserError
from instill.registry import DATASETS
from instill.train import evaluate_classification

REFERENCE = {  # plain-Python formulas, independent of the module's table
    "a+ab": lambda a, b: a + a * b, "a^2+ab": lambda a, b: a * a + a * b, "2a^2": lambda a, b: 2 * a * a,
    "2b^2": lambda a, b: 2 * b * b, "a^2+ab+b^2": lambda a, b: a * a + a * b + b * b,
    "a^3+ab": lambda a, b: a ** 3 + a * b, "a^2+b^2": lambda a, b: a * a + b * b,
    "a^2+ab+b^2+a": lambda a, b: a * a + a * b + b * b + a, "a^3+ab+b": lambda a, b: a ** 3 + a * b + b,
    "a^2": lambda a, b: a * a, "ab": lambda a, b: a * b, "a+b": lambda a, b: a + b,
    "a^2-b^2": lambda a, b: a * a - b * b,
}


def test_every_original_computation_is_supported_and_correct():
    assert set(ar.TASKS) == set(REFERENCE)
    for task, formula in REFERENCE.items():
        rows = ar.sample_rows(300, task=task, modulus=7, numbers=50, seed=1, purpose="train")
        for a, b, sep, c in rows.tolist():
            assert sep == 50 and 0 <= a < 50 and 0 <= b < 50
            assert c == formula(a, b) % 7  # Python's % is non-negative, like the original's np.mod


def test_task_spellings_and_unknown_task():
    assert ar.canonical_task("a^2 + ab") == "a^2+ab" == ar.canonical_task("a²+ab")
    assert ar.canonical_task("a*b") == "ab"
    with pytest.raises(UserError, match="did you mean 'a\\^2\\+ab'") as err:
        ar.canonical_task("a^2+ax")
    assert "\n" not in str(err.value)


def test_structured_block_covers_every_number_once_with_partners_from_one():
    numbers = 200
    rows = ar.sample_rows(1000, task="ab", modulus=7, numbers=numbers, seed=5, purpose="train")
    block = rows[:numbers]
    i = torch.arange(numbers)
    covered_in_a = block[:, 0] == i
    covered_in_b = block[:, 1] == i
    assert bool((covered_in_a | covered_in_b).all())
    partner = torch.where(covered_in_a, block[:, 1], block[:, 0])
    assert int(partner.min()) >= 1 and int(partner.max()) < numbers
    assert 0.3 < covered_in_a.float().mean() < 0.7  # the slot is random
    assert len(rows) == 1000 and rows[numbers:, :2].max() < numbers


def test_fewer_rows_than_numbers_are_a_random_subset_of_the_structured_block():
    kwargs = dict(task="ab", modulus=7, numbers=1000, seed=5, purpose="val")
    block = ar.sample_rows(1000, **kwargs)
    rows = ar.sample_rows(200, **kwargs)
    assert len(rows) == 200 and len({tuple(r) for r in rows.tolist()}) == 200  # without replacement
    assert {tuple(r) for r in rows.tolist()} <= {tuple(r) for r in block.tolist()}
    # block row i covers the number i, so its smaller operand is <= i: the first 200 rows would stay below 200
    assert int(rows[:, :2].min(dim=1).values.max()) > 400
    assert torch.equal(rows, ar.sample_rows(200, **kwargs))  # deterministic
    assert torch.equal(block, ar.sample_rows(1500, **kwargs)[:1000])  # max rows and more: unchanged by the draw


def test_ambiguous_rows_are_a_equals_b_and_all_hypotheses_agree():
    rows = ar.ambiguous_rows(task="a^2+ab", modulus=7, numbers=100)
    assert torch.equal(rows[:, 0], torch.arange(100)) and torch.equal(rows[:, 0], rows[:, 1])
    for hypothesis in ("2a^2", "2b^2"):
        assert torch.equal(ar.relabel(rows, hypothesis, 7)[:, 3], rows[:, 3])


def test_deterministic_from_seed_and_purposes_independent():
    kwargs = dict(task="a+ab", modulus=7, numbers=100)
    first = ar.sample_rows(500, **kwargs, seed=3, purpose="train")
    assert torch.equal(first, ar.sample_rows(500, **kwargs, seed=3, purpose="train"))
    assert not torch.equal(first, ar.sample_rows(500, **kwargs, seed=4, purpose="train"))
    assert not torch.equal(first, ar.sample_rows(500, **kwargs, seed=3, purpose="val"))
    # a longer set extends a shorter one (uniform rows are drawn in fixed chunks)
    assert torch.equal(first, ar.sample_rows(9000, **kwargs, seed=3, purpose="train")[:500])


def test_disambiguation_rows_are_nested_and_match_the_original_pool():
    kwargs = dict(task="a^2+ab", modulus=7, numbers=100, seed=11)
    small, large = ar.disambiguation_rows(40, **kwargs), ar.disambiguation_rows(250, **kwargs)
    assert torch.equal(small, large[:40])
    # the first `max` rows are the structured block in some order: every number covered exactly once
    block = large[:100]
    structured_a, structured_b = ar.structured_operands(100, ar._generator(11, "disambiguation:structured"))
    pairs = {(int(a), int(b)) for a, b in zip(structured_a, structured_b)}
    assert {(int(a), int(b)) for a, b in block[:, :2]} == pairs
    assert len(ar.disambiguation_rows(0, **kwargs)) == 0


def test_transfer_bundle_shares_data_across_calls_and_has_the_eval_sets():
    one = ar.transfer_bundle(7, 25, numbers=100, n_val=300, n_test=300)
    two = ar.transfer_bundle(7, 25, numbers=100, n_val=300, n_test=300)
    assert torch.equal(one.train.x, two.train.x)  # every condition at a given n trains on the same rows
    assert len(one.train) == 125 and torch.equal(one.train.x[:100, 0], one.train.x[:100, 1])
    assert set(one.extra_eval) == {"ambiguous", "2a^2", "2b^2"}
    test = one.test.x
    assert torch.equal(one.extra_eval["2a^2"].x[:, :2], test[:, :2])
    assert torch.equal(one.extra_eval["2a^2"].x[:, 3], (2 * test[:, 0] ** 2) % 7)
    assert torch.equal(one.extra_eval["2b^2"].x[:, 3], (2 * test[:, 1] ** 2) % 7)
    assert not torch.equal(one.val.x, one.test.x)
    bigger = ar.transfer_bundle(7, 60, numbers=100, n_val=300, n_test=300)
    assert torch.equal(bigger.train.x[:125], one.train.x) and torch.equal(bigger.test.x, one.test.x)


def test_registered_dataset_targets_score_the_answer_only():
    data = DATASETS.build("arithmetic", DataContext(seed=2), {"max": 60, "n_train": 500, "n_val": 100})
    assert data.info.vocab_size == 61 and data.info.seq_len == 4
    assert data.info.answer_position == ar.ANSWER_POSITION == 2
    y = data.train.y
    assert torch.equal(y[:, 2], data.train.x[:, 3])
    assert bool((y[:, [0, 1, 3]] == ar.IGNORE_INDEX).all())

    class Oracle(torch.nn.Module):  # puts all mass on the true answer, read from the input
        def forward(self, x):
            logits = torch.zeros(*x.shape, 61)
            logits[:, 2].scatter_(1, x[:, 3:4], 1.0)
            return logits

    metrics = evaluate_classification(Oracle(), {"val": data.val}, 64, torch.device("cpu"))
    assert metrics["val_acc"] == 1.0
    ambiguous = DATASETS.build("arithmetic", DataContext(seed=2), {"max": 60, "ambiguous": True})
    assert torch.equal(ambiguous.train.x[:, 0], ambiguous.train.x[:, 1])
    transfer = DATASETS.build("arithmetic", DataContext(seed=2), {"max": 60, "task": "a^2+ab",
                                                                  "n_disambiguation": 10})
    assert len(transfer.train) == 70 and "2b^2" in transfer.extra_eval


def test_bad_values_are_user_errors():
    with pytest.raises(UserError, match="modulus 70"):
        DATASETS.build("arithmetic", DataContext(seed=0), {"max": 10, "modulus": 70})
    with pytest.raises(UserError, match="unknown"):
        DATASETS.build("arithmetic", DataContext(seed=0), {"task": "a^9"})
    with pytest.raises(ValueError):
        DATASETS.validate("arithmetic", {"modulus": 1})
