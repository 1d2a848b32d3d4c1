"""The engines behind one interface: transformers, unsloth, vllm, and replay of recorded outputs."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

from reflectevo.config import GenerationParams
from reflectevo.core.jsonl import read_jsonl
from reflectevo.errors import DuplicateKeyError, GenerationError, ReplayMissingError, ReplayRowError
from reflectevo.generation.attention import grouped_attention
from reflectevo.generation.base import (
    AUTO_MAX_BATCH,
    AUTO_MEMORY_FRACTION,
    CPU_BATCH_SIZE,
    DEFAULT_MAX_SEQ_LENGTH,
    BatchedEngine,
    Engine,
    MemoryBudget,
)
from reflectevo.generation.decoding import (
    DECODER_VERSION,
    PREFILL_STAT_KEYS,
    DecodeOptions,
    Decoder,
    generate_only_settings,
)
from reflectevo.generation.requests import (
    _PARAMS,
    FinishReason,
    GenerationOutput,
    GenerationRequest,
    GenerationSettings,
    check_requests,
    render_chat,
)
from reflectevo.generation.store import Batch, batch_seed, load_store, sample_seed

log = logging.getLogger(__name__)


# what a generation stage's manifest entry records about the model that generated (loading.load_model's info)
MODEL_INFO_KEYS = (
    "source",
    "source_kind",
    "dtype",
    "adapter",
    "chat_template_source",
    "default_system_message",
    "eos_token",
    "pad_token",
)


DECODE_STAT_KEYS = (
    "calls",
    "rows",
    "steps",
    "rows_dropped",
    "rows_joined",
    "row_steps",
    "idle_row_steps",
    *PREFILL_STAT_KEYS,
    "prefill_seconds",
    "decode_seconds",
)


def manifest_model_info(info: dict[str, Any]) -> dict[str, Any]:
    """The model facts a generation stage records, with a built-in's hashes and weights note."""
    picked = {key: info[key] for key in MODEL_INFO_KEYS if key in info}
    builtin = info.get("builtin") or {}
    picked.update(
        {key: builtin[key] for key in ("weights", "gguf_sha256", "wheel_sha256", "cache_key") if key in builtin}
    )
    return picked


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
        # "loop": reflectevo.generation.decoding (shared prefixes prefilled once, ended rows leave the
        # batch, per-row samplers); "generate": model.generate on the padded batch, as before
        self.decoder: Literal["loop", "generate"] = "loop"
        self.decode_options = DecodeOptions()
        # the loop decoder's steps attend with reflectevo.generation.attention.grouped_sdpa (no copies
        # of the KV cache per query head); False keeps transformers' SDPA attention (the benchmarks' baseline)
        self.grouped_attention = True
        unsupported = generate_only_settings(model.generation_config)
        # with decoder "generate": n samples of one prompt share one prefill (the prompt is encoded
        # once and its KV cache copied n times, instead of generate() encoding n copies of the prompt)
        self.shared_prefill = True
        # summed over the loop decoder's calls: reflectevo.generation.decoding.Decoder.last
        self.decode_stats: dict[str, float] = dict.fromkeys(DECODE_STAT_KEYS, 0)
        # callables (token_ids of a chunk, settings) -> a transformers LogitsProcessor, added to
        # every generate call (the benchmarks impose output lengths on random-weight models this way)
        self.processor_factories: list[Callable[[Sequence[Sequence[int]], GenerationSettings], Any]] = []
        super().__init__(**options)
        if unsupported:  # what the model's generation config asks for, only generate() does
            self.decoder = "generate"
            self.events.append({"event": "decoder_generate", "because": unsupported})
            log.info("decoding with model.generate: the generation config sets %s", ", ".join(unsupported))

    @classmethod
    def from_loaded(cls, loaded: Any, params: GenerationParams, *, progress: bool = True) -> TransformersEngine:
        engine = cls(
            loaded.model,
            loaded.tokenizer,
            model_name=loaded.name,
            batch_size=params.batch_size,
            num_shards=params.num_shards,
            shard_index=params.shard_index,
            progress=progress,
            max_seq_length=(loaded.info or {}).get("max_seq_length"),
        )
        engine.model_info = manifest_model_info(loaded.info or {})
        return engine

    def decoder_name(self) -> str:
        if self.decoder == "generate":
            return "generate"
        attention = "" if self.grouped_attention else "-repeat-kv"
        cache = "" if self.decode_options.reserve_cache else "-concat-cache"
        return f"{DECODER_VERSION}{attention}{cache}"

    def describe(self) -> dict[str, Any]:
        stats = {
            name: round(value, 3) if isinstance(value, float) else value for name, value in self.decode_stats.items()
        }
        return {**super().describe(), "decode_stats": stats}

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
        self.memory_budget = MemoryBudget(
            free * AUTO_MEMORY_FRACTION, kv_per_token, activations_per_token, 2 * 4 * config.vocab_size
        )
        self.batch_size_how = (
            f"{free / 2**30:.1f} GiB free x {AUTO_MEMORY_FRACTION}, {AUTO_MAX_BATCH} sequences planned per "
            f"batch, each generate call cut to the rows whose KV cache fits at the batch's lengths"
        )
        return AUTO_MAX_BATCH

    def rows_that_fit(self, prompt_tokens: int, settings: GenerationSettings) -> int:
        """Prompts per generate call that the memory budget allows (each with its n samples)."""
        budget = self.memory_budget
        if budget is None:
            return 1 << 30
        # KV cache of the full sequence, one prefill layer's activations, the last-token logits
        per_row = (
            (prompt_tokens + settings.max_new_tokens) * budget.kv_per_token
            + prompt_tokens * budget.activations_per_token / settings.n
            + budget.per_row
        )
        return max(1, int(budget.bytes // (per_row * settings.n)))

    def render(self, messages: list[dict[str, Any]]) -> str:
        return render_chat(self.tokenizer, messages)

    def tokenize(self, prompts: list[str]) -> list[list[int]]:
        # the chat template already holds any BOS the model wants
        token_ids = self.tokenizer(prompts, add_special_tokens=False)["input_ids"] if prompts else []
        too_long = sum(len(ids) >= self.max_seq_length for ids in token_ids)
        if too_long:  # the model still runs, but past its context its text is not worth grading
            log.warning(
                "%d of %d prompts are as long as the %d-token context or longer",
                too_long,
                len(prompts),
                self.max_seq_length,
            )
        return token_ids

    def run_batch(self, batch: Batch, settings: GenerationSettings, stage: str) -> list[tuple[str, FinishReason, int]]:
        import torch

        size = max(1, min(self.chunk_size or len(batch.keys), len(batch.keys)))
        fits = self.rows_that_fit(len(batch.token_ids[0]), settings)
        if fits < size:
            # calls cut to the free memory: sampled outputs depend on it, so the cut is recorded
            size = fits
            self.events.append(
                {"event": "memory_cut", "stage": stage, "batch": batch.index, "sequences_per_call": size * settings.n}
            )
        while True:
            try:
                samples = []
                for start in range(0, len(batch.keys), size):
                    keys = batch.keys[start : start + size]
                    if self.decoder == "generate":
                        # every chunk reseeds, so a batch's samples do not depend on what ran before it
                        torch.manual_seed(batch_seed(settings.seed, stage, keys[0]))
                    samples.extend(
                        self.generate_chunk(batch.token_ids[start : start + size], settings, keys=keys, stage=stage)
                    )
                return samples
            except torch.cuda.OutOfMemoryError:
                if size == 1:
                    raise
                new_size = max(1, size // 2)
                self.events.append(
                    {
                        "event": "oom_backoff",
                        "stage": stage,
                        "batch": batch.index,
                        "old_size": size * settings.n,
                        "new_size": new_size * settings.n,
                    }
                )
                log.warning(
                    "out of GPU memory in %s batch %d: retrying with %d sequences per call instead of %d",
                    stage,
                    batch.index,
                    new_size * settings.n,
                    size * settings.n,
                )
                self.chunk_size = size = new_size  # later batches start at the size that fit
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()

    def generate_chunk(
        self,
        token_ids: Sequence[Sequence[int]],
        settings: GenerationSettings,
        *,
        keys: Sequence[str] = (),
        stage: str = "",
    ) -> list[tuple[str, FinishReason, int]]:
        """(text, finish reason, new tokens) of every prompt's ``settings.n`` samples, prompt-major.
        ``keys`` (the prompts' record keys) and ``stage`` seed the loop decoder's per-row samplers."""
        if self.decoder == "loop":
            return self.decode_chunk(token_ids, settings, keys, stage)
        return self.generate_call(token_ids, settings)

    def decode_chunk(
        self, token_ids: Sequence[Sequence[int]], settings: GenerationSettings, keys: Sequence[str], stage: str
    ) -> list[tuple[str, FinishReason, int]]:
        import torch

        if len(keys) != len(token_ids):
            raise GenerationError(f"{len(token_ids)} prompts need as many record keys, got {len(keys)}")
        seeds = [sample_seed(settings.seed, stage, key, sample) for key in keys for sample in range(settings.n)]
        processors = [make(token_ids, settings) for make in self.processor_factories]
        decoder = Decoder(self.model, self.tokenizer, self.eos_ids, self.pad_id, self.decode_options)
        was_training = self.model.training
        self.model.eval()  # dropout off: a model fresh from training is still in train mode
        attention = grouped_attention(self.model) if self.grouped_attention else contextlib.nullcontext()
        try:
            with torch.inference_mode(), attention:
                rows = decoder.run(token_ids, settings, seeds, processors)
        finally:
            self.model.train(was_training)
        self.decode_stats["calls"] += 1
        for name in DECODE_STAT_KEYS[1:]:
            self.decode_stats[name] += decoder.last.get(name, 0)
        return [self.finish(row.new_ids, settings.stop) for row in rows]

    def generate_call(
        self, token_ids: Sequence[Sequence[int]], settings: GenerationSettings
    ) -> list[tuple[str, FinishReason, int]]:
        import torch

        width = max(len(ids) for ids in token_ids)
        input_ids = torch.tensor([[self.pad_id] * (width - len(ids)) + list(ids) for ids in token_ids])
        attention = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in token_ids])
        sampling = (
            {"do_sample": True, "temperature": settings.temperature, "top_p": settings.top_p, "top_k": settings.top_k}
            if settings.temperature > 0
            else {"do_sample": False}
        )
        stops = {"stop_strings": list(settings.stop), "tokenizer": self.tokenizer} if settings.stop else {}
        extra: dict[str, Any] = {}
        if self.processor_factories:
            from transformers import LogitsProcessorList

            extra["logits_processor"] = LogitsProcessorList(
                [make(token_ids, settings) for make in self.processor_factories]
            )
        was_training = self.model.training
        self.model.eval()  # dropout off: a model fresh from training is still in train mode
        try:
            with torch.inference_mode():
                input_ids, attention = input_ids.to(self.model.device), attention.to(self.model.device)
                repeats = settings.n
                if settings.n > 1 and self.shared_prefill and width > 1:
                    extra["past_key_values"] = self.prefill(input_ids, attention, settings.n)
                    input_ids, attention = (
                        input_ids.repeat_interleave(settings.n, 0),
                        attention.repeat_interleave(settings.n, 0),
                    )
                    repeats = 1
                generated = self.model.generate(
                    input_ids=input_ids,
                    attention_mask=attention,
                    max_new_tokens=settings.max_new_tokens,
                    min_new_tokens=settings.min_new_tokens or None,
                    num_return_sequences=repeats,
                    pad_token_id=self.pad_id,
                    eos_token_id=sorted(self.eos_ids),
                    **sampling,
                    **stops,
                    **extra,
                )
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
        self.model(
            input_ids=input_ids[:, :-1],
            attention_mask=attention[:, :-1],
            position_ids=positions[:, :-1],
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        )
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
            raise GenerationError(
                f"engine 'unsloth' needs a model loaded through Unsloth (model.backend: unsloth), "
                f"but {loaded.name} was loaded with {loaded.backend!r}; use engine: transformers"
            )
        from unsloth import FastLanguageModel

        FastLanguageModel.for_inference(loaded.model)
        super().__init__(
            loaded.model,
            loaded.tokenizer,
            model_name=loaded.name,
            batch_size=params.batch_size,
            num_shards=params.num_shards,
            shard_index=params.shard_index,
            progress=progress,
            max_seq_length=(loaded.info or {}).get("max_seq_length"),
        )
        # Unsloth's patched forward keeps its own cache: let its generate() prefill and decode
        self.decoder = "generate"
        self.shared_prefill = False


class VLLMEngine(BatchedEngine):
    """vLLM's offline ``LLM.generate`` behind the same plan and store (optional extra, needs a GPU).

    vLLM batches internally; the plan's batches are only the units that are seeded and committed.
    Each prompt gets its own sampling seed from (seed, stage, key), as vLLM supports per-request seeds.
    ``tensor_parallel_size`` splits the one model over that many GPUs of this machine (vLLM starts
    its own worker per GPU), which is how vLLM uses several GPUs from a single process.
    """

    name = "vllm"

    def __init__(
        self,
        model: str,
        *,
        gpu_memory_utilization: float = _PARAMS.vllm_gpu_memory_utilization,
        tensor_parallel_size: int = _PARAMS.vllm_tensor_parallel_size,
        max_model_len: int | None = None,
        dtype: str = "auto",
        **options: Any,
    ) -> None:
        try:
            import vllm
        except ImportError:
            raise GenerationError(
                "engine 'vllm' needs the vllm package: pip install 'reflectevo[vllm]' (GPU only)"
            ) from None
        self._vllm = vllm
        self.llm = vllm.LLM(
            model=model,
            gpu_memory_utilization=gpu_memory_utilization,
            tensor_parallel_size=tensor_parallel_size,
            max_model_len=max_model_len,
            dtype=dtype,
        )
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
            self._vllm.SamplingParams(
                n=settings.n,
                temperature=settings.temperature,
                top_p=settings.top_p,
                top_k=settings.top_k or -1,
                max_tokens=settings.max_new_tokens,
                min_tokens=settings.min_new_tokens,
                stop=list(settings.stop),
                seed=batch_seed(settings.seed, stage, key) % 2**63,
            )
            for key in batch.keys
        ]
        prompts = [{"prompt_token_ids": list(ids)} for ids in batch.token_ids]
        results = self.llm.generate(prompts, sampling, use_tqdm=False)
        samples: list[tuple[str, FinishReason, int]] = []
        for result in results:
            for completion in result.outputs:
                reason: FinishReason = (
                    "length"
                    if completion.finish_reason == "length"
                    else ("stop" if isinstance(completion.stop_reason, str) else "eos")
                )
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
        requests = check_requests(requests)
        if seed is not None:
            settings = dataclasses.replace(settings, seed=seed)
        missing = [(r.key, s) for r in requests for s in range(settings.n) if (r.key, s) not in self.rows]
        if missing:
            key, sample = missing[0]
            raise ReplayMissingError(
                f"{self.source} has no stored output for key {key!r} sample {sample} "
                f"({len(missing)} missing in all); replay needs the run that produced these keys"
            )
        outputs = []
        for request in requests:
            for sample in range(settings.n):
                row = self.rows[(request.key, sample)]
                outputs.append(
                    GenerationOutput.from_dict(
                        {
                            "sample": sample,
                            "finish_reason": "eos",
                            "prompt": "",
                            "settings": settings.to_dict(),
                            "prompt_tokens": 0,
                            "new_tokens": 0,
                            "engine": self.name,
                            "batch": -1,
                            "stage": stage,
                            **row,
                            "key": request.key,
                        }
                    )
                )
        return outputs


