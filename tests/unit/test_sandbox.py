"""The HumanEval sandbox: what untrusted code cannot do, and that the canonical solutions pass."""
import socket
import threading
import time

import pytest

from modula_ray.evaluation.sandbox import network_namespace, run_python


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
    if network_namespace():
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
