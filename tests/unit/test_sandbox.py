"""The HumanEval sandbox: what untrusted code cannot do (each bypass a review found, held to fail),
that only a program that ran to its end passes, and that the canonical solutions pass."""
import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from modula_ray.evaluation import jail, sandbox
from modula_ray.evaluation.sandbox import SandboxUnavailable, run_python

ROOT = Path(__file__).resolve().parents[2]


def jailed_processes() -> list[int]:
    """Host pids whose command line is the sandbox's runner (the candidate and anything it forked)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and jail.PASS_MARKER.encode() in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def test_plain_code_runs_and_writes_inside_its_folder():
    result = run_python("open('inside.txt', 'w').write('ok')\nprint(open('inside.txt').read())")
    assert result.passed and result.stdout.strip() == "ok"


def test_an_infinite_loop_is_killed_at_the_wall_clock_timeout():
    started = time.monotonic()
    result = run_python("while True:\n    pass\n", timeout_s=2)
    assert result.status == "timeout" and time.monotonic() - started < 10


def test_a_memory_bomb_is_stopped():
    result = run_python("blocks = []\nwhile True:\n    blocks.append(bytearray(64 << 20))\n", memory_mb=256, timeout_s=20)
    assert result.status == "memory", result


def test_a_write_outside_the_temporary_folder_fails(tmp_path):
    target = tmp_path / "escaped.txt"
    for attempt in (f"open({str(target)!r}, 'w').write('x')", f"import os\nos.open({str(target)!r}, os.O_CREAT | os.O_WRONLY)",
                    f"import shutil\nshutil.copy('candidate.py', {str(target)!r})", "import os\nos.system('touch /tmp/x')"):
        result = run_python(attempt)
        assert result.status == "failed" and "PermissionError" in result.stderr, attempt
    assert not target.exists()


def test_opening_a_socket_fails_and_nothing_reaches_a_listener():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        server.settimeout(0.2)
        port, reached, done = server.getsockname()[1], [], threading.Event()

        def accept():
            deadline = time.monotonic() + 30
            while not done.is_set() and time.monotonic() < deadline:
                try:
                    reached.append(server.accept())
                except OSError:
                    pass

        thread = threading.Thread(target=accept)
        thread.start()
        guarded = run_python(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)")
        # below the Python guard: the C-level socket module, stopped by the empty network namespace
        raw = run_python(f"import _socket\ns = _socket.socket()\ns.settimeout(2)\ns.connect(('127.0.0.1', {port}))")
        done.set()
        thread.join()
    assert guarded.status == "failed" and "PermissionError" in guarded.stderr
    assert raw.status == "failed" and "Error" in raw.stderr.splitlines()[-1]
    assert reached == [], "a sandboxed program reached a listener on the host"


def test_canonical_humaneval_solutions_pass_and_wrong_ones_fail():
    import json

    from modula_ray.data.sources.code import human_eval_problems
    from modula_ray.evaluation.tasks import humaneval_program, score_humaneval

    for problem in human_eval_problems()[:3]:
        doc = {"meta": json.dumps({"function_prompt": problem["prompt"], "test": problem["test"],
                                   "entry_point": problem["entry_point"]})}
        assert score_humaneval(doc, [problem["canonical_solution"]]) == {"pass_at_1": 1.0}, problem["task_id"]
        assert score_humaneval(doc, ["    return None\n"]) == {"pass_at_1": 0.0}
        fenced = f"```python\n{problem['prompt']}{problem['canonical_solution']}```"
        assert "check(" in humaneval_program(doc, fenced) and score_humaneval(doc, [fenced])["pass_at_1"] == 1.0


def test_only_a_program_that_runs_to_its_end_passes():
    """The pass marker carries a nonce the host hands over on stdin, read only after the program ended."""
    assert run_python("print('ok')").passed and run_python("print('ok')").stdout == "ok\n"
    for early in ("exit(0)", "import sys\nsys.exit(0)", "import os\nos._exit(0)", "raise SystemExit",
                  f"import os\nprint({jail.PASS_MARKER!r} + '0' * 32)\nos._exit(0)",  # a forged marker, then out
                  "import signal, os\nos.kill(os.getpid(), signal.SIGKILL)"):
        result = run_python(early)
        assert not result.passed and result.status == "failed", (early, result)


def test_early_exits_score_zero_on_humaneval():
    import json

    from modula_ray.data.sources.code import human_eval_problems
    from modula_ray.evaluation.tasks import score_humaneval

    problem = human_eval_problems()[0]
    doc = {"meta": json.dumps({"function_prompt": problem["prompt"], "test": problem["test"],
                               "entry_point": problem["entry_point"]})}
    for body in ("    exit(0)\n", "    import os; os._exit(0)\n", "    raise SystemExit(0)\n"):
        assert score_humaneval(doc, [body]) == {"pass_at_1": 0.0}, body


def test_c_level_writes_outside_the_folder_fail(tmp_path):
    """io.FileIO and posix.open step around the Python guard; the read-only mounts stop them."""
    targets = [tmp_path / "escaped.txt", ROOT / "tests" / "escaped.txt", Path("/dev/shm/modula-ray-escaped")]
    for target in targets:
        for attempt in (f"import io\nio.FileIO({str(target)!r}, 'w').write(b'x')",
                        f"import posix\nposix.open({str(target)!r}, posix.O_CREAT | posix.O_WRONLY)"):
            result = run_python(attempt)
            assert result.status == "failed" and "Error" in result.stderr.splitlines()[-1], (attempt, result)
    assert not any(target.exists() for target in targets)


def test_the_jail_hides_the_host_processes_and_signals_reach_only_its_own():
    """No host process is visible (nor its environ), and kill(-1, 9) from inside ends nothing outside."""
    sentinel = subprocess.Popen(["sleep", "60"])
    try:
        me = os.getpid()
        result = run_python(f"""
