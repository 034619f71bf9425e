"""Rubric judging: a versioned YAML rubric (``eval/judges/<name>.yaml``), pointwise and pairwise.

Pointwise: the judge scores one answer ``low..high`` on each criterion (the paper's five, 0–2,
total /10). The reply must hold exactly one JSON object with every criterion an integer in range;
anything else is **invalid**: counted and reported, never scored. The answer reaches the judge
between ``<<<ANSWER`` / ``ANSWER>>>`` lines (markers inside it are taken out), and the rubric's
example reply has ``<score>`` placeholders, so a judge that echoes the prompt gives no verdict. Pairwise (as MT-Bench): the judge sees
A and B, then B and A; a side wins only if it wins in both orders, else it is a tie (position
bias cancels out); unparseable verdicts are counted invalid.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from ...assets import asset
from ...errors import ConfigError

JUDGES_DIR = asset("eval", "judges")  # the rubrics shipped in the package


@dataclass(frozen=True)
class Rubric:
    name: str
    version: str
    tasks: tuple[str, ...]
    criteria: tuple[str, ...]
    low: int
    high: int
    system: str
    prompt: str
    pairwise_prompt: str

    @property
    def total(self) -> int:
        return self.high * len(self.criteria)


def load_rubric(name: str, folder: Path | None = None) -> Rubric:
    import yaml

    path = Path(folder or JUDGES_DIR) / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError("judge", f"no rubric {path}; available: {sorted(p.stem for p in path.parent.glob('*.yaml'))}")
    spec = yaml.safe_load(path.read_text())
    try:
        return Rubric(name=spec["name"], version=str(spec["metadata"]["version"]), tasks=tuple(spec["tasks"]),
                      criteria=tuple(spec["criteria"]), low=int(spec["scale"]["low"]), high=int(spec["scale"]["high"]),
                      system=spec["system"], prompt=spec["prompt"], pairwise_prompt=spec["pairwise_prompt"])
    except (KeyError, TypeError) as error:
        raise ConfigError("judge", f"{path}: missing or malformed {error}") from None


def parse_scores(reply: str, rubric: Rubric) -> dict[str, int] | None:
    """The criteria scores in ``reply``, or ``None`` if it is not one well-formed verdict."""
    objects = re.findall(r"\{.*?\}", reply, flags=re.S)
    if len(objects) != 1:  # none, or an echo of the prompt's example beside a verdict
        return None
    try:
        verdict = json.loads(objects[0])
    except ValueError:
        return None
    if not isinstance(verdict, dict) or set(verdict) != set(rubric.criteria):
        return None
    if not all(isinstance(v, int) and not isinstance(v, bool) and rubric.low <= v <= rubric.high
               for v in verdict.values()):
        return None
    return {c: verdict[c] for c in rubric.criteria}


def parse_preference(reply: str) -> str | None:
    """``"A"``, ``"B"`` or ``"tie"`` when the reply is exactly one of them (case and dots aside)."""
    word = reply.strip().strip(".").strip().lower()
    return {"a": "A", "b": "B", "tie": "tie"}.get(word)


MARKERS = ("<<<ANSWER", "ANSWER>>>")


def delimited(answer: str) -> str:
    """The answer with the markers that bound it in the prompt taken out, so it cannot close its own block."""
    for marker in MARKERS:
        answer = answer.replace(marker, "")
    return answer


def judge_answers(client, rubric: Rubric, items: list[dict]) -> dict:
    """Score ``items`` (``{"question", "answer"}``); returns per-item scores and the summary."""
    prompts = [rubric.prompt.format(question=i["question"], answer=delimited(i["answer"])) for i in items]
    replies = client.ask_all(rubric.system, prompts, rubric.version)
    scored = [parse_scores(reply, rubric) for reply in replies]
    valid = [s for s in scored if s is not None]
    means = {c: sum(s[c] for s in valid) / len(valid) for c in rubric.criteria} if valid else {}
    return {"items": [{"answer": i["answer"], "reply": r, "scores": s} for i, r, s in zip(items, replies, scored)],
            "judged": len(items), "valid": len(valid), "invalid": len(items) - len(valid),
            "criteria": means, "total": sum(means.values()) if valid else None, "out_of": rubric.total}


def judge_pairwise(client, rubric: Rubric, items: list[dict]) -> dict:
    """``items``: ``{"question", "a", "b"}``. A side wins an item only by winning in both orders."""
    forward = [rubric.pairwise_prompt.format(question=i["question"], answer_a=delimited(i["a"]),
                                             answer_b=delimited(i["b"])) for i in items]
    swapped = [rubric.pairwise_prompt.format(question=i["question"], answer_a=delimited(i["b"]),
                                             answer_b=delimited(i["a"])) for i in items]
    first = [parse_preference(r) for r in client.ask_all(rubric.system, forward, rubric.version)]
    second = [parse_preference(r) for r in client.ask_all(rubric.system, swapped, rubric.version)]
    counts = {"a": 0, "b": 0, "tie": 0, "invalid": 0}
    for one, two in zip(first, second):
        if one is None or two is None:
            counts["invalid"] += 1
        elif (one, two) == ("A", "B"):
            counts["a"] += 1
        elif (one, two) == ("B", "A"):
            counts["b"] += 1
        else:
            counts["tie"] += 1
    return counts | {"judged": len(items)}
