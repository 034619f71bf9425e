"""The Serve endpoint under operation: API key and admin token, a bounded load, overload (503),
timeouts (408), a hot-plug after a real ``add_domain`` while requests keep coming, and lm-eval's
``local-completions`` as a second real client, held to lm-eval's in-process ``HFLM`` on the same model."""
import json
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.integration.conftest import ADMIN_TOKEN, API_KEY, call

pytestmark = pytest.mark.slow


def completion(url, model, *, key=None, max_tokens=4, routing=False, timeout=60, ignore_eos=False):
    return call(url, "/v1/completions", {"model": model, "prompt": "the market price of 3 apples",
                                         "max_tokens": max_tokens, "temperature": 0, "routing": routing,
                                         "ignore_eos": ignore_eos},
                token=key, timeout=timeout)


def test_inference_needs_the_api_key_where_one_is_set(served):
    import openai

    for key in (None, "wrong"):
        status, body = completion(served.tight, served.name, key=key)
        assert status == 401 and body["error"]["type"] == "authentication_error"
    assert call(served.tight, "/v1/models")[0] == 401 and call(served.tight, "/healthz")[0] == 200
    assert call(served.tight, "/v1/completions", raw=b'{"not": json')[0] == 401  # who, before what: no 422
    assert [call(served.tight, path)[0] for path in ("/docs", "/openapi.json")] == [401, 401]
    status, schema = call(served.tight, "/openapi.json", token=API_KEY)
    assert status == 200 and "/v1/completions" in schema["paths"]
    answer = openai.OpenAI(base_url=f"{served.tight}/v1", api_key=API_KEY, timeout=60, max_retries=0)
    assert answer.completions.create(model=served.name, prompt="1 +", max_tokens=2).usage.completion_tokens >= 1
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{served.tight}/v1", api_key="wrong", max_retries=0).models.list()


def test_the_admin_endpoint_needs_its_token_and_reads_only_under_its_roots(served, tmp_path):
    plug = lambda run_dir, token=ADMIN_TOKEN, url=served.url: call(  # noqa: E731
        url, "/v1/admin/experts", {"run_dir": str(run_dir)}, token=token)
    assert plug(served.hot, None)[0] == 401 and plug(served.hot, "wrong")[0] == 401
    status, body = plug(served.outside)
    assert status == 403 and body["error"]["type"] == "permission_error"
    assert plug(f"{served.hot}/../../{served.outside.parent.name}/outside")[0] == 403
    (served.hot.parent / "escape").symlink_to(served.outside)
    assert plug(served.hot.parent / "escape")[0] == 403          # a symlink out of the root
    status, body = plug(served.hot.parent / "missing")
    assert status == 422 and "manifest" in body["error"]["message"]
    assert plug(served.hot, url=served.tight)[0] == 404           # no admin token configured there


def test_a_bounded_load_is_answered_in_full_without_a_5xx(served):
    """200 requests at 8 concurrent (below capacity): every one answered, every one 200."""
    models = [served.name, "hot", "tiny-llama", served.name]
    with ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(lambda i: completion(served.url, models[i % 4], max_tokens=3, timeout=60)[0],
                                 range(200)))
    assert len(statuses) == 200 and set(statuses) == {200}


def raw_post(url, body, key, timeout=60):
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json", "Authorization": f"Bearer {key}"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.headers, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, error.headers, json.loads(error.read())


def test_overload_is_answered_with_503_and_a_json_body_never_a_hang(served):
    """The tight application holds 4 (a batch of 2 and a queue of 2); 24 at once overflow it."""
    body = {"model": served.name, "prompt": "the patient takes", "max_tokens": 24, "temperature": 0}
    with ThreadPoolExecutor(24) as pool:
        replies = list(pool.map(lambda _: raw_post(f"{served.tight}/v1/completions", body, API_KEY), range(24)))
    statuses = [status for status, _, _ in replies]
    assert set(statuses) <= {200, 503} and statuses.count(503) >= 1 and statuses.count(200) >= 4
    _, headers, error = next(reply for reply in replies if reply[0] == 503)
    assert error["error"]["type"] == "server_overloaded" and headers.get("Retry-After") == "1"


def test_a_request_past_its_timeout_gets_408_and_frees_its_row(served):
    status, body = completion(served.tight, served.name, key=API_KEY, max_tokens=1000, ignore_eos=True)
    assert status == 408 and body["error"]["code"] == "timeout"
    # A batch decodes until its longest row ends: had the timed-out row kept decoding its 1000 tokens,
    # this request would wait behind it past the app's own 1.5 s timeout and get a 408 too.
    status, body = completion(served.tight, served.name, key=API_KEY, max_tokens=2)
    assert status == 200 and body["usage"]["completion_tokens"] <= 2, body


