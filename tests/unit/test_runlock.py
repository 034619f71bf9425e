"""One writer per run folder: a second pipeline on a locked folder is refused at once, naming the holder;
a holder that dies leaves no stale lock."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from modula_ray.runlock import RunFolderLocked, run_lock

ROOT = Path(__file__).resolve().parents[2]
HOLD = ("import sys, time; from modula_ray.runlock import run_lock\n"
        "with run_lock(sys.argv[1], 'modula-ray train --out held'):\n"
        "    print('holding', flush=True); time.sleep(120)\n")


@pytest.fixture
def held(tmp_path):
    """Another process holding ``tmp_path/run``'s lock until the test kills it."""
    run_dir = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "holding"
        yield run_dir, holder
    finally:
        holder.kill()
        holder.wait(timeout=30)


def test_a_second_writer_is_refused_at_once_and_told_who_holds_it(held):
    run_dir, holder = held
    started = time.monotonic()
    with pytest.raises(RunFolderLocked, match=rf"pid {holder.pid} on .*modula-ray train --out held"):
        with run_lock(run_dir, "modula-ray add-domain finance"):
            pytest.fail("the lock was granted twice")
    assert time.monotonic() - started < 1


def test_a_killed_holder_leaves_no_stale_lock(held):
    run_dir, holder = held
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=30)
    with run_lock(run_dir, "modula-ray train"):
        assert f'"pid": {os.getpid()}' in (run_dir / ".lock").read_text()
    assert (run_dir / ".lock").read_text() == ""


def test_the_train_command_on_a_locked_folder_exits_2_before_writing_anything(held):
    run_dir, holder = held
    out = subprocess.run([sys.executable, "-m", "modula_ray.cli", "train", "--config", "jobs/configs/tiny.yaml",
                          "--out", str(run_dir)], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "RAY_ADDRESS": "", "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 2, out.stderr[-2000:]
    assert f"is being written by pid {holder.pid}" in out.stderr
    assert sorted(p.name for p in run_dir.iterdir()) == [".lock"]
