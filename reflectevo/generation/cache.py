"""A KV cache layer with room reserved ahead, so a decoding step writes its position in place.

transformers' ``DynamicLayer`` grows by ``torch.cat``: each decoding step copies every layer's whole
cache to append one position. At 64 rows of 1,500 tokens on SmolLM2-135M that is about 4.4 GB
written per step, and it was 698 ms of a 1,764 ms step on 2 CPU cores (``bench/decode_step.py
--profile``). ``ReservedLayer`` is a ``DynamicLayer`` whose keys and values are views of the first
``length`` positions of buffers with ``reserve`` positions of room after them: an update writes the
new positions into the room and widens the views. Only when the room runs out, or after something
replaced the views (``batch_select_indices``, ``batch_repeat_interleave``, the decoder's join), does an
update allocate a new buffer, copy the cache once and reserve room again.

The model still reads a ``(batch, heads, length, head_dim)`` tensor, strided over the buffer's
length; the arithmetic is the same as over the concatenated copy.
"""

from __future__ import annotations

import functools
from typing import Any


@functools.cache
def reserved_layer_class() -> type:
    """The ``DynamicLayer`` subclass, made on first use: transformers is imported only to generate
    (the model backend, which may patch it, is chosen first)."""
    from transformers.cache_utils import DynamicLayer

    class ReservedLayer(DynamicLayer):
        def __init__(self, reserve: int) -> None:
            super().__init__()
            self.reserve = reserve
            self.key_buffer: Any = None
            self.value_buffer: Any = None

        def update(self, key_states: Any, value_states: Any, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            cached = self.get_seq_length()
            length = cached + key_states.shape[-2]
            if not self.has_room(length, key_states):
                self.release()  # the old buffers go before the new ones are allocated (unless still viewed)
                self.key_buffer = self.grown(self.keys, key_states, cached, length)
                self.value_buffer = self.grown(self.values, value_states, cached, length)
            self.key_buffer[:, :, cached:length] = key_states
            self.value_buffer[:, :, cached:length] = value_states
            self.keys, self.values = self.key_buffer[:, :, :length], self.value_buffer[:, :, :length]
            return self.keys, self.values

        def batch_select_indices(self, indices: Any) -> None:
            super().batch_select_indices(indices)  # new tensors: the buffers are no longer viewed
            self.release()

        def batch_repeat_interleave(self, repeats: int) -> None:
            super().batch_repeat_interleave(repeats)
            self.release()

        def release(self) -> None:
            self.key_buffer = self.value_buffer = None

        def has_room(self, length: int, key_states: Any) -> bool:
            """Whether the cached keys are still the start of the buffer and it holds ``length``."""
            buffer = self.key_buffer
            return (
                buffer is not None
                and self.keys.numel() > 0
                and self.keys.data_ptr() == buffer.data_ptr()
                and self.keys.stride() == buffer.stride()
                and self.keys.shape[:2] == buffer.shape[:2] == key_states.shape[:2]
                and buffer.shape[-2] >= length
            )

        def grown(self, cached_states: Any, new_states: Any, cached: int, length: int) -> Any:
            batch, heads, _, head_dim = new_states.shape
            buffer = new_states.new_empty(batch, heads, length + self.reserve, head_dim)
            if cached:
                buffer[:, :, :cached] = cached_states
            return buffer

    return ReservedLayer


def reserve_room(cache: Any, reserve: int) -> Any:
    """``cache`` (a ``DynamicCache``) with each plain layer replaced by a ``ReservedLayer`` keeping
    ``reserve`` positions of room; layers of other kinds (sliding windows) are left as they are."""
    from transformers.cache_utils import DynamicLayer

    reserved = reserved_layer_class()
    cache.layers = [
        reserved(reserve) if type(layer) is DynamicLayer and not layer.is_initialized else layer
        for layer in cache.layers
    ]
    return cache


def stack_rows(target: Any, caches: list[Any], masks: list[Any], repeats: int = 1) -> Any:
    """Fill ``target`` (an empty ``DynamicCache`` of plain or reserved layers) with the rows of
    ``caches`` in order, each row ``repeats`` times, every cache left-padded to the widest of them;
    returns the stacked attention mask. The padding is zeros (masked out, but multiplied by an
    attention weight of 0, so it must be finite). A ``ReservedLayer`` gets its room after the rows, so
    the first decoding step writes in place instead of copying what was just stacked."""
    import torch
    import torch.nn.functional as F

    reserved = reserved_layer_class()
    width = max(mask.shape[1] for mask in masks)
    for index, layer in enumerate(target.layers):
        parts = [cache.layers[index] for cache in caches]
        first = parts[0].keys
        rows = sum(part.keys.shape[0] for part in parts) * repeats
        room = layer.reserve if isinstance(layer, reserved) else 0
        layer.lazy_initialization(first, first)
        buffers = []
        for name in ("keys", "values"):
            buffer = first.new_empty(rows, first.shape[1], width + room, first.shape[-1])
            start = 0
            for part in parts:
                states = getattr(part, name)
                count, pad = states.shape[0] * repeats, width - states.shape[-2]
                buffer[start : start + count, :, :pad] = 0
                # (rows, repeats, ...) view: each row written `repeats` times without a repeated copy
                target_rows = buffer[start : start + count, :, pad:width].unflatten(0, (states.shape[0], repeats))
                target_rows.copy_(states[:, None].expand_as(target_rows))
                start += count
            buffers.append(buffer)
        layer.keys, layer.values = buffers[0][:, :, :width], buffers[1][:, :, :width]
        if isinstance(layer, reserved):
            layer.key_buffer, layer.value_buffer = buffers
    return torch.cat([F.pad(mask, (width - mask.shape[1], 0)).repeat_interleave(repeats, 0) for mask in masks])
