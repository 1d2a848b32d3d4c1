"""Judges compare two successful reflections of one failed attempt, for Dpref (method.md §3.4).

The judge is pluggable (``reflect.judge`` in the params):

* ``self`` (the default): the model that wrote the reflections, through the same generation engine.
  No distillation from a superior model.
* ``local``: another model loaded on this machine (a name or folder, as ``model.name`` accepts).
* ``openai``: any OpenAI-compatible ``/v1/chat/completions`` endpoint, given by its base URL.

A judge answers a list of :class:`~reflectevo.generation.GenerationRequest` (the messages of
:func:`reflectevo.prompts.judge_prompt`) greedily and returns one :class:`JudgeReply` per request,
in order, with the exact prompt it sent and why the answer ended (its finish reason: a verdict
missing from an answer cut off at ``max_new_tokens`` means the budget is too small). Parsing the verdict and turning verdicts into pairs is
:mod:`reflectevo.curation`'s job.
"""

from __future__ import annotations

import dataclasses
import hashlib
import http.client
import json
import logging
import os
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from reflectevo.config import GenerationParams, JudgeParams, ModelParams
from reflectevo.errors import JudgeError
from reflectevo.generation.engines import make_engine
from reflectevo.generation.requests import GenerationRequest, GenerationSettings, check_requests
from reflectevo.models.loading import load_model


@dataclass
class JudgeReply:
    key: str
    text: str  # the judge's whole answer
    prompt: str  # exactly what was sent: the chat-templated string, or the JSON messages for an endpoint
    judge: str  # Judge.name
    # why the answer ended: "length" (cut off at max_new_tokens), "eos" or "stop" (it ended by itself; an
    # endpoint says "stop" for both), another reason an endpoint gives, or None when it gave none
    finish_reason: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class Judge(Protocol):
    name: str

    def describe(self) -> dict[str, Any]: ...

    def complete(self, requests: Sequence[GenerationRequest]) -> list[JudgeReply]: ...


class EngineJudge:
    """A judge behind a generation engine: the reflecting model itself, or another local model.

    Greedy, batched and resumable like every other stage (``store_dir`` keeps finished batches).
    """

    def __init__(
        self,
        engine: Any,
        *,
        name: str = "self",
        max_new_tokens: int = JudgeParams().max_new_tokens,
        store_dir: str | Path | None = None,
        seed: int = 0,
    ) -> None:
        self.engine, self.name, self.store_dir, self.seed = engine, name, store_dir, seed
        self.settings = GenerationSettings(n=1, temperature=0.0, max_new_tokens=max_new_tokens, seed=seed)

    def describe(self) -> dict[str, Any]:
        engine = (
            self.engine.describe()
            if hasattr(self.engine, "describe")
            else {"engine": getattr(self.engine, "name", "?")}
        )
        return {"judge": self.name, "settings": self.settings.to_dict(), "engine": engine}

    def complete(self, requests: Sequence[GenerationRequest]) -> list[JudgeReply]:
        if not requests:
            return []
        outputs = self.engine.generate(list(requests), self.settings, stage="judge", store_dir=self.store_dir)
        return [
            JudgeReply(output.key, output.text, output.prompt, self.name, output.finish_reason) for output in outputs
        ]


def make_judge(
    params: JudgeParams,
    *,
    engine: Any = None,
    model_params: ModelParams | None = None,
    store_dir: str | Path | None = None,
    seed: int = 0,
    progress: bool = True,
) -> Judge:
    """The judge ``reflect.judge`` asks for. ``self`` reuses ``engine``; ``local`` loads ``params.model``
    with the main model's dtype and device (``model_params``); ``openai`` talks to ``params.url``."""
    if params.kind == "self":
        if engine is None:
            raise JudgeError("judge kind 'self' needs the generation engine of the reflecting model")
        return EngineJudge(engine, name="self", max_new_tokens=params.max_new_tokens, store_dir=store_dir, seed=seed)
    if params.kind == "local":
        base = model_params or ModelParams()
        judge_model = load_model(base.model_copy(update={"name": params.model, "adapter": None, "revision": None}))
        judge_engine = make_engine(GenerationParams(engine="transformers"), judge_model, progress=progress)
        return EngineJudge(
            judge_engine,
            name=f"local:{params.model}",
            max_new_tokens=params.max_new_tokens,
            store_dir=store_dir,
            seed=seed,
        )
    if params.kind == "openai":
        cache = Path(store_dir) / "openai-replies.jsonl" if store_dir is not None else None
        return OpenAIJudge(
            params.url,
            params.model,
            api_key_env=params.api_key_env,
            timeout_s=params.timeout_s,
            max_new_tokens=params.max_new_tokens,
            cache_path=cache,
        )
    raise JudgeError(f"unknown judge kind {params.kind!r}; use self, local or openai")


