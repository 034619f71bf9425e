"""Run the experiment's parts as concurrent Ray tasks, each once.

A part whose ``DIR/parts/<key>.json`` exists is done and never runs again, so a rerun after a
crash (or Ctrl-C) picks up where the last one stopped; a part that was cut short runs again
from the start of that part (a training part resumes its finished stages, as ``train`` does).
Parts that train only drive Ray Train worker groups, so their task asks for no CPU; the groups
ask for the stage's resources. Evaluation parts compute in the task and ask for
``eval.cpus``. At most ``max_parallel`` parts are in flight; a failed part stops its dependents
and nothing else. While a router search runs, the CPUs its trials ask for are held back from
evaluation parts (``admit``): Ray hands a freed CPU to any waiting task, and evaluations
queued behind a search would otherwise keep its trials waiting.
"""
from __future__ import annotations

import contextlib
import os
import sys
import time
import traceback
from pathlib import Path

from ..fileio import atomic_write_json, read_json
from .parts import KINDS_ON_CPUS, WORK, Part

# Training parts first: they head the longest chains (train -> add -> evaluate), and Ray runs an
# evaluation beside them on whatever CPU the worker groups leave.
PRIORITY = {"train": 0, "add": 1, "tune": 2, "base": 3, "eval": 3, "judge": 4}
TASK_MEMORY = 1536 * 2 ** 20  # bytes, logical: a part's process (SmolLM2, fp32, plus lm-eval)


def marker(out: Path, part: Part) -> Path:
    return out / "parts" / f"{part.slug}.json"


def tune_cpus(exp, config_file, method: str) -> float:
    """The CPUs a router search asks for at once: ``max_concurrent`` trials, each a worker group
    (the search file's ``trial``, else the pipeline's router stage)."""
    from ..config import load_config
    from ..tune.space import SearchSpec
    from .config import pipeline_config, resolve

    trial = load_config(SearchSpec, resolve(config_file, exp.tune.space)).trial
    if trial is None:
        trial = pipeline_config(exp, config_file, method, 0, ".").stages.router.scaling
    per_worker = (trial.resources_per_worker or {}).get("CPU", 0 if trial.use_gpu else 1)
    return exp.tune.max_concurrent * trial.num_workers * per_worker


def admit(ready: list[Part], running: list[Part], *, slots: int, total_cpus: float, need) -> list[Part]:
    """The ready parts to start now, in order: at most ``slots``; an evaluation part only if the
    CPUs that the evaluations and searches in flight hold (``need(part)``; 0 for parts that only
    drive Train groups) leave room for it, or if nothing runs at all."""
    held = sum(need(p) for p in running)
    started: list[Part] = []
    for part in ready:
        if len(started) >= slots:
            break
        if part.kind in KINDS_ON_CPUS and (running or started) and held + need(part) > total_cpus + 1e-9:
            continue
        held += need(part)
        started.append(part)
    return started


def _execute(part: Part, exp, out: str, config_file: str, threads: int) -> dict:
    """Inside the Ray task: the part's work, its output in ``DIR/logs/<key>.log``."""
    from ..ray_session import use_offline_env

    use_offline_env()  # a cluster node's worker may lack the driver's environment
    import torch

    torch.set_num_threads(threads)
    log = Path(out) / "logs" / f"{part.slug}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    started = time.time()
    with open(log, "a") as stream, contextlib.redirect_stdout(stream), contextlib.redirect_stderr(stream):
        print(f"== {part.key} ({time.strftime('%H:%M:%S')}) ==", flush=True)
        try:
            result = WORK[part.kind](part, exp, Path(out), config_file)
        except BaseException:
            traceback.print_exc()
            raise
    import ray

    return {"key": part.key, "kind": part.kind, "run": part.run, "started_at": round(started, 3),
            "ended_at": round(time.time(), 3), "wall_s": round(time.time() - started, 1),
            "node": ray.get_runtime_context().get_node_id(), "pid": os.getpid(), "result": result}


def last_line(exc: BaseException) -> str:
    """An error's last line (a remote traceback ends with the exception), else its type."""
    text = str(exc).strip()
    return text.splitlines()[-1] if text else type(exc).__name__


def _clock(seconds: float) -> str:
    return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"


def run_parts(parts: list[Part], exp, out: Path, config_file, *, stream=None) -> dict:
    """Run every part not yet done; returns ``{"done", "ran" (by this call), "failed" ({key: error}),
    "skipped"}``. The judge endpoint is up only while judge parts run."""
    judge = JudgeEndpoint(exp)
    try:
        return _run(parts, exp, out, config_file, stream or sys.stdout, judge)
    finally:
        judge.close()


