"""A judge is any OpenAI-compatible chat-completions endpoint.

``JudgeClient`` calls ``POST {base_url}/chat/completions`` at temperature 0, at most
``concurrency`` at once, retrying connection errors, 408, 429 and 5xx with exponential backoff
(``Retry-After`` honoured), never a 4xx of ours. Every reply is cached on disk under a key of
(prompt, judge model, rubric version), so a re-run costs nothing and a changed rubric (a new
version) is judged again. Where the judge is: ``JudgeConfig.from_env()`` reads
``MODULA_RAY_JUDGE_URL`` / ``_MODEL`` / ``_KEY``; the default is this project's own endpoint,
``modula-ray serve --base smollm2-135m`` on 127.0.0.1:8000.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from ...fileio import atomic_write_json

DEFAULT_URL, DEFAULT_MODEL = "http://127.0.0.1:8000/v1", "smollm2-135m"
RETRY_STATUS = {408, 429, 500, 502, 503, 504}


class JudgeUnavailableError(RuntimeError):
    """The judge did not answer after every retry (names the URL and the last error)."""


@dataclass
class JudgeConfig:
    base_url: str = DEFAULT_URL
    model: str = DEFAULT_MODEL
    api_key: str | None = None
    concurrency: int = 4
    retries: int = 4
    backoff_s: float = 0.5
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
    stats: dict = field(default_factory=lambda: {"calls": 0, "cache_hits": 0, "retries": 0})

    def _key(self, system: str, prompt: str, version) -> str:
        text = json.dumps([system, prompt, self.config.model, str(version)])
        return hashlib.sha256(text.encode()).hexdigest()

    def _post(self, system: str, prompt: str) -> str:
        body = {"model": self.config.model, "temperature": 0, "max_tokens": self.config.max_tokens,
                "messages": [{"role": "system", "content": system}, {"role": "user", "content": prompt}]}
        headers = {"Content-Type": "application/json"}
        if self.config.api_key:
            headers["Authorization"] = f"Bearer {self.config.api_key}"
        url, last = self.config.base_url.rstrip("/") + "/chat/completions", None
        for attempt in range(self.config.retries + 1):
            request = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers, method="POST")
            wait = self.config.backoff_s * 2 ** attempt
            try:
                with urllib.request.urlopen(request, timeout=self.config.timeout_s) as response:
                    return json.loads(response.read())["choices"][0]["message"]["content"] or ""
            except urllib.error.HTTPError as error:
                if error.code not in RETRY_STATUS:
                    raise JudgeUnavailableError(f"{url}: HTTP {error.code}: {error.read()[:300]!r}") from None
                last = f"HTTP {error.code}"
                wait = max(wait, float(error.headers.get("Retry-After") or 0))
            except (urllib.error.URLError, TimeoutError, ConnectionError) as error:
                last = repr(error)
            if attempt < self.config.retries:
                self.stats["retries"] += 1
                time.sleep(wait)
        raise JudgeUnavailableError(f"{url}: no answer after {self.config.retries + 1} tries ({last})")

    def ask(self, system: str, prompt: str, version) -> str:
        """The judge's reply to ``prompt``: from the cache, or from the endpoint (then cached)."""
        path = self.cache_dir / f"{self._key(system, prompt, version)}.json"
        if path.is_file():
            self.stats["cache_hits"] += 1
            return json.loads(path.read_text())["reply"]
        reply = self._post(system, prompt)
        self.stats["calls"] += 1
        atomic_write_json(path, {"reply": reply, "model": self.config.model, "rubric_version": str(version)})
        return reply

    def ask_all(self, system: str, prompts: list[str], version) -> list[str]:
        with ThreadPoolExecutor(max(1, self.config.concurrency)) as pool:
            return list(pool.map(lambda p: self.ask(system, p, version), prompts))
