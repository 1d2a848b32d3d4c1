"""What is asked of an engine and what comes back: settings, requests, outputs, chat rendering."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from reflectevo.config import GenerationParams
from reflectevo.errors import DuplicateKeyError, GenerationError, SettingsError

_PARAMS = GenerationParams()  # the one source of the sampling defaults below
FinishReason = Literal["eos", "stop", "length"]


# ---- data types --------------------------------------------------------------------------------
@dataclass(frozen=True)
class GenerationSettings:
    """How to sample: the same settings are recorded with every output they produced."""

    n: int = 1  # samples per prompt
    temperature: float = _PARAMS.temperature  # 0 = greedy
    top_p: float = _PARAMS.top_p
    top_k: int = _PARAMS.top_k  # 0 = off
    max_new_tokens: int = _PARAMS.max_new_tokens
    min_new_tokens: int = 0  # benchmarks set it to max_new_tokens: random models never stop by themselves
    stop: tuple[str, ...] = ()  # generation ends at the first of these; the text excludes it
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop", tuple(self.stop))  # a list from YAML or JSON is fine too
        problems = []
        if not isinstance(self.n, int) or self.n < 1:
            problems.append(f"n must be a positive integer, got {self.n!r}")
        if self.temperature < 0:
            problems.append(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.n > 1 and self.temperature == 0:
            problems.append(f"n={self.n} samples need temperature > 0 (greedy samples are all identical)")
        if not 0 < self.top_p <= 1:
            problems.append(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            problems.append(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if self.max_new_tokens < 1:
            problems.append(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            problems.append(
                f"min_new_tokens must be between 0 and max_new_tokens ({self.max_new_tokens}), got {self.min_new_tokens}"
            )
        if any(not isinstance(text, str) or not text for text in self.stop):
            problems.append(f"stop strings must be non-empty strings, got {list(self.stop)!r}")
        if not isinstance(self.seed, int) or self.seed < 0:
            problems.append(f"seed must be a non-negative integer, got {self.seed!r}")
        if problems:
            raise SettingsError("invalid generation settings: " + "; ".join(problems))

    @classmethod
    def from_params(cls, params: GenerationParams, **overrides: Any) -> GenerationSettings:
        """Settings from the ``generation`` params section; a stage overrides what it owns (n, stop, ...)."""
        base = {
            "temperature": params.temperature,
            "top_p": params.top_p,
            "top_k": params.top_k,
            "max_new_tokens": params.max_new_tokens,
        }
        return cls(**{**base, **overrides})

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "stop": list(self.stop)}


@dataclass(frozen=True)
class GenerationRequest:
    key: str  # the record key, unique within one generate call
    messages: list[dict[str, Any]]  # chat messages; the engine applies the model's chat template


@dataclass
class GenerationOutput:
    key: str
    sample: int  # 0 .. n-1
    text: str  # stop string excluded
    finish_reason: FinishReason
    prompt: str  # exactly what the model saw, after the chat template
    settings: dict[str, Any]
    prompt_tokens: int
    new_tokens: int
    engine: str
    batch: int  # the plan batch that produced it (-1 for scripted replay rows)
    stage: str = ""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, row: dict[str, Any]) -> GenerationOutput:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{name: value for name, value in row.items() if name in names})


def render_chat(tokenizer: Any, messages: list[dict[str, Any]]) -> str:
    """The prompt string of ``messages`` under the model's chat template. A last assistant message is a
    prefix the model continues (the paper's two-call attempt pre-fills "Thought: " and "Action: ")."""
    if messages and messages[-1].get("role") == "assistant":
        return tokenizer.apply_chat_template(messages, tokenize=False, continue_final_message=True)
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def check_requests(requests: Sequence[GenerationRequest]) -> list[GenerationRequest]:
    seen: set[str] = set()
    duplicates = []
    for request in requests:
        if not isinstance(request.key, str) or not request.key:
            raise GenerationError(f"a request key must be a non-empty string, got {request.key!r}")
        if request.key in seen:
            duplicates.append(request.key)
        seen.add(request.key)
    if duplicates:
        raise DuplicateKeyError(
            f"{len(duplicates)} duplicate request key(s), e.g. {duplicates[:3]}; record keys must be unique"
        )
    return list(requests)
