"""Token-sequence tasks of "Training the Untrainable": copy-paste, parity, and next-token language modelling.

Every task is a ``DataBundle`` of in-memory int64 tensors, a pure function of the run's seed: each split draws from
its own generator seeded from ``(seed, task, split)``, so changing one split's size never changes another split,
and a smaller split is the first rows of a larger one.
Token 0 is padding and nothing else (the original copy-paste task also used 0 as a symbol, so about a tenth of the
symbols were never trained on or scored). Padding is always trailing, which causal models may simply ignore: a
left-to-right model's outputs at real positions never depend on what follows them.

Targets follow one convention, so the shared training loop's loss and accuracy apply unchanged: ``y`` holds the
class to predict from the model's output at the same position, and ``IGNORE_INDEX`` (-100) where nothing is scored.
Accuracy is ``argmax == y`` over the positions where ``y != -100``.

========================  =========================================  =============================================
task                      x                                          y
========================  =========================================  =============================================
``copy_paste``            (N, T) ids, T = 2 max_len + 1              (N, T): the copy and EOS, -100 elsewhere
``parity``                (N, max_len) ids: 1 = bit 0, 2 = bit 1     (N,): number of 1 bits mod 2
``grammar``, ``text``     (N, seq_len) ids                           (N, seq_len): the next token at each position
========================  =========================================  =============================================
"""

from __future__ import annotations

import os
import random
import re
from collections import Counter
from pathlib import Path
from typing import Literal, Optional

import torch
from pydantic import confloat, conint

from . import DataBundle, DataContext, DatasetInfo, Split
from . import grammar as pcfg
from ..errors import UserError
from ..registry import DATASETS
from ..seeds import derive_seed

PAD = 0
UNK = 1  # text vocabularies: a token outside max_vocab
IGNORE_INDEX = -100
SCORED = "positions where y != -100"
Fraction = confloat(ge=0.0, lt=0.5)


