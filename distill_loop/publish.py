"""Student hot-swap for in-process students: serve whatever the registry's CURRENT names.

`sync()` builds the named version (base weights + its LoRA adapter, merged) off the event loop
and hands it to the backend's owner thread between batches: in-flight batches finish on the
old model, the next batch uses the new one, and no request fails. The object that served
traffic is never mutated; a new one replaces it.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any, Protocol

import torch

from distill_loop.registry import BASE, Registry
from models import LoadedModel, resolve_model_dir

log = logging.getLogger(__name__)
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class SwappableStudent(Protocol):
    config: Any

    @property
    def info(self) -> Any: ...

    @property
    def loaded(self) -> LoadedModel | None: ...

    async def swap(self, loaded: LoadedModel) -> None: ...


def build_version(
    registry: Registry, name: str, model: str, dtype: str, device: Any, cache_dir: Path | None
) -> LoadedModel:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base_dir = resolve_model_dir(model, cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    net: Any = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    adapter = registry.adapter_dir(name)
    if adapter is not None:
        net = PeftModel.from_pretrained(net, adapter).merge_and_unload()
    net = net.to(dtype=_DTYPES[dtype]).to(device)
    net.eval()
    return LoadedModel(net, tokenizer, name)


class LocalPublisher:
    def __init__(self, registry: Registry, student: SwappableStudent, cache_dir: Path | None = None) -> None:
        self.registry = registry
        self.student = student
        self.cache_dir = cache_dir
        self._lock = asyncio.Lock()  # two syncs never build or swap at once

    async def sync(self) -> str | None:
        """Swap to the registry's CURRENT if it differs from what is served; returns the new name."""
        async with self._lock:
            target = self.registry.current()
            loaded = self.student.loaded
            if loaded is None or loaded.version == target:
                return None
            device = next(loaded.model.parameters()).device
            cfg = self.student.config
            new = await asyncio.to_thread(
                build_version, self.registry, target, cfg.model, cfg.dtype, device, self.cache_dir
            )
            await self.student.swap(new)
            log.info("student hot-swapped %s -> %s", loaded.version, target)
            return target


__all__ = ["BASE", "LocalPublisher", "build_version"]
