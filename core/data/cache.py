"""The data cache: tensors that take a while to build (rendered shapes, decoded image folders), kept on disk.

Files live under ``DataContext.cache_dir`` (``.cache/instill`` in the working directory), one per key. The cache is
bounded: after each write the least recently used files go until the total is under ``INSTILL_CACHE_MB``
(default 2048 MB), so sweeping seeds does not fill the disk. Deleting the folder is always safe.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import struct
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file

from ..files import user_mode

DEFAULT_LIMIT_MB = 2048
_HOST = socket.gethostname().replace(".", "-")
_writers: list[threading.Thread] = []


def cache_path(cache_dir: str | os.PathLike, kind: str, key: dict) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:20]
    return Path(cache_dir) / f"{kind}-{digest}.safetensors"


def read_cached(cache_dir: str | os.PathLike, kind: str, key: dict) -> dict[str, torch.Tensor] | None:
    """The tensors stored for ``key``, or None when there are none (or the file does not read back)."""
    path = cache_path(cache_dir, kind, key)
    if not path.is_file():  # only a regular file: a FIFO in its place would block the reader forever
        return None
    try:
        tensors = load_file(path)
        os.utime(path)  # recently used: pruned last
        return tensors
    except Exception:  # noqa: BLE001 - any unreadable cache file is rebuilt, whatever the reason
        return None


def write_cached(cache_dir: str | os.PathLike, kind: str, key: dict, tensors: dict[str, torch.Tensor]) -> None:
    """Store ``tensors`` for ``key``: written to a temporary name and renamed into place, so a crash never leaves
    half a file under the cache's name. An unwritable cache only costs time (a warning)."""
    path = cache_path(cache_dir, kind, key)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove_dead_writers_files(path.parent)
        # the writer's host and pid in the name: a later writer removes what a killed one left (3 GB for an
        # ImageNet-sized folder), and never a live writer's file
        handle, temp = tempfile.mkstemp(dir=path.parent, prefix=f"{path.name}.{_HOST}.{os.getpid()}.",
                                        suffix=".tmp")
        os.close(handle)
        try:
            save_file(tensors, temp)
            os.chmod(temp, user_mode())  # as any file the user creates, not mkstemp's 0600
            os.replace(temp, path)
        finally:
            if os.path.exists(temp):
                os.remove(temp)
        prune(path.parent, keep=path)
    except OSError as err:
        warnings.warn(f"could not write the data cache {path}: {str(err).splitlines()[0]}", stacklevel=2)


def write_cached_later(cache_dir: str | os.PathLike, kind: str, key: dict, tensors: dict[str, torch.Tensor]) -> None:
    """``write_cached`` in a background thread: a decoded image folder is gigabytes, written at disk speed while
    training goes on. The tensors must not change afterwards. The interpreter waits for the thread at exit, and a
    stage waits for it when its run ends (``wait_for_writes``), so a finished run's cache is on disk."""
    thread = threading.Thread(target=write_cached, args=(cache_dir, kind, key, tensors), name="instill-cache-write")
    _writers.append(thread)
    thread.start()


def wait_for_writes() -> None:
    """Return once every cache write started by ``write_cached_later`` has ended."""
    while _writers:
        _writers.pop().join()


def cached_tensors(cache_dir: str | os.PathLike, kind: str, key: dict,
                   build: Callable[[], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """``build()``'s tensors, stored once per ``key`` under ``cache_dir`` and read back on later calls; a file that
    does not read back (truncated, corrupt, other keys) is rebuilt."""
    tensors = read_cached(cache_dir, kind, key)
    if tensors is None:
        tensors = build()
        write_cached(cache_dir, kind, key, tensors)
    return tensors


def _remove_dead_writers_files(cache_dir: Path) -> None:
    """Remove temporary files whose writer (a process of this host) no longer runs: a write killed part-way."""
    for temp in cache_dir.glob(f"*.safetensors.{_HOST}.*.tmp"):
        pid = temp.name.split(f".safetensors.{_HOST}.", 1)[1].split(".", 1)[0]
        if pid.isdigit() and not _running(int(pid)):
            temp.unlink(missing_ok=True)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


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


def save_file(tensors: dict[str, torch.Tensor], path: str | os.PathLike) -> None:
    """``tensors`` in the safetensors format (an 8-byte header length, the JSON header, the raw bytes), written with
    plain file writes. Those release the interpreter's lock: a write in a background thread leaves training its
    interpreter, where safetensors' own ``save_file`` held it (600 MB: 3.2 s in a thread against 1.3 s in a process
    of its own, and a Python loop beside it at half speed)."""
    flat = {name: tensor.detach().cpu().contiguous() for name, tensor in tensors.items()}
    header, offset = {}, 0
    for name, tensor in flat.items():
        size = tensor.numel() * tensor.element_size()
        header[name] = {"dtype": _SAFETENSORS_DTYPES[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as file:
        file.write(struct.pack("<Q", len(text)) + text)
        for tensor in flat.values():
            file.write(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))


_SAFETENSORS_DTYPES = {torch.bool: "BOOL", torch.uint8: "U8", torch.int8: "I8", torch.int16: "I16",
                       torch.int32: "I32", torch.int64: "I64", torch.float16: "F16", torch.bfloat16: "BF16",
                       torch.float32: "F32", torch.float64: "F64"}
