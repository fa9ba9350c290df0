"""Small distributed helpers, in one place. Under ``torchrun`` every stage runs unchanged: rank 0 writes.

Without ``WORLD_SIZE`` in the environment (a plain ``python`` run) these are no-ops for a single process.
"""

from __future__ import annotations

import os
from typing import Any, Callable, TypeVar

import torch
import torch.distributed as torch_dist

T = TypeVar("T")


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def active() -> bool:
    return torch_dist.is_available() and torch_dist.is_initialized()


def init(device: torch.device) -> None:
    """Join the process group torchrun describes (gloo on the CPU, nccl on CUDA); once per process."""
    if world_size() > 1 and not active():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(local_rank())
        torch_dist.init_process_group(backend=backend)


def barrier() -> None:
    if active():
        torch_dist.barrier()


def broadcast(compute: Callable[[], T]) -> T:
    """Rank 0 computes the value; every rank returns it (a UserError on rank 0 is raised on all ranks)."""
    if not active():
        return compute()
    box: list[Any] = [None]
    if is_main():
        try:
            box[0] = ("ok", compute())
        except Exception as err:  # sent to the others so that every rank stops with the same message
            box[0] = ("error", err)
    torch_dist.broadcast_object_list(box, src=0)
    kind, value = box[0]
    if kind == "error":
        raise value
    return value


def all_agree(flag: bool, device: torch.device) -> bool:
    """True when ``flag`` is true on every rank: one tiny all-reduce under torchrun, ``flag`` itself otherwise."""
    if not active():
        return flag
    value = torch.tensor([int(flag)], device=device)
    torch_dist.all_reduce(value, op=torch_dist.ReduceOp.MIN)
    return bool(value.item())


def average_gradients(params) -> None:
    """Replace every ``param.grad`` by its mean over the ranks (one all-reduce of the flattened gradients); what
    DistributedDataParallel does for back-propagation, for gradients produced outside its forward and backward.

    Args:
        params: the parameters; those without a gradient are skipped (every rank must skip the same ones).
    """
    if not active():
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    torch_dist.all_reduce(flat)
    flat /= world_size()
    for g, mean in zip(grads, flat.split([g.numel() for g in grads])):
        g.copy_(mean.view_as(g))


def wrap(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """DistributedDataParallel when running under torchrun, the model itself otherwise."""
    if not active():
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index if device.index is not None else local_rank()] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "module", model)


def cleanup() -> None:
    if active():
        torch_dist.destroy_process_group()
