"""A judge is any OpenAI-compatible chat-completions endpoint.

``JudgeClient`` asks it through the ``openai`` client at temperature 0, at most ``concurrency``
at once. The client retries connection errors, timeouts, 408, 409, 429 and 5xx up to ``retries``
times (exponential backoff from 0.5 s; ``Retry-After`` in seconds or as an HTTP date honoured up
to the client's 60 s cap, a longer one ignored for the backoff), never another 4xx. A 200 whose body
is not a chat completion is counted (``stats["malformed"]``) and read as an empty reply, which the
rubric counts invalid; it is not cached. Every other reply is cached on disk under a key of
(prompt, judge URL, judge model, rubric version), so a re-run costs nothing, another judge is asked
afresh, and a changed rubric (a new version) is judged again. Where the judge is:
``JudgeConfig.from_env()`` reads ``MODULA_RAY_JUDGE_URL`` / ``_MODEL`` / ``_KEY``; the default is
this project's own endpoint, ``modula-ray serve --base smollm2-135m`` on 127.0.0.1:8000.
"""
from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from ...fileio import atomic_write_json

DEFAULT_URL, DEFAULT_MODEL = "http://127.0.0.1:8000/v1", "smollm2-135m"


class JudgeUnavailableError(RuntimeError):
    """The judge did not answer after every retry (names the URL and the last error)."""


@dataclass
class JudgeConfig:
    base_url: str = DEFAULT_URL
    model: str = DEFAULT_MODEL
    api_key: str | None = None
    concurrency: int = 4
    retries: int = 4  # the openai client's max_retries
    timeout_s: float = 120.0
    max_tokens: int = 96

    @classmethod
    def from_env(cls, **overrides) -> JudgeConfig:
        env = {"base_url": os.environ.get("MODULA_RAY_JUDGE_URL"), "model": os.environ.get("MODULA_RAY_JUDGE_MODEL"),
               "api_key": os.environ.get("MODULA_RAY_JUDGE_KEY")}
        return cls(**{k: v for k, v in env.items() if v} | overrides)

    def describe(self) -> str:
        return f"{self.model} at {self.base_url}"


@dataclass
class JudgeClient:
    config: JudgeConfig
    cache_dir: Path
    stats: dict = field(default_factory=lambda: {"calls": 0, "cache_hits": 0, "retries": 0, "malformed": 0})

    def __post_init__(self):
        import openai

        self.openai_client = openai.OpenAI(base_url=self.config.base_url, api_key=self.config.api_key or "unused",
                                           timeout=self.config.timeout_s, max_retries=self.config.retries)

    def _key(self, system: str, prompt: str, version) -> str:
        text = json.dumps([system, prompt, self.config.base_url.rstrip("/"), self.config.model, str(version)])
        return hashlib.sha256(text.encode()).hexdigest()

    @property
    def url(self) -> str:
        return self.config.base_url.rstrip("/") + "/chat/completions"

    def _post(self, system: str, prompt: str) -> str | None:
        import openai

        try:
            raw = self.openai_client.chat.completions.with_raw_response.create(
                model=self.config.model, temperature=0, max_tokens=self.config.max_tokens,
                messages=[{"role": "system", "content": system}, {"role": "user", "content": prompt}])
        except openai.APIStatusError as error:  # after the client's retries if the status allows them
            raise JudgeUnavailableError(f"{self.url}: HTTP {error.status_code}: {error.message[:300]}") from None
        except openai.APIError as error:  # connection errors and timeouts, after every retry
            raise JudgeUnavailableError(f"{self.url}: no answer after {self.config.retries + 1} tries "
                                        f"({error!r})") from None
        self.stats["retries"] += raw.retries_taken
        try:
            content = raw.parse().choices[0].message.content
        except (AttributeError, IndexError, KeyError, TypeError, ValueError):
            content = None
        if not isinstance(content, str):
            return None
        return content

    def ask(self, system: str, prompt: str, version) -> str:
        """The judge's reply to ``prompt``: from the cache, or from the endpoint (then cached)."""
        path = self.cache_dir / f"{self._key(system, prompt, version)}.json"
        if path.is_file():
            self.stats["cache_hits"] += 1
            return json.loads(path.read_text())["reply"]
        reply = self._post(system, prompt)
        self.stats["calls"] += 1
        if reply is None:  # a 200 that is not a chat completion: invalid, and asked again next time
            self.stats["malformed"] += 1
            return ""
        atomic_write_json(path, {"reply": reply, "model": self.config.model, "url": self.config.base_url,
                                 "rubric_version": str(version)})
        return reply

    def ask_all(self, system: str, prompts: list[str], version) -> list[str]:
        with ThreadPoolExecutor(max(1, self.config.concurrency)) as pool:
            return list(pool.map(lambda p: self.ask(system, p, version), prompts))