def _run(parts: list[Part], exp, out: Path, config_file, stream, judge: JudgeEndpoint) -> dict:
    import ray

    remote = ray.remote(max_retries=0)(_execute)
    done = {p.key for p in parts if marker(out, p).is_file()}
    already = set(done)
    failed: dict[str, str] = {}
    todo = [p for p in parts if p.key not in done]
    running: dict = {}
    searches = {m: tune_cpus(exp, config_file, m) for m in {p.method for p in todo if p.kind == "tune"}}

    def need(part: Part) -> float:
        return searches[part.method] if part.kind == "tune" else exp.eval.cpus if part.kind in KINDS_ON_CPUS else 0

    total_cpus = ray.cluster_resources().get("CPU", 0)
    first = time.time()
    print(f"[experiment] {len(done)} of {len(parts)} parts already done; {len(todo)} to run, "
          f"at most {exp.max_parallel} at once (logs: {out / 'logs'})", file=stream, flush=True)
    while todo or running:
        blocked = [p for p in todo if any(n in failed for n in p.needs)]
        for part in blocked:
            todo.remove(part)
            failed.setdefault(part.key, "skipped: a part it needs failed")
        # Once the judge is up, the judge parts go first, so that it is shut down soon.
        ready = sorted((p for p in todo if all(n in done for n in p.needs)),
                       key=lambda p: -1 if p.kind == "judge" and judge.up else PRIORITY[p.kind])
        for part in admit(ready, [p for p, _ in running.values()], slots=exp.max_parallel - len(running),
                          total_cpus=total_cpus, need=need):
            todo.remove(part)
            if part.kind == "judge" and not judge.ensure():
                failed[part.key] = judge.error
                print(f"[experiment {_clock(time.time() - first)}] FAILED {part.key}: {judge.error}",
                      file=stream, flush=True)
                continue
            cpus = need(part) if part.kind in KINDS_ON_CPUS else 0
            ref = remote.options(num_cpus=cpus, memory=TASK_MEMORY, name=part.key).remote(
                part, exp, str(out), str(config_file), max(1, int(round(cpus or 1))))
            running[ref] = (part, time.time())
            print(f"[experiment {_clock(time.time() - first)}] start  {part.key}", file=stream, flush=True)
        if not running:
            if blocked:  # their dependents are skipped on the next pass
                continue
            for part in todo:  # waits on a part that is neither done nor planned
                failed[part.key] = "skipped: a part it needs is not in the plan"
            break
        finished, _ = ray.wait(list(running), num_returns=1)
        part, started = running.pop(finished[0])
        if not any(p.kind == "judge" for p in [*todo, *(q for q, _ in running.values())]):
            judge.close()
        try:
            record = ray.get(finished[0])
        except Exception as exc:  # the part's traceback is in its log
            message = last_line(exc)
            failed[part.key] = message
            print(f"[experiment {_clock(time.time() - first)}] FAILED {part.key}: {message} "
                  f"(log: {out / 'logs' / (part.slug + '.log')})", file=stream, flush=True)
            continue
        atomic_write_json(marker(out, part), record)
        done.add(part.key)
        print(f"[experiment {_clock(time.time() - first)}] done   {part.key} in {_clock(record['wall_s'])} "
              f"({len(done)}/{len(parts)})", file=stream, flush=True)
    return {"done": sorted(done), "ran": sorted(done - already), "failed": {k: v for k, v in failed.items() if not v.startswith("skipped")},
            "skipped": sorted(k for k, v in failed.items() if v.startswith("skipped"))}


def part_records(parts: list[Part], out: Path) -> dict[str, dict]:
    return {p.key: read_json(marker(out, p)) for p in parts if marker(out, p).is_file()}


class JudgeEndpoint:
    """The judge for the judge parts: ``MODULA_RAY_JUDGE_URL`` if set, else the base model served
    on 127.0.0.1:8000 by Ray Serve, started when the first judge part starts and shut down when
    the last one ends (Serve's controller and proxy would otherwise poll for the whole run). If
    Serve does not start, every judge part fails with ``error`` and the other parts go on."""

    def __init__(self, exp):
        self.model, self.up, self.error = exp.eval.judge_model, False, None

    def ensure(self) -> bool:
        """True once the judge can be asked; False (``error`` says why) if it could not start."""
        if self.up or os.environ.get("MODULA_RAY_JUDGE_URL"):
            return True
        if self.error is None:
            try:
                self._start()
            except Exception as exc:  # noqa: BLE001 - any start failure fails the judge parts alone
                self.close()
                self.error = f"the judge {self.model!r} did not start on Ray Serve: {last_line(exc)}"
        return self.error is None

    def _start(self) -> None:
        from ray import serve

        from ..serve.app import build_app

        serve.start(http_options={"host": "127.0.0.1", "port": 8000})
        self.up = True
        # The replica reserves a tenth of a CPU: it computes only while judge parts wait on it.
        serve.run(build_app([], base_models=[self.model], deployment={"ray_actor_options": {"num_cpus": 0.1}}),
                  name="modula-ray-judge", route_prefix="/")
        print(f"[experiment] judge: {self.model} served on http://127.0.0.1:8000/v1", flush=True)

    def close(self) -> None:
        if self.up:
            from ray import serve

            serve.shutdown()
            self.up = False
            print("[experiment] judge: Serve shut down (no judge part left)", flush=True)
