"""Modular arithmetic sequences ``[a, b, SEP, c]``: the symbolic tasks of subtask induction.

Tokens are the integers themselves (no tokenizer): operands a, b in [0, max), ``SEP = max``, and the answer
``c = f(a, b) mod p`` shares the vocabulary (so ``vocab_size = max + 1``). A causal model reads the sequence and
predicts the answer from the logits at ``ANSWER_POSITION`` (the SEP token): ``y`` holds the answer there and
``IGNORE_INDEX`` (-100) everywhere else, so the shared training loop's sequence cross-entropy and accuracy score the
answer only. The whole-sequence language-model loss of the original code is in ``instill.models.gpt2``.

Sampling follows the original ``generate_samples``:

* **structured coverage**: the first ``max`` rows put every number 0..max-1 once into a random operand slot, with a
  random partner from [1, max); the remaining rows are uniform over [0, max)^2 (a set of fewer than ``max`` rows,
  which the original refused, is a random subset of the structured block);
* **ambiguous** rows are exactly ``a = b = i`` for every i, where the target task ``a^2+ab`` and the competing
  hypotheses ``2a^2`` and ``2b^2`` all agree.

Everything is a pure function of the run's seed: each purpose (train, val, test, disambiguation) draws from its own
generator, seeded from ``(seed, purpose)``, so adding one set never shifts another.

Transfer data (``transfer_bundle``): the ambiguous rows plus ``n`` disambiguating rows of the target task. The
disambiguating rows are the first ``n`` of one seeded sequence (the shuffled structured block, then uniform rows), so
every condition at a given ``n`` trains on the very same rows, and the rows for a smaller ``n`` are a subset of
those for a larger one. For each ``n`` this has the original's distribution: ``n`` rows drawn without replacement
from a structured pool of ``max(max, n)`` rows.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from pydantic import conint

from . import DataBundle, DataContext, DatasetInfo, Split
from ..errors import UserError, unknown_name
from ..registry import DATASETS
from ..seeds import derive_seed

IGNORE_INDEX = -100
SEQ_LEN = 4
ANSWER_POSITION = 2  # the logits at the SEP token predict the answer token that follows it
TARGET_TASK = "a^2+ab"
COMPETING_TASKS = ("2a^2", "2b^2")  # the hypotheses that also fit the ambiguous rows a = b
_UNIFORM_CHUNK = 4096  # uniform rows are drawn in fixed chunks, so a longer sequence extends a shorter one

Formula = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

# Every computation the original code supports, keyed by a canonical spelling (spaces removed, ^ for powers).
TASKS: dict[str, Formula] = {
    "a+ab": lambda a, b: a + a * b,
    "a^2+ab": lambda a, b: a**2 + a * b,
    "2a^2": lambda a, b: 2 * a**2,
    "2b^2": lambda a, b: 2 * b**2,
    "a^2+ab+b^2": lambda a, b: a**2 + a * b + b**2,
    "a^3+ab": lambda a, b: a**3 + a * b,
    "a^2+b^2": lambda a, b: a**2 + b**2,
    "a^2+ab+b^2+a": lambda a, b: a**2 + a * b + b**2 + a,
    "a^3+ab+b": lambda a, b: a**3 + a * b + b,
    "a^2": lambda a, b: a**2,
    "ab": lambda a, b: a * b,
    "a+b": lambda a, b: a + b,
    "a^2-b^2": lambda a, b: a**2 - b**2,
}


def canonical_task(task: str) -> str:
    """The canonical name of ``task``: ``"a^2 + ab"``, ``"a²+ab"`` and ``"a^2+ab"`` are one task."""
    name = task.replace(" ", "").replace("²", "^2").replace("³", "^3").replace("*", "")
    if name not in TASKS:
        raise unknown_name("arithmetic task", name, TASKS)
    return name


def _generator(seed: int, purpose: str) -> torch.Generator:
    """A generator for one purpose, seeded from (run seed, purpose) so purposes never share draws."""
    return torch.Generator().manual_seed(derive_seed(seed, "arithmetic", purpose))


# ----------------------------------------------------------------------------------------------------- rows

def label_rows(a: torch.Tensor, b: torch.Tensor, task: str, modulus: int, numbers: int) -> torch.Tensor:
    """Rows ``[a, b, SEP, f(a, b) mod p]`` (int64, shape (N, 4)) for operand vectors ``a`` and ``b``."""
    a, b = a.long(), b.long()
    answer = torch.remainder(TASKS[canonical_task(task)](a, b), modulus)  # remainder is >= 0, also for a^2-b^2
    return torch.stack([a, b, torch.full_like(a, numbers), answer], dim=1)


def structured_operands(numbers: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Operands covering every number once: number i sits in a random slot, its partner is uniform in [1, max)."""
    slot = torch.randint(2, (numbers,), generator=generator)
    partner = torch.randint(1, numbers, (numbers,), generator=generator)
    covered = torch.arange(numbers)
    a = torch.where(slot == 0, covered, partner)
    b = torch.where(slot == 0, partner, covered)
    return a, b


