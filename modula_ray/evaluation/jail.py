"""The process jail that untrusted candidate code runs in (``sandbox.run_python``).

``unshare`` gives the program new PID, mount, network, IPC and UTS namespaces; ``JAIL`` runs as
PID 1 of the new PID namespace and, before it starts the candidate:

- **files**: hides ``HIDDEN`` (homes, temporary folders, ``/run``) under empty tmpfs, binds back
  only the work folder and the interpreter's prefix at their own paths, then makes every mount
  read-only (``mount_setattr(AT_RECURSIVE, MOUNT_ATTR_RDONLY)``) except the work folder;
- **processes**: ``/proc`` is the new namespace's, so the host's processes (and their
  ``environ``) are out of sight and ``kill(-1, 9)`` reaches only the jail's; when PID 1 exits the
  kernel kills every process left in it (a ``setsid`` grandchild included), and ``unshare
  --kill-child`` ends PID 1 when the host kills ``unshare`` at the wall clock;
- **privileges**: the capability bounding set is emptied and ``no_new_privs`` set; run as root,
  the candidate becomes ``nobody`` (65534), so ``RLIMIT_NPROC`` (which root ignores) binds;
  run as a user, a user namespace maps it to root of the jail only, and the limit counts the
  jail's own processes;
- **network**: the new network namespace has no interface but a down loopback.

Then it forks the candidate (``RUNNER``: Python-level guard, the program, and the pass marker),
reaps every process until the candidate ends, and exits with its status (``128 + signal`` for a
signal). A failure to build the jail exits ``JAIL_FAILED`` with a ``sandbox jail:`` line.
"""
from __future__ import annotations

import os
import sys

JAIL_FAILED = 71
NOBODY = 65534
PASS_MARKER = "MODULA-RAY-SANDBOX-PASSED "
HIDDEN = ("/root", "/home", "/tmp", "/var/tmp", "/dev/shm", "/run", "/mnt", "/media", "/srv")
UNSHARE_FLAGS = ("--pid", "--fork", "--kill-child", "--mount", "--mount-proc", "--net", "--ipc", "--uts")

JAIL = r'''
import ctypes, os, resource, sys
work, uid, nproc, python = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
keep, hide, runner = sys.argv[5].split(os.pathsep), sys.argv[6].split(os.pathsep), sys.argv[7]
libc = ctypes.CDLL(None, use_errno=True)
MS_NOSUID, MS_NODEV, MS_BIND, MS_REC = 2, 4, 4096, 16384
RDONLY, NOSUID, NODEV, AT_RECURSIVE, SYS_MOUNT_SETATTR = 1, 2, 4, 0x8000, 442

def fail(what):
    sys.stderr.write(f"sandbox jail: {what}: {os.strerror(ctypes.get_errno())}\n")
    os._exit(%(failed)d)

class MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64), ("propagation", ctypes.c_uint64),
                ("userns_fd", ctypes.c_uint64)]

def set_attr(path, add, clear, flags):
    attr = MountAttr(add, clear, 0, 0)
    if libc.syscall(SYS_MOUNT_SETATTR, -100, path.encode(), flags, ctypes.byref(attr), ctypes.sizeof(attr)):
        fail(f"mount_setattr {path}")

held = {path: os.open(path, os.O_PATH | os.O_DIRECTORY) for path in keep}
for path in hide:
    if os.path.isdir(path) and not os.path.islink(path):
        if libc.mount(b"tmpfs", path.encode(), b"tmpfs", MS_NOSUID | MS_NODEV, b"size=1m,mode=755"):
            fail(f"tmpfs over {path}")
for path, fd in held.items():
    os.makedirs(path, mode=0o755, exist_ok=True)
    if libc.mount(f"/proc/self/fd/{fd}".encode(), path.encode(), None, MS_BIND | MS_REC, None):
        fail(f"bind {path}")
    os.close(fd)
set_attr("/", RDONLY | NOSUID | NODEV, 0, AT_RECURSIVE)
set_attr(work, 0, RDONLY, 0)
os.chdir(work)

candidate = os.fork()
if candidate == 0:
    try:
        with open("/proc/sys/kernel/cap_last_cap") as last:
            for cap in range(int(last.read()) + 1):
                if libc.prctl(24, cap, 0, 0, 0):  # PR_CAPBSET_DROP
                    fail(f"dropping capability {cap}")
        if libc.prctl(38, 1, 0, 0, 0):  # PR_SET_NO_NEW_PRIVS
            fail("no_new_privs")
        if uid >= 0:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
        resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))
        os.execv(python, [python, "-I", "-u", "-c", runner])
    except OSError as error:
        sys.stderr.write(f"sandbox jail: starting the candidate: {error}\n")
    os._exit(%(failed)d)
while True:  # PID 1 reaps every orphan until the candidate ends
    try:
        pid, status = os.wait()
    except ChildProcessError:
        os._exit(%(failed)d)
    if pid == candidate:
        code = os.waitstatus_to_exitcode(status)
        os._exit(code if code >= 0 else 128 - code)
''' % {"failed": JAIL_FAILED}

RUNNER = r'''
import builtins, io, os, shutil, socket, subprocess, sys
ROOT = os.path.realpath(os.getcwd())
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
_read, _write = os.read, os.write

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
for name in ("system", "popen", "kill", "killpg", "fork", "forkpty", "setsid", "setuid", "chroot", "putenv",
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
_nonce = _read(0, 256).strip()  # only a program that ran to its end gets here
if _nonce:
    _write(1, b"\n" + PASS_MARKER.encode() + _nonce + b"\n")
'''.replace("PASS_MARKER", repr(PASS_MARKER))


def interpreter() -> str:
    """The base interpreter (not a virtual environment's link to it): the candidate needs the stdlib only."""
    return os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)


def jail_command(work: str, *, nproc: int) -> tuple[list[str], int | None]:
    """``(argv, uid)``: the command that runs ``RUNNER`` in the jail over ``work``, and the host uid the
    candidate runs as (``None``: the caller's own, through a user namespace)."""
    as_root = os.geteuid() == 0
    python = interpreter()
    work = os.path.realpath(work)
    runtime = {os.path.realpath(sys.base_prefix), os.path.realpath(sys.base_exec_prefix), os.path.dirname(python)}
    keep = [work] + sorted(k for k in runtime if not any(k != o and k.startswith(o + os.sep) for o in runtime))
    user = () if as_root else ("--user", "--map-root-user")
    argv = ["unshare", *UNSHARE_FLAGS, *user, "--", python, "-I", "-S", "-c", JAIL, work,
            str(NOBODY if as_root else -1), str(nproc), python, os.pathsep.join(keep), os.pathsep.join(HIDDEN),
            RUNNER]
    return argv, (NOBODY if as_root else None)
