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
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from reflectevo.config import JudgeParams, ModelParams
from reflectevo.errors import ReflectEvoError
from reflectevo.generation import GenerationRequest, GenerationSettings


class JudgeError(ReflectEvoError):
    """A judge cannot be built or did not answer; the message says what to change."""


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

    def __init__(self, engine: Any, *, name: str = "self", max_new_tokens: int = JudgeParams().max_new_tokens,
                 store_dir: str | Path | None = None, seed: int = 0) -> None:
        self.engine, self.name, self.store_dir, self.seed = engine, name, store_dir, seed
        self.settings = GenerationSettings(n=1, temperature=0.0, max_new_tokens=max_new_tokens, seed=seed)

    def describe(self) -> dict[str, Any]:
        engine = self.engine.describe() if hasattr(self.engine, "describe") else {"engine": getattr(self.engine, "name", "?")}
        return {"judge": self.name, "settings": self.settings.to_dict(), "engine": engine}

    def complete(self, requests: Sequence[GenerationRequest]) -> list[JudgeReply]:
        if not requests:
            return []
        outputs = self.engine.generate(list(requests), self.settings, stage="judge", store_dir=self.store_dir)
        return [JudgeReply(output.key, output.text, output.prompt, self.name, output.finish_reason) for output in outputs]


def make_judge(params: JudgeParams, *, engine: Any = None, model_params: ModelParams | None = None,
               store_dir: str | Path | None = None, seed: int = 0, progress: bool = True) -> Judge:
    """The judge ``reflect.judge`` asks for. ``self`` reuses ``engine``; ``local`` loads ``params.model``
    with the main model's dtype and device (``model_params``); ``openai`` talks to ``params.url``."""
    if params.kind == "self":
        if engine is None:
            raise JudgeError("judge kind 'self' needs the generation engine of the reflecting model")
        return EngineJudge(engine, name="self", max_new_tokens=params.max_new_tokens, store_dir=store_dir, seed=seed)
    if params.kind == "local":
        from reflectevo.config import GenerationParams
        from reflectevo.generation import make_engine
        from reflectevo.models import load_model

        base = model_params or ModelParams()
        judge_model = load_model(base.model_copy(update={"name": params.model, "adapter": None, "revision": None}))
        judge_engine = make_engine(GenerationParams(engine="transformers"), judge_model, progress=progress)
        return EngineJudge(judge_engine, name=f"local:{params.model}", max_new_tokens=params.max_new_tokens,
                           store_dir=store_dir, seed=seed)
    if params.kind == "openai":
        from reflectevo.openai_judge import OpenAIJudge

        cache = Path(store_dir) / "openai-replies.jsonl" if store_dir is not None else None
        return OpenAIJudge(params.url, params.model, api_key_env=params.api_key_env, timeout_s=params.timeout_s,
                           max_new_tokens=params.max_new_tokens, cache_path=cache)
    raise JudgeError(f"unknown judge kind {params.kind!r}; use self, local or openai")
