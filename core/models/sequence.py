"""Sequence models of "Training the Untrainable": recurrent and Transformer language models and classifiers.

Inputs are always (batch, time) int64 token ids, token 0 is padding and padding is trailing
(``instill.data.sequences``).

==========================  =====================================  ==================================================
model                       output                                 module names (captured by forward hooks)
==========================  =====================================  ==================================================
``rnn``, ``lstm``, ``gru``  (batch, time, vocab) logits            ``embedding``, ``layers.0`` .. ``layers.{n-1}``
                                                                   (one single-layer recurrent module each),
                                                                   ``head``
``transformer``             (batch, time, vocab) logits            ``embedding``, ``layers.0`` .. ``layers.{n-1}``
                                                                   (``nn.TransformerEncoderLayer``, causal), or
                                                                   ``layer`` when tied; ``norm`` (LayerNorm when
                                                                   pre-LN, else identity), ``head``
``rnn_classifier``          (batch, classes) logits                as ``rnn``; ``head`` reads the last real step
``transformer_classifier``  (batch, classes) logits                as ``transformer``; ``head`` reads the mean over
                                                                   real positions
==========================  =====================================  ==================================================

Every module keeps the batch axis first (``batch_first=True`` throughout). A recurrent module returns
``(output, state)``; its output (batch, time, hidden) is what a capture keeps. A tied Transformer applies its one
``layer`` ``num_layers`` times, so a capture of ``layer`` gives one entry per application (``layer``, ``layer@1``,
...). Untied layers are the default; ``tied: true`` is the original code's shared layer.

Differences from the original code, on purpose: every recurrent layer starts from a zero state (the original
initialised layer i+1 with layer i's final state); the Transformer language model uses causal self-attention only
(the original's decoder layer cross-attended to its own whole input, which sees the future once targets are
shifted); parity models read lengths from the padding instead of taking them as a second argument.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import confloat, conint
from torch import nn

from ..dataset_info import DatasetInfo
from ..errors import UserError
from ..registry import MODELS

PAD = 0
Cell = Literal["rnn", "lstm", "gru"]
CELLS = {"rnn": nn.RNN, "lstm": nn.LSTM, "gru": nn.GRU}


def _require(info: DatasetInfo, model: str, *, classifier: bool) -> None:
    """The data must be tokens, and a classification task exactly when the model is a classifier."""
    if info.vocab_size is None:
        raise UserError(f"model {model} needs token data (its info has no vocab_size): "
                        "try data copy_paste, parity, grammar or text")
    if classifier and info.num_classes is None:
        raise UserError(f"model {model} classifies sequences, but the data is next-token prediction: "
                        "use rnn, lstm, gru or transformer")
    if not classifier and info.num_classes is not None:
        raise UserError(f"model {model} predicts a token per position, but the data labels whole sequences: "
                        "use rnn_classifier or transformer_classifier")


def real_lengths(x: torch.Tensor) -> torch.Tensor:
    """Number of tokens before the trailing padding, at least 1 (an all-padding row reads its first position)."""
    return (x != PAD).sum(1).clamp(min=1)


# ----------------------------------------------------------------------------------------------------- recurrent

class RecurrentStack(nn.Module):
    """Embedding, then ``num_layers`` single-layer recurrent modules (``layers.i``), each from a zero state."""

    def __init__(self, vocab_size: int, cell: str, embed_dim: int, hidden_size: int, num_layers: int,
                 dropout: float):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, embed_dim, padding_idx=PAD)
        sizes = [embed_dim] + [hidden_size] * num_layers
        self.layers = nn.ModuleList(CELLS[cell](sizes[i], sizes[i + 1], batch_first=True)
                                    for i in range(num_layers))
        self.dropout = nn.Dropout(dropout)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(batch, time, hidden) outputs of the last layer."""
        h = self.embedding(x)
        for i, layer in enumerate(self.layers):
            h = layer(self.dropout(h) if i else h)[0]
        return h


class RecurrentLM(RecurrentStack):
    """(batch, time) ids -> (batch, time, vocab) next-token logits."""

    def __init__(self, vocab_size: int, cell: str, embed_dim: int, hidden_size: int, num_layers: int,
                 dropout: float):
        super().__init__(vocab_size, cell, embed_dim, hidden_size, num_layers, dropout)
        self.head = nn.Linear(hidden_size, vocab_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.features(x)))