import os, posix
print(os.getppid(), sorted(int(p) for p in os.listdir('/proc') if p.isdigit()))
for probe in (lambda: open('/proc/{me}/environ').read(), lambda: posix.kill({me}, 0), lambda: posix.kill({sentinel.pid}, 0)):
    try:
        probe()
        print('reached')
    except (OSError, ProcessLookupError) as error:
        print(type(error).__name__)
posix.kill(-1, 9)
""", timeout_s=10)
        lines = result.stdout.splitlines()
        assert lines[0].startswith("1 ") and eval(lines[0].split(" ", 1)[1]) == [1, 2], result
        assert "reached" not in lines[1:], result
        assert sentinel.poll() is None, "kill(-1, 9) in the jail ended a host process"
    finally:
        sentinel.kill()
        sentinel.wait()


def test_forked_and_setsid_grandchildren_end_with_the_jail():
    """posix.fork and os.setsid are not guarded at the C level: the PID namespace ends them all, and a
    grandchild that keeps the pipes open no longer hangs the evaluation."""
    holds_pipes = """
import posix, time
if posix.fork() == 0:
    posix.setsid()
    time.sleep(60)
print('parent done')
"""
    started = time.monotonic()
    result = run_python(holds_pipes, timeout_s=20)
    assert result.passed and result.stdout == "parent done\n" and time.monotonic() - started < 15, result
    sleeper = "import posix, time\nif posix.fork() == 0:\n    posix.setsid()\ntime.sleep(60)\n"
    started = time.monotonic()
    result = run_python(sleeper, timeout_s=3)
    assert result.status == "timeout" and time.monotonic() - started < 15, result
    deadline = time.monotonic() + 10
    while jailed_processes() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert jailed_processes() == [], "a jailed process outlived its sandbox"


def test_a_fork_bomb_stops_at_rlimit_nproc():
    bomb = """
import posix, time
made = 0
try:
    while made < 1000:
        if posix.fork() == 0:
            time.sleep(60)
            posix._exit(0)
        made += 1
except OSError as error:
    print('stopped after', made, error.errno)
"""
    result = run_python(bomb, timeout_s=20)
    assert result.passed and result.stdout.startswith("stopped after"), result
    assert int(result.stdout.split()[2]) < sandbox.NPROC


def test_output_is_read_with_a_byte_cap():
    started = time.monotonic()
    result = run_python("import sys\nwhile True:\n    sys.stdout.write('x' * 65536)\n", timeout_s=20,
                        output_limit=100_000)
    assert result.status == "output" and len(result.stdout) <= 100_000 and time.monotonic() - started < 15


def test_without_a_jail_it_refuses_to_run_candidates_unless_told_unsafe(monkeypatch, tmp_path):
    """An unshare that cannot make the namespaces (here: given a flag it does not know) fails closed."""
    target = tmp_path / "ran.txt"
    sandbox.jail_problem.cache_clear()
    monkeypatch.setattr(jail, "UNSHARE_FLAGS", (*jail.UNSHARE_FLAGS, "--no-such-namespace"))
    try:
        with pytest.raises(SandboxUnavailable, match="cannot make its jail here .*--unsafe"):
            run_python(f"open({str(target)!r}, 'w')")
        assert not target.exists()
        assert run_python("print('ran')", unsafe=True).stdout == "ran\n"
        monkeypatch.setenv(sandbox.UNSAFE_ENV, "unsafe")
        assert run_python("print('ran')").passed
    finally:
        sandbox.jail_problem.cache_clear()
