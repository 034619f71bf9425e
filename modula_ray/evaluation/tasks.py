"""What the lm-eval task YAMLs in ``eval/tasks/`` call (``!function modula_ray.evaluation.tasks.*``).

Data comes from the test splits ``modula-ray data build`` wrote. lm-eval hands every task its
metadata, and the model's arguments with it, as keyword arguments of ``custom_dataset``; the folder
is ``data_dir`` there (``evaluate_model(data_dir=)``, ``--metadata '{"data_dir": ...}'`` or
``--model_args base=NAME,data_dir=...``), else the data folder in the manifest of ``run=RUN_DIR``,
else a clear error. No environment variable: each evaluation names its own folder, and nobody
edits paths in the YAMLs.

Scoring, per task family:

- reasoning-gym rows (math, code, general): the answer is the generation's first non-empty line,
  with a trailing "answer is" phrase and ``<answer>`` tags removed; ``score`` is reasoning-gym's
  own scorer for the row's generator, ``exact_match`` a plain string comparison;
- MMLU rows (medicine, finance, general capability): multiple choice over the options;
- e-commerce categorisation: "aisle / department", scored on each part;
- domain loss: ``nll_per_byte`` = −log p(response | prompt) / UTF-8 bytes of the response.
"""
from __future__ import annotations

import re

from ..data.schema import row_meta
from ..errors import ConfigError

LETTERS = "ABCD"
# MMLU subjects outside every domain: general-capability retention (DESIGN §4).
GENERAL_SUBJECTS = ("astronomy", "high school geography", "high school us history", "world religions",
                    "logical fallacies", "sociology", "computer security", "marketing")
GENERAL_PER_SUBJECT = 25


def data_dir_of(run_dir) -> str:
    """The data folder a run was trained on, from its manifest."""
    from ..compose import Manifest

    return str(Manifest.read(run_dir)["data"]["dir"])


def resolve_data_dir(data_dir: str | None = None, run: str | None = None) -> str:
    """``data_dir``, else the data folder of the run ``run`` (the ``modula`` model's ``run=``)."""
    if data_dir:
        return str(data_dir)
    if run:
        return data_dir_of(run)
    raise ConfigError("data_dir", "no data folder for the modula tasks: evaluate --model modula with "
                                  "run=RUN_DIR, or name one: --metadata '{\"data_dir\": DIR}' (lm_eval), "
                                  "--model_args base=NAME,data_dir=DIR, or evaluate_model(data_dir=DIR)")


def load_domain_split(domain: str, split: str = "test", data_dir: str | None = None, kind: str | None = None,
                      run: str | None = None, **_):
    """``DatasetDict({split: rows})`` of one built domain; ``kind`` keeps rows whose ``meta.task``
    (e-commerce) or ``meta.generator`` (reasoning-gym) or source prefix equals it."""
    import datasets

    from ..data.build import split_file
    from ..data.schema import read_split

    rows = read_split(split_file(resolve_data_dir(data_dir, run), domain, split)).to_pylist()
    if kind is not None:
        rows = [r for r in rows if kind in (row_meta(r).get("task"), row_meta(r).get("generator"), r["source"].split("/")[0])]
    return datasets.DatasetDict({split: datasets.Dataset.from_list(rows)})


def load_general(split: str = "test", per_subject: int = GENERAL_PER_SUBJECT, **_):
    """MMLU questions of ``GENERAL_SUBJECTS``, the first ``per_subject`` of each (no domain trains on them)."""
    import datasets

    from ..data.sources.mmlu_base import format_question, mmlu_rows

    picked, counts = [], {}
    for row in mmlu_rows():
        subject = row["topic"]
        if subject in GENERAL_SUBJECTS and counts.get(subject, 0) < per_subject:
            counts[subject] = counts.get(subject, 0) + 1
            choices = [row[f"answer_{c}"] for c in "abcd"]
            picked.append({"prompt": format_question(subject, row["question"], choices), "choices": choices,
                           "answer": choices[LETTERS.index(row["correct_answer"])], "subject": subject})
    return datasets.DatasetDict({split: datasets.Dataset.from_list(picked)})


def extract_answer(text: str) -> str:
    """The first non-empty line, without ``<answer>`` tags or a leading "the answer is"."""
    tagged = re.search(r"<answer>(.*?)</answer>", text, flags=re.S)
    text = tagged.group(1) if tagged else text
    line = next((line.strip() for line in text.splitlines() if line.strip()), "")
    return re.sub(r"^(the\s+)?(final\s+)?answer\s*(is|:)\s*", "", line, flags=re.I).strip().rstrip(".")


def score_reasoning_gym(doc: dict, results: list[str]) -> dict:
    import reasoning_gym

    meta, answer = row_meta(doc), extract_answer(results[0])
    entry = {"question": doc["prompt"], "answer": doc["answer"], "metadata": meta.get("metadata", {})}
    try:
        score = float(reasoning_gym.get_score_answer_fn(meta["generator"])(answer=answer, entry=entry))
    except Exception:  # noqa: BLE001 - a scorer that chokes on garbage scores it 0
        score = 0.0
    return {"score": score, "exact_match": float(answer == doc["answer"].strip())}


def mc_choices(doc: dict) -> list[str]:
    """The options as the prompt lists them (and training answered): ``"A. text"``."""
    return [f"{letter}. {text}" for letter, text in zip(LETTERS, doc["choices"])]


def mc_target(doc: dict) -> int:
    return list(doc["choices"]).index(doc["answer"])


def score_category(doc: dict, results: list[str]) -> dict:
    """``aisle / department`` against the catalogue's labels: each part, and both."""
    meta = row_meta(doc)
    parts = [p.strip().lower() for p in extract_answer(results[0]).split("/")]
    aisle, department = (parts + ["", ""])[:2]
    aisle_ok, department_ok = aisle == meta["aisle"].lower(), department == meta["department"].lower()
    return {"aisle_acc": float(aisle_ok), "department_acc": float(department_ok),
            "exact_match": float(aisle_ok and department_ok)}


def nll_per_byte(doc: dict, results: list[tuple[float, bool]]) -> dict:
    loglikelihood, _ = results[0]
    return {"nll_per_byte": -loglikelihood / max(1, len(doc["response"].encode("utf-8")))}


HUMANEVAL_STOPS = ("\nclass ", "\ndef ", "\nif __name__", "\nprint(", "\n```")


def humaneval_program(doc: dict, completion: str) -> str:
    """The function's prompt, the completion (its body; or a whole definition, which then wins),
    the problem's tests and the call ``check(entry_point)``."""
    meta = row_meta(doc)
    fenced = re.search(r"```(?:python)?\n(.*?)(```|$)", completion, flags=re.S)
    body = fenced.group(1) if fenced else completion
    for stop in HUMANEVAL_STOPS:
        if stop in body and not body.lstrip().startswith(("def ", "import ", "from ")):
            body = body[:body.index(stop)]
    return f"{meta['function_prompt']}{body}\n\n{meta['test']}\n\ncheck({meta['entry_point']})\n"


def score_humaneval(doc: dict, results: list[str]) -> dict:
    """pass@1 of one greedy sample, run only in the sandbox (``modula_ray.evaluation.sandbox``)."""
    from .sandbox import run_python

    return {"pass_at_1": float(run_python(humaneval_program(doc, results[0]), timeout_s=10).passed)}
