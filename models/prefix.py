"""Prefix caching for the in-process backend: the KV of a prompt's static start, computed once.

A teacher prompted with a knowledge base spends nearly all of each request prefilling the same
few thousand system-prompt tokens (about 6 s on 2 CPU cores for 2,900 Gemma tokens). The static
start of a backend's prompts is found once per loaded model: the common token prefix of two
probe conversations, built by the backend's own prompt format. Its KV cache is computed the
first time a batch needs it and copied into each later batch, so only each request's own
tokens are prefilled.

A batch is prefilled row by row from copies of the prefix's cache, then the rows' caches are
joined with padding in front: padding between the prefix and a row's own tokens would take
slots of a sliding-window layer's window (Gemma-3 keeps 512 tokens in five of every six layers),
so a shorter row would see fewer prefix tokens than it does alone. Joined this way, every row
computes what it would alone, up to rounding.

It deliberately caches one prefix per loaded model, not arbitrary shared prefixes (a radix tree
of conversation histories is vLLM's job), and it is never used for a batch whose every prompt
does not start with that prefix exactly: such a batch is prefilled whole, as before. It knows
nothing about batching, sampling or routing; `join_caches` also serves models/local.py to join
newcomers' caches to a running batch's.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

from models.base import ChatMessage
from models.config import BackendConfig
from models.prompt import build_prompt

# Below this many tokens a prefix costs about as much to copy as to prefill (the student's
# chat template alone is about 30 tokens), so it is not cached.
MIN_PREFIX_TOKENS = 64
# Two conversations that differ from their first character, so their common prefix is exactly
# the text every prompt of this backend starts with.
_PROBES = ((ChatMessage("user", "a"),), (ChatMessage("user", "Z"),))


def static_prefix(config: BackendConfig, tokenizer: Any) -> tuple[int, ...]:
    """The token ids every prompt of this backend starts with, or () when too short to cache.

    The last common token is left out: a tokenizer may merge the text before the conversation
    with the conversation's first characters, and a prompt is only served from the cache when
    it starts with these ids exactly."""
    a, b = (_ids(config, tokenizer, messages) for messages in _PROBES)
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    n -= 1
    return tuple(a[:n]) if n >= MIN_PREFIX_TOKENS else ()


def _ids(config: BackendConfig, tokenizer: Any, messages: tuple[ChatMessage, ...]) -> list[int]:
    prompt = build_prompt(config, tokenizer, messages)
    ids: list[int] = tokenizer(prompt.text, add_special_tokens=prompt.add_special_tokens)["input_ids"]
    return ids


class PrefixKV:
    """The static prefix of one loaded model and, once computed, its batch-of-one KV cache.

    Used only from the backend's owner thread, so it needs no lock."""

    def __init__(self, ids: tuple[int, ...]) -> None:
        self.ids = ids
        self._cache: DynamicCache | None = None
        self.usable = True  # False once the model's cache turns out to have layers we cannot join
        self.hits = 0  # batches served from the cache (tests and benchmarks read it)

    def __len__(self) -> int:
        return len(self.ids)

    def covers(self, prompt_ids: list[int]) -> bool:
        """Whether `prompt_ids` starts with the prefix and has at least one token after it."""
        n = len(self.ids)
        return self.usable and len(prompt_ids) > n and tuple(prompt_ids[:n]) == self.ids

    def ready(self, model: Any, device: torch.device) -> bool:
        """Compute the prefix's cache on first use; False if this model's cache cannot be joined."""
        if self._cache is None and self.usable:
            cache = DynamicCache(config=model.config)
            ids_1_P = torch.tensor([self.ids], dtype=torch.long, device=device)
            model(
                input_ids=ids_1_P,
                attention_mask=torch.ones_like(ids_1_P),
                position_ids=torch.arange(len(self.ids), device=device).unsqueeze(0),
                cache=cache,
                use_cache=True,
                logits_to_keep=1,
            )
            self.usable = joinable(cache)
            self._cache = cache if self.usable else None
        return self.usable

    def prefill(
        self, model: Any, rows: list[list[int]], device: torch.device
    ) -> tuple[DynamicCache, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Prefill each row's tokens after the prefix; returns the joined cache, the attention
        mask [B, T] over it, each row's next position [B] and its last logits [B, V]."""
        assert self._cache is not None
        self.hits += 1
        n = len(self.ids)
        caches, logits = [], []
        for ids in rows:
            own = ids[n:]
            cache = copy.deepcopy(self._cache)
            own_1_S = torch.tensor([own], dtype=torch.long, device=device)
            out = model(
                input_ids=own_1_S,
                attention_mask=torch.ones((1, n + len(own)), dtype=torch.long, device=device),
                position_ids=torch.arange(n, n + len(own), device=device).unsqueeze(0),
                cache=cache,
                use_cache=True,
                logits_to_keep=1,
            )
            caches.append(cache)
            logits.append(out.logits[:, -1, :])
        width = max(len(ids) for ids in rows)
        mask_B_T = torch.zeros((len(rows), width), dtype=torch.long, device=device)
        for b, ids in enumerate(rows):
            mask_B_T[b, width - len(ids) :] = 1
        next_pos_B = torch.tensor([len(ids) for ids in rows], dtype=torch.long, device=device)
        return join_caches(caches), mask_B_T, next_pos_B, torch.cat(logits).float()


def joinable(cache: DynamicCache) -> bool:
    """Whether every layer of `cache` is one `join_caches` can pad and join."""
    return all(type(layer) in _JOINABLE for layer in cache.layers)


def join_caches(caches: list[DynamicCache]) -> DynamicCache:
    """One batch cache from `caches` (each of one or more rows; every one `joinable`), each
    row's keys and values padded in front to the longest. Reuses, and so changes, `caches[0]`."""
    joined = caches[0]
    for i, layer in enumerate(joined.layers):
        parts: list[Any] = [c.layers[i] for c in caches]
        length = max(p.keys.shape[-2] for p in parts)
        for attr in ("keys", "values"):
            padded = [F.pad(getattr(p, attr), (0, 0, length - getattr(p, attr).shape[-2], 0)) for p in parts]
            setattr(layer, attr, torch.cat(padded))
        if isinstance(layer, DynamicSlidingWindowLayer):
            layer.cumulative_length = max(p.cumulative_length for p in parts)
    return joined


# Cache layers whose state is just keys and values (plus a token count for sliding windows).
_JOINABLE = (DynamicLayer, DynamicSlidingWindowLayer)
