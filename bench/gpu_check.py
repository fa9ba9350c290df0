"""``make gpu-check``: every bench of ``bench/`` and a short paper-shaped run of each system, one JSON file of ratios.

On a machine with a CUDA device (under 8 minutes on one H100 as planned; not yet measured on one):

1. Benches: each script of ``bench/`` (``BENCHES``) in a subprocess, on CUDA where it takes ``--device``
   (synchronising around every timed call), in the size given there; the targets each one states (``TARGETS``) are
   read from its JSON line. Benches without a device option time what they time on the CPU (the DFA feedback
   matrices' resident memory, the sweep executor, start-up) and say so (``device`` in the output).
2. Paper-shaped runs on generated data (``PAPER``), bf16 autocast on CUDA as the training loop's
   ``train.precision: bf16`` does, a few timed steps after warm-up each:
   * ``gpt2_arithmetic_12l``: GPT-2 of configs/paper/math_12l_base.yaml (12 layers, 128 wide, 4 heads), batch 500
     of 4-token rows, AdamW: tokens per second of plain training, a mask-discovery step and a transplanted
     (subnet, 24 % frozen) step, and the two ratios to plain training.
   * ``tiny10_stitch``: two Tiny10 networks on CIFAR-sized 32 x 32 images, stitched at bn3, batch 128, Adam on the
     transform: images per second of a stitch step.
   * ``align_1024``: runs ``bench/align.py --width 1024`` (exact alignment scores of all four layers of the width-1024
     NTK MLP against a backprop step).
   * ``guide_resnet``: the guided step of configs/paper/guide_deep_fcn.yaml's shapes (a 48-layer 1024-wide deep FCN
     target, an untrained ResNet-18 guide, 224 px, batch 64 here), Adam: images per second, and the ratio to the
     unguided step plus the guide's forward.

``--quick`` (the CPU mode the tests run, seconds): the paper-shaped runs at toy sizes, fp32, two timed steps, and
no bench subprocess (each would take minutes on a CPU); the output still lists every target, with ``value`` null
for what was not measured. The JSON (``--out``, default ``gpu-check.json``) holds ``targets``: one entry per target
with where it comes from, the bound, the value and ``met`` (true, false or null when not measured).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
from timing import synced_median  # noqa: E402 - bench/ is on the path from here on

# bench script -> (its arguments on the GPU machine, whether it takes --device)
BENCHES: dict[str, tuple[list[str], bool]] = {
    "align": (["--width", "1024"], True),
    "compare": ([], True),
    "scaling": (["--plot", "scaling-gpu.png"], True),
    "masks": (["--quick"], True),
    "guidance": ([], True),
    "stitch": (["--quick"], True),
    "vision": (["--quick"], True),
    "images": ([], True),
    "dfa_memory": (["--quick"], False),
    "startup": (["--quick"], False),
    "sweep": (["--quick"], False),
}


@dataclass
class Target:
    source: str  # "bench:<name>" or "paper:<run>"
    key: str  # a dotted path into that JSON
    op: str  # "<=", ">=" or "<"
    bound: float


TARGETS = [
    Target("bench:compare", "over_floor", "<=", 1.10),
    Target("bench:compare", "speedup_vs_torch_cka", ">=", 3.0),
    Target("bench:guidance", "guided_step.over_floor", "<=", 1.05),
    Target("bench:masks", "transfer_memory_vs_plain", "<=", 1.05),
    Target("bench:masks", "transfer_memory_vs_plain_high_density", "<=", 1.05),
    Target("bench:masks", "transfer_training_memory_vs_plain", "<=", 1.03),
    Target("bench:masks", "discovery_vs_plain", "<=", 1.25),
    Target("bench:masks", "transfer_vs_plain", "<=", 1.05),
    Target("bench:stitch", "step_over_tail", "<=", 1.10),
    Target("bench:align", "exact_scores_over_backprop_step", "<", 1.0),
    Target("bench:images", "first_epoch_vs_torchvision", ">=", 1.0),
    Target("bench:images", "later_epochs_vs_torchvision", ">=", 3.0),
    Target("paper:gpt2_arithmetic_12l", "discovery_vs_plain", "<=", 1.25),
    Target("paper:gpt2_arithmetic_12l", "transfer_vs_plain", "<=", 1.05),
    Target("paper:guide_resnet", "guided_vs_unguided_plus_guide", "<=", 1.25),
]


def timed_steps(step: Callable[[], None], device: torch.device, steps: int) -> float:
    """Median seconds of ``steps`` calls after as many warm-up calls (at most 3), synchronised around each."""
    return synced_median(step, device, steps, warmup=min(steps, 3))


def _autocast(device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


# ----------------------------------------------------------------------------------------------------- paper runs

def gpt2_arithmetic(quick: bool, device: torch.device, steps: int) -> dict:
    import masks as bench

    from instill.subnetworks.masks import MaskedModel
    from instill.subnetworks.transplant import transplant

    size = bench.QUICK if quick else bench.Size(n_layer=12, n_embd=128, n_head=4, vocab=1001, discovery_batch=500,
                                                transfer_batch=500)
    x, answer = (t.to(device) for t in bench.batch(size, size.transfer_batch))

    def training(model: torch.nn.Module) -> Callable[[], None]:
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4,
                                      weight_decay=0.01)

        def step() -> None:
            optimizer.zero_grad(set_to_none=True)
            with _autocast(device):
                loss = bench.answer_loss(model(x).logits, answer)
            loss.backward()
            optimizer.step()
        return step

    plain = training(bench.gpt2(size, seed=3).to(device).train())
    base = bench.gpt2(size, seed=0)
    moved = transplant("subnet", base, bench.gpt2(size, seed=3), bench.random_subnetwork(base, size.density))
    transfer = training(moved.model.to(device).train())
    masked = MaskedModel(bench.gpt2(size).to(device), bench.mask_config()).train()
    mask_optimizer = torch.optim.AdamW(masked.logits.parameters(), lr=1e-3)

    def discovery() -> None:
        mask_optimizer.zero_grad(set_to_none=True)
        with _autocast(device):
            loss = bench.answer_loss(masked(x).logits, answer) + masked.penalty()
        loss.backward()
        mask_optimizer.step()

    seconds = {name: timed_steps(fn, device, steps) for name, fn in
               (("plain", plain), ("transfer", transfer), ("discovery", discovery))}
    tokens = x.numel()
    return {"n_layer": size.n_layer, "batch": len(x), "tokens_per_s_plain": round(tokens / seconds["plain"]),
            "tokens_per_s_transfer": round(tokens / seconds["transfer"]),
            "tokens_per_s_discovery": round(tokens / seconds["discovery"]),
            "transfer_vs_plain": round(seconds["transfer"] / seconds["plain"], 3),
            "discovery_vs_plain": round(seconds["discovery"] / seconds["plain"], 3)}


def tiny10_stitch(quick: bool, device: torch.device, steps: int) -> dict:
    from instill.registry import MODELS
    from instill.stitching.stitch import Head, Side, StitchTransform, Tail, freeze, layout_of

    info = {"input_shape": (3, 32, 32), "num_classes": 10}
    torch.manual_seed(0)
    front, end = (freeze(MODELS.build("tiny10", info, {})).to(device) for _ in range(2))
    head, tail = Head(front, "bn3"), Tail(end, "bn3")
    batch = 8 if quick else 128
    x, y = torch.randn(batch, 3, 32, 32, device=device), torch.randint(0, 10, (batch,), device=device)
    with torch.no_grad():
        shape = tuple(head(x).shape[1:])
    transform = StitchTransform(Side(shape, layout_of(shape)), Side(shape, layout_of(shape))).to(device)
    optimizer = torch.optim.Adam(transform.parameters(), lr=1e-3)

    def step() -> None:
        with _autocast(device):
            with torch.no_grad():
                a = head(x)
            loss = F.cross_entropy(tail(transform(a)).float(), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return {"batch": batch, "images_per_s": round(batch / timed_steps(step, device, steps))}


def guide_resnet(quick: bool, device: torch.device, steps: int) -> dict:
    from instill.data import DatasetInfo
    from instill.registry import MODELS
    from instill.stages import load_stage_config
    from instill.guidance.guide import _alignment

    side, batch = (32, 8) if quick else (224, 64)
    shrink = ["model.depth=3", "model.width=32", "guidance.guide.width=8"] if quick else []
    cfg = load_stage_config(REPO / "configs" / "paper" / "guide_deep_fcn.yaml", "guide", shrink)
    info = DatasetInfo((3, side, side), num_classes=1000)
    torch.manual_seed(0)
    target = MODELS.build(cfg.model.name, info, cfg.model.params).to(device).train()
    guide = MODELS.build(cfg.guidance.guide.name, info, cfg.guidance.guide.params).to(device)
    guide.eval().requires_grad_(False)
    plain = MODELS.build(cfg.model.name, info, cfg.model.params).to(device).train()
    x, y = torch.randn(batch, 3, side, side, device=device), torch.randint(0, 1000, (batch,), device=device)
    alignment = _alignment(cfg.guidance, target, guide, x[:8])
    optimizers = {name: torch.optim.Adam(m.parameters(), lr=1e-4) for name, m in (("ours", target), ("plain", plain))}

    def guided() -> None:
        optimizers["ours"].zero_grad(set_to_none=True)
        with _autocast(device):
            loss = F.cross_entropy(target(x).float(), y) + alignment(x)[0]
        loss.backward()
        optimizers["ours"].step()

    def unguided() -> None:
        optimizers["plain"].zero_grad(set_to_none=True)
        with _autocast(device):
            loss = F.cross_entropy(plain(x).float(), y)
        loss.backward()
        optimizers["plain"].step()

    def guide_forward() -> None:
        with torch.no_grad(), _autocast(device):
            guide(x)

    try:
        seconds = {name: timed_steps(fn, device, steps) for name, fn in
                   (("guided", guided), ("unguided", unguided), ("guide", guide_forward))}
    finally:
        alignment.close()
    return {"batch": batch, "resolution": side, "images_per_s_guided": round(batch / seconds["guided"]),
            "images_per_s_unguided": round(batch / seconds["unguided"]),
            "guided_vs_unguided_plus_guide": round(seconds["guided"] / (seconds["unguided"] + seconds["guide"]), 3)}


PAPER: dict[str, Callable[[bool, torch.device, int], dict]] = {
    "gpt2_arithmetic_12l": gpt2_arithmetic, "tiny10_stitch": tiny10_stitch, "guide_resnet": guide_resnet}


# ----------------------------------------------------------------------------------------------------- benches

def run_bench(name: str, device: torch.device, timeout: float) -> dict:
    args, takes_device = BENCHES[name]
    command = [sys.executable, str(HERE / f"{name}.py"), *args] + (["--device", str(device)] if takes_device else [])
    start = time.perf_counter()
    try:
        done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s", "command": " ".join(command[1:])}
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"exit {done.returncode}: {tail[:300]}", "command": " ".join(command[1:])}
    return {**json.loads(lines[-1]), "device": str(device) if takes_device else "cpu",
            "seconds": round(time.perf_counter() - start, 1)}


def _lookup(result: dict | None, key: str) -> float | None:
    for part in key.split("."):
        if not isinstance(result, dict) or part not in result:
            return None
        result = result[part]
    return result if isinstance(result, (int, float)) else None


def checked_targets(outputs: dict[str, dict], quick: bool) -> list[dict]:
    """One row per target; ``met`` is None where nothing was measured, or at the quick mode's toy sizes."""
    compare = {"<=": lambda v, b: v <= b, ">=": lambda v, b: v >= b, "<": lambda v, b: v < b}
    rows = []
    for target in TARGETS:
        value = _lookup(outputs.get(target.source), target.key)
        met = None if value is None or quick else compare[target.op](value, target.bound)
        rows.append({"source": target.source, "key": target.key, "target": f"{target.op} {target.bound}",
                     "value": value, "met": met})
    return rows


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="CPU, toy sizes, no bench subprocesses (seconds)")
    parser.add_argument("--out", default="gpu-check.json", help="the JSON file written")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--bench-timeout", type=float, default=150, help="seconds allowed to each bench")
    args = parser.parse_args(argv)
    device = torch.device("cpu" if args.quick else args.device)
    if device.type != "cuda" and not args.quick:
        raise SystemExit("gpu-check: no CUDA device here; run it on a GPU machine, or --quick for the CPU check")
    torch.set_num_threads(1 if args.quick else torch.get_num_threads())
    started = time.perf_counter()
    outputs: dict[str, dict] = {}
    for name, run in PAPER.items():
        try:
            outputs[f"paper:{name}"] = run(args.quick, device, 1 if args.quick else 10)
        except Exception as err:  # noqa: BLE001 - one failing system must not hide the others' figures
            outputs[f"paper:{name}"] = {"error": f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"}
    for name in ([] if args.quick else BENCHES):
        outputs[f"bench:{name}"] = run_bench(name, device, args.bench_timeout)
    targets = checked_targets(outputs, args.quick)
    result = {"device": str(device), "name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "quick": args.quick, "precision": "bf16 autocast" if device.type == "cuda" else "fp32",
              "seconds": round(time.perf_counter() - started, 1), "load": [round(v, 2) for v in os.getloadavg()],
              "targets": targets, "outputs": outputs}
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    for row in targets:
        state = {True: "met", False: "MISSED", None: "toy size, not checked" if args.quick and row["value"] is not None
                 else "not measured"}[row["met"]]
        print(f"{row['source']:28s} {row['key']:40s} {row['target']:8s} {row['value']!s:>10s}  {state}")
    errors = {k: v["error"] for k, v in outputs.items() if "error" in v}
    for source, error in errors.items():
        print(f"{source}: {error}")
    print(f"wrote {args.out} ({result['seconds']} s)")
    if errors:
        raise SystemExit(1)
    return result


if __name__ == "__main__":
    main()
