"""One decoding step of the loop decoder, with and without grouped attention, and where its time goes.

A decoding step feeds one token per row against a KV cache of the rows' contexts. The bench builds
that cache once (a prefill of a few rows, copied up to the batch), then times decoding steps of the
same batch with transformers' SDPA attention (every key/value head copied once per query head it
serves) and with ``reflectevo.generation.attention.grouped_sdpa`` (no copies), alternating the two
so machine noise hits both, and reports the best step of each with their ratio and the largest
logit difference between them. ``--profile`` adds torch.profiler's operator groups of one step of each.

    python bench/decode_step.py                                  # builtin:smollm2-135m, the default grid
    python bench/decode_step.py --rows 16,64 --contexts 500,1500 --profile

Rows are padded on the left as the decoder pads them (a quarter of each row but the first is padding).
"""

from __future__ import annotations

import argparse
import copy
import time
from collections import defaultdict
from typing import Any

import torch

from reflectevo.config import ModelParams
from reflectevo.generation.attention import grouped_attention, groups_of
from reflectevo.models.loading import load_model

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
    """One decoding step on a copy of ``cache``; the last position's logits."""
    grown = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
    with torch.inference_mode():
        return model(input_ids=token, attention_mask=grown, past_key_values=cache, use_cache=True).logits[:, -1]


def timed_steps(model: Any, cache: Any, mask: torch.Tensor, token: torch.Tensor, grouped: bool, repeats: int):
    """(best seconds of ``repeats`` steps, the logits of the last) with or without grouped attention."""
    best, logits = float("inf"), None
    for _ in range(repeats):
        fresh = copy.deepcopy(cache)
        started = time.perf_counter()
        if grouped:
            with grouped_attention(model):
                logits = step(model, fresh, mask, token)
        else:
            logits = step(model, fresh, mask, token)
        best = min(best, time.perf_counter() - started)
    return best, logits


def profile_groups(model: Any, cache: Any, mask: torch.Tensor, token: torch.Tensor, grouped: bool) -> dict[str, float]:
    """Milliseconds of one step per operator group (self CPU time of torch's top-level operators)."""
    from torch.profiler import ProfilerActivity, profile

    fresh = copy.deepcopy(cache)
    with profile(activities=[ProfilerActivity.CPU]) as recorded:
        if grouped:
            with grouped_attention(model):
                step(model, fresh, mask, token)
        else:
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
    print("| rows | context | SDPA ms/step | grouped ms/step | x | max abs logit diff |")
    print("|---:|---:|---:|---:|---:|---:|")
    profiles = []
    for rows in (int(v) for v in args.rows.split(",")):
        for context in (int(v) for v in args.contexts.split(",")):
            cache, mask, token = cached_batch(model, rows, context)
            plain, plain_logits = timed_steps(model, cache, mask, token, grouped=False, repeats=1)
            grouped, grouped_logits = timed_steps(model, cache, mask, token, grouped=True, repeats=1)
            for _ in range(args.repeats - 1):  # alternate, so both meet the same noise
                plain = min(plain, timed_steps(model, cache, mask, token, grouped=False, repeats=1)[0])
                grouped = min(grouped, timed_steps(model, cache, mask, token, grouped=True, repeats=1)[0])
            diff = (plain_logits - grouped_logits).abs().max().item()
            print(
                f"| {rows} | {context} | {plain * 1000:.0f} | {grouped * 1000:.0f} | {plain / grouped:.2f} | {diff:.1e} |"
            )
            if args.profile:
                profiles.append((rows, context, "SDPA", profile_groups(model, cache, mask, token, grouped=False)))
                profiles.append((rows, context, "grouped", profile_groups(model, cache, mask, token, grouped=True)))
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
