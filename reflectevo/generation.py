"""Text generation behind one interface, with batching, resume, sharding and OOM back-off.

    engine = make_engine(params.generation, loaded_model)
    settings = GenerationSettings(n=1, max_new_tokens=256, stop=ATTEMPT_STOP, seed=params.run.seed)
    requests = [GenerationRequest(key, attempt_messages(task, item)) for key, item in ...]
    outputs = engine.generate(requests, settings, stage="first_trial", store_dir=run_dir / "gen")

Engines: ``transformers`` (the default: batched ``model.generate``), ``unsloth`` (the same loop after
Unsloth's inference switch), ``replay`` (stored outputs served by record key, for re-grading old
runs and for scripted outputs in tests) and ``vllm`` (optional extra, GPU only).

Determinism. The requests of a call are planned into batches that depend only on the record keys,
the prompt token lengths and the batch size (never on free memory). Each batch reseeds the sampler
from (seed, stage, its first record key), so a batch's outputs do not depend on which batches ran
before it. That makes three things give the same bytes as one uninterrupted run: resuming a killed
run (each finished batch is committed atomically to ``store_dir`` and skipped on rerun), running
whole-batch shards separately and merging them (:func:`merge_shards`), and running batch by batch.
It is also what makes data-parallel generation exact (:meth:`BatchedEngine.data_parallel`, used by
``accelerate launch -m reflectevo generate``): every process plans the same batches, generates its
share into one store folder, then reads all of them back.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import socket
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

from reflectevo.config import GenerationParams, ModelParams
from reflectevo.errors import DataError, ReflectEvoError
from reflectevo.jsonl import read_jsonl, write_jsonl_atomic

log = logging.getLogger(__name__)

_PARAMS = GenerationParams()  # the one source of the sampling defaults below
CPU_BATCH_SIZE = 16  # batch_size "auto" on CPU: larger batches stop paying off on a few cores
AUTO_MAX_BATCH = 512  # batch_size "auto" on a GPU plans this many sequences per batch (at most)
AUTO_MEMORY_FRACTION = 0.8  # share of free GPU memory that "auto" plans to fill
DEFAULT_MAX_SEQ_LENGTH = ModelParams().max_seq_length  # sizes "auto" when the model states none
PLAN_FILE = "plan.json"
PLAN_FIELDS = {"plan_sha256": "set of record keys or prompts", "num_batches": "number of batches",
               "prompts_per_batch": "batch size"}  # plan.json fields, as the mismatch error names them
BATCH_FILE = re.compile(r"batch-(\d{5})-([0-9a-f]{12})\.jsonl")
BATCH_TEMP_FILE = re.compile(r"\.batch-(\d{5})-[0-9a-f]{12}\.jsonl\..*\.tmp")  # write_jsonl_atomic's temp name
SHARD_LEDGER = "shard-{index}-of-{count}.json"  # which batches one shard generated and resumed, last pass
FinishReason = Literal["eos", "stop", "length"]


class GenerationError(ReflectEvoError):
    """Generation cannot start or go on; the message says what to change."""


class SettingsError(GenerationError, ValueError):
    """Impossible generation settings."""


class DuplicateKeyError(GenerationError, ValueError):
    """Two requests share a record key."""


class StoreMismatchError(GenerationError):
    """The store folder holds outputs of a different plan (other params, prompts or seed)."""


class ReplayMissingError(GenerationError, LookupError):
    """A replay engine was asked for a record key it has no stored output for."""


class ReplayRowError(GenerationError, DataError):
    """A replay row that is not a stored output (the message names ``file:line`` or the row number)."""


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
            problems.append(f"min_new_tokens must be between 0 and max_new_tokens ({self.max_new_tokens}), got {self.min_new_tokens}")
        if any(not isinstance(text, str) or not text for text in self.stop):
            problems.append(f"stop strings must be non-empty strings, got {list(self.stop)!r}")
        if not isinstance(self.seed, int) or self.seed < 0:
            problems.append(f"seed must be a non-negative integer, got {self.seed!r}")
        if problems:
            raise SettingsError("invalid generation settings: " + "; ".join(problems))

    @classmethod
    def from_params(cls, params: GenerationParams, **overrides: Any) -> GenerationSettings:
        """Settings from the ``generation`` params section; a stage overrides what it owns (n, stop, ...)."""
        base = {"temperature": params.temperature, "top_p": params.top_p, "top_k": params.top_k,
                "max_new_tokens": params.max_new_tokens}
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


@dataclass(frozen=True)
class Batch:
    """One unit of the plan: generated together, seeded together, committed together."""

    index: int
    keys: tuple[str, ...]
    prompts: tuple[str, ...]
    token_ids: tuple[tuple[int, ...], ...]

    @property
    def file_name(self) -> str:
        digest = hashlib.sha256("\x1f".join(self.keys).encode("utf-8")).hexdigest()[:12]
        return f"batch-{self.index:05d}-{digest}.jsonl"


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
        raise DuplicateKeyError(f"{len(duplicates)} duplicate request key(s), e.g. {duplicates[:3]}; record keys must be unique")
    return list(requests)


def batch_seed(seed: int, stage: str, first_key: str) -> int:
    """The 64-bit sampler seed of a batch: a function of the run seed, the stage and the batch's first key."""
    digest = hashlib.sha256(f"{seed}\x1f{stage}\x1f{first_key}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


def plan_batches(keys: Sequence[str], prompts: Sequence[str], token_ids: Sequence[Sequence[int]], prompts_per_batch: int) -> list[Batch]:
    """Longest prompts first (an out-of-memory error shows at once), ties by key; then fixed-size chunks."""
    order = sorted(range(len(keys)), key=lambda i: (-len(token_ids[i]), keys[i]))
    batches = []
    for start in range(0, len(order), prompts_per_batch):
        chunk = order[start:start + prompts_per_batch]
        batches.append(Batch(len(batches), tuple(keys[i] for i in chunk), tuple(prompts[i] for i in chunk),
                             tuple(tuple(token_ids[i]) for i in chunk)))
    return batches


# ---- engines -----------------------------------------------------------------------------------
class Engine(Protocol):
    name: str
    events: list[dict[str, Any]]  # back-offs and batch-size decisions, for the run manifest

    def generate(self, requests: Sequence[GenerationRequest], settings: GenerationSettings, *, stage: str,
                 store_dir: str | Path | None = None, seed: int | None = None, force: bool = False) -> list[GenerationOutput]:
        """Outputs in request order, each request's samples in order. ``seed`` overrides ``settings.seed``."""
        ...


class BatchedEngine:
    """The plan / store / shard / seed loop shared by the model-backed engines.

    A subclass renders prompts and token ids (:meth:`render`, :meth:`tokenize`) and generates one
    batch (:meth:`run_batch`); this class decides what runs, in which order, and what is kept.
    """

    name = "batched"
    batch_size_how = "fixed"  # how the batch size was chosen, for the manifest

    def __init__(self, *, batch_size: int | Literal["auto"] = _PARAMS.batch_size, num_shards: int = 1,
                 shard_index: int = 0, model_name: str = "", progress: bool = True) -> None:
        if not 0 <= shard_index < num_shards:
            raise GenerationError(f"shard_index {shard_index} must be below num_shards {num_shards}")
        if batch_size == "auto" and num_shards > 1:
            # each shard would size "auto" from its own free memory and plan different batches
            raise GenerationError("sharded generation needs an explicit batch_size, so every shard plans the same batches")
        self.num_shards, self.shard_index = num_shards, shard_index
        self.barrier: Callable[[], None] | None = None  # set by data_parallel(): waits for every process
        self.model_name = model_name
        self.progress = progress
        self.events: list[dict[str, Any]] = []
        self.stats: dict[str, dict[str, float]] = {}  # per stage: seconds, new tokens, batches run and resumed
        self.requested_batch_size = batch_size
        self.batch_size = self.auto_batch_size() if batch_size == "auto" else int(batch_size)  # sequences per batch
        if batch_size == "auto":
            self.events.append({"event": "batch_size_auto", "batch_size": self.batch_size, "how": self.batch_size_how})

    def auto_batch_size(self) -> int:
        self.batch_size_how = "CPU default"
        return CPU_BATCH_SIZE

    def data_parallel(self, rank: int, world_size: int, barrier: Callable[[], None]) -> None:
        """Generate as process ``rank`` of ``world_size`` (``accelerate launch``, ``torchrun``).

        Each :meth:`generate` call then generates this process's share of the plan (the batches whose
        index % world_size == rank) into its store folder, waits at ``barrier`` until every process
        has committed its share, and reads every batch back: all processes return the same, whole
        outputs, so the next, dependent step plans the same requests everywhere. The store folder
        must be one every process sees (a shared file system when the processes span machines).
        """
        if self.requested_batch_size == "auto":
            raise GenerationError(f"{world_size} processes must plan the same batches, and batch_size 'auto' depends on "
                                  "each process's free memory: set generation.batch_size to a number")
        if self.barrier is None and self.num_shards > 1:
            raise GenerationError("generation.num_shards splits a stage by hand; under a distributed launch the "
                                  "processes split it themselves: leave num_shards at 1")
        if not 0 <= rank < world_size:
            raise GenerationError(f"process rank {rank} must be below the world size {world_size}")
        self.num_shards, self.shard_index, self.barrier = world_size, rank, barrier

    # subclass hooks
    def render(self, messages: list[dict[str, Any]]) -> str:
        raise NotImplementedError

    def tokenize(self, prompts: list[str]) -> list[list[int]]:
        raise NotImplementedError

    def run_batch(self, batch: Batch, settings: GenerationSettings, stage: str) -> list[tuple[str, FinishReason, int]]:
        """(text, finish_reason, new_tokens) per prompt and sample, prompt-major."""
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        return {"engine": self.name, "model": self.model_name, "batch_size": self.batch_size,
                "batch_size_requested": self.requested_batch_size, "batch_size_how": self.batch_size_how,
                "num_shards": self.num_shards, "shard_index": self.shard_index, "events": list(self.events)}

    def generate(self, requests: Sequence[GenerationRequest], settings: GenerationSettings, *, stage: str,
                 store_dir: str | Path | None = None, seed: int | None = None, force: bool = False) -> list[GenerationOutput]:
        """Generate this shard's batches of the plan (under :meth:`data_parallel`, this process's share,
        then every process's outputs); outputs in request order.

        ``store_dir`` (one folder per stage) keeps every finished batch; a rerun skips those. A
        folder planned differently (other settings, keys, prompts, batch size) is an error unless
        ``force``, which discards it. ``seed`` overrides ``settings.seed``.
        """
        requests = check_requests(requests)
        if seed is not None:
            settings = dataclasses.replace(settings, seed=seed)
        if self.barrier is not None and store_dir is None:
            raise GenerationError(f"data-parallel generation ({stage}) needs a store folder: the processes hand their "
                                  "batches to each other through it")
        if self.barrier is not None and force:
            raise GenerationError(f"force cannot discard {store_dir} while other processes write into it: delete the "
                                  "folder first, or use a new run name")
        prompts = [self.render(request.messages) for request in requests]
        token_ids = self.tokenize(prompts)
        store = BatchStore(Path(store_dir), self.num_shards, self.shard_index, force) if store_dir is not None else None
        prompts_per_batch = max(1, self.batch_size // settings.n)
        if store is not None and self.requested_batch_size == "auto":
            # a resumed run keeps the batches it started with, whatever memory is free now
            prompts_per_batch = store.recorded_prompts_per_batch() or prompts_per_batch
        plan = plan_batches([r.key for r in requests], prompts, token_ids, prompts_per_batch)
        if store is not None:
            store.open(self._plan_record(plan, settings, stage, prompts_per_batch), plan)
        mine = [batch for batch in plan if batch.index % self.num_shards == self.shard_index]
        done = store.committed(plan, settings, stage) if store is not None else {}
        by_batch = self._run_plan(mine, done, settings, stage, store)
        if store is not None and self.num_shards > 1:
            store.write_ledger(stage, mine, done)
        if self.barrier is not None and store is not None:
            self.barrier()  # every process has committed its share: the whole plan is on disk
            by_batch, mine = store.read_plan(plan, settings, stage), plan
        position = {request.key: i for i, request in enumerate(requests)}
        outputs = [output for batch in mine for output in by_batch[batch.index]]
        return sorted(outputs, key=lambda o: (position[o.key], o.sample))

    def _plan_record(self, plan: list[Batch], settings: GenerationSettings, stage: str, prompts_per_batch: int) -> dict[str, Any]:
        digest = hashlib.sha256()
        for batch in plan:
            digest.update(json.dumps([batch.keys, batch.prompts], ensure_ascii=False).encode("utf-8"))
        return {"stage": stage, "engine": self.name, "model": self.model_name, "settings": settings.to_dict(),
                "prompts_per_batch": prompts_per_batch, "num_batches": len(plan), "plan_sha256": digest.hexdigest()}

    def _run_plan(self, mine: list[Batch], done: dict[int, list[GenerationOutput]], settings: GenerationSettings,
                  stage: str, store: BatchStore | None) -> dict[int, list[GenerationOutput]]:
        from tqdm.auto import tqdm

        stats = self.stats.setdefault(stage, {"seconds": 0.0, "new_tokens": 0, "batches_run": 0, "batches_resumed": 0})
        by_batch: dict[int, list[GenerationOutput]] = {}
        bar = tqdm(total=sum(len(b.keys) for b in mine) * settings.n, desc=f"generate {stage}", unit="seq",
                   disable=not self.progress, dynamic_ncols=True)
        try:
            for batch in mine:
                if batch.index in done:
                    by_batch[batch.index] = done[batch.index]
                    stats["batches_resumed"] += 1
                    bar.update(len(done[batch.index]))
                    continue
                started = time.perf_counter()
                samples = self.run_batch(batch, settings, stage)
                stats["seconds"] += time.perf_counter() - started
                outputs = [
                    GenerationOutput(key=batch.keys[i // settings.n], sample=i % settings.n, text=text,
                                     finish_reason=finish, prompt=batch.prompts[i // settings.n],
                                     settings=settings.to_dict(), prompt_tokens=len(batch.token_ids[i // settings.n]),
                                     new_tokens=new_tokens, engine=self.name, batch=batch.index, stage=stage)
                    for i, (text, finish, new_tokens) in enumerate(samples)
                ]
                if store is not None:
                    store.commit(batch, outputs)
                by_batch[batch.index] = outputs
                stats["new_tokens"] += sum(o.new_tokens for o in outputs)
                stats["batches_run"] += 1
                bar.update(len(outputs))
                bar.set_postfix(tok_s=f"{stats['new_tokens'] / max(stats['seconds'], 1e-9):.0f}")
        finally:
            bar.close()
        return by_batch


@dataclass(frozen=True)
class MemoryBudget:
    """What batch_size "auto" measured on the GPU: bytes it may fill and what one token costs."""

    bytes: float
    kv_per_token: int
    activations_per_token: int
    per_row: int  # last-token logits and their softmax, float32


class TransformersEngine(BatchedEngine):
    """Batched, left-padded ``model.generate`` with per-sequence stops and CUDA out-of-memory back-off."""

    name = "transformers"

    def __init__(self, model: Any, tokenizer: Any, *, max_seq_length: int | None = None, **options: Any) -> None:
        self.model, self.tokenizer = model, tokenizer
        if getattr(tokenizer, "chat_template", None) is None:
            raise GenerationError("the tokenizer has no chat template; set model.chat_template in the params")
        configured = getattr(model.config, "max_position_embeddings", None) or DEFAULT_MAX_SEQ_LENGTH
        self.max_seq_length = min(max_seq_length or DEFAULT_MAX_SEQ_LENGTH, configured)
        eos = model.generation_config.eos_token_id
        eos = tokenizer.eos_token_id if eos is None else eos
        self.eos_ids = set(eos) if isinstance(eos, (list, tuple)) else {eos}
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(self.eos_ids)
        self.chunk_size: int | None = None  # sequences per generate call once an OOM forced it down
        self.memory_budget: MemoryBudget | None = None  # set by batch_size "auto" on a GPU
        # n samples of one prompt share one prefill: the prompt is encoded once and its KV cache
        # copied n times, instead of generate() encoding n copies of the prompt
        self.shared_prefill = True
        # callables (token_ids of a chunk, settings) -> a transformers LogitsProcessor, added to
        # every generate call (the benchmarks impose output lengths on random-weight models this way)
        self.processor_factories: list[Callable[[Sequence[Sequence[int]], GenerationSettings], Any]] = []
        super().__init__(**options)

    @classmethod
    def from_loaded(cls, loaded: Any, params: GenerationParams, *, progress: bool = True) -> TransformersEngine:
        return cls(loaded.model, loaded.tokenizer, model_name=loaded.name, batch_size=params.batch_size,
                   num_shards=params.num_shards, shard_index=params.shard_index, progress=progress,
                   max_seq_length=(loaded.info or {}).get("max_seq_length"))

    def auto_batch_size(self) -> int:
        import torch

        if not torch.cuda.is_available() or self.model.device.type != "cuda":
            self.batch_size_how = "CPU default"
            return CPU_BATCH_SIZE
        # KV cache of a full-length sequence plus the prefill activations and last-token logits
        config = self.model.config.get_text_config()
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        dtype_bytes = next(self.model.parameters()).element_size()
        kv_per_token = 2 * config.num_hidden_layers * kv_heads * head_dim * dtype_bytes
        activations_per_token = (3 * config.intermediate_size + 4 * config.hidden_size) * dtype_bytes
        free, _total = torch.cuda.mem_get_info(self.model.device)
        # Batches are planned AUTO_MAX_BATCH sequences wide; run_batch then cuts each one into calls
        # that fit this budget at that batch's own lengths (prompts are sorted longest first, so
        # short prompts run in wide calls instead of all calls being sized for the longest one).
        self.memory_budget = MemoryBudget(free * AUTO_MEMORY_FRACTION, kv_per_token, activations_per_token, 2 * 4 * config.vocab_size)
        self.batch_size_how = (f"{free / 2**30:.1f} GiB free x {AUTO_MEMORY_FRACTION}, {AUTO_MAX_BATCH} sequences planned per "
                               f"batch, each generate call cut to the rows whose KV cache fits at the batch's lengths")
        return AUTO_MAX_BATCH

    def rows_that_fit(self, prompt_tokens: int, settings: GenerationSettings) -> int:
        """Prompts per generate call that the memory budget allows (each with its n samples)."""
        budget = self.memory_budget
        if budget is None:
            return 1 << 30
        # KV cache of the full sequence, one prefill layer's activations, the last-token logits
        per_row = (prompt_tokens + settings.max_new_tokens) * budget.kv_per_token + prompt_tokens * budget.activations_per_token / settings.n + budget.per_row
        return max(1, int(budget.bytes // (per_row * settings.n)))

    def render(self, messages: list[dict[str, Any]]) -> str:
        return render_chat(self.tokenizer, messages)

    def tokenize(self, prompts: list[str]) -> list[list[int]]:
        # the chat template already holds any BOS the model wants
        token_ids = self.tokenizer(prompts, add_special_tokens=False)["input_ids"] if prompts else []
        too_long = sum(len(ids) >= self.max_seq_length for ids in token_ids)
        if too_long:  # the model still runs, but past its context its text is not worth grading
            log.warning("%d of %d prompts are as long as the %d-token context or longer", too_long, len(prompts), self.max_seq_length)
        return token_ids

    def run_batch(self, batch: Batch, settings: GenerationSettings, stage: str) -> list[tuple[str, FinishReason, int]]:
        import torch

        size = max(1, min(self.chunk_size or len(batch.keys), len(batch.keys)))
        fits = self.rows_that_fit(len(batch.token_ids[0]), settings)
        if fits < size:
            # calls cut to the free memory: sampled outputs depend on it, so the cut is recorded
            size = fits
            self.events.append({"event": "memory_cut", "stage": stage, "batch": batch.index, "sequences_per_call": size * settings.n})
        while True:
            try:
                samples = []
                for start in range(0, len(batch.keys), size):
                    # every chunk reseeds, so a batch's samples do not depend on what ran before it
                    torch.manual_seed(batch_seed(settings.seed, stage, batch.keys[start]))
                    samples.extend(self.generate_chunk(batch.token_ids[start:start + size], settings))
                return samples
            except torch.cuda.OutOfMemoryError:
                if size == 1:
                    raise
                new_size = max(1, size // 2)
                self.events.append({"event": "oom_backoff", "stage": stage, "batch": batch.index,
                                    "old_size": size * settings.n, "new_size": new_size * settings.n})
                log.warning("out of GPU memory in %s batch %d: retrying with %d sequences per call instead of %d",
                            stage, batch.index, new_size * settings.n, size * settings.n)
                self.chunk_size = size = new_size  # later batches start at the size that fit
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()

    def generate_chunk(self, token_ids: Sequence[Sequence[int]], settings: GenerationSettings) -> list[tuple[str, FinishReason, int]]:
        import torch

        width = max(len(ids) for ids in token_ids)
        input_ids = torch.tensor([[self.pad_id] * (width - len(ids)) + list(ids) for ids in token_ids])
        attention = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in token_ids])
        sampling = {"do_sample": True, "temperature": settings.temperature, "top_p": settings.top_p,
                    "top_k": settings.top_k} if settings.temperature > 0 else {"do_sample": False}
        stops = {"stop_strings": list(settings.stop), "tokenizer": self.tokenizer} if settings.stop else {}
        extra: dict[str, Any] = {}
        if self.processor_factories:
            from transformers import LogitsProcessorList

            extra["logits_processor"] = LogitsProcessorList([make(token_ids, settings) for make in self.processor_factories])
        was_training = self.model.training
        self.model.eval()  # dropout off: a model fresh from training is still in train mode
        try:
            with torch.inference_mode():
                input_ids, attention = input_ids.to(self.model.device), attention.to(self.model.device)
                repeats = settings.n
                if settings.n > 1 and self.shared_prefill and width > 1:
                    extra["past_key_values"] = self.prefill(input_ids, attention, settings.n)
                    input_ids, attention = input_ids.repeat_interleave(settings.n, 0), attention.repeat_interleave(settings.n, 0)
                    repeats = 1
                generated = self.model.generate(
                    input_ids=input_ids, attention_mask=attention,
                    max_new_tokens=settings.max_new_tokens, min_new_tokens=settings.min_new_tokens or None,
                    num_return_sequences=repeats, pad_token_id=self.pad_id, eos_token_id=sorted(self.eos_ids),
                    **sampling, **stops, **extra)
        finally:
            self.model.train(was_training)
        return [self.finish(row, settings.stop) for row in generated[:, width:].tolist()]

    def prefill(self, input_ids: Any, attention: Any, n: int) -> Any:
        """The KV cache of every prompt but its last token, computed once and repeated ``n`` times
        (prompt-major, as ``num_return_sequences`` orders rows). ``generate`` then feeds only the last
        prompt token, so its first sampling step sees the same logits it would have computed itself."""
        from transformers import DynamicCache

        # left padding: positions count real tokens only, as generate() derives them from the mask
        positions = attention.long().cumsum(-1) - 1
        positions.masked_fill_(attention == 0, 1)
        cache = DynamicCache(config=self.model.config)
        self.model(input_ids=input_ids[:, :-1], attention_mask=attention[:, :-1], position_ids=positions[:, :-1],
                   past_key_values=cache, use_cache=True, logits_to_keep=1)
        cache.batch_repeat_interleave(n)
        return cache

    def finish(self, new_ids: list[int], stop: tuple[str, ...]) -> tuple[str, FinishReason, int]:
        """The text of one generated row, why it ended and how many tokens it took."""
        reason: FinishReason = "length"
        end = next((i for i, token in enumerate(new_ids) if token in self.eos_ids), None)
        if end is not None:
            new_ids, reason = new_ids[:end], "eos"
            count = end + 1
        else:
            while new_ids and new_ids[-1] == self.pad_id:  # padding after a stop string ended the row early
                new_ids = new_ids[:-1]
            count = len(new_ids)
        text = self.tokenizer.decode(new_ids, skip_special_tokens=True)
        cut = min((position for position in (text.find(s) for s in stop) if position >= 0), default=None)
        if cut is not None:
            text, reason = text[:cut], "stop"
        return text, reason, count


class UnslothEngine(TransformersEngine):
    """Unsloth's inference path: ``FastLanguageModel.for_inference`` once, then the same batched loop."""

    name = "unsloth"

    def __init__(self, loaded: Any, params: GenerationParams, *, progress: bool = True) -> None:
        if loaded.backend != "unsloth":
            raise GenerationError(f"engine 'unsloth' needs a model loaded through Unsloth (model.backend: unsloth), "
                                  f"but {loaded.name} was loaded with {loaded.backend!r}; use engine: transformers")
        from unsloth import FastLanguageModel

        FastLanguageModel.for_inference(loaded.model)
        super().__init__(loaded.model, loaded.tokenizer, model_name=loaded.name, batch_size=params.batch_size,
                         num_shards=params.num_shards, shard_index=params.shard_index, progress=progress,
                         max_seq_length=(loaded.info or {}).get("max_seq_length"))
        self.shared_prefill = False  # Unsloth's patched forward keeps its own cache; let it prefill


class VLLMEngine(BatchedEngine):
    """vLLM's offline ``LLM.generate`` behind the same plan and store (optional extra, needs a GPU).

    vLLM batches internally; the plan's batches are only the units that are seeded and committed.
    Each prompt gets its own sampling seed from (seed, stage, key), as vLLM supports per-request seeds.
    ``tensor_parallel_size`` splits the one model over that many GPUs of this machine (vLLM starts
    its own worker per GPU), which is how vLLM uses several GPUs from a single process.
    """

    name = "vllm"

    def __init__(self, model: str, *, gpu_memory_utilization: float = _PARAMS.vllm_gpu_memory_utilization,
                 tensor_parallel_size: int = _PARAMS.vllm_tensor_parallel_size, max_model_len: int | None = None,
                 dtype: str = "auto", **options: Any) -> None:
        try:
            import vllm
        except ImportError:
            raise GenerationError("engine 'vllm' needs the vllm package: pip install 'reflectevo[vllm]' (GPU only)") from None
        self._vllm = vllm
        self.llm = vllm.LLM(model=model, gpu_memory_utilization=gpu_memory_utilization, tensor_parallel_size=tensor_parallel_size,
                            max_model_len=max_model_len, dtype=dtype)
        self.tokenizer = self.llm.get_tokenizer()
        super().__init__(model_name=model, **options)

    def auto_batch_size(self) -> int:
        self.batch_size_how = "vLLM schedules sequences itself; auto commits every AUTO_MAX_BATCH prompts"
        return AUTO_MAX_BATCH

    def render(self, messages: list[dict[str, Any]]) -> str:
        return render_chat(self.tokenizer, messages)

    def tokenize(self, prompts: list[str]) -> list[list[int]]:
        return self.tokenizer(prompts, add_special_tokens=False)["input_ids"] if prompts else []

    def run_batch(self, batch: Batch, settings: GenerationSettings, stage: str) -> list[tuple[str, FinishReason, int]]:
        sampling = [
            self._vllm.SamplingParams(n=settings.n, temperature=settings.temperature, top_p=settings.top_p,
                                      top_k=settings.top_k or -1, max_tokens=settings.max_new_tokens,
                                      min_tokens=settings.min_new_tokens, stop=list(settings.stop),
                                      seed=batch_seed(settings.seed, stage, key) % 2**63)
            for key in batch.keys
        ]
        prompts = [{"prompt_token_ids": list(ids)} for ids in batch.token_ids]
        results = self.llm.generate(prompts, sampling, use_tqdm=False)
        samples: list[tuple[str, FinishReason, int]] = []
        for result in results:
            for completion in result.outputs:
                reason: FinishReason = "length" if completion.finish_reason == "length" else (
                    "stop" if isinstance(completion.stop_reason, str) else "eos")
                samples.append((completion.text, reason, len(completion.token_ids)))
        return samples


class ReplayEngine:
    """Stored outputs served by record key and sample index: re-grading without a model, scripted tests.

    Rows are :class:`GenerationOutput` dicts; a scripted row needs only ``key`` and ``text`` (``sample``
    defaults to 0, ``finish_reason`` to "eos"; the rest is filled from the request and settings).
    """

    name = "replay"

    def __init__(self, rows: Iterable[dict[str, Any]], source: str = "rows") -> None:
        self.source = source
        self.events: list[dict[str, Any]] = []
        self.rows: dict[tuple[str, int], dict[str, Any]] = {}
        for number, row in enumerate(rows, start=1):
            self.add(row, f"{source} row {number}")

    def add(self, row: dict[str, Any], where: str) -> None:
        """Store one row; ``where`` names it in errors (``file:line``)."""
        if not isinstance(row, dict):
            raise ReplayRowError(f"{where}: a replay row is an object with 'key' and 'text', got {type(row).__name__}")
        if "key" not in row or "text" not in row:
            raise ReplayRowError(f"{where}: a replay row needs 'key' and 'text', got keys {sorted(row)}")
        check_replay_row(row, where)
        slot = (row["key"], row.get("sample", 0))
        if slot in self.rows:
            raise DuplicateKeyError(f"{where}: key {slot[0]!r} sample {slot[1]} is stored twice")
        self.rows[slot] = row

    @classmethod
    def from_path(cls, path: str | Path) -> ReplayEngine:
        """A JSONL file of outputs, or a store folder written by a batched engine."""
        path = Path(path)
        if path.is_dir():
            return cls((output.to_dict() for output in load_store(path)), str(path))
        engine = cls((), str(path))
        for line, row in read_jsonl(path):
            engine.add(row, f"{path}:{line}")
        return engine

    def describe(self) -> dict[str, Any]:
        return {"engine": self.name, "source": self.source, "rows": len(self.rows), "events": list(self.events)}

    def generate(self, requests: Sequence[GenerationRequest], settings: GenerationSettings, *, stage: str,
                 store_dir: str | Path | None = None, seed: int | None = None, force: bool = False) -> list[GenerationOutput]:
        requests = check_requests(requests)
        if seed is not None:
            settings = dataclasses.replace(settings, seed=seed)
        missing = [(r.key, s) for r in requests for s in range(settings.n) if (r.key, s) not in self.rows]
        if missing:
            key, sample = missing[0]
            raise ReplayMissingError(f"{self.source} has no stored output for key {key!r} sample {sample} "
                                     f"({len(missing)} missing in all); replay needs the run that produced these keys")
        outputs = []
        for request in requests:
            for sample in range(settings.n):
                row = self.rows[(request.key, sample)]
                outputs.append(GenerationOutput.from_dict({
                    "sample": sample, "finish_reason": "eos", "prompt": "", "settings": settings.to_dict(),
                    "prompt_tokens": 0, "new_tokens": 0, "engine": self.name, "batch": -1, "stage": stage,
                    **row, "key": request.key}))
        return outputs


REPLAY_FIELDS: dict[str, type] = {
    "key": str, "text": str, "sample": int, "finish_reason": str, "prompt": str, "settings": dict,
    "prompt_tokens": int, "new_tokens": int, "engine": str, "batch": int, "stage": str,
}  # the GenerationOutput fields a replay row may state


def check_replay_row(row: dict[str, Any], where: str) -> None:
    """Raise :class:`ReplayRowError` unless the fields a row states have the types of a stored output:
    a wrong one would only fail later, in grading or in the records, far from the file."""
    for name, kind in REPLAY_FIELDS.items():
        if name not in row:
            continue
        value = row[name]
        if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
            raise ReplayRowError(f"{where}: field {name!r} must be {kind.__name__}, got {type(value).__name__}")
    if not row["key"]:
        raise ReplayRowError(f"{where}: field 'key' is empty")
    if row.get("sample", 0) < 0:
        raise ReplayRowError(f"{where}: field 'sample' must be >= 0, got {row['sample']}")
    if row.get("finish_reason", "eos") not in ("eos", "stop", "length"):
        raise ReplayRowError(f"{where}: field 'finish_reason' must be eos, stop or length, got {row['finish_reason']!r}")


def make_engine(params: GenerationParams, loaded_model: Any = None, *, progress: bool = True) -> Engine:
    """The engine the ``generation`` params ask for; ``auto`` follows the backend the model loaded with."""
    if params.engine == "replay":
        return ReplayEngine.from_path(params.replay_from)
    if loaded_model is None:
        raise GenerationError(f"engine {params.engine!r} needs a loaded model (reflectevo.models.load_model)")
    engine = params.engine
    if engine == "auto":
        engine = "unsloth" if loaded_model.backend == "unsloth" else "transformers"
    if engine == "unsloth":
        return UnslothEngine(loaded_model, params, progress=progress)
    if engine == "vllm":
        # vLLM loads the weights itself, from the folder or hub id the model came from
        if getattr(loaded_model, "source", "config") == "config":
            raise GenerationError(f"engine 'vllm' needs weights on disk or on the hub; {loaded_model.name} has none")
        return VLLMEngine(str(loaded_model.source), gpu_memory_utilization=params.vllm_gpu_memory_utilization,
                          tensor_parallel_size=params.vllm_tensor_parallel_size, batch_size=params.batch_size,
                          num_shards=params.num_shards, shard_index=params.shard_index, progress=progress)
    return TransformersEngine.from_loaded(loaded_model, params, progress=progress)


# ---- the store: committed batches, resume, shards ------------------------------------------------
class BatchStore:
    """One JSONL file per finished batch plus ``plan.json``, the fingerprint every batch must match."""

    def __init__(self, folder: Path, num_shards: int, shard_index: int, force: bool) -> None:
        self.folder, self.num_shards, self.shard_index, self.force = folder, num_shards, shard_index, force

    def recorded_prompts_per_batch(self) -> int | None:
        path = self.folder / PLAN_FILE
        if self.force or not path.is_file():
            return None
        return json.loads(path.read_text(encoding="utf-8")).get("prompts_per_batch")

    def open(self, record: dict[str, Any], plan: list[Batch]) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        for temp in self.folder.iterdir():  # left by a killed writer of this shard; never results
            match = BATCH_TEMP_FILE.fullmatch(temp.name)
            if match and int(match.group(1)) % self.num_shards == self.shard_index:
                temp.unlink(missing_ok=True)
        plan_path = self.folder / PLAN_FILE
        if plan_path.is_file():
            self._check_recorded(record)
        names = {batch.file_name for batch in plan}
        strangers = [p.name for p in self.folder.iterdir() if BATCH_FILE.fullmatch(p.name) and p.name not in names]
        if strangers:
            self._mismatch(f"batch file(s) {strangers[:3]} do not belong to this plan (other keys)")
        if not plan_path.is_file() and not create_once(plan_path, json.dumps(record, ensure_ascii=False) + "\n"):
            self._check_recorded(record)  # another process of the same launch wrote it first: same plan?

    def _check_recorded(self, record: dict[str, Any]) -> None:
        recorded = json.loads((self.folder / PLAN_FILE).read_text(encoding="utf-8"))
        differing = sorted(name for name in set(record) | set(recorded) if record.get(name) != recorded.get(name))
        if differing:
            described = ", ".join(PLAN_FIELDS.get(name, name) for name in differing)
            self._mismatch(f"it was planned with a different {described}")

    def _mismatch(self, why: str) -> None:
        if not self.force:
            raise StoreMismatchError(f"{self.folder} holds generation outputs of a different plan: {why}. "
                                     "Use a new run name, or force (--force) to discard them and generate again")
        log.warning("discarding the outputs in %s: %s", self.folder, why)
        for path in self.folder.iterdir():
            if BATCH_FILE.fullmatch(path.name) or path.name == PLAN_FILE:
                path.unlink()

    def committed(self, plan: list[Batch], settings: GenerationSettings, stage: str) -> dict[int, list[GenerationOutput]]:
        """The finished batches of this shard; a damaged file is removed and its batch generated again."""
        done = {}
        for batch in plan:
            path = self.folder / batch.file_name
            if batch.index % self.num_shards != self.shard_index or not path.is_file():
                continue
            try:
                outputs = [GenerationOutput.from_dict(row) for _line, row in read_jsonl(path)]
            except (ValueError, TypeError) as exc:
                log.warning("ignoring damaged batch file %s (%s); generating it again", path, exc)
                path.unlink()
                continue
            if not self._matches(batch, outputs, settings, stage):
                why = f"{path.name} holds other keys, samples or settings than the plan's batch {batch.index}"
                if not self.force:
                    self._mismatch(why)
                log.warning("discarding %s: %s", path, why)
                path.unlink()
                continue
            done[batch.index] = outputs
        return done

    @staticmethod
    def _matches(batch: Batch, outputs: list[GenerationOutput], settings: GenerationSettings, stage: str) -> bool:
        expected = [(key, sample) for key in batch.keys for sample in range(settings.n)]
        found = [(o.key, o.sample) for o in outputs]
        return found == expected and all(o.settings == settings.to_dict() and o.stage == stage for o in outputs)

    def read_plan(self, plan: list[Batch], settings: GenerationSettings, stage: str) -> dict[int, list[GenerationOutput]]:
        """Every batch of the plan, whichever process committed it (after all of them finished their
        shares); a batch that is not there, or not whole, is an error: nothing can regenerate it now."""
        done, missing = {}, []
        for batch in plan:
            path = self.folder / batch.file_name
            if not path.is_file():
                missing.append(batch.index)
                continue
            try:
                outputs = [GenerationOutput.from_dict(row) for _line, row in read_jsonl(path)]
            except (ValueError, TypeError) as exc:
                raise GenerationError(f"{path} cannot be read ({exc}); delete it and generate again") from None
            if not self._matches(batch, outputs, settings, stage):
                raise GenerationError(f"{path} holds other keys, samples or settings than the plan's batch {batch.index}; "
                                      "were all processes started with the same params?")
            done[batch.index] = outputs
        if missing:
            raise GenerationError(
                f"{len(missing)} of the {len(plan)} {stage} batches are not in {self.folder} after every process finished "
                f"its share (e.g. batch {missing[0]}, shard {missing[0] % self.num_shards}). The processes exchange batches "
                "through this folder: run.output_dir must be on a file system that every machine of the launch shares")
        return done

    def write_ledger(self, stage: str, mine: list[Batch], done: dict[int, list[GenerationOutput]]) -> None:
        """Record which batches this shard generated and which it found committed (its last pass):
        who produced what, when several processes or machines share the store."""
        ledger = {"stage": stage, "shard_index": self.shard_index, "num_shards": self.num_shards,
                  "host": socket.gethostname(), "pid": os.getpid(),
                  "generated": [batch.index for batch in mine if batch.index not in done],
                  "resumed": [batch.index for batch in mine if batch.index in done]}
        write_jsonl_atomic(self.folder / SHARD_LEDGER.format(index=self.shard_index, count=self.num_shards), [ledger])

    def commit(self, batch: Batch, outputs: list[GenerationOutput]) -> None:
        write_jsonl_atomic(self.folder / batch.file_name, (output.to_dict() for output in outputs))


def create_once(path: Path, text: str) -> bool:
    """Put ``text`` at ``path`` unless a file is there already; True when this call wrote it.

    Processes racing to create the same file: exactly one wins, and none ever reads half a file (it
    is written under a temporary name, then hard-linked into place, which fails if ``path`` exists).
    """
    from reflectevo.runs import is_write_failure, usual_permissions, write_failure

    handle = None
    try:
        handle = tempfile.NamedTemporaryFile("w", encoding="utf-8", dir=path.parent, prefix=f".{path.name}.", suffix=".tmp", delete=False)  # noqa: SIM115  (closed below, then removed)
        with handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        usual_permissions(handle.name)
        try:
            os.link(handle.name, path)
            return True
        except FileExistsError:
            return False
        except OSError:  # a file system without hard links: a rename, whose last writer wins
            if path.exists():
                return False
            os.replace(handle.name, path)
            return True
    except OSError as exc:
        if is_write_failure(exc):
            raise write_failure(path, exc) from exc
        raise
    finally:
        if handle is not None:
            Path(handle.name).unlink(missing_ok=True)


def load_store(store_dir: str | Path) -> list[GenerationOutput]:
    """Every committed output in a store folder, in plan order (batch by batch)."""
    folder = Path(store_dir)
    files = sorted((int(m.group(1)), p) for p in folder.iterdir() if (m := BATCH_FILE.fullmatch(p.name)))
    return [GenerationOutput.from_dict(row) for _index, path in files for _line, row in read_jsonl(path)]


def merge_shards(parts: Iterable[Iterable[GenerationOutput]], requests: Sequence[GenerationRequest]) -> list[GenerationOutput]:
    """Combine the outputs of whole-batch shards into what one unsharded run returns (request order)."""
    slots: dict[tuple[str, int], GenerationOutput] = {}
    for part in parts:
        for output in part:
            slot = (output.key, output.sample)
            if slot in slots and slots[slot] != output:
                raise GenerationError(f"key {output.key!r} sample {output.sample} differs between shards; were they run with the same params?")
            slots[slot] = output
    wanted = {request.key for request in check_requests(requests)}
    missing = sorted(wanted - {key for key, _ in slots})
    if missing:
        raise GenerationError(f"{len(missing)} request key(s) are in no shard, e.g. {missing[:3]}; run the missing shards first")
    position = {request.key: i for i, request in enumerate(requests)}
    return sorted((o for o in slots.values() if o.key in wanted), key=lambda o: (position[o.key], o.sample))


def write_outputs(path: str | Path, outputs: Iterable[GenerationOutput]) -> Path:
    return write_jsonl_atomic(path, (output.to_dict() for output in outputs))


def read_outputs(path: str | Path) -> list[GenerationOutput]:
    return [GenerationOutput.from_dict(row) for _line, row in read_jsonl(path)]
