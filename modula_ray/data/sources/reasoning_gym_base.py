"""Shared base for sources drawn from reasoning-gym generators (graded by their own scorers).

Generators are sampled in rounds, round r with seed ``derive_seed(seed, name, r)``, and
interleaved so every split sees every family. ``meta`` keeps the generator name and its
metadata, enough to rebuild the entry for ``reasoning_gym.get_score_answer_fn(name)``.

A source's ``program_generators`` run programs to make their items: codeio executes each item's
reference program, and some of those write, read or delete files in the working directory (CSV,
TXT, pickles). They run in a child Python started in a fresh temporary folder, so this process
never changes its working directory and nothing those programs do (files, imported modules,
global random state) reaches it. Some programs draw from the global ``random``/``numpy.random``
state, so the child seeds both from the round's seed first: the same seed gives the same rows
(unseeded, that state starts from the OS's entropy). Entries come back as JSON, which is how
``make_row`` stores ``meta`` anyway (``default=str``).
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator

from ...errors import DataValidationError
from . import Quota, Source, derive_seed, make_row

MAX_ROUNDS = 12
CHILD_TIMEOUT_S = 900
# What the child runs: the entries as one JSON line on stdout (the generators' own output is sunk).
CHILD = ("import json, sys\n"
         "from modula_ray.data.sources.reasoning_gym_base import generate_seeded\n"
         "print(json.dumps(generate_seeded(sys.argv[1], int(sys.argv[2]), int(sys.argv[3])), default=str))\n")


def generate_entries(name: str, size: int, seed: int) -> list[dict | None]:
    """``size`` entries; ``None`` where the generator itself fails on an index (codeio does,
    e.g. on numpy ints it cannot serialise), so indices stay aligned and deterministic."""
    import reasoning_gym

    sink = io.StringIO()  # some generators print progress dots and warnings to stdout/stderr
    entries = []
    with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        dataset = reasoning_gym.create_dataset(name, size=size, seed=seed)
        for i in range(size):
            try:
                entries.append(dataset[i])
            except Exception:  # noqa: BLE001 - a bad generated item is skipped, not fatal
                entries.append(None)
    return entries


def generate_seeded(name: str, size: int, seed: int) -> list[dict | None]:
    """``generate_entries`` after seeding the global ``random`` and ``numpy.random`` state
    (in the child process only: this one's stays untouched)."""
    import random

    import numpy

    random.seed(seed)
    numpy.random.seed(seed % 2 ** 32)
    return generate_entries(name, size, seed)


def generate_in_child(name: str, size: int, seed: int) -> list[dict | None]:
    """``generate_seeded`` in a child Python whose working directory is a fresh temporary folder
    (removed afterwards); it imports modula_ray from this process's ``sys.path``."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path for path in sys.path if path)}
    with tempfile.TemporaryDirectory(prefix="modula-ray-generator-") as scratch:
        done = subprocess.run([sys.executable, "-c", CHILD, name, str(size), str(seed)], cwd=scratch, env=env,
                              capture_output=True, text=True, timeout=CHILD_TIMEOUT_S)
    if done.returncode != 0 or not done.stdout.strip():
        raise DataValidationError(f"reasoning-gym/{name}", None, None,
                                  f"the generator's process (seed {seed}, size {size}) exited with "
                                  f"{done.returncode}: {done.stderr.strip()[-800:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


class ReasoningGymSource(Source):
    generators: tuple[str, ...] = ()
    program_generators: tuple[str, ...] = ()  # those that run programs: generated in a child process
    max_prompt_chars: int = 1200

    def _generate(self, name: str, size: int, seed: int) -> list[dict | None]:
        generate = generate_in_child if name in self.program_generators else generate_entries
        return generate(name, size, seed)

    def candidates(self, seed: int, quota: Quota) -> Iterator[dict]:
        # The hash split puts ~10% in each of val/test, so draw enough for the larger of the needs.
        per_round = max(8, -(-max(quota.train * 10 // 8, quota.val * 10, quota.test * 10) // len(self.generators)))
        for round_ in range(MAX_ROUNDS):
            batches = [self._generate(name, per_round, derive_seed(seed, self.domain, name, round_))
                       for name in self.generators]
            for i in range(per_round):
                for name, batch in zip(self.generators, batches):
                    entry = batch[i]
                    if entry is None:
                        continue
                    question, answer = str(entry["question"]).strip(), str(entry["answer"]).strip()
                    if not question or not answer or len(question) > self.max_prompt_chars:
                        continue
                    meta = {"generator": name, "round": round_, "index": i, "metadata": entry.get("metadata", {})}
                    yield make_row(self.domain, f"reasoning-gym/{name}", question, answer, answer=answer, meta=meta)
