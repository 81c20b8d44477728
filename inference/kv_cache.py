"""The batching engine's KV cache: its own tensors, handed to transformers only through public API.

The engine keeps each decoder layer's keys and values in a buffer with spare room (`KVSlab`), so a
decode step writes its new position in place. transformers' own dynamic cache concatenates the
whole cache with every new token, copying it once per step; at a batch of 8 that copy costs about
as much as attention itself on a CPU.

Corral's decode step (`decode_step.py`) appends to the slabs directly. The forward passes that go
through transformers (every prefill, and decode steps of models outside the fast path) get a
`transformers.DynamicCache` filled with `Cache.update` and read back through `Cache.layers`, its
documented parts; no transformers class is subclassed, so a new minor release that reworks its
cache layers leaves the engine working.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import torch
from transformers import DynamicCache

KeysAndValues = tuple[torch.Tensor, torch.Tensor]  # [batch, kv heads, positions, head dim] each


class KVSlab:
    """One decoder layer's keys and values, in buffers with room to grow in place."""

    GROWTH = 128  # spare positions reserved each time the buffers are (re)allocated

    def __init__(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        self._allocate(keys, values, keys.shape[-2])

    def _allocate(self, keys: torch.Tensor, values: torch.Tensor, length: int) -> None:
        shape = list(keys.shape)
        shape[-2] = length + self.GROWTH
        key_buffer, value_buffer = keys.new_empty(shape), values.new_empty(shape)
        key_buffer[..., :length, :] = keys
        value_buffer[..., :length, :] = values
        self._key_buffer, self._value_buffer, self._length = key_buffer, value_buffer, length
        self.keys = key_buffer[..., :length, :]
        self.values = value_buffer[..., :length, :]

    def update(self, keys: torch.Tensor, values: torch.Tensor) -> KeysAndValues:
        """Append new positions; return every cached key and value (views, no copy)."""
        end = self._length + keys.shape[-2]
        if end > self._key_buffer.shape[-2]:
            self._allocate(self.keys, self.values, self._length)
        self._key_buffer[..., self._length : end, :] = keys
        self._value_buffer[..., self._length : end, :] = values
        self._length = end
        self.keys = self._key_buffer[..., :end, :]
        self.values = self._value_buffer[..., :end, :]
        return self.keys, self.values


class KVCache:
    """The running batch's cache: one `KVSlab` per decoder layer, rows in the batch's order."""

    def __init__(self, layers: Sequence[KeysAndValues]) -> None:
        self.layers = [KVSlab(keys, values) for keys, values in layers]

    def keep(self, rows: torch.Tensor, first_position: int) -> None:
        """Keep only `rows`, and drop the positions before `first_position` (padding no row uses)."""
        self.layers = [
            KVSlab(slab.keys[rows, :, first_position:], slab.values[rows, :, first_position:])
            for slab in self.layers
        ]

    def to_transformers(self, config: Any) -> DynamicCache:
        """A transformers cache holding a copy of these keys and values, for a model's forward."""
        cache = DynamicCache(config=config)
        for index, slab in enumerate(self.layers):
            cache.update(slab.keys, slab.values, index)
        return cache

    def append_last_position(self, cache: DynamicCache) -> None:
        """Take the position a forward pass just appended to `cache` (made by `to_transformers`)."""
        for slab, (keys, values) in zip(self.layers, layers_of(cache), strict=True):
            slab.update(keys[..., -1:, :], values[..., -1:, :])


def layers_of(cache: DynamicCache) -> list[KeysAndValues]:
    """Each layer's keys and values in a transformers cache."""
    return [(layer.keys, layer.values) for layer in cache.layers]


def cache_keyword(model: Any) -> str:
    """The name under which this model's forward takes a KV cache.

    transformers 5.24 renamed `past_key_values` to `cache` (the old name still works, with a
    deprecation warning, until 5.40); asking the forward itself keeps the engine right on both.
    """
    # Wrappers (an adapter, an observer) take **kwargs: ask the model they wrap.
    seen: set[int] = set()
    while callable(getattr(model, "forward", None)) and id(model) not in seen:
        seen.add(id(model))
        parameters = inspect.signature(model.forward).parameters
        for name in ("cache", "past_key_values"):
            if name in parameters:
                return name
        inner = model.get_base_model() if hasattr(model, "get_base_model") else None
        model = inner if inner is not None else getattr(model, "model", None)
    return "past_key_values"


def uses_sliding_window(config: Any) -> bool:
    """Whether any layer of this model attends over a sliding window (the engine cannot merge
    left-padded rows of such a cache correctly beyond the window)."""
    return any(DynamicCache(config=config).is_sliding)
