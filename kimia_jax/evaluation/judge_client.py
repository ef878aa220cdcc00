"""Judge client: any OpenAI-compatible chat-completions endpoint, with a request/reply cache.

`HttpJudge` sends each `JudgeRequest` as the Evalkit's `OpenAIWrapper` does (model, optional
system message, one user message with the filled template, n=1, max_tokens, temperature, top_p,
frequency/presence penalty, stop) to `<base_url>/chat/completions`, 10 requests at a time, with up
to 5 tries and back-off. Every good reply is appended to a cache jsonl (`fileio.ResultLog`, keyed
by the sha256 of the request body), so a re-run sends nothing; a failed call (after its tries)
comes back as `None` and is never cached. `ReplayJudge` answers from a cache file only (tests,
re-scoring offline) and fails clearly on a request it has no reply for.

The Evalkit's judge for Kimi-Audio is `gpt-4o-mini` at api.openai.com with the system prompt below
(data/prompts.json "judge"); our own server (kimia_jax/serving) or a local LLM work through
`base_url` but are not paper-comparable.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
import random
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from typing import Any

from kimia_jax.evaluation.judged import JudgeRequest
from kimia_jax.fileio import ResultLog

GPT4O_MINI_SYSTEM = "You are a helpful assistant who tries to help answer the user's question."
OPENAI_BASE_URL = "https://api.openai.com/v1"


def request_body(model: str, system_prompt: str | None, req: JudgeRequest) -> dict[str, Any]:
    """The chat-completions body for one judge request (the Evalkit's layout)."""
    messages = []
    if system_prompt:
        messages.append({"role": "system", "content": system_prompt})
    messages.append({"role": "user", "content": [{"type": "text", "text": req.prompt}]})
    return {"model": model, "messages": messages, "n": 1, **req.sampling()}


def cache_key(body: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


class JudgeCache:
    """Replies by request hash, in an append-only jsonl ({"id", "request", "reply"} per line)."""

    def __init__(self, path: str | os.PathLike[str]):
        self.log = ResultLog(path, arg="--judge_cache")
        self._lock = threading.Lock()

    def get(self, key: str) -> str | None:
        row = self.log.done.get(key)
        return None if row is None else row["reply"]

    def put(self, key: str, body: dict[str, Any], reply: str) -> None:
        with self._lock:
            self.log.append([{"id": key, "request": body, "reply": reply}])


class HttpJudge:
    """Callable judge: `judge(requests) -> replies` (None = failed after every try)."""

    def __init__(
        self,
        model: str = "gpt-4o-mini",
        base_url: str = OPENAI_BASE_URL,
        *,
        api_key: str | None = None,
        system_prompt: str | None = GPT4O_MINI_SYSTEM,
        cache: JudgeCache | None = None,
        concurrency: int = 10,
        tries: int = 5,
        backoff_s: float = 10.0,
        timeout_s: float = 120.0,
    ):
        self.model, self.system_prompt, self.cache = model, system_prompt, cache
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.api_key = api_key
        self.concurrency, self.tries = concurrency, tries
        self.backoff_s, self.timeout_s = backoff_s, timeout_s
        self.sent = 0  # HTTP requests made (cache hits are not counted)
        self.failures: list[str] = []

    def _post(self, body: dict[str, Any]) -> str:
        data = json.dumps(body).encode("utf-8")
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        req = urllib.request.Request(self.url, data=data, headers=headers, method="POST")
        with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
            reply = json.loads(resp.read().decode("utf-8"))
        content = reply["choices"][0]["message"]["content"]
        if not isinstance(content, str):
            raise ValueError(f"reply content is {type(content).__name__}, not text")
        return content

    def _one(self, req: JudgeRequest) -> str | None:
        body = request_body(self.model, self.system_prompt, req)
        key = cache_key(body)
        if self.cache is not None and (hit := self.cache.get(key)) is not None:
            return hit
        err = ""
        for attempt in range(self.tries):
            try:
                self.sent += 1
                content = self._post(body)
            except (OSError, urllib.error.URLError, ValueError, KeyError, IndexError) as e:
                err = f"{type(e).__name__}: {e}"
                if attempt + 1 < self.tries:
                    time.sleep(random.uniform(0, self.backoff_s))
                continue
            if self.cache is not None:
                self.cache.put(key, body, content)
            return content
        self.failures.append(f"{req.key}: {err}")
        return None

    def __call__(self, requests: Sequence[JudgeRequest]) -> list[str | None]:
        with concurrent.futures.ThreadPoolExecutor(max(1, self.concurrency)) as pool:
            return list(pool.map(self._one, requests))


class ReplayJudge:
    """Answers from a judge cache only; a request without a recorded reply is an error."""

    def __init__(
        self,
        cache: JudgeCache,
        model: str = "gpt-4o-mini",
        system_prompt: str | None = GPT4O_MINI_SYSTEM,
    ):
        self.cache, self.model, self.system_prompt = cache, model, system_prompt

    def __call__(self, requests: Sequence[JudgeRequest]) -> list[str | None]:
        out = []
        for r in requests:
            key = cache_key(request_body(self.model, self.system_prompt, r))
            reply = self.cache.get(key)
            if reply is None:
                raise KeyError(
                    f"judge replay: no recorded reply for {r.key} in {self.cache.log.path} "
                    "(run once with --judge_base_url to record it)"
                )
            out.append(reply)
        return out
