"""builtin:tiny, the 4M-parameter stand-in: settings, the cache key, the locked one-time build and its training."""

from __future__ import annotations

import hashlib
import json
import math
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from reflectevo.errors import ModelLoadError
from reflectevo.models.builtin.build import _announce, _build_once, build_versions
from reflectevo.models.builtin.checks import validation_quality
from reflectevo.models.builtin.corpus import build_corpus
from reflectevo.models.builtin.generic import stdlib_docstrings
from reflectevo.models.builtin.settings import BUILDER_VERSION, TINY, TinySettings, default_tiny_settings
from reflectevo.models.builtin.tokenizer import (
    CHAT_TEMPLATE,
    END,
    SPECIAL_TOKENS,
    Pair,
    encode_pair,
    train_bpe,
    wrap_tokenizer,
)
from reflectevo.models.cache import cache_dir


# ---- builtin:tiny: build, quality check, cache ---------------------------------------------------
def tiny_cache_key(settings: TinySettings | None = None, corpus: list[tuple[str, Pair]] | None = None) -> str:
    """sha256 of everything that shapes the model: builder version, settings, chat format, corpus, docstrings."""
    settings = default_tiny_settings() if settings is None else settings
    corpus = build_corpus(settings) if corpus is None else corpus
    digest = hashlib.sha256()
    header = {
        "builder": BUILDER_VERSION,
        "settings": settings.to_dict(),
        "template": CHAT_TEMPLATE,
        "specials": SPECIAL_TOKENS,
    }
    digest.update(json.dumps(header, sort_keys=True).encode() + b"\n")
    for name, (messages, completion) in corpus:
        digest.update(json.dumps([name, messages, completion], ensure_ascii=False).encode() + b"\n")
    for doc in stdlib_docstrings():
        digest.update(json.dumps(doc, ensure_ascii=False).encode() + b"\n")
    return digest.hexdigest()


def tiny_model_dir(settings: TinySettings | None = None) -> Path:
    """The folder of ``builtin:tiny`` (:func:`default_tiny_settings` unless ``settings`` are given),
    built first if this cache does not hold it yet.

    Safe to call from several processes at once: one builds (into a temporary folder renamed into
    place when complete), the others wait on the lock and then use its result.
    """
    settings = default_tiny_settings() if settings is None else settings
    corpus = build_corpus(settings)
    key = tiny_cache_key(settings, corpus)
    final = cache_dir() / "models" / f"tiny-{key[:16]}"

    def build(staging: Path) -> None:
        _announce(
            f"building the stand-in model {TINY} in {final} (once per corpus version; about 5 minutes on 2 CPU cores)"
        )
        info = build_tiny(staging, settings, corpus, key)
        quality = info["quality"]["overall"]
        _announce(
            f"built {TINY} in {info['build_seconds']:.0f} s: validation answers parseable {quality['parseable']:.2f}, "
            f"accuracy {quality['accuracy']:.2f} (a stand-in for demos and tests, not a research model)"
        )

    return _build_once(final, "standin.json", f"{TINY} in {final}", build)


