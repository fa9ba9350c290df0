"""Speed of masks and transplants, measured side by side in one process.

Prints these ratios (lower is better) and, last, one JSON object with them:

* ``discovery_vs_plain``: a discovery step over a masked GPT-2 (forward with soft masks, answer loss + L0 penalty,
  backward, AdamW step on the mask logits) divided by a plain forward+backward of the frozen model in which the
  masked weights require gradients (the same matrix products; nothing else). Target <= 1.25.
* ``discovery_vs_neurosurgeon``: the same discovery step divided by NeuroSurgeon 0.1.0's (``CircuitModel`` with
  continuous-sparsification layers, the same loss, its own L0). Target <= 1.
* ``mask_overhead_vs_neurosurgeon``: (ours - plain) / (NeuroSurgeon - plain): what the masks add, compared.
* ``transfer_vs_plain``: a training step of a transplanted ``subnet`` model (its frozen entries kept fixed by the
  optimizer hooks of ``instill.subnetworks.transplant.FrozenEntries``) divided by the plain model's step, with
  torch's default AdamW. Target <= 1.05. ``transfer_vs_plain_fused_adamw``: the same with ``AdamW(fused=True)``.
  ``transfer_zero_grads_vs_plain``: with the frozen entries' gradients zeroed as soon as they exist (``zero_grads``).
* Memory, transplanted over plain, at the 2-layer preset's subnetwork density (``--density``, 0.24) and at a high
  density (``--high-density``, 0.76: what a legacy sampled baseline keeps, N - k): ``transfer_memory_vs_plain``
  counts parameters, buffers and freezing state (params only; target <= 1.05 at any density);
  ``transfer_training_memory_vs_plain`` counts them just before an optimizer step, with gradients and AdamW state
  (training step; target <= 1.03). Freezing holds one bit per entry of each masked parameter, whatever the density
  (no copy of the frozen values); while it steps, one parameter at a time also has its mask unpacked (a byte per
  entry) and a decay factor per entry, temporaries smaller than the optimizer's own (not counted here).

Timing: the compared steps take turns (``--repeats`` rounds after warm-up); a ratio is the median over rounds.
Run on a quiet machine (``uptime``), from the repository root: ``PYTHONPATH=. python bench/masks.py`` (paper size:
GPT-2 2 layers (``--layers``), 128 wide, 4 heads, vocabulary 1001, discovery batch 500, transfer batch 50) or
``--quick`` (toy size, seconds).
"""

from __future__ import annotations

import argparse
import json
import statistics
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from instill.subnetworks.masks import MaskConfig, MaskedModel
from instill.subnetworks.transplant import transplant
from timing import interleaved_times, median_ratio


@dataclass
class Size:
    n_layer: int = 2
    n_embd: int = 128
    n_head: int = 4
    vocab: int = 1001
    discovery_batch: int = 500
    transfer_batch: int = 50
    # kept fraction of the transplanted subnetwork: configs/math_2l_ablate.yaml keeps 22-25% of the Conv1D weights
    density: float = 0.24
    # a high density: the legacy sampled baseline (legacy_sampling: true) keeps N - k, 0.76 at the preset
    high_density: float = 0.76
    repeats: int = 30
    warmup: int = 5
    device: str = "cpu"  # where models and batches live; timed calls are synchronised there


QUICK = Size(n_layer=1, n_embd=32, n_head=2, vocab=101, discovery_batch=64, transfer_batch=16, repeats=5, warmup=2)


def gpt2(size: Size, seed: int = 0) -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=size.vocab, n_positions=4, n_embd=size.n_embd, n_layer=size.n_layer,
                        n_head=size.n_head, bos_token_id=None, eos_token_id=None, use_cache=False)
    return GPT2LMHeadModel(config).to(size.device)


def batch(size: Size, n: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, size.vocab - 1, (n, 4), generator=g).to(size.device)
    return x, x[:, 3]


def answer_loss(logits: torch.Tensor, answer: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[:, 2].float(), answer)


def _device(size: Size) -> torch.device:
    return torch.device(size.device)


def median_ms(times: dict[str, list[float]], name: str) -> float:
    return statistics.median(times[name]) * 1e3


# ----------------------------------------------------------------------------------------------------- discovery

def mask_config(l0_lambda: float = 1e-7) -> MaskConfig:
    return MaskConfig(layers=("Conv1D",), mask_init_value=-0.1, l0_lambda=l0_lambda)


def ours_discovery_step(size: Size) -> Callable[[], None]:
    masked = MaskedModel(gpt2(size), mask_config())
    masked.train()
    masked.temperature = 5.0
    optimizer = torch.optim.AdamW(masked.logits.parameters(), lr=1e-3)
    x, answer = batch(size, size.discovery_batch)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss = answer_loss(masked(x).logits, answer) + masked.penalty()
        loss.backward()
        optimizer.step()

    return step