class RecurrentClassifier(RecurrentStack):
    """(batch, time) ids -> (batch, classes): ReLU and a linear head on the output at the last real token."""

    def __init__(self, vocab_size: int, num_classes: int, cell: str, embed_dim: int, hidden_size: int,
                 num_layers: int, dropout: float):
        super().__init__(vocab_size, cell, embed_dim, hidden_size, num_layers, dropout)
        self.head = nn.Linear(hidden_size, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.features(x)
        last = h[torch.arange(len(x), device=x.device), real_lengths(x) - 1]  # causal: padding after it is unseen
        return self.head(torch.relu(last))


# ----------------------------------------------------------------------------------------------------- transformer

def sinusoidal_positions(length: int, d_model: int) -> torch.Tensor:
    """(length, d_model) sinusoidal position codes of Vaswani et al."""
    position = torch.arange(length, dtype=torch.float32)[:, None]
    frequency = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float32) * (-math.log(10000.0) / d_model))
    codes = torch.zeros(length, d_model)
    codes[:, 0::2] = torch.sin(position * frequency)
    codes[:, 1::2] = torch.cos(position * frequency[: d_model // 2])
    return codes


class TransformerStack(nn.Module):
    """Token embedding x sqrt(d) + sinusoidal positions, then encoder layers: ``layers.i`` or, tied, ``layer``.

    Post-LN by default (PyTorch's and the original's layer); ``norm_first`` makes them pre-LN with a final
    ``norm``.
    """

    def __init__(self, vocab_size: int, d_model: int, nhead: int, num_layers: int, dim_feedforward: int,
                 dropout: float, tied: bool, norm_first: bool, max_len: int):
        super().__init__()
        self.d_model, self.num_layers, self.tied = d_model, num_layers, tied
        self.embedding = nn.Embedding(vocab_size, d_model, padding_idx=PAD)
        self.register_buffer("positions", sinusoidal_positions(max_len, d_model), persistent=False)
        self.dropout = nn.Dropout(dropout)

        def make_layer() -> nn.TransformerEncoderLayer:
            return nn.TransformerEncoderLayer(d_model, nhead, dim_feedforward, dropout, batch_first=True,
                                              norm_first=norm_first)

        if tied:
            self.layer = make_layer()
        else:
            self.layers = nn.ModuleList(make_layer() for _ in range(num_layers))
        self.norm = nn.LayerNorm(d_model) if norm_first else nn.Identity()

    def applied_layers(self) -> list[nn.Module]:
        """The layers in the order they run: the one shared layer ``num_layers`` times when tied."""
        return [self.layer] * self.num_layers if self.tied else list(self.layers)

    def features(self, x: torch.Tensor, *, causal: bool) -> torch.Tensor:
        """(batch, time, d_model): causal self-attention, or bidirectional attention that skips the padding."""
        length = x.shape[1]
        positions = self.positions if length <= len(self.positions) else sinusoidal_positions(length, self.d_model)
        h = self.dropout(self.embedding(x) * math.sqrt(self.d_model) + positions[:length].to(x.device))
        if causal:
            options = {"src_mask": nn.Transformer.generate_square_subsequent_mask(length, device=x.device),
                       "is_causal": True}
        else:
            padding = torch.arange(length, device=x.device) >= real_lengths(x)[:, None]
            options = {"src_key_padding_mask": padding}
        for layer in self.applied_layers():
            h = layer(h, **options)
        return self.norm(h)


class TransformerLM(TransformerStack):
    """(batch, time) ids -> (batch, time, vocab) next-token logits, causal self-attention."""

    def __init__(self, vocab_size: int, **stack):
        super().__init__(vocab_size, **stack)
        self.head = nn.Linear(self.d_model, vocab_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x, causal=True))


class TransformerClassifier(TransformerStack):
    """(batch, time) ids -> (batch, classes): linear head on the mean over real positions (padding masked)."""

    def __init__(self, vocab_size: int, num_classes: int, **stack):
        super().__init__(vocab_size, **stack)
        self.head = nn.Linear(self.d_model, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.features(x, causal=False)
        real = (torch.arange(x.shape[1], device=x.device) < real_lengths(x)[:, None]).to(h.dtype)
        pooled = (h * real[..., None]).sum(1) / real.sum(1, keepdim=True)
        return self.head(pooled)


def _transformer_options(info: DatasetInfo, model: str, d_model: int, nhead: int, num_layers: int, dim_feedforward: int,
                         dropout: float, tied: bool, norm_first: bool) -> dict:
    if d_model % nhead:
        raise UserError(f"model {model}: d_model {d_model} is not divisible by nhead {nhead}")
    return dict(d_model=d_model, nhead=nhead, num_layers=num_layers, dim_feedforward=dim_feedforward,
                dropout=dropout, tied=tied, norm_first=norm_first, max_len=(info.seq_len or 512))


# ----------------------------------------------------------------------------------------------------- registry

def _recurrent_lm(info: DatasetInfo, model: str, cell: str, embed_dim: int, hidden_size: int, num_layers: int,
                  dropout: float) -> nn.Module:
    _require(info, model, classifier=False)
    return RecurrentLM(info.vocab_size, cell, embed_dim, hidden_size, num_layers, dropout)


@MODELS.register("rnn")
def rnn(info: DatasetInfo, *, cell: Cell = "rnn", embed_dim: conint(ge=1) = 64, hidden_size: conint(ge=1) = 64,
        num_layers: conint(ge=1) = 2, dropout: confloat(ge=0, lt=1) = 0.0) -> nn.Module:
    """Recurrent language model: (batch, time) ids -> (batch, time, vocab) logits; ``cell`` rnn (tanh), lstm, gru.

    Defaults are the CPU-scale copy-paste target (2 x 64); the paper's was embed 256, 4 layers of hidden 512.
    ``dropout`` acts between layers and before the head.
    """
    return _recurrent_lm(info, "rnn", cell, embed_dim, hidden_size, num_layers, dropout)


@MODELS.register("lstm")
def lstm(info: DatasetInfo, *, embed_dim: conint(ge=1) = 64, hidden_size: conint(ge=1) = 64,
         num_layers: conint(ge=1) = 2, dropout: confloat(ge=0, lt=1) = 0.0) -> nn.Module:
    """``rnn`` with LSTM layers: (batch, time) ids -> (batch, time, vocab) logits."""
    return _recurrent_lm(info, "lstm", "lstm", embed_dim, hidden_size, num_layers, dropout)


@MODELS.register("gru")
def gru(info: DatasetInfo, *, embed_dim: conint(ge=1) = 64, hidden_size: conint(ge=1) = 64,
        num_layers: conint(ge=1) = 2, dropout: confloat(ge=0, lt=1) = 0.0) -> nn.Module:
    """``rnn`` with GRU layers: (batch, time) ids -> (batch, time, vocab) logits."""
    return _recurrent_lm(info, "gru", "gru", embed_dim, hidden_size, num_layers, dropout)


@MODELS.register("transformer")
def transformer(info: DatasetInfo, *, d_model: conint(ge=1) = 64, nhead: conint(ge=1) = 4, num_layers: conint(ge=1) = 4,
                dim_feedforward: conint(ge=1) = 64, dropout: confloat(ge=0, lt=1) = 0.1, tied: bool = False,
                norm_first: bool = False) -> nn.Module:
    """Causal Transformer language model: (batch, time) ids -> (batch, time, vocab) logits.

    Defaults are the CPU-scale copy-paste guide (d 64, 4 heads, 4 layers, feed-forward 64; the paper's: d 512,
    16 heads, feed-forward 512). ``tied: true`` applies one shared layer ``num_layers`` times, as the original.
    """
    _require(info, "transformer", classifier=False)
    options = _transformer_options(info, "transformer", d_model, nhead, num_layers, dim_feedforward, dropout, tied,
                                   norm_first)
    return TransformerLM(info.vocab_size, **options)


@MODELS.register("rnn_classifier")
def rnn_classifier(info: DatasetInfo, *, cell: Cell = "rnn", embed_dim: conint(ge=1) = 16,
                   hidden_size: conint(ge=1) = 64, num_layers: conint(ge=1) = 2,
                   dropout: confloat(ge=0, lt=1) = 0.0) -> nn.Module:
    """Sequence classifier (the paper's parity RNN): (batch, time) ids -> (batch, classes) logits.

    Reads the recurrent output at the last real token. Defaults: CPU-scale parity guide (2 x 64).
    """
    _require(info, "rnn_classifier", classifier=True)
    return RecurrentClassifier(info.vocab_size, info.num_classes, cell, embed_dim, hidden_size, num_layers,
                               dropout)


@MODELS.register("transformer_classifier")
def transformer_classifier(info: DatasetInfo, *, d_model: conint(ge=1) = 64, nhead: conint(ge=1) = 4,
                           num_layers: conint(ge=1) = 4, dim_feedforward: conint(ge=1) = 128,
                           dropout: confloat(ge=0, lt=1) = 0.1, tied: bool = False,
                           norm_first: bool = False) -> nn.Module:
    """Transformer encoder classifier (the paper's parity ``TransEnc``): (batch, time) ids -> (batch, classes).

    Bidirectional attention with the padding masked, then the mean over real positions. Defaults: CPU-scale
    parity target (d 64, 4 heads, 4 layers, feed-forward 128). ``tied: true``: one shared layer, as the original.
    """
    _require(info, "transformer_classifier", classifier=True)
    options = _transformer_options(info, "transformer_classifier", d_model, nhead, num_layers, dim_feedforward,
                                   dropout, tied, norm_first)
    return TransformerClassifier(info.vocab_size, info.num_classes, **options)
