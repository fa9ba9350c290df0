"""GPT-2 from scratch (Hugging Face ``GPT2LMHeadModel``) for the arithmetic sequences.

The model is built from a ``GPT2Config`` (layers, width, heads, dropout): no download, no tokenizer, token ids are
the integers of ``instill.data.arithmetic``. It is the plain HF class, so parameter names are HF's
(``transformer.h.0.attn.c_attn.weight``, ...) and masks or NeuroSurgeon checkpoints name the same tensors.

Scoring: the answer is predicted by the logits at ``info.answer_position`` (the SEP token); the data's targets
hold it there and -100 elsewhere, so the shared loss and accuracy (``instill.stages.task.make_loss``,
``instill.train.evaluate_classification``) score the answer only. ``loss_scope: sequence`` gives instead the original
code's causal-LM loss over every next token, which includes the unpredictable ``b`` token and so sits at ln(max)/3
even for a perfect model.
"""

from __future__ import annotations

from typing import Literal

from pydantic import confloat, conint
from torch import nn

from ..dataset_info import DatasetInfo
from ..errors import UserError
from ..registry import MODELS


@MODELS.register("gpt2")
def gpt2(info: DatasetInfo, *, n_layer: conint(ge=1) = 2, n_embd: conint(ge=1) = 128, n_head: conint(ge=1) = 4,
         dropout: confloat(ge=0, lt=1) = 0.1, attn_dropout: confloat(ge=0, lt=1) = 0.1,
         activation: Literal["gelu_new", "gelu", "relu", "silu", "tanh"] = "gelu_new",
         init_std: confloat(gt=0) = 0.02) -> nn.Module:
    """GPT-2 (HF ``GPT2LMHeadModel``) initialised from scratch, sized by the data's ``vocab_size`` and ``seq_len``.

    ``dropout`` sets the residual and embedding dropout, ``attn_dropout`` the attention dropout (HF defaults 0.1).
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    if n_embd % n_head:
        raise UserError(f"model gpt2: n_embd {n_embd} is not divisible by n_head {n_head}")
    if info.vocab_size is None:
        raise UserError("model gpt2 needs a token dataset (its info has no vocab_size); try data: arithmetic")
    config = GPT2Config(vocab_size=info.vocab_size, n_positions=(info.seq_len or info.input_shape[0]),
                        n_embd=n_embd, n_layer=n_layer, n_head=n_head, resid_pdrop=dropout, embd_pdrop=dropout,
                        attn_pdrop=attn_dropout, activation_function=activation, initializer_range=init_std,
                        bos_token_id=None, eos_token_id=None, use_cache=False)
    return GPT2LMHeadModel(config)