def neurosurgeon_discovery_step(size: Size) -> Callable[[], None]:
    from NeuroSurgeon.Models.circuit_model import CircuitModel
    from NeuroSurgeon.Models.model_configs import CircuitConfig

    model = gpt2(size)
    targets = [name for name, m in model.named_modules() if type(m).__name__ == "Conv1D"]
    config = CircuitConfig(mask_method="continuous_sparsification", target_layers=targets, freeze_base=True,
                           add_l0=True, l0_lambda=1e-7,
                           mask_hparams={"ablation": "none", "mask_unit": "weight", "mask_bias": False,
                                         "mask_init_value": -0.1})
    circuit = CircuitModel(config, model)
    circuit.train(True)
    circuit.temperature = 5.0
    optimizer = torch.optim.AdamW([p for p in circuit.parameters() if p.requires_grad], lr=1e-3)
    x, answer = batch(size, size.discovery_batch)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        logits = circuit(input_ids=x).logits
        loss = answer_loss(logits, answer) + config.l0_lambda * circuit._compute_l0_loss()
        loss.backward()
        optimizer.step()

    return step


def plain_forward_backward(size: Size) -> Callable[[], None]:
    """The frozen model's forward+backward with exactly the masked weights requiring gradients."""
    model = gpt2(size)
    model.eval()
    for name, param in model.named_parameters():
        param.requires_grad_(name.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")))
    x, answer = batch(size, size.discovery_batch)

    def step() -> None:
        model.zero_grad(set_to_none=True)
        answer_loss(model(x).logits, answer).backward()

    return step


# ----------------------------------------------------------------------------------------------------- transfer

def random_subnetwork(model: torch.nn.Module, density: float, seed: int = 2) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {name: torch.rand(p.shape, generator=g) < density for name, p in model.named_parameters()
            if name.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight"))}


class TrainingStep:
    """One AdamW training step (causal-LM loss, batch ``size.transfer_batch``), then ``after_step``."""

    def __init__(self, model: torch.nn.Module, size: Size, after_step: Callable[[], None] = lambda: None,
                 fused: bool = False):
        self.model, self.after_step = model.train(), after_step
        self.optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4,
                                           weight_decay=0.01, fused=fused or None)
        self.x, _ = batch(size, size.transfer_batch)

    def backward(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        logits = self.model(self.x).logits
        F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), self.x[:, 1:].reshape(-1)).backward()

    def __call__(self) -> None:
        self.backward()
        self.optimizer.step()
        self.after_step()

    def peak_bytes(self, extra: Callable[[], int] = lambda: 0) -> int:
        """Bytes held just before an optimizer step: parameters, buffers, gradients, optimizer state, ``extra``."""
        self()
        self.backward()  # the gradients (and any per-step freezing state) exist now, as at the step
        tensors = [*self.model.parameters(), *self.model.buffers(),
                   *(p.grad for p in self.model.parameters() if p.grad is not None),
                   *(t for state in self.optimizer.state.values() for t in state.values()
                     if isinstance(t, torch.Tensor))]
        held = sum(t.numel() * t.element_size() for t in tensors) + extra()
        self.optimizer.step()
        self.after_step()
        return held


def model_bytes(model: torch.nn.Module, extra: int = 0) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()]) + extra


def transplanted(size: Size, density: float, zero_grads: bool = False):
    """A ``subnet`` transplant of a random subnetwork of ``density`` into a fresh GPT-2."""
    base = gpt2(size, seed=0)
    return transplant("subnet", base, gpt2(size, seed=3), random_subnetwork(base, density), zero_grads=zero_grads)


def memory_ratios(size: Size, density: float) -> dict[str, float]:
    """Bytes, transplanted over plain, at ``density``: params only (``model``) and at a training step."""
    moved = transplanted(size, density)
    moved_step, plain_step = TrainingStep(moved.model, size, moved.after_step), TrainingStep(gpt2(size, seed=3), size)
    return {"model": model_bytes(moved.model, moved.frozen.extra_bytes()) / model_bytes(plain_step.model),
            "training": moved_step.peak_bytes(moved.frozen.extra_bytes) / plain_step.peak_bytes()}


def transfer_steps(size: Size, fused: bool = False, zero_grads: bool = False) -> tuple[TrainingStep, TrainingStep]:
    """(transplanted step, plain step) for a ``subnet`` transplant at ``size.density``."""
    moved = transplanted(size, size.density, zero_grads)
    return TrainingStep(moved.model, size, moved.after_step, fused), TrainingStep(gpt2(size, seed=3), size, fused=fused)


