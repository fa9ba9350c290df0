"""GPT-2 from scratch (Hugging Face ``GPT2LMHeadModel``) for the arithmetic sequences, and its losses.

The model is built from a ``GPT2Config`` (layers, width, heads, dropout): no download, no tokenizer, token ids are
the integers of ``core.data.arithmetic``. It is the plain HF class, so parameter names are HF's
(``transformer.h.0.attn.c_attn.weight``, ...) and masks or NeuroSurgeon checkpoints name the same tensors.

Scoring: the answer is predicted by the logits at ``info["answer_position"]`` (the SEP token), accuracy is their
argmax over the whole vocabulary. ``sequence_loss`` gives either the answer-only cross-entropy or the whole-sequence
causal-LM loss of the original code (next-token cross-entropy over every position, which includes the
unpredictable ``b`` token and so sits at ln(max)/3 even for a perfect model).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import confloat, conint
from torch import nn

from core.errors import UserError
from core.registry import MODELS

IGNORE_INDEX = -100
LossScope = Literal["answer", "sequence"]


@MODELS.register("gpt2")
def gpt2(info: dict, *, n_layer: conint(ge=1) = 2, n_embd: conint(ge=1) = 128, n_head: conint(ge=1) = 4,
         dropout: confloat(ge=0, lt=1) = 0.1, attn_dropout: confloat(ge=0, lt=1) = 0.1,
         activation: Literal["gelu_new", "gelu", "relu", "silu", "tanh"] = "gelu_new", init_std: confloat(gt=0) = 0.02) -> nn.Module:
    """GPT-2 (HF ``GPT2LMHeadModel``) initialised from scratch, sized by the data's ``vocab_size`` and ``seq_len``.

    ``dropout`` sets the residual and embedding dropout, ``attn_dropout`` the attention dropout (HF defaults 0.1).
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    if n_embd % n_head:
        raise UserError(f"model gpt2: n_embd {n_embd} is not divisible by n_head {n_head}")
    if "vocab_size" not in info:
        raise UserError("model gpt2 needs a token dataset (its info has no vocab_size); try data: arithmetic")
    config = GPT2Config(vocab_size=info["vocab_size"], n_positions=info.get("seq_len", info["input_shape"][0]),
                        n_embd=n_embd, n_layer=n_layer, n_head=n_head, resid_pdrop=dropout, embd_pdrop=dropout,
                        attn_pdrop=attn_dropout, activation_function=activation, initializer_range=init_std,
                        bos_token_id=None, eos_token_id=None, use_cache=False)
    return GPT2LMHeadModel(config)


def logits_of(output: Any) -> torch.Tensor:
    """(B, T, V) logits from an HF output object or a plain tensor."""
    return output.logits if hasattr(output, "logits") else output


def answer_logits(output: Any, answer_position: int = 2) -> torch.Tensor:
    """(B, V) logits that predict the answer: those at ``answer_position`` (the SEP token)."""
    return logits_of(output)[:, answer_position]


def answer_targets(y: torch.Tensor, answer_position: int = 2) -> torch.Tensor:
    """(B,) answer tokens from the (B, T) targets of ``core.data.arithmetic``."""
    return y[:, answer_position]


def answer_accuracy(output: Any, y: torch.Tensor, answer_position: int = 2) -> float:
    """Exact-match accuracy of the argmax over the whole vocabulary at the answer position."""
    predicted = answer_logits(output, answer_position).argmax(-1)
    return (predicted == answer_targets(y, answer_position)).float().mean().item()


def sequence_loss(output: Any, x: torch.Tensor, y: torch.Tensor, scope: LossScope = "answer") -> torch.Tensor:
    """Cross-entropy: ``answer`` scores the positions where ``y`` is set; ``sequence`` is HF's causal-LM loss.

    ``sequence`` equals ``GPT2LMHeadModel(x, labels=x).loss``: every token predicted from the ones before it.
    """
    logits = logits_of(output).float()
    if scope == "sequence":
        logits, targets = logits[:, :-1], x[:, 1:]
    elif scope == "answer":
        targets = y
    else:
        raise UserError(f"loss scope {scope!r} is unknown; use 'answer' or 'sequence'")
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX)
