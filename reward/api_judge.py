"""A judge behind an OpenAI-compatible chat-completions endpoint, using only the standard library.

Each pair is asked twice, with the responses in both orders, for a one-letter answer ("A" or "B"); disagreeing
answers are a tie (see `combine_both_orders`). Requests run concurrently, and a 429, a 5xx, a timeout or a dropped
connection is retried with exponential backoff (or the server's Retry-After). The API key is read from the
environment at each call, by the variable's name: it is never held on the object, so it cannot reach a repr, a log,
the resolved config or a run directory.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import time
import urllib.error
import urllib.request
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Callable

from pipeline.errors import ConfigError, PipelineError
from pipeline.log import log
from reward.judges import DEFAULT_RUBRIC, combine_both_orders, judge_messages
from reward.pairs import Label, Pair

_RETRY_STATUSES = {429, 500, 502, 503, 504}
_ANSWER = re.compile(r"""[\s"'*(\[]*(?:response\s*)?([AB])[\s"'*)\].:]*""", re.IGNORECASE)


@dataclass(frozen=True)
class ApiJudgeConfig:
    base_url: str
    """The API root, e.g. https://api.openai.com/v1; requests go to <base_url>/chat/completions."""
    model: str
    """The model name sent with every request."""
    api_key_env: str = "OPENAI_API_KEY"
    """The NAME of the environment variable holding the key (the key itself never appears in a config)."""
    rubric: str = DEFAULT_RUBRIC
    """The principles the judge applies, put in its system message."""
    max_concurrency: int = 4
    """Requests in flight at once."""
    max_retries: int = 5
    """Retries of one request after a 429, 5xx, timeout or connection error."""
    timeout: float = 60.0
    """Seconds to wait for one response."""
    backoff: float = 1.0
    """Seconds before the first retry; doubled for each one after."""
    max_backoff: float = 60.0
    """The longest single wait, Retry-After included."""
    temperature: float | None = 0.0
    """Sent unless None."""
    max_tokens: int | None = None
    """Sent unless None (some models reject the field)."""

    def __post_init__(self):
        if not self.base_url.startswith(("http://", "https://")):
            raise ConfigError(f"judge base_url must start with http:// or https://, got {self.base_url!r}")
        if self.max_concurrency < 1 or self.max_retries < 0 or self.timeout <= 0 or self.backoff < 0:
            raise ConfigError("judge max_concurrency must be ≥ 1, max_retries ≥ 0, timeout > 0 and backoff ≥ 0")


def _retry_after(headers) -> float | None:
    value = headers.get("Retry-After") if headers else None
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def parse_answer(text: str) -> str | None:
    """"A" or "B" from a reply like "A", "b.", "**B**" or "Response A"; None for anything else."""
    match = _ANSWER.fullmatch(text)
    return match.group(1).upper() if match else None


class ApiJudge:
    """`on_label`, if given, is called from the calling thread with each label as its pair finishes (e.g.
    `LabelStore.add`), so an interrupted batch keeps what it had."""

    def __init__(self, config: ApiJudgeConfig, on_label: Callable[[Label], None] | None = None):
        self.config, self.on_label = config, on_label
        self.name = f"api:{config.model}"
        self.url = config.base_url.rstrip("/") + "/chat/completions"
        self._key()  # fail in setup, not after the first batch

    def __repr__(self) -> str:
        return f"ApiJudge(url={self.url!r}, model={self.config.model!r}, api_key_env={self.config.api_key_env!r})"

    def _key(self) -> str:
        key = os.environ.get(self.config.api_key_env, "")
        if not key:
            raise ConfigError(f"the API judge reads its key from the environment variable "
                              f"{self.config.api_key_env}, which is not set")
        return key

    def messages(self, pair: Pair, first: str, second: str) -> list[dict]:
        return judge_messages(pair, first, second, self.config.rubric)

    def _post(self, messages: list[dict]) -> str:
        body = {"model": self.config.model, "messages": messages}
        if self.config.temperature is not None:
            body["temperature"] = self.config.temperature
        if self.config.max_tokens is not None:
            body["max_tokens"] = self.config.max_tokens
        data = json.dumps(body).encode("utf-8")
        last = "no attempt made"
        for attempt in range(self.config.max_retries + 1):
            # The key lives in the request's headers only, never in a local of this frame: a traceback that shows
            # locals (pytest -l, an error tracker) sees the Request object's opaque repr.
            request = urllib.request.Request(self.url, data=data, method="POST", headers=self._headers())
            delay = self.config.backoff * 2 ** attempt
            try:
                with urllib.request.urlopen(request, timeout=self.config.timeout) as response:
                    return self._content(response.read())
            except urllib.error.HTTPError as e:
                detail = self._redact(e.read()[:300].decode("utf-8", "replace"))
                last = f"HTTP {e.code}: {detail}".rstrip(": ")
                if e.code not in _RETRY_STATUSES:
                    raise PipelineError(f"{self.url} answered {last}") from None
                retry_after = _retry_after(e.headers)
                delay = delay if retry_after is None else retry_after
            except (urllib.error.URLError, TimeoutError, ConnectionError, http.client.HTTPException) as e:
                last = f"{type(e).__name__}: {getattr(e, 'reason', e)}"
            if attempt < self.config.max_retries:
                time.sleep(min(delay, self.config.max_backoff))
        raise PipelineError(f"{self.url}: no answer after {self.config.max_retries + 1} attempts; last: {last}")

    def _headers(self) -> dict:
        return {"Content-Type": "application/json", "Authorization": f"Bearer {self._key()}"}

    def _redact(self, text: str) -> str:
        """`text` (a server's words, which may echo the key) with the key replaced."""
        key = os.environ.get(self.config.api_key_env, "")
        return text.replace(key, "***") if key else text

    def _content(self, raw: bytes) -> str:
        try:
            content = json.loads(raw)["choices"][0]["message"]["content"] or ""
            if not isinstance(content, str):
                raise TypeError(content)
            return content
        except (ValueError, KeyError, IndexError, TypeError):
            snippet = self._redact(raw[:300].decode("utf-8", "replace"))
            raise PipelineError(f"{self.url} answered with no choices[0].message.content string: {snippet}") from None

    def judge(self, pairs: list[Pair]) -> list[Label]:
        answers: dict[int, dict[str, str]] = {index: {} for index in range(len(pairs))}
        labels: dict[int, Label] = {}
        with ThreadPoolExecutor(self.config.max_concurrency) as pool:
            pending = {}
            for index, pair in enumerate(pairs):
                for order, (first, second) in (("ab", (pair.response_a, pair.response_b)),
                                               ("ba", (pair.response_b, pair.response_a))):
                    pending[pool.submit(self._post, self.messages(pair, first, second))] = (index, order)
            try:
                while pending:
                    done, _ = wait(pending, return_when=FIRST_COMPLETED)
                    for future in done:
                        index, order = pending.pop(future)
                        answers[index][order] = future.result()
                        if len(answers[index]) == 2:
                            label = self._label(pairs[index], answers[index])
                            if label is not None:
                                labels[index] = label
                                if self.on_label:
                                    self.on_label(label)
            except BaseException:
                pool.shutdown(cancel_futures=True)
                raise
        return [labels[index] for index in sorted(labels)]

    def _label(self, pair: Pair, answers: dict[str, str]) -> Label | None:
        first, swapped = parse_answer(answers["ab"]), parse_answer(answers["ba"])
        if first is None or swapped is None:
            unread = answers["ab"] if first is None else answers["ba"]
            # markup=False: the model's words are not rich markup.
            log(f"warning: {self.name} gave no A/B answer for the pair from {pair.source} ({unread[:60]!r}); "
                "it stays unlabelled and is asked again on the next run", style="yellow", markup=False)
            return None
        winner, verdicts = combine_both_orders(first, swapped)
        return Label(pair.id, winner, self.name, verdicts=verdicts)
