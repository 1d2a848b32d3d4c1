"""Attention for the loop decoder's steps on models whose query heads share key/value heads.

SmolLM2, Llama 3 and Mistral use grouped-query attention: each key/value head serves several query
heads (SmolLM2-135M: 9 query heads, 3 key/value heads). With a padding mask, transformers' SDPA
attention copies every key and value head once per query head it serves (``repeat_kv``) in every
layer at every step, so a decoding step writes and reads the whole KV cache several times over: at
64 rows of 1,500 tokens on SmolLM2-135M that is about 13 GB of copies per step, and the step is
memory-bound (``bench/decode_step.py``).

A decoding step has one query position, so the query heads of one key/value head can instead be
laid out as that head's query rows: ``(batch, kv_heads, groups, head_dim)`` against keys of shape
``(batch, kv_heads, length, head_dim)``. The padding mask, one row per sequence, broadcasts over
them. Same arithmetic, no copies. Prefill (several query positions) and models without grouped
heads go to transformers' own SDPA attention unchanged.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

# torch and transformers are imported inside the functions, as everywhere in the engine: the model
# backend is selected (Unsloth patches transformers on import) before anything imports them.
GROUPED_SDPA = "reflectevo_grouped_sdpa"


def grouped_sdpa(
    module: Any,
    query: Any,
    key: Any,
    value: Any,
    attention_mask: Any,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[Any, None]:
    """transformers' attention-function signature; returns (output (batch, 1, heads, head_dim), None)."""
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    groups = getattr(module, "num_key_value_groups", 1)
    batch, heads, positions, head_dim = query.shape
    if groups == 1 or positions != 1 or attention_mask is None or dropout:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )
    # query head h serves key/value head h // groups (transformers' repeat_kv order), so the
    # groups of one key/value head are consecutive and a reshape lines them up as its rows
    rows = query.reshape(batch, key.shape[1], groups, head_dim)
    output = torch.nn.functional.scaled_dot_product_attention(rows, key, value, attn_mask=attention_mask, scale=scaling)
    return output.reshape(batch, heads, 1, head_dim).transpose(1, 2).contiguous(), None


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    if GROUPED_SDPA not in AttentionInterface._global_mapping:
        AttentionInterface.register(GROUPED_SDPA, grouped_sdpa)
        # without a mask function of its own a registered attention is given no padding mask at all
        AttentionMaskInterface.register(GROUPED_SDPA, sdpa_mask)


def groups_of(model: Any) -> int:
    """Query heads per key/value head of a transformers model (1: no grouped heads)."""
    config = getattr(model, "config", None)
    heads = getattr(config, "num_attention_heads", None)
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    return heads // kv_heads if heads and kv_heads else 1


@contextlib.contextmanager
def grouped_attention(model: Any) -> Iterator[bool]:
    """Decode ``model`` with :func:`grouped_sdpa` inside the block when it runs transformers' SDPA
    attention over grouped heads; restores its attention after. Yields whether it switched."""
    config = getattr(model, "config", None)
    before = getattr(config, "_attn_implementation", None)
    if before != "sdpa" or groups_of(model) <= 1:
        yield False
        return
    _register()
    model.set_attn_implementation(GROUPED_SDPA)
    try:
        yield True
    finally:
        model.set_attn_implementation(before)
