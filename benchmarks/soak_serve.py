"""Fault soak of the Serve endpoint on 127.0.0.1: mixed traffic, a replica killed, a hot-plug. Prints JSON.

    .venv/bin/python benchmarks/soak_serve.py [RUN_DIR] [--seconds 180] [--clients 16] [--replicas 2]
        [--out docs/results/soak_serve.json]

RUN_DIR (default: the tiny pipeline, ``jobs/configs/tiny.yaml``, trained first into a temporary
folder) is served by ``build_app`` on ``--replicas`` replicas with an admin token. ``--clients``
threads send requests for ``--seconds``: three in four well-formed (greedy completions, chat,
streamed completions, tokenize), one in four malformed (each kind a client mistake the endpoint
must answer with a 4xx). A well-formed request that gets 503 or 408, or a 5xx that is not ours (the
Serve proxy's plain "Internal Server Error" for a request whose replica died under it; the openai
client retries 5xx by default too), is retried, at most ``RETRIES`` times, 0.25 s apart; its last
status counts, and its first is kept.
At a third of the time one replica is killed (``ray.kill``); at two thirds the folder is
hot-plugged again through the admin endpoint. Recorded: requests by kind and final status, every
5xx, the faults, and how long Serve took to run ``--replicas`` healthy replicas again.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.update({"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
ADMIN, RETRIES, APP = "soak-admin-token", 20, "soak"

WELL_FORMED = {
    "completion": ("/v1/completions", {"prompt": "the market price of 3 apples", "max_tokens": 8, "temperature": 0}),
    "chat": ("/v1/chat/completions", {"messages": [{"role": "user", "content": "What is 2 + 2?"}], "max_tokens": 8,
                                      "temperature": 0}),
    "stream": ("/v1/completions", {"prompt": "1 2 3", "max_tokens": 8, "temperature": 0, "stream": True}),
    "tokenize": ("/tokenize", {"prompt": "organic apples aisle"}),
}
MALFORMED = {
    "seed_2^64": ("/v1/completions", {"prompt": "x", "seed": 2 ** 64, "temperature": 0.7}),
    "temperature_1e-39": ("/v1/completions", {"prompt": "x", "temperature": 1e-39}),
    "lone_surrogate": ("/v1/completions", {"prompt": "\ud800"}),
    "token_id_2^40": ("/detokenize", {"tokens": [2 ** 40]}),
    "prompt_id_out_of_vocab": ("/v1/completions", {"prompt": [10 ** 6]}),
    "negative_max_tokens": ("/v1/completions", {"prompt": "x", "max_tokens": -1}),
    "unknown_model": ("/v1/completions", {"prompt": "x", "model": "nope"}),
    "long_stop": ("/v1/completions", {"prompt": "x", "stop": "s" * 500}),
    "too_many_prompts": ("/v1/completions", {"prompt": ["x"] * 30}),
    "bad_json": ("/v1/completions", None),
    "oversized_body": ("/v1/completions", {"prompt": "x" * (80 << 10)}),
}


def post(url: str, body, *, raw: bytes | None = None, token: str | None = None, timeout: float = 120) -> tuple[int, str]:
    data = raw if raw is not None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {token}"} if token else {})
    request = urllib.request.Request(url, data=data, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read().decode(errors="replace")
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode(errors="replace")
    except (urllib.error.URLError, ConnectionError, TimeoutError) as error:
        return 0, repr(error)  # no HTTP answer at all: counted as lost


def one_request(url: str, model: str, kind: str, malformed: bool) -> dict:
    path, body = (MALFORMED if malformed else WELL_FORMED)[kind]
    started, tries, first = time.monotonic(), 0, None
    while True:
        tries += 1
        if body is None:
            status, text = post(url + path, None, raw=b'{"model": "' + model.encode() + b'", "prompt": ')
        else:
            status, text = post(url + path, {"model": model} | body)
        first = first if tries > 1 else status
        proxy_error = status >= 500 and status != 503 and not text.lstrip().startswith('{"error"')
        if malformed or not (status in (503, 408) or proxy_error) or tries > RETRIES:
            break
        time.sleep(0.25)
    ok = (400 <= status < 500) if malformed else status == 200 and (not body.get("stream") or "data: [DONE]" in text)
    return {"kind": kind, "malformed": malformed, "status": status, "first_status": first, "tries": tries, "ok": ok,
            "seconds": round(time.monotonic() - started, 3), "body": text[:300] if not ok else None}


def replica_states(serve) -> dict:
    deployment = serve.status().applications[APP].deployments["CompositionServer"]
    return dict(Counter({str(k): v for k, v in deployment.replica_states.items()}))


def kill_one_replica(ray) -> str:
    actors = [a for a in ray.util.list_named_actors(all_namespaces=True)
              if "SERVE_REPLICA" in a["name"] and APP in a["name"]]
    victim = actors[0]
    ray.kill(ray.get_actor(victim["name"], namespace=victim["namespace"]), no_restart=True)
    return victim["name"]


def train_tiny(folder: Path) -> Path:
    from modula_ray.config import PipelineConfig, load_config
    from modula_ray.train.pipeline import run_pipeline

    run_dir = folder / "tiny"
    run_pipeline(load_config(PipelineConfig, ROOT / "jobs/configs/tiny.yaml"), run_dir, command="soak_serve.py")
    return run_dir


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", nargs="?", default=None, help="a finished run folder (default: train the tiny one)")
    parser.add_argument("--seconds", type=float, default=180.0)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    import ray
    from ray import serve

    from modula_ray.fileio import emit_json
    from modula_ray.serve.app import build_app

    ray.init(num_cpus=4, log_to_driver=False, include_dashboard=False,
             runtime_env={"env_vars": {k: os.environ[k] for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}})
    with contextlib.redirect_stdout(sys.stderr):  # stdout holds the JSON alone
        run_dir = Path(args.run_dir).resolve() if args.run_dir else train_tiny(Path(tempfile.mkdtemp(prefix="soak-")))
    port = 8765
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app([run_dir], admin_token=ADMIN, max_body_bytes=64 << 10, request_timeout_s=60,
                        deployment={"num_replicas": args.replicas, "health_check_period_s": 2,
                                    "ray_actor_options": {"num_cpus": 0.5}}), name=APP, route_prefix="/")
    url, model = f"http://127.0.0.1:{port}", run_dir.name
    results, faults, lock, stop = [], [], threading.Lock(), threading.Event()

    def client(index: int) -> None:
        rng = random.Random(args.seed * 1000 + index)
        while not stop.is_set():
            malformed = rng.random() < 0.25
            kind = rng.choice(sorted(MALFORMED if malformed else WELL_FORMED))
            outcome = one_request(url, model, kind, malformed)
            with lock:
                results.append(outcome)

    started = time.monotonic()
    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(args.clients)]
    for thread in threads:
        thread.start()
    time.sleep(args.seconds / 3)
    faults.append({"fault": "replica killed", "at_s": round(time.monotonic() - started, 1), "replica": kill_one_replica(ray)})
    killed_at = time.monotonic()
    recovered_s = None
    while time.monotonic() - started < 2 * args.seconds / 3:
        if recovered_s is None and replica_states(serve).get("RUNNING") == args.replicas and time.monotonic() - killed_at > 3:
            recovered_s = round(time.monotonic() - killed_at, 1)
        time.sleep(0.5)
    status, text = post(f"{url}/v1/admin/experts", {"run_dir": str(run_dir)}, token=ADMIN)
    faults.append({"fault": "hot-plug", "at_s": round(time.monotonic() - started, 1), "status": status})
    while time.monotonic() - started < args.seconds:
        if recovered_s is None and replica_states(serve).get("RUNNING") == args.replicas:
            recovered_s = round(time.monotonic() - killed_at, 1)
        time.sleep(0.5)
    stop.set()
    for thread in threads:
        thread.join(timeout=180)
    final_states = replica_states(serve)
    serve.shutdown()

    by_kind = {}
    for r in results:
        entry = by_kind.setdefault(r["kind"], {"malformed": r["malformed"], "sent": 0, "statuses": Counter()})
        entry["sent"] += 1
        entry["statuses"][str(r["status"])] += 1
    well = [r for r in results if not r["malformed"]]
    bad = [r for r in results if r["malformed"]]
    report = {
        "what": "fault soak of the Serve endpoint on 127.0.0.1 (benchmarks/soak_serve.py)",
        "command": " ".join(["python", *sys.argv]), "run_dir": str(run_dir), "seconds": args.seconds,
        "clients": args.clients, "replicas": args.replicas,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "requests": len(results), "well_formed": len(well), "malformed": len(bad),
        "well_formed_answered_200": sum(r["ok"] for r in well),
        "well_formed_lost": [r for r in well if not r["ok"]][:20],
        "well_formed_lost_count": sum(not r["ok"] for r in well),
        "well_formed_retried": sum(r["tries"] > 1 for r in well),
        "malformed_answered_4xx": sum(r["ok"] for r in bad),
        "any_5xx": sum(r["status"] >= 500 for r in results),
        "first_try_statuses_of_well_formed": dict(Counter(str(r["first_status"]) for r in well)),
        "faults": faults, "replicas_running_again_after_s": recovered_s, "replica_states_at_end": final_states,
        "by_kind": {k: {**v, "statuses": dict(v["statuses"])} for k, v in sorted(by_kind.items())},
        "p50_s": sorted(r["seconds"] for r in well)[len(well) // 2] if well else None,
    }
    report["passed"] = (report["well_formed_lost_count"] == 0 and report["malformed_answered_4xx"] == len(bad)
                        and final_states.get("RUNNING") == args.replicas)
    emit_json(report, args.out)
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
