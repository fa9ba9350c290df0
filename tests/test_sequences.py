"""Sequence tasks: layouts, the padding and scoring conventions, determinism, and one-line errors."""

from __future__ import annotations

import random

import pytest
import torch

from instill.data import DataContext
from instill.data import grammar as pcfg
from instill.data.grammar import GRAMMAR_CORPUS
from instill.data.sequences import IGNORE_INDEX, PAD, UNK, real_positions
from instill.errors import UserError
from instill.registry import DATASETS


def build(name: str, seed: int = 0, **params):
    return DATASETS.build(name, DataContext(seed=seed), params)


# ----------------------------------------------------------------------------------------------------- copy-paste

@pytest.mark.parametrize("teacher_forcing", [False, True])
def test_copy_paste_layout(teacher_forcing):
    data = build("copy_paste", symbols=7, min_len=3, max_len=9, n_train=300, teacher_forcing=teacher_forcing)
    info = data.info
    sep, eos = info.facts["sep_token"], info.facts["eos_token"]
    assert (sep, eos, info.vocab_size, info.seq_len) == (8, 9, 10, 19)
    assert data.train.x.shape == data.train.y.shape == (300, 19)
    for x, y in zip(data.train.x.tolist(), data.train.y.tolist()):
        length = x.index(sep)
        assert 3 <= length <= 9
        source = x[:length]
        assert all(1 <= s <= 7 for s in source)  # 0 is padding only, never a symbol
        answer_slots = x[length + 1 : 2 * length + 1]
        assert answer_slots == (source if teacher_forcing else [PAD] * length)
        assert x[2 * length + 1 :] == [PAD] * (18 - 2 * length)  # trailing padding
        # the output at SEP predicts s_1, at answer slot j predicts s_{j+1}, at the last slot EOS
        assert y[length : 2 * length + 1] == source + [eos]
        assert set(y[:length] + y[2 * length + 1 :]) <= {IGNORE_INDEX}


def test_copy_paste_symbol_set_scores_symbols_only():
    data = build("copy_paste", min_len=4, max_len=6, n_test=50)
    full, symbols = data.test.y, data.extra_eval["test_symbols"].y
    assert torch.equal(data.extra_eval["test_symbols"].x, data.test.x)
    eos = data.info.facts["eos_token"]
    assert torch.equal(symbols, torch.where(full == eos, IGNORE_INDEX, full))
    assert (full == eos).sum() == 50 and not (symbols == eos).any()


def test_copy_paste_is_deterministic_and_splits_are_independent():
    a, b = build("copy_paste", seed=3), build("copy_paste", seed=3)
    for split in ("train", "val", "test"):
        assert torch.equal(getattr(a, split).x, getattr(b, split).x)
    assert not torch.equal(a.train.x, build("copy_paste", seed=4).train.x)
    assert not torch.equal(a.val.x, a.test.x[: len(a.val)])
    resized = build("copy_paste", seed=3, n_val=10)  # one split's size leaves the others alone
    assert torch.equal(resized.train.x, a.train.x) and torch.equal(resized.val.x, a.val.x[:10])


def test_copy_paste_lengths_cover_the_range():
    data = build("copy_paste", min_len=2, max_len=5, n_train=400)
    lengths = (data.train.x == data.info.facts["sep_token"]).float().argmax(1)
    assert set(lengths.tolist()) == {2, 3, 4, 5}


# ----------------------------------------------------------------------------------------------------- parity

def test_parity_labels_and_padding():
    data = build("parity", min_len=2, max_len=12, n_train=500)
    x, y = data.train.x, data.train.y
    assert x.shape == (500, 12) and y.shape == (500,)
    assert data.info.num_classes == 2 and data.info.vocab_size == 3
    lengths = (x != PAD).sum(1)
    assert lengths.min() >= 2 and lengths.max() <= 12
    real = torch.arange(12) < lengths[:, None]
    assert torch.equal(x != PAD, real)  # padding is trailing only
    assert torch.equal(y, (x == 2).sum(1) % 2)  # token 2 is bit 1
    assert 0.4 < y.float().mean() < 0.6
    assert torch.equal(build("parity", seed=1).test.x, build("parity", seed=1).test.x)


def test_min_len_above_max_len_is_a_user_error():
    with pytest.raises(UserError, match="min_len 9 is larger than max_len 5"):
        build("parity", min_len=9, max_len=5)
    with pytest.raises(UserError, match="min_len"):
        build("copy_paste", min_len=9, max_len=5)


# ---------------------------------------------------------------------------------------------- language modelling

