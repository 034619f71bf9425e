"""One writer per run folder: ``RUN/.lock``, held with ``flock`` while a command writes the folder.

``run_pipeline``, ``add_domain``, ``run_stage`` and ``tune router`` take it before anything else
(before Ray starts); a second writer fails at once with ``RunFolderLocked``, which names the
holder (pid, host, command, since when). The kernel drops the lock when its process ends, however
it ends, so a crash leaves no stale lock. Readers (``eval``, ``serve``) do not take it.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from pathlib import Path

from .errors import ModulaError

LOCK_FILE = ".lock"


class RunFolderLocked(ModulaError, RuntimeError):
    """Another process is writing this run folder."""


@contextlib.contextmanager
def run_lock(run_dir, command: str):
    """Hold ``RUN_DIR/.lock`` for the ``with`` block, or raise ``RunFolderLocked`` at once."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    handle = open(run_dir / LOCK_FILE, "a+", encoding="utf-8")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = _describe(handle.read())
        handle.close()
        raise RunFolderLocked(f"{run_dir} is being written by {holder}; wait for it to finish (or stop it), "
                              f"then run `{command}` again") from None
    try:
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "command": command,
                                 "since": time.strftime("%Y-%m-%d %H:%M:%S %Z")}))
        handle.flush()
        yield
    finally:
        handle.seek(0)
        handle.truncate()
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()


def _describe(text: str) -> str:
    try:
        holder = json.loads(text)
        return f"pid {holder['pid']} on {holder['host']} (`{holder['command']}`, since {holder['since']})"
    except (ValueError, KeyError, TypeError):
        return "another process"