def test_a_stream_past_its_timeout_ends_with_its_408_event_and_done(served):
    """The timeout is checked between events, not by cancelling whatever awaits: the stream still
    says why it ended, and ends with [DONE]."""
    request = urllib.request.Request(f"{served.tight}/v1/completions", method="POST", data=json.dumps(
        {"model": served.name, "prompt": "1 2 3", "max_tokens": 1000, "ignore_eos": True, "stream": True}).encode(),
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}"})
    with urllib.request.urlopen(request, timeout=60) as response:
        events = [line[6:] for line in response.read().decode().splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]" and json.loads(events[-2])["error"]["code"] == "timeout", events[-3:]
    assert len(events) > 3  # it streamed before the deadline


def replicas(app: str) -> set[str]:
    import ray

    return {a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
            if a["name"].startswith(f"SERVE_REPLICA::{app}#")}


def test_a_replica_whose_decode_failed_is_replaced_by_serve(served, tiny_run, tmp_path):
    """A failed decode marks the replica broken; ``check_health`` then fails, and Serve starts another
    replica, which answers. The failure is injected in the replica itself (``decode_hook``)."""
    from ray import serve

    from modula_ray.serve.app import build_app

    marker = tmp_path / "failed"
    serve.run(build_app([tiny_run[0]], decode_hook={"call": "tests.integration.faults:fail_decode_once",
                                                    "marker": str(marker)},
                        deployment={"health_check_period_s": 0.5, "health_check_timeout_s": 10,
                                    "ray_actor_options": {"num_cpus": 0.25}}),
              name="fragile", route_prefix="/fragile")
    url = f"{served.url}/fragile"
    try:
        before = replicas("fragile")
        request = urllib.request.Request(f"{url}/v1/completions", method="POST", headers={"Content-Type": "application/json"},
                                         data=json.dumps({"model": served.name, "prompt": "1 +", "max_tokens": 2}).encode())
        with pytest.raises(urllib.error.HTTPError) as failed:
            urllib.request.urlopen(request, timeout=60)
        assert failed.value.code == 500 and marker.exists() and len(before) == 1
        deadline = time.monotonic() + 90
        while (replicas("fragile") & before or not replicas("fragile")) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert replicas("fragile") and not replicas("fragile") & before, "Serve did not replace the broken replica"
        status, body = completion(url, served.name, max_tokens=2)
        for _ in range(60):  # bounded: the new replica may still be loading
            if status == 200:
                break
            time.sleep(0.5)
            status, body = completion(url, served.name, max_tokens=2)
        assert status == 200 and body["usage"]["completion_tokens"] >= 1, body
    finally:
        serve.delete("fragile")