# ---- any OpenAI-compatible endpoint ------------------------------------------------------------
# A judge behind any OpenAI-compatible ``/v1/chat/completions`` endpoint, with the standard library only.
#
#     judge = OpenAIJudge("http://127.0.0.1:8000/v1", "my-judge", cache_path=run_dir / "openai-replies.jsonl")
#     replies = judge.complete(requests)  # one JudgeReply per request, in order
#
# Requests run concurrently; 429s, 5xx answers and dropped connections are retried with exponential
# back-off; anything else (a refused connection, another 4xx, a reply without text) is a
# :class:`~reflectevo.judges.JudgeError` that names the URL, the status and what to fix.
#
# The resume cache is an append-only JSONL file: one line per answered request, written and fsynced
# as soon as the answer arrives, so a killed run loses at most the requests in flight. A rerun
# answers from it whatever it finds with the same key and the same (model, messages, max_tokens). Each
# reply keeps the endpoint's ``finish_reason`` ("length": cut off at max_tokens), cached with its text.

log = logging.getLogger(__name__)

BODY_EXCERPT_CHARS = 300  # of an error answer, quoted in the JudgeError
MAX_BACKOFF_S = 30.0


class OpenAIJudge:
    """Greedy chat completions from an OpenAI-compatible endpoint (vLLM, llama.cpp, ``reflectevo serve``, ...)."""

    def __init__(
        self,
        url: str,
        model: str,
        *,
        api_key_env: str = "OPENAI_API_KEY",
        timeout_s: float = 120.0,
        max_new_tokens: int = JudgeParams().max_new_tokens,
        cache_path: str | Path | None = None,
        max_workers: int = 8,
        retries: int = 3,
        backoff_s: float = 1.0,
    ) -> None:
        parts = urllib.parse.urlsplit(url or "")
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise JudgeError(
                f"judge url {url!r} is not an http(s) URL; give the endpoint's base URL, "
                "e.g. http://127.0.0.1:8000/v1 (the part before /chat/completions)"
            )
        if not model:
            raise JudgeError("an OpenAI-compatible judge needs the model id the endpoint serves (reflect.judge.model)")
        self.url = url.rstrip("/")
        self.endpoint = f"{self.url}/chat/completions"
        self.model = model
        self.name = f"openai:{model}@{self.url}"
        self.api_key_env = api_key_env
        self.timeout_s, self.max_new_tokens = timeout_s, max_new_tokens
        self.max_workers, self.retries, self.backoff_s = max(1, max_workers), max(0, retries), backoff_s
        self.cache_path = Path(cache_path) if cache_path is not None else None
        self.served = {"cache": 0, "endpoint": 0}
        self._lock = threading.Lock()  # guards the counters and the cache file

    def describe(self) -> dict[str, Any]:
        """For the run manifest: where the judge is, and how many answers came from the cache."""
        return {
            "judge": self.name,
            "url": self.url,
            "model": self.model,
            "max_new_tokens": self.max_new_tokens,
            "cache_path": str(self.cache_path) if self.cache_path else None,
            "from_cache": self.served["cache"],
            "from_endpoint": self.served["endpoint"],
        }

    def complete(self, requests: Sequence[GenerationRequest]) -> list[JudgeReply]:
        """One reply per request, in request order; the first request that fails stops the rest."""
        requests = check_requests(requests)
        cached = self._read_cache()
        answers: dict[str, tuple[str, str | None]] = {}  # key -> (text, finish reason)
        missing = []
        for request in requests:
            entry = cached.get(request.key)
            if entry is not None and entry[0] == self._fingerprint(request.messages):
                answers[request.key] = entry[1:]
            else:
                missing.append(request)
        self.served["cache"] += len(answers)
        if missing:
            with ThreadPoolExecutor(max_workers=min(self.max_workers, len(missing))) as pool:
                futures = [pool.submit(self._answer, request) for request in missing]
                try:
                    for request, future in zip(missing, futures):
                        answers[request.key] = future.result()
                except BaseException:
                    # answers still in flight are cached when they arrive; the rest are not sent
                    pool.shutdown(cancel_futures=True)
                    raise
        return [
            JudgeReply(r.key, answers[r.key][0], self._prompt(r.messages), self.name, answers[r.key][1])
            for r in requests
        ]

    # ---- one request ---------------------------------------------------------------------------
    def _prompt(self, messages: list[dict[str, Any]]) -> str:
        return json.dumps(messages, ensure_ascii=False)

    def _fingerprint(self, messages: list[dict[str, Any]]) -> str:
        identity = json.dumps([self.model, messages, self.max_new_tokens], ensure_ascii=False, sort_keys=True)
        return hashlib.sha256(identity.encode("utf-8")).hexdigest()

    def _answer(self, request: GenerationRequest) -> tuple[str, str | None]:
        """(text, finish reason) of one request, cached as soon as it arrives."""
        body = {
            "model": self.model,
            "messages": request.messages,
            "temperature": 0,
            "max_tokens": self.max_new_tokens,
            "n": 1,
        }
        reply = self._post(json.dumps(body, ensure_ascii=False).encode("utf-8"))
        text = _content(reply)
        if text is None:
            raise JudgeError(
                f"{self.endpoint} answered without choices[0].message.content: "
                f"{_excerpt(json.dumps(reply, ensure_ascii=False))}; is it an OpenAI-compatible chat endpoint?"
            )
        finish_reason = _finish_reason(reply)
        with self._lock:
            self.served["endpoint"] += 1
            self._append_cache(request.key, self._fingerprint(request.messages), text, finish_reason)
        return text, finish_reason

    def _post(self, data: bytes) -> Any:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        key = os.environ.get(self.api_key_env) if self.api_key_env else None
        if key:
            headers["Authorization"] = f"Bearer {key}"
        for attempt in range(self.retries + 1):
            retry_after = None
            try:
                with urllib.request.urlopen(
                    urllib.request.Request(self.endpoint, data=data, headers=headers, method="POST"),
                    timeout=self.timeout_s,
                ) as response:
                    raw = response.read()
                try:
                    return json.loads(raw)
                except ValueError:
                    raise JudgeError(
                        f"{self.endpoint} answered {response.status} with something that is not JSON: "
                        f"{_excerpt(raw)}; is the url the endpoint's /v1 base?"
                    ) from None
            except urllib.error.HTTPError as exc:
                excerpt = _excerpt(exc.read())
                if exc.code != 429 and exc.code < 500:
                    raise JudgeError(
                        f"{self.endpoint} answered HTTP {exc.code}: {excerpt}; "
                        f"{_fix_for_status(exc.code, self.api_key_env)}"
                    ) from None
                why = f"HTTP {exc.code}: {excerpt}"
                retry_after = _seconds(exc.headers.get("Retry-After"))
            except urllib.error.URLError as exc:  # urlopen wraps what fails while connecting and sending
                why = self._connection_trouble(exc.reason)
            except (ConnectionError, TimeoutError, http.client.IncompleteRead) as exc:  # while reading the answer
                why = self._connection_trouble(exc)
            except http.client.HTTPException as exc:
                raise JudgeError(
                    f"{self.endpoint} did not answer in HTTP ({type(exc).__name__}: {exc}); "
                    "check reflect.judge.url (scheme and port)"
                ) from None
            if attempt == self.retries:
                kept = " (the answers so far are cached)" if self.cache_path else ""
                raise JudgeError(
                    f"{self.endpoint} failed {self.retries + 1} times, last with {why}; "
                    f"the server is overloaded or failing: check its log, then rerun{kept}"
                )
            delay = min(MAX_BACKOFF_S, retry_after if retry_after is not None else self.backoff_s * 2**attempt)
            log.warning("judge request to %s failed (%s); retrying in %.1f s", self.endpoint, why, delay)
            time.sleep(delay)
        raise AssertionError("unreachable")

    def _connection_trouble(self, reason: Any) -> str:
        """Why a connection failed, when retrying may help; a JudgeError when it will not."""
        if isinstance(reason, ConnectionRefusedError):
            raise JudgeError(
                f"{self.endpoint}: connection refused; is the server running and the url right? "
                "(serve a local model with `reflectevo serve MODEL`)"
            )
        if isinstance(reason, TimeoutError):
            raise JudgeError(
                f"{self.endpoint}: no answer within {self.timeout_s:g} s; "
                "raise reflect.judge.timeout_s or lower max_new_tokens"
            )
        if isinstance(reason, (ConnectionError, http.client.IncompleteRead)):  # reset, aborted, broken pipe
            return f"connection dropped ({type(reason).__name__}: {reason})"
        raise JudgeError(f"{self.endpoint}: cannot connect ({reason}); check reflect.judge.url")

    # ---- the resume cache ------------------------------------------------------------------------
    def _read_cache(self) -> dict[str, tuple[str, str, str | None]]:
        """key -> (fingerprint, text, finish reason); the last line of a key wins (a line written before
        finish reasons were kept has None). A torn last line is cut off."""
        if self.cache_path is None or not self.cache_path.is_file():
            return {}
        raw = self.cache_path.read_bytes()
        complete_end = raw.rfind(b"\n") + 1
        if complete_end < len(raw):  # a write killed half-way; cut it so the next append starts a clean line
            log.warning("%s: ignoring a torn last line (%d bytes)", self.cache_path, len(raw) - complete_end)
            with open(self.cache_path, "r+b") as handle:
                handle.truncate(complete_end)
        entries = {}
        for number, line in enumerate(raw[:complete_end].decode("utf-8", errors="replace").splitlines(), 1):
            try:
                row = json.loads(line)
                finish_reason = row.get("finish_reason")
                entries[str(row["key"])] = (
                    str(row["sha256"]),
                    str(row["text"]),
                    None if finish_reason is None else str(finish_reason),
                )
            except (ValueError, KeyError, TypeError):
                log.warning("%s:%d: ignoring a damaged cache line", self.cache_path, number)
        return entries

    def _append_cache(self, key: str, fingerprint: str, text: str, finish_reason: str | None) -> None:
        if self.cache_path is None:
            return
        self.cache_path.parent.mkdir(parents=True, exist_ok=True)
        line = (
            json.dumps(
                {"key": key, "sha256": fingerprint, "text": text, "finish_reason": finish_reason}, ensure_ascii=False
            )
            + "\n"
        )
        with open(self.cache_path, "a", encoding="utf-8") as handle:
            handle.write(line)
            handle.flush()
            os.fsync(handle.fileno())


