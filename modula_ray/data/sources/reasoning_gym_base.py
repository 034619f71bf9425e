"""Shared base for sources drawn from reasoning-gym generators (graded by their own scorers).

Generators are sampled in rounds, round r with seed ``derive_seed(seed, name, r)``, and
interleaved so every split sees every family. ``meta`` keeps the generator name and its
metadata, enough to rebuild the entry for ``reasoning_gym.get_score_answer_fn(name)``.
"""
from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator

from . import Quota, Source, derive_seed, make_row

MAX_ROUNDS = 12


@contextlib.contextmanager
def scratch_cwd():
    """Run the block in a fresh temporary working directory, then restore the old one."""
    import os
    import tempfile

    previous = os.getcwd()
    with tempfile.TemporaryDirectory(prefix="modula-ray-generator-") as scratch:
        os.chdir(scratch)
        try:
            yield scratch
        finally:
            os.chdir(previous)


class ReasoningGymSource(Source):
    generators: tuple[str, ...] = ()
    max_prompt_chars: int = 1200

    def _generate(self, name: str, size: int, seed: int) -> list[dict | None]:
        """``size`` entries; ``None`` where the generator itself fails on an index (codeio does,
        e.g. on numpy ints it cannot serialise), so indices stay aligned and deterministic."""
        import reasoning_gym

        sink = io.StringIO()  # some generators print progress dots and warnings to stdout/stderr
        entries = []
        # codeio runs its reference programs, and some write files (CSV, TXT) into the working
        # directory: give them a scratch one, so a build never litters the repo or a job's upload.
        with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink), scratch_cwd():
            dataset = reasoning_gym.create_dataset(name, size=size, seed=seed)
            for i in range(size):
                try:
                    entries.append(dataset[i])
                except Exception:  # noqa: BLE001 - a bad generated item is skipped, not fatal
                    entries.append(None)
        return entries

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