def test_a_hot_plug_under_load_drops_nothing_and_routes_over_the_new_expert(served):
    """``add_domain`` trains finance into the served folder (Train beside Serve on one Ray); the
    old composition keeps answering; the hot-plug swaps it while 4 clients keep sending; the two
    replicas of ``/pair``, serving the same folder, follow it."""
    from modula_ray.train.pipeline import add_domain

    assert set(completion(served.pair, "plug", routing=True)[1]["routing"][0]) == {"math", "code"}
    add_domain("finance", served.plug)
    replies, plugged, stop = [], [], threading.Event()

    def client():
        for _ in range(100):  # bounded
            if stop.is_set():
                return
            sent = time.monotonic()
            replies.append((sent, *completion(served.url, "plug", routing=True, timeout=60)))

    threads = [threading.Thread(target=client) for _ in range(4)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 60
    while len(replies) < 12 and time.monotonic() < deadline:
        time.sleep(0.05)
    started = time.monotonic()
    status, answer = call(served.url, "/v1/admin/experts", {"run_dir": str(served.plug)}, token=ADMIN_TOKEN)
    plugged.append(time.monotonic())
    while sum(sent > plugged[0] for sent, *_ in replies) < 12 and time.monotonic() < deadline:
        time.sleep(0.05)
    stop.set()
    for thread in threads:
        thread.join(timeout=120)
    assert status == 200 and answer["experts"] == ["math", "code", "finance"], answer
    assert answer["previous_experts"] == ["math", "code"]
    assert all(code == 200 for _, code, _ in replies), [body for _, code, body in replies if code != 200][:3]
    experts = [(sent, set(body["routing"][0])) for sent, _, body in replies]
    assert all(names == {"math", "code"} for sent, names in experts if sent < started)
    after = [names for sent, names in experts if sent > plugged[0]]
    assert len(after) >= 12 and all(names == {"math", "code", "finance"} for names in after)
    # /pair serves the same folder on two replicas that never got the call: both follow within seconds
    follows, deadline = [], time.monotonic() + 60
    while len(follows) < 16 and time.monotonic() < deadline:
        status, body = completion(served.pair, "plug", routing=True)
        assert status == 200, body
        follows = follows + [set(body["routing"][0])] if "finance" in body["routing"][0] else []
        time.sleep(0.1)
    assert len(follows) == 16, "the /pair replicas did not follow the hot-plug within 60 s"


TASKS = {
    "serve_mc": {"output_type": "multiple_choice", "doc_to_text": "Question: {{question}}\nAnswer:",
                 "doc_to_choice": "{{choices}}", "doc_to_target": "{{answer}}", "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}]},
    "serve_gen": {"output_type": "generate_until", "doc_to_text": "Question: {{question}}\nAnswer:",
                  "doc_to_target": "{{choices[answer]}}", "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}],
                  "generation_kwargs": {"until": ["\n"], "max_gen_toks": 6, "do_sample": False}},
}
ROWS = [{"question": f"What is {a} + {b}?", "choices": [str(a + b), str(a + b + 1), str(a * b)], "answer": i % 3}
        for i, (a, b) in enumerate([(2, 3), (4, 4), (7, 1), (3, 9), (6, 5), (8, 2)])]


def write_tasks(folder: Path) -> Path:
    import yaml

    (folder / "rows.jsonl").write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    for name, spec in TASKS.items():
        task = {"task": name, "dataset_path": "json", "test_split": "test", "metadata": {"version": 1.0},
                "dataset_kwargs": {"data_files": {"test": str(folder / "rows.jsonl")}}, **spec}
        (folder / f"{name}.yaml").write_text(yaml.safe_dump(task))
    return folder


def samples(results: dict, task: str) -> list[dict]:
    return sorted(results["samples"][task], key=lambda s: s["doc_id"])


def test_lm_eval_local_completions_scores_a_task_like_in_process_hflm(served, tiny_run, tmp_path):
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from modula_ray.compose import load_composition

    tasks = write_tasks(tmp_path)
    args = f"base_url={served.url}/v1/completions,model={served.name},tokenizer_backend=remote,num_concurrent=2," \
           f"max_retries=1,timeout=120"
    manager = TaskManager(include_path=str(tasks), include_defaults=False)
    served = simple_evaluate(model="local-completions", model_args=args, tasks=list(TASKS), task_manager=manager,
                             log_samples=True)  # lm-eval's own OpenAI-style client, over HTTP to Serve
    model, tokenizer = load_composition(tiny_run[0])
    local = simple_evaluate(model=HFLM(pretrained=model, tokenizer=tokenizer, batch_size=4), tasks=list(TASKS),
                            task_manager=manager, log_samples=True)
    served_mc, local_mc = samples(served, "serve_mc"), samples(local, "serve_mc")
    assert len(served_mc) == len(ROWS) == len(local_mc)
    for ours, theirs in zip(served_mc, local_mc):
        assert [float(r[0][0]) for r in ours["resps"]] == pytest.approx([float(r[0][0]) for r in theirs["resps"]],
                                                                         abs=2e-3)
    assert [s["filtered_resps"] for s in samples(served, "serve_gen")] == [
        s["filtered_resps"] for s in samples(local, "serve_gen")]


def test_a_name_plugged_on_one_replica_answers_on_every_replica_and_after_a_restart(served):
    """/pair's two replicas: the admin call reaches one; the name reaches the other through the
    application's registry, and a replica Serve starts after the first is killed knows it too."""
    import ray

    status, body = call(served.pair, "/v1/admin/experts", {"run_dir": str(served.plug), "model": "plug-alias"},
                        token=ADMIN_TOKEN)
    assert status == 200, body
    assert [completion(served.pair, "plug-alias")[0] for _ in range(16)] == [200] * 16

    def models_by_replica(tries=40):
        seen = {}
        for _ in range(tries):  # each GET lands on a replica Serve picks
            code, health = call(served.pair, "/healthz")
            if code == 200:
                seen[health["replica"]] = health["models"]
        return seen

    before = models_by_replica()
    assert len(before) == 2 and all("plug-alias" in models for models in before.values()), before
    victim = next(a for a in ray.util.list_named_actors(all_namespaces=True)
                  if "SERVE_REPLICA" in a["name"] and "pair" in a["name"])
    ray.kill(ray.get_actor(victim["name"], namespace=victim["namespace"]), no_restart=True)
    deadline, fresh = time.monotonic() + 120, {}
    while not fresh and time.monotonic() < deadline:
        fresh = {r: m for r, m in models_by_replica(10).items() if r not in before}
        time.sleep(0.5)
    assert fresh and all("plug-alias" in models for models in fresh.values()), "the new replica forgot the name"
