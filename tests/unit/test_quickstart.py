"""The in-process three-stage walk-through runs and routes over both domains."""
import re
import subprocess
import sys


def test_quickstart_on_tiny_model(tmp_path):
    out = subprocess.run([sys.executable, "jobs/quickstart.py", "--base", "tiny-llama", "--steps", "2"],
                         capture_output=True, text=True, timeout=300,
                         env={"MODULA_RAY_CACHE": str(tmp_path), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    for stage in ("universal", "experts", "router"):
        assert f"[{stage}] step 2/2 loss" in out.stdout
    weights = dict(re.findall(r"(\w+)=([0-9.]+)", out.stdout.split("mean routing weights:")[1]))
    assert set(weights) == {"math", "ecommerce"}
    assert abs(sum(map(float, weights.values())) - 1.0) < 2e-3
