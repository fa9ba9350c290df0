"""Files as a run writes them: atomically (temporary file, then rename), with the user's permissions, regular files
only,
and one-line errors for a full disk, a read-only file system or a missing permission.

Every writer of instill (run directories, sweeps, reports, mask imports) goes through these functions, so an
interrupted write leaves either the old file or the new one."""
from __future__ import annotations

import csv
import errno
import io
import json
import os
import signal
import stat
import tempfile
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from .errors import UserError



# ---------------------------------------------------------------------------------------------------------------
# Files: permissions, regular files only, write errors, the crash hook of the tests


def user_mode(directory: bool = False) -> int:
    """The mode the user's umask gives a new file (0666 & ~umask) or directory (0777 & ~umask).

    ``tempfile`` creates 0600 files and 0700 directories; every file of a run directory gets this mode instead.
    """
    return (0o777 if directory else 0o666) & ~_umask()


def _umask() -> int:
    try:  # Linux reports it without changing it (os.umask can only read it by setting it, which races threads)
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


class NotRegularFile(OSError):
    """A path that names a FIFO, a device, a socket or a directory where a regular file was expected."""


def read_regular_bytes(path: str | Path) -> bytes:
    """The bytes of the regular file ``path``; NotRegularFile for anything else (reading a FIFO would block forever).

    The file is opened without blocking and checked on the open descriptor, so nothing can swap it in between.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0))
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise NotRegularFile(errno.EINVAL, "not a regular file", str(path))
        os.set_blocking(fd, True)
        chunks = []
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def check_regular_file(path: str | Path, what: str) -> Path:
    """``path`` if it names a regular file (symlinks followed); a UserError saying what it is otherwise."""
    path = Path(path)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise UserError(f"{path}: {what} not found") from None
    except OSError as err:
        raise UserError(f"{path}: cannot read {what} ({err.strerror or err})") from None
    if not stat.S_ISREG(mode):
        raise UserError(f"{path}: {what} is not a regular file")
    return path


def write_error(path: str | Path, err: BaseException) -> UserError:
    """The one-line error for a file that could not be written (full disk, read-only, permissions, long name)."""
    reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err).splitlines()[0]
    return UserError(f"cannot write {path}: {reason}")


def _disk_full(directory: Path) -> bool:
    try:
        return os.statvfs(directory).f_bavail == 0
    except OSError:
        return False


_fault_count = 0


def fault_point() -> None:
    """Test hook: with ``INSTILL_KILL_AT=N`` in the environment, the N-th call in this process kills it with SIGKILL,
    a crash at that very moment (no handler, no cleanup); ``INSTILL_KILL_SIGNAL=SIGINT`` sends Ctrl-C's signal
    instead. Called between the steps of every file write and after every optimizer step, so a test can stop a run
    anywhere, not only where it saves its state."""
    global _fault_count
    _fault_count += 1
    at = os.environ.get("INSTILL_KILL_AT")
    if at and _fault_count == int(at):
        os.kill(os.getpid(), getattr(signal, os.environ.get("INSTILL_KILL_SIGNAL", "SIGKILL")))


# ---------------------------------------------------------------------------------------------------------------
# Atomic files


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())

    atomic_save(path, write)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def csv_text(rows: list[dict[str, Any]], columns: Optional[list[str]] = None) -> str:
    """The one CSV format of instill's tables (results.csv, accuracy_logs.csv, metrics.csv, similarity.csv).

    Args:
        rows: one dict per row.
        columns: the columns in order; keys of a row outside them are left out, missing ones are empty. ``None``:
            every key any row has, in order of first appearance.

    Returns:
        The CSV text with a header line.
    """
    if columns is None:
        columns = list(dict.fromkeys(key for row in rows for key in row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def atomic_write_csv(path: str | Path, rows: list[dict[str, Any]], columns: Optional[list[str]] = None) -> None:
    """Write ``rows`` as :func:`csv_text` atomically to ``path``."""
    atomic_write_text(path, csv_text(rows, columns))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, default=json_default) + "\n")


def atomic_save(path: str | Path, save_fn) -> None:
    """Call ``save_fn(tmp_path)`` and move the result into place; the file gets the mode of the user's umask.

    Raises:
        UserError: the file could not be written (full disk, read-only file system, no permission, ...); the old
            file, if any, stays as it was and no temporary file is left behind.
    """
    path = Path(path)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.fchmod(fd, user_mode())
        os.close(fd)
        save_fn(tmp)
        os.chmod(tmp, user_mode())  # some writers (safetensors) create the file anew, with their own mode
        fault_point()
        os.replace(tmp, path)
        fault_point()
    except OSError as err:
        remove_quietly(tmp)
        raise write_error(path, err) from None
    except Exception:  # torch and safetensors report a full disk as their own errors
        full = _disk_full(path.parent)
        remove_quietly(tmp)
        if full:
            raise write_error(path, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))) from None
        raise
    except BaseException:
        remove_quietly(tmp)
        raise


def remove_quietly(path: Optional[str]) -> None:
    try:
        if path is not None:
            os.remove(path)
    except OSError:
        pass


def json_default(obj):
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    if isinstance(obj, torch.Tensor) and obj.numel() == 1:
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def read_json(path: str | Path) -> Optional[dict]:
    """The JSON object in ``path``, or None when the file is missing, unreadable or not a regular file."""
    try:
        value = json.loads(read_regular_bytes(path))
        return value if isinstance(value, dict) else None
    except (OSError, ValueError):
        return None
