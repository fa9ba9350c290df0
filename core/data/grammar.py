"""A small probabilistic context-free grammar of English-like sentences: the offline language-modelling corpus.

The grammar has number agreement between a subject and its verb across prepositional phrases and relative clauses
("the dog near the cats that sleep runs ."), so predicting the verb needs memory of a noun several words back: the
kind of dependency that separates recurrent from attention models. Sentences end with ``"."``. Recursion (noun
phrases holding phrases holding noun phrases) is bounded by ``MAX_DEPTH``, beyond which only the non-recursive
expansion is chosen.

Everything is a pure function of the ``random.Random`` passed in, so a corpus is reproducible from a seed.
``core/data/corpus/grammar.txt`` (the ``text`` dataset's default file) is ``corpus()``, written by
``python -m instill.data.grammar``.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Iterator

GRAMMAR_CORPUS = Path(__file__).resolve().parent / "corpus" / "grammar.txt"  # shipped; this module writes it

CORPUS_SEED, CORPUS_SENTENCES = 0, 6000  # the shipped corpus: about 250 KB, 54k word tokens with line breaks
MAX_DEPTH = 6  # derivation depth (every symbol counts one); sentences average 8 words, at most ~30

# Lexicon by category; "_sg" / "_pl" categories agree in number.
LEXICON: dict[str, tuple[str, ...]] = {
    "Det_sg": ("the", "a", "every", "this"),
    "Det_pl": ("the", "some", "these", "many"),
    "N_sg": ("cat", "dog", "bird", "child", "teacher", "farmer", "horse", "student"),
    "N_pl": ("cats", "dogs", "birds", "children", "teachers", "farmers", "horses", "students"),
    "Adj": ("small", "old", "happy", "green", "quiet", "clever"),
    "P": ("near", "behind", "with", "under"),
    "Vi_sg": ("sleeps", "runs", "sings", "waits"),
    "Vi_pl": ("sleep", "run", "sing", "wait"),
    "Vt_sg": ("sees", "likes", "follows", "helps"),
    "Vt_pl": ("see", "like", "follow", "help"),
}

# Nonterminal -> [(probability, expansion)]; "{n}" is replaced by the number (sg or pl) of the left-hand side.
# The first expansion of each rule is non-recursive: it is the one taken past MAX_DEPTH.
RULES: dict[str, list[tuple[float, tuple[str, ...]]]] = {
    "NP_{n}": [(0.5, ("Det_{n}", "N_{n}")), (0.2, ("Det_{n}", "Adj", "N_{n}")),
               (0.15, ("NP_{n}", "PP")), (0.15, ("NP_{n}", "RC_{n}"))],
    "VP_{n}": [(0.45, ("Vi_{n}",)), (0.4, ("Vt_{n}", "NP")), (0.15, ("Vi_{n}", "PP"))],
    "RC_{n}": [(1.0, ("that", "VP_{n}"))],
    "PP": [(1.0, ("P", "NP"))],
}


def _expand(symbol: str, rng: random.Random, depth: int, out: list[str]) -> None:
    """Append the words of one derivation of ``symbol`` to ``out``."""
    if symbol in ("S", "NP"):  # unmarked number: draw it, then use the agreeing nonterminals
        number = rng.choice(("sg", "pl"))
        children = ("NP_" + number, "VP_" + number) if symbol == "S" else ("NP_" + number,)
        for child in children:
            _expand(child, rng, depth + 1, out)
        return
    if symbol in LEXICON:
        out.append(rng.choice(LEXICON[symbol]))
        return
    if symbol == "that":
        out.append(symbol)
        return
    head, _, number = symbol.partition("_")
    options = RULES[f"{head}_{{n}}" if number else head]
    if depth >= MAX_DEPTH:
        options = options[:1]
    weights = [p for p, _ in options]
    _, expansion = rng.choices(options, weights=weights)[0]
    for child in expansion:
        _expand(child.replace("{n}", number), rng, depth + 1, out)


def sentence(rng: random.Random) -> list[str]:
    """One sentence as a list of words, ending with ``"."``."""
    words: list[str] = []
    _expand("S", rng, 0, words)
    return words + ["."]


def words(rng: random.Random) -> Iterator[str]:
    """An endless stream of words: sentence after sentence."""
    while True:
        yield from sentence(rng)


def vocabulary() -> list[str]:
    """Every word the grammar can produce, sorted (so token ids do not depend on the sample)."""
    lexicon = {w for entries in LEXICON.values() for w in entries}
    return sorted(lexicon | {"that", "."})


def corpus(seed: int = CORPUS_SEED, sentences: int = CORPUS_SENTENCES) -> str:
    """``sentences`` sentences, one per line, words separated by spaces."""
    rng = random.Random(seed)
    return "".join(" ".join(sentence(rng)) + "\n" for _ in range(sentences))


if __name__ == "__main__":
    GRAMMAR_CORPUS.parent.mkdir(exist_ok=True)
    GRAMMAR_CORPUS.write_text(corpus(), encoding="utf-8")
    print(f"wrote {GRAMMAR_CORPUS} ({GRAMMAR_CORPUS.stat().st_size} bytes)")
