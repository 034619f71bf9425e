"""`ray job submit` of the tiny pipeline to a real 2-node cluster started by cluster/local.sh."""
import json
import os
import subprocess
from pathlib import Path

import pytest

from modula_ray.train.ledger import overlaps

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def local_cluster(tmp_path):
    env = {**os.environ, "MODULA_RAY_LOCAL_CLUSTER": str(tmp_path / "cluster")}
    env.pop("RAY_ADDRESS", None)
    up = subprocess.run(["bash", "cluster/local.sh", "up"], cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=180)
    assert up.returncode == 0, up.stdout + up.stderr
    exports = subprocess.run(["bash", "cluster/local.sh", "env"], cwd=ROOT, env=env, capture_output=True,
                             text=True, timeout=30).stdout.split()[1:]
    env.update(item.split("=", 1) for item in exports)
    try:
        yield env
    finally:
        subprocess.run(["bash", "cluster/local.sh", "down"], cwd=ROOT, env=env, timeout=120)


def test_job_submit_runs_stage2_concurrently_on_two_nodes(local_cluster, tmp_path):
    run_dir = tmp_path / "run"
    status = subprocess.run(["bash", "cluster/local.sh", "status"], cwd=ROOT, env=local_cluster,
                            capture_output=True, text=True, timeout=60).stdout
    assert "pool_head" in status and "pool_worker" in status
    submit = [str(ROOT / ".venv/bin/ray"), "job", "submit", "--address", local_cluster["RAY_ADDRESS"],
              "--working-dir", ".", "--", "python", "jobs/pipeline.py", "--config", "jobs/configs/tiny.yaml",
              "--out", str(run_dir),
              "--set", "stages.experts.domains.math.scaling.node_labels={pool: head}",
              "--set", "stages.experts.domains.code.scaling.node_labels={pool: worker}"]
    job = subprocess.run(submit, cwd=ROOT, env=local_cluster, capture_output=True, text=True, timeout=900)
    assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
    assert "succeeded" in job.stdout + job.stderr
    manifest = json.loads((run_dir / "manifest.json").read_text())
    experts = {r["domain"]: r for r in manifest["ledger"] if r["stage"] == "experts"}
    assert overlaps(experts["math"], experts["code"]), "stage-2 groups did not overlap in time"
    assert experts["math"]["nodes"] and experts["code"]["nodes"]
    assert set(experts["math"]["nodes"]).isdisjoint(experts["code"]["nodes"]), "labels did not pin the groups"
    assert (run_dir / "config.yaml").read_text().startswith("# python jobs/pipeline.py --config")
