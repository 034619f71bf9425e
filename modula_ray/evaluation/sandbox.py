"""Run untrusted, model-written Python in a jail, and only there (HumanEval's execution).

``run_python(code, timeout_s=, memory_mb=, cpu_s=)`` writes ``code`` into a fresh temporary folder
and runs it in the process jail of ``jail.py`` (PID, mount and network namespaces; a read-only
file system but that folder; ``nobody`` with ``RLIMIT_NPROC`` when run as root). Around it:

- **time**: a wall-clock ``timeout_s`` kills ``unshare``, and with it the jail's PID 1 and every
  process in the jail (grandchildren that called ``setsid`` included); ``RLIMIT_CPU`` stops a busy
  loop even if the parent is gone;
- **memory**: ``RLIMIT_AS`` of ``memory_mb``, so a memory bomb gets ``MemoryError``;
  ``RLIMIT_FSIZE``/``RLIMIT_NOFILE``/``RLIMIT_CORE`` bound the rest;
- **output**: stdout and stderr are read as they come, at most ``output_limit`` bytes each; a
  program that writes more is stopped (``status == "output"``);
- **passing**: the host hands the program a random nonce on stdin; only after the whole program
  ran (its ``check(...)`` returned) does the runner read it and print ``PASS_MARKER + nonce`` as
  the last line. ``passed`` needs that line: ``exit(0)``, ``os._exit(0)`` or a killed program
  fails whatever its exit code. (It stops programs that end early, not one written to read the
  nonce and print it itself: tests that run in the candidate's own process cannot stop that.)

It fails closed: where the jail cannot be made (no ``unshare``, namespaces not allowed), every
call raises ``SandboxUnavailable`` and no candidate runs, unless the user opts out with
``modula-ray eval --unsafe`` or ``MODULA_RAY_SANDBOX=unsafe``. Unsafe runs keep only the
Python-level guard (``jail.RUNNER``: no writes outside the folder, no sockets, no process creation
through ``os``/``subprocess``), the rlimits and a new session; code that reaches the C level steps
around that guard.
"""
from __future__ import annotations

import functools
import os
import secrets
import selectors
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass

from .jail import PASS_MARKER, RUNNER, interpreter, jail_command

UNSAFE_ENV = "MODULA_RAY_SANDBOX"
NPROC = 8


class SandboxUnavailable(RuntimeError):
    """The jail cannot be made on this machine; candidates are not run."""


@dataclass
class SandboxResult:
    status: str          # passed | failed | timeout | memory | cpu | output
    returncode: int | None
    stdout: str
    stderr: str
    seconds: float

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def unsafe_requested() -> bool:
    return os.environ.get(UNSAFE_ENV, "").strip().lower() == "unsafe"


@functools.lru_cache(maxsize=1)
def jail_problem() -> str | None:
    """Why the jail cannot run a trivial program here (``None``: it can), probed once per process."""
    try:
        result = _run("pass", jailed=True, timeout_s=30, memory_mb=512, cpu_s=30, output_limit=10_000)
    except FileNotFoundError as error:
        return f"{error.filename or 'unshare'} is not installed"
    if result.passed:
        return None
    return (result.stderr.strip().splitlines() or [f"exit code {result.returncode}"])[-1]


def run_python(code: str, *, timeout_s: float = 10.0, memory_mb: int = 512, cpu_s: int | None = None,
               output_limit: int = 10_000, unsafe: bool | None = None) -> SandboxResult:
    """Run ``code`` as a script in the jail (or, with ``unsafe``, without it); ``status`` says how it ended."""
    unsafe = unsafe_requested() if unsafe is None else unsafe
    if not unsafe and (problem := jail_problem()):
        raise SandboxUnavailable(
            f"the code sandbox cannot make its jail here ({problem}): it needs `unshare` (util-linux) and "
            "permission for PID, mount and network namespaces. No candidate was run. To run candidates "
            f"with only a Python-level guard and rlimits, pass --unsafe to `modula-ray eval` or set {UNSAFE_ENV}=unsafe.")
    return _run(code, jailed=not unsafe, timeout_s=timeout_s, memory_mb=memory_mb,
                cpu_s=cpu_s or max(1, int(timeout_s) + 1), output_limit=output_limit)


def _run(code: str, *, jailed: bool, timeout_s: float, memory_mb: int, cpu_s: int, output_limit: int) -> SandboxResult:
    nonce = secrets.token_hex(16)
    with tempfile.TemporaryDirectory(prefix="modula-ray-sandbox-") as folder:
        with open(os.path.join(folder, "candidate.py"), "w") as handle:
            handle.write(code)
        if jailed:
            command, uid = jail_command(folder, nproc=NPROC)
            if uid is not None:
                os.chown(folder, uid, uid)
        else:
            command = [interpreter(), "-I", "-u", "-c", RUNNER]
        start = time.monotonic()
        process = subprocess.Popen(command, cwd=folder, env={"PATH": "/usr/bin:/bin", "PYTHONHASHSEED": "0"},
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   start_new_session=True, preexec_fn=_limits(memory_mb, cpu_s))
        stdout, stderr, ending = _collect(process, nonce, start + timeout_s, output_limit)
        seconds = time.monotonic() - start
    code = process.returncode
    signum = -code if code is not None and code < 0 else code - 128 if jailed and code and code > 128 else None
    out, err = stdout.decode(errors="replace"), stderr.decode(errors="replace")
    lines = out.rstrip("\n").split("\n")
    if ending:
        status = ending
    elif code == 0 and lines[-1] == PASS_MARKER + nonce:
        status, out = "passed", "\n".join(lines[:-1]).rstrip("\n") + "\n"
    elif "MemoryError" in err or signum == signal.SIGKILL:
        status = "memory"
    elif signum == signal.SIGXCPU:
        status = "cpu"
    else:
        status = "failed"
    return SandboxResult(status, code, out[-output_limit:], err[-output_limit:], round(seconds, 3))


def _collect(process: subprocess.Popen, nonce: str, deadline: float, cap: int) -> tuple[bytes, bytes, str | None]:
    """Hand over the nonce, then read both pipes, at most ``cap`` bytes each, until they close, the
    wall clock ends, or a pipe overflows; then kill the process group (and so the jail)."""
    try:
        process.stdin.write(nonce.encode() + b"\n")
        process.stdin.close()
    except BrokenPipeError:
        pass
    selector = selectors.DefaultSelector()
    buffers = {process.stdout: bytearray(), process.stderr: bytearray()}
    for pipe in buffers:
        selector.register(pipe, selectors.EVENT_READ)
    ending, exited_at = None, None
    while selector.get_map():
        now = time.monotonic()
        if exited_at is None and process.poll() is not None:
            exited_at = now
        limit = deadline if exited_at is None else min(deadline, exited_at + 1.0)  # a pipe held by an escapee
        if now >= limit:
            ending = "timeout" if exited_at is None else None
            break
        for key, _ in selector.select(timeout=min(0.2, limit - now)):
            chunk = os.read(key.fd, 65536)
            if not chunk:
                selector.unregister(key.fileobj)
                continue
            buffer, room = buffers[key.fileobj], cap - len(buffers[key.fileobj])
            buffer += chunk[:room]
            if len(chunk) > room:
                ending = "output"
        if ending:
            break
    selector.close()
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    process.wait(timeout=30)
    for pipe in buffers:
        pipe.close()
    return bytes(buffers[process.stdout]), bytes(buffers[process.stderr]), ending


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
