"""``modula-ray eval RUN --suite judge``: the composition and its base model answer the held-out
judged items (e-commerce Title-Optimisation and Keyword-Recommendation, ``meta.task``), greedily
through the chat template; the judge scores each answer on the rubric, and compares the two
pairwise (both orders). The entry records which judge scored and how many verdicts were invalid.
"""
from __future__ import annotations

import json
from pathlib import Path

from .client import JudgeClient, JudgeConfig
from .rubric import judge_answers, judge_pairwise, load_rubric

DEFAULT_RUBRIC = "ecommerce_generation"


def judged_items(run_dir, rubric, limit: int | None) -> list[dict]:
    from ...compose import Manifest
    from ...data.build import split_file
    from ...data.schema import read_split

    data_dir = Manifest.read(run_dir)["data"]["dir"]
    rows = [r for r in read_split(split_file(data_dir, "ecommerce", "test")).to_pylist()
            if json.loads(r["meta"]).get("task") in rubric.tasks]
    return rows[:limit] if limit else rows


def answer(model, tokenizer, prompts: list[str], max_new_tokens: int = 64) -> list[str]:
    """Greedy answers through the chat template, one prompt at a time (no padding effects)."""
    import torch

    from ...data.formatting import prompt_ids

    answers = []
    with torch.no_grad():
        for prompt in prompts:
            ids = torch.tensor([prompt_ids(tokenizer, prompt)])
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                 do_sample=False, pad_token_id=tokenizer.pad_token_id)
            answers.append(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip())
    return answers


def run_judge_suite(run_dir, *, limit: int | None = None, config: JudgeConfig | None = None,
                    rubric_name: str = DEFAULT_RUBRIC) -> dict:
    from ...compose import Manifest, load_composition
    from ...models import load_base

    config, rubric = config or JudgeConfig.from_env(), load_rubric(rubric_name)
    client = JudgeClient(config, Path(run_dir) / "eval" / "judge-cache")
    items = judged_items(run_dir, rubric, limit)
    prompts = [row["prompt"] for row in items]
    composed = answer(*load_composition(run_dir), prompts)
    base = answer(*load_base(Manifest.read(run_dir)["base_model"]["name"]), prompts)
    entry = {"judge": config.describe(), "rubric": f"{rubric.name} v{rubric.version}", "limit": limit,
             "composition": judge_answers(client, rubric, [{"question": p, "answer": a} for p, a in zip(prompts, composed)]),
             "base": judge_answers(client, rubric, [{"question": p, "answer": a} for p, a in zip(prompts, base)]),
             "pairwise": judge_pairwise(client, rubric, [{"question": p, "a": a, "b": b}
                                                         for p, a, b in zip(prompts, composed, base)])}
    entry["client"] = dict(client.stats)
    return entry