def build_tiny(
    out_dir: Path, settings: TinySettings, corpus: list[tuple[str, Pair]], key: str, on_step: Callable | None = None
) -> dict[str, Any]:
    """Train ``builtin:tiny`` into ``out_dir`` and write ``standin.json`` there last; returns its content.

    ``on_step(step, model, loss)`` is called after every optimiser step (for watching a build).
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    started = time.perf_counter()
    texts = [text for _, (messages, completion) in corpus for text in (*(m["content"] for m in messages), completion)]
    tokenizer = wrap_tokenizer(train_bpe(texts + list(stdlib_docstrings()), settings.vocab_size))
    end_id = tokenizer.convert_tokens_to_ids(END)

    rows, dropped = [], 0
    for _, pair in corpus:
        ids, labels = encode_pair(tokenizer, pair)
        if len(ids) > settings.max_row_tokens:
            dropped += 1
            continue
        rows.append((ids, labels))
    if len(rows) < settings.batch_size:
        raise ModelLoadError(f"only {len(rows)} training rows fit in max_row_tokens={settings.max_row_tokens}")

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=settings.hidden_size,
        intermediate_size=settings.intermediate_size,
        num_hidden_layers=settings.num_layers,
        num_attention_heads=settings.num_heads,
        num_key_value_heads=settings.num_heads,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=end_id,
        bos_token_id=None,
    )
    torch.manual_seed(settings.seed)
    model = LlamaForCausalLM(config)
    train_started = time.perf_counter()
    losses = _train(model, rows, tokenizer.pad_token_id, settings, on_step)
    train_seconds = time.perf_counter() - train_started

    model.eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = end_id
    quality = validation_quality(model, tokenizer)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)

    parts: dict[str, int] = {}
    for name, _ in corpus:
        parts[name] = parts.get(name, 0) + 1
    info = {
        "name": TINY,
        "note": "a stand-in for demos and tests, not a research model",
        "builder_version": BUILDER_VERSION,
        "cache_key": key,
        "settings": settings.to_dict(),
        "corpus_rows": len(corpus),
        "corpus_parts": parts,
        "rows_dropped_too_long": dropped,
        "steps": settings.steps,
        "final_loss": round(sum(losses[-20:]) / len(losses[-20:]), 4),
        "parameters": sum(p.numel() for p in model.parameters()),
        "vocab_size": len(tokenizer),
        "train_seconds": round(train_seconds, 1),
        "build_seconds": round(time.perf_counter() - started, 1),
        "quality": quality,
        "versions": build_versions(),
    }
    (out_dir / "standin.json").write_text(json.dumps(info, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return info


def _train(
    model, rows: list[tuple[list[int], list[int]]], pad_id: int, settings: TinySettings, on_step: Callable | None
) -> list[float]:
    """Plain AdamW loop: warm-up, cosine decay, gradient clipping, a seeded choice of batches."""
    import torch

    optimizer = torch.optim.AdamW(
        model.parameters(), lr=settings.learning_rate, betas=settings.adam_betas, weight_decay=settings.weight_decay
    )
    rng = random.Random(settings.seed)
    losses = []
    pending: list[list[tuple[list[int], list[int]]]] = []
    model.train()
    for step in range(settings.steps):
        if not pending:
            # a random pool of rows sorted by length, cut into batches: each batch pads to a similar length
            pool = rng.sample(rows, min(len(rows), settings.batch_size * settings.length_buckets))
            pool.sort(key=lambda row: len(row[0]))
            pending = [
                pool[i : i + settings.batch_size]
                for i in range(0, len(pool) - settings.batch_size + 1, settings.batch_size)
            ]
            rng.shuffle(pending)
        warmup = min(1.0, (step + 1) / settings.warmup_steps)
        cosine = 0.5 * (1 + math.cos(math.pi * step / settings.steps))
        for group in optimizer.param_groups:
            group["lr"] = (
                settings.learning_rate
                * warmup
                * (settings.final_lr_fraction + (1 - settings.final_lr_fraction) * cosine)
            )
        input_ids, attention_mask, labels = _right_padded(pending.pop(), pad_id)
        loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), settings.clip_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if on_step is not None:
            on_step(step, model, losses[-1])
    return losses


def _right_padded(batch: list[tuple[list[int], list[int]]], pad_id: int):
    import torch

    width = max(len(ids) for ids, _ in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), -100, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, (ids, row_labels) in enumerate(batch):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(ids)] = torch.tensor(row_labels)
        attention_mask[row, : len(ids)] = 1
    return input_ids, attention_mask, labels


def read_standin_json(folder: Path) -> dict[str, Any]:
    return json.loads((Path(folder) / "standin.json").read_text(encoding="utf-8"))
