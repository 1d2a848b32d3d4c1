"""How close decoding comes to what the hardware allows.

One decoding step of a batch of B sequences must read every weight once and each sequence's KV
cache once (memory-bandwidth bound at small B), and do about 2 FLOPs per parameter per sequence
plus the attention over the context (compute bound at large B). So at batch B and mean context L:

    bytes per step = weight bytes + B x L x KV bytes per token
    FLOPs per step = B x (2 x parameters + 4 x layers x L x hidden)
    ceiling tokens/s = B / (bytes / bandwidth)   and   B / (FLOPs / peak FLOP/s)

Peaks are the vendors' datasheet figures (dense 16-bit tensor throughput, no sparsity); real
kernels reach a part of them, so the fractions below are upper-bound comparisons, not efficiencies
one should expect to reach 1.
"""

from __future__ import annotations

from typing import Any

# device name substring: (memory bandwidth bytes/s, dense bf16/fp16 tensor FLOP/s), datasheet
DATASHEET_PEAKS: dict[str, tuple[float, float]] = {
    "H200": (4.8e12, 989e12),
    "H100": (3.35e12, 989e12),  # SXM
    "A100-SXM4-80GB": (2.039e12, 312e12),
    "A100 80GB PCIe": (1.935e12, 312e12),
    "A100": (1.555e12, 312e12),  # 40 GB
    "L4": (0.3e12, 121e12),
    "T4": (0.32e12, 65e12),
}


def device_peaks(name: str) -> tuple[float, float] | None:
    """Datasheet peaks of a CUDA device by its name (longest matching key), or None if unknown."""
    matches = [key for key in DATASHEET_PEAKS if key in name]
    return DATASHEET_PEAKS[max(matches, key=len)] if matches else None


def decode_ceilings(
    shape: dict[str, Any], parameters: int, dtype_bytes: int, batch: int, context: float, bandwidth: float, flops: float
) -> dict[str, float]:
    """Tokens/s ceilings of one decoding step at ``batch`` sequences of mean ``context`` tokens."""
    head_dim = shape["hidden_size"] // shape["num_attention_heads"]
    kv_heads = shape.get("num_key_value_heads") or shape["num_attention_heads"]
    kv_per_token = 2 * shape["num_hidden_layers"] * kv_heads * head_dim * dtype_bytes  # K and V, every layer
    step_bytes = parameters * dtype_bytes + batch * context * kv_per_token
    step_flops = batch * (2 * parameters + 4 * shape["num_hidden_layers"] * context * shape["hidden_size"])
    return {
        "bandwidth_ceiling_tok_s": round(batch * bandwidth / step_bytes, 1),
        "compute_ceiling_tok_s": round(batch * flops / step_flops, 1),
        "kv_bytes_per_token": kv_per_token,
        "batch": batch,
        "mean_context": round(context, 1),
    }


def fractions(measured_tok_s: float, ceilings: dict[str, float]) -> dict[str, float]:
    return {
        "of_bandwidth_ceiling": round(measured_tok_s / ceilings["bandwidth_ceiling_tok_s"], 4),
        "of_compute_ceiling": round(measured_tok_s / ceilings["compute_ceiling_tok_s"], 4),
    }
