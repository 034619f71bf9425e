"""Atomic writes: build into a temporary sibling, then ``os.replace`` into place.

A reader never sees a half-written file or folder, and a failed write leaves the
previous version untouched.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path


def sha256_file(path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def atomic_write_bytes(path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path, obj, sort_keys: bool = True) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=sort_keys) + "\n")


def emit_json(result, out=None) -> int:
    """What a benchmark ends with: ``result`` printed as JSON and, with ``out``, written there
    atomically; returns the exit code 0."""
    if out:
        atomic_write_json(out, result)
    print(json.dumps(result, indent=2))
    return 0


@contextlib.contextmanager
def atomic_dir(path):
    """Yield a temporary folder; on success it replaces ``path`` whole.

    An existing ``path`` is swapped with the new folder in one step (Linux ``renameat2`` with
    ``RENAME_EXCHANGE``), so a reader finds the old or the new version at every instant, never
    none; the old one is deleted after. Where the file system cannot exchange, the old one is
    moved aside first (a moment without ``path``, but never a half-written one).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _replace_dir(tmp, path)


@contextlib.contextmanager
def staged_copy(path, purpose: str):
    """Yield a copy of folder ``path`` beside it (files hard-linked: writes here replace files, they
    never edit one in place); on success swap it with ``path`` in one step, as ``atomic_dir`` does.
    A reader of ``path`` sees the old folder or the new one whole; a failure (or a crash: the next
    call starts afresh) leaves ``path`` as it was."""
    path = Path(path)
    staging = path.parent / f".{path.name}.{purpose}"
    shutil.rmtree(staging, ignore_errors=True)  # what a crashed attempt left
    shutil.copytree(path, staging, symlinks=True, copy_function=os.link)
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _replace_dir(staging, path)


def _replace_dir(new: Path, path: Path) -> None:
    """Put folder ``new`` at ``path`` and delete what was there: one ``renameat2`` exchange, or, where
    the file system cannot exchange, the old one moved aside first."""
    if not path.exists():
        os.replace(new, path)
        return
    if _exchange(new, path):
        old = new  # holds the old version now
    else:
        old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
        os.replace(path, old / path.name)
        os.replace(new, path)
    shutil.rmtree(old, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (``renameat2(RENAME_EXCHANGE)``); False where that is not available."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def read_json(path, error_cls=None):
    """Read a JSON file; a missing or malformed file raises ``error_cls(path, msg)``."""
    from .errors import ArtifactError

    error_cls = error_cls or ArtifactError
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except FileNotFoundError:
        raise error_cls(path, "file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise error_cls(path, f"not valid JSON ({exc})") from None
