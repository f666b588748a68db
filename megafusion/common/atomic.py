"""The one implementation of atomic writes: readers see the old file/directory or the complete new one.

Everything is built in a temporary sibling (same filesystem, so the final rename is atomic) and renamed into
place. Temporary names carry host and pid so a later run can recognise and remove leftovers of a killed
process (`remove_stale_tmp`)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

# A temporary sibling older than this is removed even if its owner cannot be checked (another host).
STALE_TMP_SECONDS = 24 * 3600


def tmp_prefix(final: Path) -> str:
    return f".{final.name}.tmp-"


def tmp_sibling(final: str | os.PathLike) -> Path:
    """A fresh, not yet created path beside `final`."""
    # Not tempfile.mkdtemp/mkstemp: those force 0700/0600 while the result should get the user's umask.
    final = Path(final)
    owner = f"{socket.gethostname()}-{os.getpid()}"
    return final.parent / f"{tmp_prefix(final)}{owner}-{uuid.uuid4().hex[:8]}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_tmp(final: str | os.PathLike) -> None:
    """Delete temporary siblings of `final` left by killed runs: same host and dead pid, or simply very old."""
    final = Path(final)
    parent, prefix = final.parent, tmp_prefix(final)
    if not parent.is_dir():
        return
    host = socket.gethostname()
    now = time.time()
    for p in parent.glob(f"{prefix}*"):
        owner_host, _, pid = p.name[len(prefix) :].rpartition("-")[0].rpartition("-")
        stale = owner_host == host and pid.isdigit() and not _pid_alive(int(pid))
        try:
            stale = stale or now - p.stat().st_mtime > STALE_TMP_SECONDS
        except OSError:
            continue
        if not stale:
            continue
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


def _discard(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextmanager
def atomic_directory(
    out: str | os.PathLike, *, keep_existing: Callable[[Path], bool] | None = None, replace: bool = True
) -> Iterator[Path]:
    """Yields an empty temporary sibling of `out` to fill; on success it replaces `out` (an existing `out` is
    moved aside first and deleted after the swap), on error it is removed and `out` is untouched.

    `keep_existing(out)`: when the final rename fails because a concurrent process installed `out` first and
    this returns True for it, that result is kept and ours discarded.
    `replace=False`: a non-empty `out` present at the end is never moved aside (someone may be reading it);
    the rename then fails and `keep_existing` decides between keeping it and raising."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_sibling(out)
    tmp.mkdir()
    old: Path | None = None
    try:
        yield tmp
        if out.is_dir() and not out.is_symlink() and not any(out.iterdir()):
            out.rmdir()  # an empty directory holds nothing to lose, and rename cannot replace a non-empty one
        elif replace and (out.exists() or out.is_symlink()):
            old = tmp_sibling(out)
            os.replace(out, old)
        try:
            os.replace(tmp, out)
        except OSError:
            if keep_existing is not None and keep_existing(out):
                return
            raise
    finally:
        _discard(tmp)
        if old is not None:
            _discard(old)


@contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary sibling path of `path` to write; on success it is renamed onto `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_sibling(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(text)


def write_json_atomic(path: str | os.PathLike, data: Any, indent: int | None = 2) -> None:
    write_text_atomic(path, json.dumps(data, indent=indent) + "\n")
