"""The batched engine every backend shares: length-sorted batches, resume, shards, OOM back-off, auto batch size."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

from reflectevo.config import ModelParams
from reflectevo.core import live
from reflectevo.errors import GenerationError
from reflectevo.generation.requests import (
    _PARAMS,
    FinishReason,
    GenerationOutput,
    GenerationRequest,
    GenerationSettings,
    check_requests,
)
from reflectevo.generation.store import Batch, BatchStore, plan_batches

CPU_BATCH_SIZE = 16  # batch_size "auto" on CPU: larger batches stop paying off on a few cores
AUTO_MAX_BATCH = 512  # batch_size "auto" on a GPU plans this many sequences per batch (at most)
AUTO_MEMORY_FRACTION = 0.8  # share of free GPU memory that "auto" plans to fill
DEFAULT_MAX_SEQ_LENGTH = ModelParams().max_seq_length  # sizes "auto" when the model states none


# ---- engines -----------------------------------------------------------------------------------
class Engine(Protocol):
    name: str
    events: list[dict[str, Any]]  # back-offs and batch-size decisions, for the run manifest

    def generate(
        self,
        requests: Sequence[GenerationRequest],
        settings: GenerationSettings,
        *,
        stage: str,
        store_dir: str | Path | None = None,
        seed: int | None = None,
        force: bool = False,
    ) -> list[GenerationOutput]:
        """Outputs in request order, each request's samples in order. ``seed`` overrides ``settings.seed``."""
        ...


class BatchedEngine:
    """The plan / store / shard / seed loop shared by the model-backed engines.

    A subclass renders prompts and token ids (:meth:`render`, :meth:`tokenize`) and generates one
    batch (:meth:`run_batch`); this class decides what runs, in which order, and what is kept.
    """

    name = "batched"
    batch_size_how = "fixed"  # how the batch size was chosen, for the manifest

    def __init__(
        self,
        *,
        batch_size: int | Literal["auto"] = _PARAMS.batch_size,
        num_shards: int = 1,
        shard_index: int = 0,
        model_name: str = "",
        progress: bool = True,
    ) -> None:
        if not 0 <= shard_index < num_shards:
            raise GenerationError(f"shard_index {shard_index} must be below num_shards {num_shards}")
        if batch_size == "auto" and num_shards > 1:
            # each shard would size "auto" from its own free memory and plan different batches
            raise GenerationError(
                "sharded generation needs an explicit batch_size, so every shard plans the same batches"
            )
        self.num_shards, self.shard_index = num_shards, shard_index
        self.barrier: Callable[[], None] | None = None  # set by data_parallel(): waits for every process
        self.model_name = model_name
        self.model_info: dict[str, Any] = {}  # what the manifest should know about the model (loaded.info)
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
            raise GenerationError(
                f"{world_size} processes must plan the same batches, and batch_size 'auto' depends on "
                "each process's free memory: set generation.batch_size to a number"
            )
        if self.barrier is None and self.num_shards > 1:
            raise GenerationError(
                "generation.num_shards splits a stage by hand; under a distributed launch the "
                "processes split it themselves: leave num_shards at 1"
            )
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

    def decoder_name(self) -> str:
        """Which decoding produced the outputs: a store holds the outputs of one decoder only."""
        return self.name

    def describe(self) -> dict[str, Any]:
        return {
            "engine": self.name,
            "decoder": self.decoder_name(),
            "model": self.model_name,
            "batch_size": self.batch_size,
            "batch_size_requested": self.requested_batch_size,
            "batch_size_how": self.batch_size_how,
            "num_shards": self.num_shards,
            "shard_index": self.shard_index,
            "events": list(self.events),
            **({"model_info": self.model_info} if self.model_info else {}),
        }

    def generate(
        self,
        requests: Sequence[GenerationRequest],
        settings: GenerationSettings,
        *,
        stage: str,
        store_dir: str | Path | None = None,
        seed: int | None = None,
        force: bool = False,
    ) -> list[GenerationOutput]:
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
            raise GenerationError(
                f"data-parallel generation ({stage}) needs a store folder: the processes hand their "
                "batches to each other through it"
            )
        if self.barrier is not None and force:
            raise GenerationError(
                f"force cannot discard {store_dir} while other processes write into it: delete the "
                "folder first, or use a new run name"
            )
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

    def _plan_record(
        self, plan: list[Batch], settings: GenerationSettings, stage: str, prompts_per_batch: int
    ) -> dict[str, Any]:
        digest = hashlib.sha256()
        for batch in plan:
            digest.update(json.dumps([batch.keys, batch.prompts], ensure_ascii=False).encode("utf-8"))
        return {
            "stage": stage,
            "engine": self.name,
            "decoder": self.decoder_name(),
            "model": self.model_name,
            "settings": settings.to_dict(),
            "prompts_per_batch": prompts_per_batch,
            "num_batches": len(plan),
            "plan_sha256": digest.hexdigest(),
        }

    def _run_plan(
        self,
        mine: list[Batch],
        done: dict[int, list[GenerationOutput]],
        settings: GenerationSettings,
        stage: str,
        store: BatchStore | None,
    ) -> dict[int, list[GenerationOutput]]:
        from tqdm.auto import tqdm

        stats = self.stats.setdefault(stage, {"seconds": 0.0, "new_tokens": 0, "batches_run": 0, "batches_resumed": 0})
        by_batch: dict[int, list[GenerationOutput]] = {}
        total = sum(len(b.keys) for b in mine) * settings.n
        bar = tqdm(total=total, desc=f"generate {stage}", unit="seq", disable=not self.progress, dynamic_ncols=True)
        terminal = live.Progress(f"generate {stage}", total, "sequences")
        try:
            for batch in mine:
                if batch.index in done:
                    by_batch[batch.index] = done[batch.index]
                    stats["batches_resumed"] += 1
                    bar.update(len(done[batch.index]))
                    terminal.update(bar.n, "resumed from the store")
                    continue
                started = time.perf_counter()
                samples = self.run_batch(batch, settings, stage)
                stats["seconds"] += time.perf_counter() - started
                outputs = [
                    GenerationOutput(
                        key=batch.keys[i // settings.n],
                        sample=i % settings.n,
                        text=text,
                        finish_reason=finish,
                        prompt=batch.prompts[i // settings.n],
                        settings=settings.to_dict(),
                        prompt_tokens=len(batch.token_ids[i // settings.n]),
                        new_tokens=new_tokens,
                        engine=self.name,
                        batch=batch.index,
                        stage=stage,
                    )
                    for i, (text, finish, new_tokens) in enumerate(samples)
                ]
                if store is not None:
                    store.commit(batch, outputs)
                by_batch[batch.index] = outputs
                stats["new_tokens"] += sum(o.new_tokens for o in outputs)
                stats["batches_run"] += 1
                bar.update(len(outputs))
                tokens_per_s = stats["new_tokens"] / max(stats["seconds"], 1e-9)
                bar.set_postfix(tok_s=f"{tokens_per_s:.0f}")
                terminal.update(bar.n, f"{tokens_per_s:.0f} tokens/s")
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
