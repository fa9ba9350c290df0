"""The data cache: tensors that take a while to build (rendered shapes, decoded image folders), kept on disk.

Files live under ``DataContext.cache_dir`` (``.cache/instill`` in the working directory), one per key. The cache is
bounded: after each write the least recently used files go until the total is under ``INSTILL_CACHE_MB``
(default 2048 MB), so sweeping seeds does not fill the disk. Deleting the folder is always safe.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..files import user_mode

DEFAULT_LIMIT_MB = 2048


def cached_tensors(cache_dir: str | os.PathLike, kind: str, key: dict,
                   build: Callable[[], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """``build()``'s tensors, stored once per ``key`` under ``cache_dir`` and read back on later calls.

    The file is written to a temporary name and renamed into place, so a crash never leaves half a file; a file
    that does not read back (truncated, corrupt, other keys) is rebuilt. An unwritable cache only costs time.
    """
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:20]
    path = Path(cache_dir) / f"{kind}-{digest}.safetensors"
    if path.is_file():  # only a regular file: a FIFO in its place would block the reader forever
        try:
            tensors = load_file(path)
            os.utime(path)  # recently used: pruned last
            return tensors
        except Exception:  # noqa: BLE001 - any unreadable cache file is rebuilt, whatever the reason
            pass
    tensors = build()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        os.close(handle)
        try:
            save_file(_unshared(tensors), temp)
            os.chmod(temp, user_mode())  # as any file the user creates, not mkstemp's 0600
            os.replace(temp, path)
        finally:
            if os.path.exists(temp):
                os.remove(temp)
        prune(path.parent, keep=path)
    except (OSError, SafetensorError) as err:  # safetensors reports a full disk as its own error
        warnings.warn(f"could not write the data cache {path}: {str(err).splitlines()[0]}", stacklevel=2)
    return tensors


def cache_limit_bytes() -> int:
    try:
        return int(float(os.environ.get("INSTILL_CACHE_MB", DEFAULT_LIMIT_MB)) * 2**20)
    except ValueError:
        return DEFAULT_LIMIT_MB * 2**20


def prune(cache_dir: Path, keep: Path) -> None:
    """Remove the least recently used cache files (never ``keep``) until the folder is within the limit."""
    files = []
    for file in Path(cache_dir).glob("*.safetensors"):
        try:
            stat = file.stat()
        except FileNotFoundError:  # another process pruned it
            continue
        files.append((stat.st_mtime, stat.st_size, file))
    total, limit = sum(size for _, size, _ in files), cache_limit_bytes()
    for _, size, file in sorted(files):
        if total <= limit:
            break
        if file != keep:
            file.unlink(missing_ok=True)
            total -= size


def _unshared(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous tensors, copying any that share memory with an earlier one (safetensors refuses aliases)."""
    seen: set[int] = set()
    out = {}
    for name, tensor in tensors.items():
        tensor = tensor.contiguous()
        out[name] = tensor.clone() if tensor.data_ptr() in seen else tensor
        seen.add(tensor.data_ptr())
    return out