REPLAY_FIELDS: dict[str, type] = {
    "key": str,
    "text": str,
    "sample": int,
    "finish_reason": str,
    "prompt": str,
    "settings": dict,
    "prompt_tokens": int,
    "new_tokens": int,
    "engine": str,
    "batch": int,
    "stage": str,
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
        raise ReplayRowError(
            f"{where}: field 'finish_reason' must be eos, stop or length, got {row['finish_reason']!r}"
        )


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
        chosen: Engine = UnslothEngine(loaded_model, params, progress=progress)
        chosen.model_info = manifest_model_info(loaded_model.info or {})
        return chosen
    if engine == "vllm":
        # vLLM loads the weights itself, from the folder or hub id the model came from
        if getattr(loaded_model, "source", "config") == "config":
            raise GenerationError(f"engine 'vllm' needs weights on disk or on the hub; {loaded_model.name} has none")
        return VLLMEngine(
            str(loaded_model.source),
            gpu_memory_utilization=params.vllm_gpu_memory_utilization,
            tensor_parallel_size=params.vllm_tensor_parallel_size,
            batch_size=params.batch_size,
            num_shards=params.num_shards,
            shard_index=params.shard_index,
            progress=progress,
        )
    return TransformersEngine.from_loaded(loaded_model, params, progress=progress)