def real_positions(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(batch, time) bool: the positions before a row's trailing padding.

    That is up to the row's last non-padding input token or its last scored target, whichever comes later
    (copy-paste's answer slots hold PAD inputs but are scored). Language-modelling blocks have no padding.
    """
    t = torch.arange(x.shape[1], device=x.device)
    last = torch.where(x != PAD, t, -1).amax(1)
    if y.shape == x.shape:  # a target per position
        last = torch.maximum(last, torch.where(y != IGNORE_INDEX, t, -1).amax(1))
    return t <= last[:, None]


def _generator(seed: int, purpose: str) -> torch.Generator:
    """A generator for one purpose (task and split), so purposes never share draws."""
    return torch.Generator().manual_seed(derive_seed(seed, "sequences", purpose))


def _row_draws(n: int, width: int, generator: torch.Generator) -> torch.Tensor:
    """(n, width) integers in [0, 2^62), drawn row by row: the first rows of a larger draw are a smaller draw.

    Reduced modulo a small range they are uniform up to a bias below 1e-16.
    """
    return torch.randint(0, 2**62, (n, width), generator=generator)


def _check_lengths(task: str, min_len: int, max_len: int) -> None:
    if min_len > max_len:
        raise UserError(f"{task}: min_len {min_len} is larger than max_len {max_len}")


# ----------------------------------------------------------------------------------------------------- copy-paste

def copy_paste_split(n: int, *, symbols: int, min_len: int, max_len: int, teacher_forcing: bool,
                     generator: torch.Generator) -> tuple[Split, Split]:
    """``n`` copy-paste sequences: (split scoring the copy and EOS, split scoring the copied symbols only).

    A sequence of length L (uniform in [min_len, max_len]) of symbols s in 1..symbols is followed by SEP and L
    answer slots: ``x = [s_1 .. s_L, SEP, a_1 .. a_L, PAD ...]``. The output at SEP predicts s_1, the output at
    answer slot j predicts s_{j+1}, and the last slot predicts EOS (the model must also know when the copy ends).
    Answer slots hold PAD (the model reproduces the sequence from memory, as in the paper) or, with
    ``teacher_forcing``, the previous symbol (``a_j = s_j``: an ordinary next-token language model of the copy).
    """
    sep, eos = symbols + 1, symbols + 2
    seq_len = 2 * max_len + 1
    draws = _row_draws(n, 1 + max_len, generator)
    lengths = min_len + draws[:, 0] % (max_len - min_len + 1)
    s = 1 + draws[:, 1:] % symbols
    real = torch.arange(max_len) < lengths[:, None]  # (n, max_len): which drawn symbols are used
    rows = torch.arange(n)[:, None].expand(n, max_len)[real]
    slot = torch.arange(max_len).expand(n, max_len)[real]  # j - 1 for symbol s_j
    start = lengths[:, None].expand(n, max_len)[real]  # the SEP position L of each used symbol's row

    x = torch.full((n, seq_len), PAD, dtype=torch.long)
    x[rows, slot] = s[real]
    x[torch.arange(n), lengths] = sep
    if teacher_forcing:
        x[rows, start + 1 + slot] = s[real]
    y = torch.full((n, seq_len), IGNORE_INDEX, dtype=torch.long)
    y[rows, start + slot] = s[real]
    y_symbols = y.clone()
    y[torch.arange(n), 2 * lengths] = eos
    return Split(x, y), Split(x, y_symbols)


@DATASETS.register("copy_paste")
def copy_paste(ctx: DataContext, *, symbols: conint(ge=1) = 10, min_len: conint(ge=1) = 10,
               max_len: conint(ge=1) = 20, teacher_forcing: bool = False, n_train: conint(ge=1) = 8000,
               n_val: conint(ge=1) = 1000, n_test: conint(ge=1) = 1000) -> DataBundle:
    """Copy-paste: read symbols 1..``symbols``, then SEP, then reproduce them and EOS (a causal LM's task).

    Tokens: 0 PAD (also the empty answer slots), 1..symbols, SEP = symbols + 1, EOS = symbols + 2 (a target
    only). ``y`` scores the copied symbols and EOS; the extra evaluation set ``test_symbols`` (the test inputs)
    scores the copied symbols alone (chance = 1 / symbols). Paper: 10 symbols, lengths 20-40; the default 10-20 is
    instill's CPU-scale setting (docs/papers.md).
    """
    _check_lengths("copy_paste", min_len, max_len)
    options = dict(symbols=symbols, min_len=min_len, max_len=max_len, teacher_forcing=teacher_forcing)
    train, _ = copy_paste_split(n_train, **options, generator=_generator(ctx.seed, "copy_paste:train"))
    val, _ = copy_paste_split(n_val, **options, generator=_generator(ctx.seed, "copy_paste:val"))
    test, test_symbols = copy_paste_split(n_test, **options, generator=_generator(ctx.seed, "copy_paste:test"))
    seq_len = 2 * max_len + 1
    info = DatasetInfo((seq_len,), vocab_size=symbols + 3, seq_len=seq_len, pad_token=PAD, facts={
        "sep_token": symbols + 1, "eos_token": symbols + 2, "symbols": symbols, "ignore_index": IGNORE_INDEX,
        "scored": SCORED + ": the copied symbols and EOS (extra set 'test_symbols': the copied symbols only)"})
    return DataBundle(train=train, val=val, test=test, info=info, extra_eval={"test_symbols": test_symbols})


# ----------------------------------------------------------------------------------------------------- parity

def parity_split(n: int, *, min_len: int, max_len: int, generator: torch.Generator) -> Split:
    """``n`` bit strings of length uniform in [min_len, max_len]: bit b is token b + 1, PAD after the end."""
    draws = _row_draws(n, 1 + max_len, generator)
    lengths = min_len + draws[:, 0] % (max_len - min_len + 1)
    bits = draws[:, 1:] % 2
    real = torch.arange(max_len) < lengths[:, None]
    x = torch.where(real, bits + 1, PAD)
    return Split(x, (bits * real).sum(1) % 2)


@DATASETS.register("parity")
def parity(ctx: DataContext, *, min_len: conint(ge=1) = 2, max_len: conint(ge=1) = 50,
           n_train: conint(ge=1) = 20000, n_val: conint(ge=1) = 2000, n_test: conint(ge=1) = 2000) -> DataBundle:
    """Parity of a bit string (a sequence classification): class 1 when the number of 1 bits is odd.

    Tokens: 0 PAD, 1 = bit 0, 2 = bit 1 (the original used 0/1 bits and pad 2). Lengths as the paper: 2-50.
    """
    _check_lengths("parity", min_len, max_len)
    split = {name: parity_split(size, min_len=min_len, max_len=max_len,
                                generator=_generator(ctx.seed, f"parity:{name}"))
             for name, size in (("train", n_train), ("val", n_val), ("test", n_test))}
    info = DatasetInfo((max_len,), vocab_size=3, num_classes=2, seq_len=max_len, pad_token=PAD,
                       class_names=("even", "odd"))
    return DataBundle(**split, info=info)


# ---------------------------------------------------------------------------------------------- language modelling

def lm_blocks(tokens: torch.Tensor, seq_len: int) -> Split:
    """Non-overlapping blocks of a token stream: ``x`` a block, ``y`` the same block shifted by one token."""
    n = (len(tokens) - 1) // seq_len
    return Split(tokens[: n * seq_len].view(n, seq_len).clone(), tokens[1 : n * seq_len + 1].view(n, seq_len).clone())


def _lm_info(vocab: list[str], seq_len: int, **facts) -> DatasetInfo:
    return DatasetInfo((seq_len,), vocab_size=len(vocab), seq_len=seq_len, pad_token=PAD, vocab=tuple(vocab),
                       facts={"scored": SCORED + ": every next token", **facts})


@DATASETS.register("grammar")
def grammar_corpus(ctx: DataContext, *, seq_len: conint(ge=2) = 64, n_train: conint(ge=1) = 2000,
                   n_val: conint(ge=1) = 200, n_test: conint(ge=1) = 200) -> DataBundle:
    """Next-word prediction on sentences of a small probabilistic grammar (``instill.data.grammar``): offline.

    Each split is its own stream of sentences cut into ``n`` blocks of ``seq_len`` words. Subjects agree in
    number with verbs across phrases and relative clauses, a dependency several words long.
    """
    vocab = ["<pad>"] + pcfg.vocabulary()
    ids = {word: i for i, word in enumerate(vocab)}

    def split(n: int, purpose: str) -> Split:
        stream = pcfg.words(random.Random(derive_seed(ctx.seed, "sequences", f"grammar:{purpose}")))
        tokens = torch.tensor([ids[next(stream)] for _ in range(n * seq_len + 1)], dtype=torch.long)
        return lm_blocks(tokens, seq_len)

    return DataBundle(train=split(n_train, "train"), val=split(n_val, "val"), test=split(n_test, "test"),
                      info=_lm_info(vocab, seq_len, level="word"))


def tokenize(text: str, level: Literal["char", "word"]) -> list[str]:
    """Characters, or words: runs of non-space characters, with each line break kept as a token."""
    return list(text) if level == "char" else re.findall(r"\S+|\n", text)


def build_vocab(tokens: list[str], max_vocab: Optional[int]) -> list[str]:
    """``<pad>``, ``<unk>``, then the tokens, most frequent first (ties alphabetical), at most ``max_vocab`` in all."""
    ranked = sorted(Counter(tokens).items(), key=lambda kv: (-kv[1], kv[0]))
    keep = [token for token, _ in ranked][: None if max_vocab is None else max(max_vocab - 2, 0)]
    return ["<pad>", "<unk>"] + sorted(keep)




def _read_text(path: str) -> str:
    file = Path(path)
    if not file.is_file():
        what = "is not a regular file" if os.path.lexists(file) else "not found"  # a FIFO would block the reader
        raise UserError(f"data text: path {path} {what}")
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise UserError(f"data text: {path} is not UTF-8 text (byte {err.start})") from None
    if not text.strip():
        raise UserError(f"data text: {path} is empty")
    return text


@DATASETS.register("text")
def text_file(ctx: DataContext, *, path: Optional[str] = None, level: Literal["char", "word"] = "char",
              seq_len: conint(ge=2) = 64, val_fraction: Fraction = 0.1, test_fraction: Fraction = 0.1,
              max_vocab: Optional[conint(ge=3)] = None) -> DataBundle:
    """Next-token prediction on a UTF-8 text file, by character or by word.

    ``path`` defaults to the shipped corpus ``core/data/corpus/grammar.txt``: sentences of the grammar of
    ``instill.data.grammar``, one per line (written by ``python -m instill.data.grammar``), so it works offline.

    The token stream is split in order (train first, then val, then test: no block is shared, as WikiText's
    files) and each part is cut into blocks of ``seq_len``. The vocabulary is the whole file's (``<pad>`` = 0,
    ``<unk>`` = 1 for tokens beyond the ``max_vocab`` most frequent); ``info.vocab`` lists it by id. The seed
    plays no part: the file alone decides the data.
    """
    path = str(pcfg.GRAMMAR_CORPUS) if path is None else path
    tokens = tokenize(_read_text(path), level)
    vocab = build_vocab(tokens, max_vocab)
    ids = {token: i for i, token in enumerate(vocab)}
    stream = torch.tensor([ids.get(token, UNK) for token in tokens], dtype=torch.long)
    n_val, n_test = (int(len(stream) * f) for f in (val_fraction, test_fraction))
    n_train = len(stream) - n_val - n_test
    parts = {"train": stream[:n_train], "val": stream[n_train:n_train + n_val], "test": stream[n_train + n_val:]}
    for name, part in parts.items():
        if len(part) < seq_len + 1:
            raise UserError(f"data text: {path} gives {len(part)} {level} tokens for {name}, fewer than one block "
                            f"of seq_len {seq_len} + 1 (use a longer file, a smaller seq_len or larger fractions)")
    splits = {name: lm_blocks(part, seq_len) for name, part in parts.items()}
    return DataBundle(**splits, info=_lm_info(vocab, seq_len, level=level))