def _content(reply: Any) -> str | None:
    """choices[0].message.content of a chat completion, None when the reply has no such string."""
    try:
        content = reply["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        return None
    return content if isinstance(content, str) else None


def _finish_reason(reply: Any) -> str | None:
    """choices[0].finish_reason of a chat completion ("stop", "length", ...), None when it gives none."""
    try:
        reason = reply["choices"][0].get("finish_reason")
    except (KeyError, IndexError, TypeError, AttributeError):
        return None
    return reason if isinstance(reason, str) else None


def _excerpt(body: bytes | str) -> str:
    text = body.decode("utf-8", errors="replace") if isinstance(body, bytes) else body
    text = " ".join(text.split())
    return repr(text[:BODY_EXCERPT_CHARS] + ("..." if len(text) > BODY_EXCERPT_CHARS else ""))


def _fix_for_status(status: int, api_key_env: str) -> str:
    if status in (401, 403):
        return f"set the API key in ${api_key_env} (reflect.judge.api_key_env names the variable)"
    if status == 404:
        return "check reflect.judge.url (the base ending in /v1) and reflect.judge.model (an id from GET /v1/models)"
    return "the endpoint rejected the request; check reflect.judge.model and max_new_tokens against what it serves"


def _seconds(value: str | None) -> float | None:
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None