def test_grammar_corpus_is_shifted_and_deterministic():
    data = build("grammar", seq_len=16, n_train=50, n_val=5, n_test=5)
    x, y = data.train.x, data.train.y
    assert x.shape == y.shape == (50, 16)
    assert torch.equal(x[:, 1:], y[:, :-1]) and torch.equal(x[1:, 0], y[:-1, -1])  # one contiguous stream
    assert data.info.vocab[0] == "<pad>" and int(x.min()) >= 1 and int(x.max()) < data.info.vocab_size
    assert torch.equal(x, build("grammar", seq_len=16, n_train=50, n_val=5, n_test=5).train.x)
    assert not torch.equal(x, build("grammar", seed=1, seq_len=16, n_train=50, n_val=5, n_test=5).train.x)


def test_grammar_sentences_agree_in_number():
    """The simplest sentences, ``Det N V .``, take the verb form of their noun's number."""
    singular = set(pcfg.LEXICON["N_sg"]) | set(pcfg.LEXICON["Vi_sg"])
    rng, checked = random.Random(0), 0
    for _ in range(2000):
        words = pcfg.sentence(rng)
        assert words[-1] == "." and set(words) <= set(pcfg.vocabulary())
        if len(words) == 4 and words[2] in pcfg.LEXICON["Vi_sg"] + pcfg.LEXICON["Vi_pl"]:
            assert (words[1] in singular) == (words[2] in singular), words
            checked += 1
    assert checked > 50


def test_the_shipped_corpus_is_the_grammars_and_the_text_default():
    text = GRAMMAR_CORPUS.read_text(encoding="utf-8")
    assert text == pcfg.corpus()  # regenerated by python -m instill.data.grammar, never edited by hand
    assert 100_000 < len(text.encode()) < 400_000 and text.count("\n") == pcfg.CORPUS_SENTENCES
    data = build("text", level="word", seq_len=32)  # no path: the shipped corpus
    assert set(data.info.vocab) == {"<pad>", "<unk>", "\n", *pcfg.vocabulary()}
    first_line = text.split("\n")[0].split()
    assert [data.info.vocab[i] for i in data.train.x[0, : len(first_line) + 1].tolist()] == first_line + ["\n"]


def test_real_positions_end_with_each_rows_trailing_padding():
    copy = build("copy_paste", min_len=2, max_len=5, n_train=40).train
    lengths = (copy.x != PAD).sum(1) - 1  # symbols before SEP
    real = real_positions(copy.x, copy.y)
    assert torch.equal(real.sum(1), 2 * lengths + 1)  # the symbols, SEP, and the answer slots (PAD inputs, scored)
    parity = build("parity", min_len=2, max_len=9, n_train=40).train
    assert torch.equal(real_positions(parity.x, parity.y), parity.x != PAD)
    lm = build("grammar", seq_len=8, n_train=4, n_val=1, n_test=1).train
    assert real_positions(lm.x, lm.y).all()


def test_text_file_char_level(tmp_path):
    text = "the quick brown fox jumps over the lazy dog\n" * 20
    path = tmp_path / "corpus.txt"
    path.write_text(text)
    data = build("text", path=str(path), seq_len=10)
    vocab = data.info.vocab
    assert vocab[:2] == ("<pad>", "<unk>") and data.info.vocab_size == len(vocab) == 2 + len(set(text))
    decoded = "".join(vocab[i] for i in data.train.x.flatten().tolist())
    assert text.startswith(decoded)
    assert torch.equal(data.train.x[:, 1:], data.train.y[:, :-1])
    n_train_tokens = len(text) - 2 * int(len(text) * 0.1)
    assert len(data.train) == (n_train_tokens - 1) // 10
    assert "".join(vocab[i] for i in data.val.x[0].tolist()) == text[n_train_tokens : n_train_tokens + 10]


def test_text_file_word_level_with_max_vocab(tmp_path):
    path = tmp_path / "words.txt"
    path.write_text(("a a a b b c\n" * 30) + "rare")
    data = build("text", path=str(path), level="word", seq_len=4, max_vocab=4)
    assert data.info.vocab == ("<pad>", "<unk>", "a", "b")  # the two most frequent tokens survive
    tokens = torch.cat([data.train.x.flatten(), data.val.x.flatten(), data.test.x.flatten()])
    assert (tokens == UNK).any() and not (tokens == PAD).any()


@pytest.mark.parametrize("content, message", [
    (None, "not found"),
    ("", "is empty"),
    ("  \n ", "is empty"),
    ("short text", "fewer than one block"),
])
def test_text_file_bad_input_is_one_line(tmp_path, content, message):
    path = tmp_path / "corpus.txt"
    if content is not None:
        path.write_text(content)
    with pytest.raises(UserError, match=message) as err:
        build("text", path=str(path), seq_len=8)
    assert "\n" not in str(err.value)
