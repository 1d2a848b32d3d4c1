"""One decoding step of the loop decoder, three ways, and where its time goes.

A decoding step feeds one token per row against a KV cache of the rows' contexts. The bench builds
that cache once (a prefill of a few rows, copied up to the batch), then times decoding steps of the
same batch three ways, in turn so machine noise hits all three:

- ``SDPA``: transformers' SDPA attention (every key/value head copied once per query head it serves)
  on transformers' ``DynamicCache`` (the whole cache copied to append the step's position): decoder ``loop-1``;
- ``grouped``: ``reflectevo.generation.attention.grouped_sdpa`` (no copies of heads), same cache: ``loop-2``;
- ``reserved``: grouped attention on a cache with room reserved ahead
  (``reflectevo.generation.cache``), which writes the step's position in place: ``loop-3``.

It reports the best step of each, their ratios to ``SDPA`` and the largest logit difference from it.
``--profile`` adds torch.profiler's operator groups of one step of each.

    python bench/decode_step.py                                  # builtin:smollm2-135m, the default grid
    python bench/decode_step.py --rows 16,64 --contexts 500,1500 --profile

Rows are padded on the left as the decoder pads them (a quarter of each row but the first is padding).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import time
from collections import defaultdict
from typing import Any

import torch
from transformers import DynamicCache

from reflectevo.config import ModelParams
from reflectevo.generation.attention import grouped_attention, groups_of
from reflectevo.generation.cache import reserve_room
from reflectevo.models.loading import load_model

WAYS = ("SDPA", "grouped", "reserved")  # see the docstring
PREFILL_ROWS = 8  # rows actually prefilled; the batch repeats them (the step's cost does not care)
# operator-name fragments -> the group they are counted in (first match wins)
GROUPS = (
    ("copies (repeat_kv, cache growth)", ("cat", "copy_", "clone", "expand", "reshape", "contiguous", "index_select")),
    ("attention", ("scaled_dot_product", "_flash_attention", "softmax", "baddbmm", "bmm")),
    ("matmuls (weights)", ("linear", "addmm", "mm", "matmul")),
)


def cached_batch(model: Any, rows: int, context: int, seed: int = 0) -> tuple[Any, torch.Tensor, torch.Tensor]:
    """(the KV cache of ``rows`` rows of ``context`` tokens, their padding mask, one next token per row)."""
    generator = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    base = min(rows, PREFILL_ROWS)
    ids = torch.randint(100, vocab - 1, (base, context), generator=generator)
    mask = torch.ones(base, context, dtype=torch.long)
    mask[1:, : context // 4] = 0  # left padding on every row but the first
    with torch.inference_mode():
        cache = model(input_ids=ids, attention_mask=mask, use_cache=True).past_key_values
    index = torch.arange(rows) % base
    cache.batch_select_indices(index)
    return cache, mask[index], torch.randint(100, vocab - 1, (rows, 1), generator=generator)


def step(model: Any, cache: Any, mask: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
    """One decoding step on ``cache``; the last position's logits."""
    grown = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
    with torch.inference_mode():
        return model(input_ids=token, attention_mask=grown, past_key_values=cache, use_cache=True).logits[:, -1]


def prepared(model: Any, cache: Any, way: str) -> Any:
    """A copy of ``cache`` to step on: for ``reserved``, moved into the loop decoder's reserved cache
    (``reserve_room``) with 16 positions of room."""
    fresh = copy.deepcopy(cache)
    if way != "reserved":
        return fresh
    reserved = reserve_room(DynamicCache(config=model.config), reserve=16)
    for layer, old in zip(reserved.layers, fresh.layers, strict=True):
        layer.update(old.keys, old.values)
    return reserved


def attention(model: Any, way: str) -> contextlib.AbstractContextManager:
    """Grouped attention for ``grouped`` and ``reserved``; transformers' SDPA for ``SDPA``."""
    return grouped_attention(model) if way != "SDPA" else contextlib.nullcontext()


def timed_step(model: Any, cache: Any, mask: torch.Tensor, token: torch.Tensor, way: str):
    """(seconds of one step on a fresh copy of ``cache``, its logits), decoded ``way``."""
    fresh = prepared(model, cache, way)
    started = time.perf_counter()
    with attention(model, way):
        logits = step(model, fresh, mask, token)
    return time.perf_counter() - started, logits


def profile_groups(model: Any, cache: Any, mask: torch.Tensor, token: torch.Tensor, way: str) -> dict[str, float]:
    """Milliseconds of one step per operator group (self CPU time of torch's top-level operators)."""
    from torch.profiler import ProfilerActivity, profile

    fresh = prepared(model, cache, way)
    with profile(activities=[ProfilerActivity.CPU]) as recorded, attention(model, way):
        step(model, fresh, mask, token)
    totals: dict[str, float] = defaultdict(float)
    for event in recorded.key_averages():
        name = event.key.removeprefix("aten::")
        group = next((label for label, parts in GROUPS if any(part in name for part in parts)), "other")
        totals[group] += event.self_cpu_time_total / 1000
    return dict(totals)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="builtin:smollm2-135m")
    parser.add_argument("--rows", default="16,64", help="rows per step, comma-separated")
    parser.add_argument("--contexts", default="500,1500", help="context tokens per row, comma-separated")
    parser.add_argument("--repeats", type=int, default=3, help="steps timed per way (the best one counts)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--profile", action="store_true", help="also the operator groups of one step")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    loaded = load_model(ModelParams(name=args.model, dtype="float32", device="cpu"))
    model = loaded.model.eval()
    print(
        f"model {args.model}: {model.config.num_attention_heads} query heads, "
        f"{model.config.num_key_value_heads} key/value heads ({groups_of(model)} per group), "
        f"{model.config.num_hidden_layers} layers; {args.threads} threads; float32"
    )
    print(
        "| rows | context | SDPA ms/step | grouped ms/step | reserved ms/step | x grouped | x reserved "
        "| max abs logit diff |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    profiles = []
    for rows in (int(v) for v in args.rows.split(",")):
        for context in (int(v) for v in args.contexts.split(",")):
            cache, mask, token = cached_batch(model, rows, context)
            best = dict.fromkeys(WAYS, float("inf"))
            logits = {}
            for _ in range(args.repeats):  # in turn, so all three meet the same noise
                for way in WAYS:
                    seconds, logits[way] = timed_step(model, cache, mask, token, way)
                    best[way] = min(best[way], seconds)
            diff = max((logits[way] - logits["SDPA"]).abs().max().item() for way in WAYS[1:])
            ms = " | ".join(f"{best[way] * 1000:.0f}" for way in WAYS)
            ratios = " | ".join(f"{best['SDPA'] / best[way]:.2f}" for way in WAYS[1:])
            print(f"| {rows} | {context} | {ms} | {ratios} | {diff:.1e} |")
            if args.profile:
                profiles += [(rows, context, way, profile_groups(model, cache, mask, token, way)) for way in WAYS]
    if profiles:
        labels = [label for label, _ in GROUPS] + ["other"]
        print("\nms of one step by operator group (torch.profiler, self CPU time)\n")
        print("| rows | context | way | " + " | ".join(labels) + " |")
        print("|---:|---:|---|" + "---:|" * len(labels))
        for rows, context, way, totals in profiles:
            cells = " | ".join(f"{totals.get(label, 0.0):.0f}" for label in labels)
            print(f"| {rows} | {context} | {way} | {cells} |")


if __name__ == "__main__":
    main()