def uniform_operands(count: int, numbers: int, seed: int, purpose: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``count`` rows of an endless uniform stream; chunked, so a prefix never depends on ``count``."""
    chunks = []
    for index in range(-(-count // _UNIFORM_CHUNK)):
        generator = _generator(seed, f"{purpose}:uniform:{index}")
        chunks.append(torch.randint(numbers, (_UNIFORM_CHUNK, 2), generator=generator))
    pairs = torch.cat(chunks)[:count] if chunks else torch.zeros(0, 2, dtype=torch.long)
    return pairs[:, 0], pairs[:, 1]


def sample_rows(n: int, *, task: str, modulus: int, numbers: int, seed: int, purpose: str) -> torch.Tensor:
    """``n`` rows as the original ``generate_samples``: the structured block first, uniform rows after it.

    The original refused ``n < max``. Fewer rows are ``n`` of the structured rows drawn without replacement, as the
    original drew its disambiguating rows from a structured pool; the first ``n`` in block order would cover only
    the numbers 0..n-1. From ``max`` rows on, the rows do not depend on that draw.
    """
    a, b = structured_operands(numbers, _generator(seed, f"{purpose}:structured"))
    if n < numbers:
        chosen = torch.randperm(numbers, generator=_generator(seed, f"{purpose}:subset"))[:n]
        a, b = a[chosen], b[chosen]
    extra_a, extra_b = uniform_operands(max(n - numbers, 0), numbers, seed, purpose)
    return label_rows(torch.cat([a, extra_a])[:n], torch.cat([b, extra_b])[:n], task, modulus, numbers)


def ambiguous_rows(*, task: str, modulus: int, numbers: int) -> torch.Tensor:
    """The ``max`` rows ``a = b = i``, labelled by ``task`` (for a^2+ab the label is 2a^2 mod p)."""
    i = torch.arange(numbers)
    return label_rows(i, i, task, modulus, numbers)


def disambiguation_rows(n: int, *, task: str, modulus: int, numbers: int, seed: int) -> torch.Tensor:
    """The first ``n`` rows of one seeded sequence: the structured block shuffled, then uniform rows.

    Nested in ``n`` (rows for n are the first rows for any larger n) and shared by every condition at a given n.
    """
    a, b = structured_operands(numbers, _generator(seed, "disambiguation:structured"))
    order = torch.randperm(numbers, generator=_generator(seed, "disambiguation:order"))
    extra_a, extra_b = uniform_operands(max(n - numbers, 0), numbers, seed, "disambiguation")
    a, b = torch.cat([a[order], extra_a])[:n], torch.cat([b[order], extra_b])[:n]
    return label_rows(a, b, task, modulus, numbers)


def relabel(rows: torch.Tensor, task: str, modulus: int) -> torch.Tensor:
    """The same operands answered by another task (for the competing-hypothesis evaluations)."""
    numbers = int(rows[0, 2]) if len(rows) else 0
    return label_rows(rows[:, 0], rows[:, 1], task, modulus, numbers)


def to_split(rows: torch.Tensor) -> Split:
    """x = the whole sequence; y = the answer at ``ANSWER_POSITION`` and ``IGNORE_INDEX`` elsewhere."""
    y = torch.full_like(rows, IGNORE_INDEX)
    y[:, ANSWER_POSITION] = rows[:, 3]
    return Split(rows.clone(), y)


def info(*, task: str, modulus: int, numbers: int, **facts) -> DatasetInfo:
    """Rows of ``SEQ_LEN`` tokens over ``numbers + 1`` ids (the last is SEP), answered at ``ANSWER_POSITION``."""
    return DatasetInfo((SEQ_LEN,), vocab_size=numbers + 1, seq_len=SEQ_LEN, answer_position=ANSWER_POSITION,
                       facts={"sep_token": numbers, "modulus": modulus, "task": task, **facts})


def _check(modulus: int, numbers: int) -> None:
    if modulus > numbers + 1:
        raise UserError(f"arithmetic: modulus {modulus} needs answer tokens up to {modulus - 1}, but the vocabulary "
                        f"has only {numbers + 1} tokens (raise max)")


# ----------------------------------------------------------------------------------------------------- bundles

def transfer_bundle(seed: int, n_disambiguation: int, *, task: str = TARGET_TASK, modulus: int = 7,
                    numbers: int = 1000, n_val: int = 1000, n_test: int = 1000,
                    competing: tuple[str, ...] = COMPETING_TASKS) -> DataBundle:
    """Training data of the transfer stage for one ``n``, and its evaluation sets.

    train: the ambiguous rows plus ``n_disambiguation`` rows of ``task``; val (model selection) and test: fresh
    rows of ``task``; extra_eval: ``ambiguous`` (the a = b rows) and one set per competing hypothesis (the test
    operands answered by that hypothesis, e.g. ``2a^2``), which shows which rule the model adopted.
    """
    task = canonical_task(task)
    _check(modulus, numbers)
    ambiguous = ambiguous_rows(task=task, modulus=modulus, numbers=numbers)
    extra = disambiguation_rows(n_disambiguation, task=task, modulus=modulus, numbers=numbers, seed=seed)
    val = sample_rows(n_val, task=task, modulus=modulus, numbers=numbers, seed=seed, purpose="val")
    test = sample_rows(n_test, task=task, modulus=modulus, numbers=numbers, seed=seed, purpose="test")
    evals = {"ambiguous": to_split(ambiguous)}
    evals.update({name: to_split(relabel(test, name, modulus)) for name in map(canonical_task, competing)})
    return DataBundle(train=to_split(torch.cat([ambiguous, extra])), val=to_split(val), test=to_split(test),
                      info=info(task=task, modulus=modulus, numbers=numbers, n_disambiguation=n_disambiguation),
                      extra_eval=evals)


@DATASETS.register("arithmetic")
def arithmetic(ctx: DataContext, *, task: str = "a+ab", modulus: conint(ge=2) = 7, max: conint(ge=2) = 1000,
               n_train: conint(ge=1) = 200_000, n_val: conint(ge=1) = 1000, n_test: conint(ge=1) = 1000,
               ambiguous: bool = False, n_disambiguation: Optional[conint(ge=0)] = None) -> DataBundle:
    """Sequences ``[a, b, SEP, f(a, b) mod modulus]`` with a, b in [0, max).

    Plain (default): ``n_train`` rows of ``task`` (structured coverage first). ``ambiguous: true``: train on the
    ``max`` rows a = b only. ``n_disambiguation: n``: the transfer stage's data (ambiguous rows plus n
    disambiguating rows; evaluation sets for the ambiguous rows and the competing hypotheses 2a^2 and 2b^2).
    """
    numbers = max  # the config key is the original's; the builtin keeps its meaning below
    task = canonical_task(task)
    _check(modulus, numbers)
    if n_disambiguation is not None:
        return transfer_bundle(ctx.seed, n_disambiguation, task=task, modulus=modulus, numbers=numbers,
                               n_val=n_val, n_test=n_test)
    rows = dict(task=task, modulus=modulus, numbers=numbers, seed=ctx.seed)
    train = (ambiguous_rows(task=task, modulus=modulus, numbers=numbers) if ambiguous
             else sample_rows(n_train, **rows, purpose="train"))
    return DataBundle(train=to_split(train), val=to_split(sample_rows(n_val, **rows, purpose="val")),
                      test=to_split(sample_rows(n_test, **rows, purpose="test")),
                      info=info(task=task, modulus=modulus, numbers=numbers))
