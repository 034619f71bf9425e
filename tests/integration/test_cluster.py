"""`ray job submit` of the tiny pipeline to a real 2-node cluster started by cluster/local.sh, then
a local `modula-ray eval` that joins that cluster through RAY_ADDRESS=http://... (as the README's
next steps do) and evaluates two runs as one Ray task each, one per node."""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from modula_ray.train.ledger import overlaps
from tests.integration.test_eval import loss_of

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


def test_job_submit_runs_stage2_concurrently_on_two_nodes(local_cluster, tiny_data, tmp_path):
    """The tiny pipeline with ``method: modula_flan`` (the tiny run elsewhere is modula_res) and the
    supervised routing term on the shared tiny data; at the end lm-eval's ``--model modula`` scores
    the flan composition."""
    run_dir = tmp_path / "run"
    status = subprocess.run(["bash", "cluster/local.sh", "status"], cwd=ROOT, env=local_cluster,
                            capture_output=True, text=True, timeout=60).stdout
    assert "pool_head" in status and "pool_worker" in status
    submit = [str(ROOT / ".venv/bin/ray"), "job", "submit", "--address", local_cluster["RAY_ADDRESS"],
              "--working-dir", ".", "--", "python", "jobs/pipeline.py", "--config", "jobs/configs/tiny.yaml",
              "--out", str(run_dir), "--set", "method=modula_flan", "--set", f"data.dir={tiny_data}",
              "--set", "stages.experts.domains.math.scaling.node_labels={pool: head}",
              "--set", "stages.experts.domains.code.scaling.node_labels={pool: worker}",
              # long enough (about 5 s) that "trained at the same time" means something; a checkpoint
              # every 30 steps, not tiny.yaml's 4 (15 checkpoints made the 60 steps take 26 s, not 4-5)
              "--set", "stages.experts.steps=60", "--set", "stages.experts.log_every=20",
              "--set", "stages.experts.checkpoint_every=30",
              # the supervised routing term, through Ray (flan: the general rows target the universal expert)
              "--set", "stages.router.route_loss_coef=0.5"]
    job = subprocess.run(submit, cwd=ROOT, env=local_cluster, capture_output=True, text=True, timeout=900)
    assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
    assert "succeeded" in job.stdout + job.stderr
    manifest = json.loads((run_dir / "manifest.json").read_text())
    experts = {r["domain"]: r for r in manifest["ledger"] if r["stage"] == "experts"}
    # Worker-side windows, not the driver's fit() calls: both groups' workers were live at the same time,
    # each on its node. (Not the training windows: the two nodes share this machine's CPUs, and the group
    # whose node imports afresh loads for seconds longer, 7.3 s against 2.8 s here, while the other's
    # 60 steps take about 4 s; that they overlapped by 1 s here and not at all in one CI run is start-up
    # jitter. The training windows' overlap on one node is held in test_pipeline.)
    assert overlaps(experts["math"], experts["code"], since="worker_started_at"), (
        "stage-2 worker groups were not live at the same time", experts["math"], experts["code"])
    nodes = node_ids_by_pool(local_cluster)
    assert experts["math"]["nodes"] == [nodes["head"]], "math did not run on the head node"
    assert experts["code"]["nodes"] == [nodes["worker"]], "code did not run on the worker node"
    assert (run_dir / "config.yaml").read_text().startswith("# python jobs/pipeline.py --config")
    router = manifest["router"]
    assert router["hyperparameters"]["route_loss_coef"] == 0.5
    assert router["metrics"]["route"] > 0 and 0 < router["metrics"]["gate_entropy"] <= 1

    # Evaluating several runs on the cluster: one Ray task per run folder, spread over the nodes. With
    # RAY_ADDRESS=http://... (the dashboard, as for job submit) a local command joins the cluster.
    assert local_cluster["RAY_ADDRESS"].startswith("http://")
    twin = tmp_path / "twin"
    shutil.copytree(run_dir, twin, ignore=shutil.ignore_patterns("ray"))
    evaluate = subprocess.run([str(ROOT / ".venv/bin/modula-ray"), "eval", str(run_dir), str(twin), "--suite",
                               "general", "--limit", "1", "--report", str(tmp_path / "side.md")],
                              cwd=ROOT, env=local_cluster, capture_output=True, text=True, timeout=600)
    assert evaluate.returncode == 0, evaluate.stdout[-3000:] + evaluate.stderr[-3000:]
    assert "ray: joined the cluster at http://127.0.0.1:8265" in evaluate.stdout
    ran_on = re.findall(r"evaluated by a Ray task on node (\w+) \(pid (\d+)\)", evaluate.stdout)
    assert len(ran_on) == 2 and {node for node, _ in ran_on} == set(nodes.values()), evaluate.stdout[-2000:]
    assert all((folder / "eval" / "results.json").is_file() for folder in (run_dir, twin))
    assert "| modula_flan (twin) |" in (tmp_path / "side.md").read_text()
    loss_of(run_dir)  # lm-eval's --model modula evaluates a flan run (held to HFLM, unlike the base model)


def node_ids_by_pool(env: dict) -> dict[str, str]:
    """``{pool label: Ray node id}`` of the running local cluster, asked of the cluster itself."""
    script = ("import json, os, ray; ray.init(address=os.environ['MODULA_RAY_GCS_ADDRESS'], log_to_driver=False); "
              "print(json.dumps({n['Labels'].get('pool'): n['NodeID'] for n in ray.nodes() if n['Alive']}))")
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_a_dashboard_address_without_a_gcs_address_says_what_to_do(ray_local, tmp_path):
    """RAY_ADDRESS=http://... of a cluster we cannot find, while another Ray runs on this machine (the
    tests' in-process one, without a dashboard), which Ray's "auto" joins: one clear sentence, exit 2,
    nothing trained. (With no Ray running at all: the unit twin in test_ray_session.py.)"""
    env = {k: v for k, v in os.environ.items() if k != "MODULA_RAY_GCS_ADDRESS"}
    env.update(RAY_ADDRESS="http://127.0.0.1:1", RAY_TMPDIR=str(tmp_path / "no-ray-here"))
    out = subprocess.run([str(ROOT / ".venv/bin/modula-ray"), "train", "--config", "jobs/configs/tiny.yaml",
                          "--out", str(tmp_path / "run")], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=180)
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-2000:]
    assert "auto joined a cluster without a dashboard, not RAY_ADDRESS=http://127.0.0.1:1" in out.stderr
    assert "MODULA_RAY_GCS_ADDRESS" in out.stderr and not (tmp_path / "run" / "manifest.json").exists()