# ----------------------------------------------------------------------------------------------------- main

def run(size: Size) -> dict[str, float]:
    steps = {"ours": ours_discovery_step(size), "neurosurgeon": neurosurgeon_discovery_step(size),
             "plain": plain_forward_backward(size)}
    discovery = interleaved_times(steps, size.repeats, size.warmup, _device(size))
    # what the masks add on top of the plain forward+backward, ours over NeuroSurgeon's (per round, then median)
    overhead = statistics.median((o - p) / max(n - p, 1e-9) for o, n, p in
                                 zip(discovery["ours"], discovery["neurosurgeon"], discovery["plain"]))
    moved, plain = transfer_steps(size)
    transfer = interleaved_times({"moved": moved, "plain": plain}, size.repeats, size.warmup, _device(size))
    fused = interleaved_times(dict(zip(("moved", "plain"), transfer_steps(size, fused=True))), size.repeats,
                              size.warmup, _device(size))
    hooked = interleaved_times(dict(zip(("moved", "plain"), transfer_steps(size, zero_grads=True))), size.repeats,
                               size.warmup, _device(size))
    memory, high = memory_ratios(size, size.density), memory_ratios(size, size.high_density)
    result = {"discovery_vs_plain": median_ratio(discovery["ours"], discovery["plain"]),
              "discovery_vs_neurosurgeon": median_ratio(discovery["ours"], discovery["neurosurgeon"]),
              "mask_overhead_vs_neurosurgeon": overhead,
              "transfer_vs_plain": median_ratio(transfer["moved"], transfer["plain"]),
              "transfer_vs_plain_fused_adamw": median_ratio(fused["moved"], fused["plain"]),
              "transfer_zero_grads_vs_plain": median_ratio(hooked["moved"], hooked["plain"]),
              "transfer_memory_vs_plain": memory["model"],
              "transfer_training_memory_vs_plain": memory["training"],
              "transfer_memory_vs_plain_high_density": high["model"],
              "transfer_training_memory_vs_plain_high_density": high["training"]}
    print(f"discovery step {median_ms(discovery, 'ours'):.2f} ms / plain fwd+bwd {median_ms(discovery, 'plain'):.2f} "
          f"ms = {result['discovery_vs_plain']:.3f} (target <= 1.25)")
    print(f"discovery step / NeuroSurgeon step {median_ms(discovery, 'neurosurgeon'):.2f} ms = "
          f"{result['discovery_vs_neurosurgeon']:.3f} (target <= 1); mask overhead ours / NeuroSurgeon's = "
          f"{overhead:.2f}")
    print(f"transplanted step {median_ms(transfer, 'moved'):.2f} ms / plain step {median_ms(transfer, 'plain'):.2f} "
          f"ms = {result['transfer_vs_plain']:.3f} (target <= 1.05; torch's default AdamW); with fused AdamW "
          f"{median_ms(fused, 'moved'):.2f} / {median_ms(fused, 'plain'):.2f} ms = "
          f"{result['transfer_vs_plain_fused_adamw']:.3f}; "
          f"with zero_grads {result['transfer_zero_grads_vs_plain']:.3f}")
    for density, ratios in ((size.density, memory), (size.high_density, high)):
        print(f"memory, transplanted / plain, at subnetwork density {density}: params only (parameters, buffers, "
              f"frozen-entry bits) {ratios['model']:.3f}; training step (also gradients and AdamW "
              f"state) {ratios['training']:.3f} (targets <= 1.05 and <= 1.03)")
    return {**{k: round(v, 4) for k, v in result.items()}, "n_layer": size.n_layer, "n_embd": size.n_embd,
            "discovery_batch": size.discovery_batch, "transfer_batch": size.transfer_batch,
            "density": size.density, "high_density": size.high_density, "repeats": size.repeats, "device": size.device,
            "threads": torch.get_num_threads()}


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="toy size, a few repeats")
    parser.add_argument("--layers", type=int, help="GPT-2 layers (default 2)")
    parser.add_argument("--repeats", type=int, help="timed steps per variant")
    parser.add_argument("--density", type=float, help="kept fraction of the transplanted subnetwork (default 0.24)")
    parser.add_argument("--high-density", type=float, help="the high density of the memory figures (default 0.76)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--device", default="cpu", help="where the models run (cuda: timed calls synchronised)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    size = QUICK if args.quick else Size()
    for key, value in (("n_layer", args.layers), ("repeats", args.repeats), ("density", args.density),
                       ("high_density", args.high_density), ("device", args.device)):
        if value is not None:
            setattr(size, key, value)
    result = run(size)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
