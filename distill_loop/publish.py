"""Student hot-swap: serve whatever the registry's CURRENT names, in-process or on vLLM.

`LocalPublisher.sync()` asks an in-process student to build the named version (base weights +
its LoRA adapter, merged) and swap to it between decode steps: rows already running finish on the
old model, requests after the swap start on the new one, and no request fails. The object that served traffic is
never mutated; a new one replaces it. `VllmPublisher` does the same through vLLM's runtime LoRA.
Neither imports torch: building weights is the student's job (`models.SwappableStudent`).
"""

from __future__ import annotations

import asyncio
import logging

from distill_loop.registry import BASE, Registry
from models import RuntimeLoraStudent, SwappableStudent

log = logging.getLogger(__name__)


class LocalPublisher:
    def __init__(self, registry: Registry, student: SwappableStudent) -> None:
        self.registry = registry
        self.student = student
        self._lock = asyncio.Lock()  # two syncs never build or swap at once

    async def sync(self) -> str | None:
        """Swap to the registry's CURRENT if it differs from what is served; returns the new name."""
        async with self._lock:
            target = self.registry.current()
            serving = self.student.info
            if not serving.ready or serving.version == target:
                return None
            await self.student.load_version(target, self.registry.adapter_dir(target))
            log.info("student hot-swapped %s -> %s", serving.version, target)
            return target

    async def drain(self) -> None:
        """Nothing outlives a swap in-process: the old weights go when their last batch ends."""


class VllmPublisher:
    """Hot-swap for a student on vLLM (a server, or the in-process engine), through runtime LoRA.

    Each load uses a name that is never reused (`student-<version>-<n>`): reloading a name in
    place risks serving stale prefix-cache entries (vllm #42125). The gateway switches to the
    new name in one assignment; an adapter is unloaded only after the requests using it have
    finished. The current and the previous version stay loaded, so a rollback to the previous
    version is a pure pointer switch.
    """

    def __init__(self, registry: Registry, student: RuntimeLoraStudent, *, keep_loaded: int = 2) -> None:
        self.registry = registry
        self.student = student
        self.base_name = student.served_model
        self.keep_loaded = keep_loaded
        self._loaded: dict[str, str] = {}  # version -> adapter name on the server, oldest first
        self._serving = BASE
        self._loads = 0
        self._lock = asyncio.Lock()
        self._unloads: set[asyncio.Task[None]] = set()
        student.use_model(self.base_name, BASE)  # the base model is version "base", as in-process

    async def sync(self) -> str | None:
        async with self._lock:
            target = self.registry.current()
            if target == self._serving:
                return None
            if target == BASE:
                name = self.base_name
            elif target in self._loaded:
                name = self._loaded.pop(target)  # re-inserted below as the newest
            else:
                adapter = self.registry.adapter_dir(target)
                assert adapter is not None
                self._loads += 1
                name = f"student-{target}-{self._loads}"
                await self.student.load_adapter(name, str(adapter.resolve()))
            if target != BASE:
                self._loaded[target] = name
            self.student.use_model(name, target)
            log.info("vLLM student switched %s -> %s (%s)", self._serving, target, name)
            self._serving = target
            for version in list(self._loaded)[: max(0, len(self._loaded) - self.keep_loaded)]:
                old = self._loaded.pop(version)
                task = asyncio.create_task(self._unload_when_idle(old), name=f"unload-{old}")
                self._unloads.add(task)
                task.add_done_callback(self._unloads.discard)
            return target

    async def _unload_when_idle(self, name: str) -> None:
        if not await self.student.wait_idle(name):
            log.warning("adapter %s still busy after the drain timeout; unloading anyway", name)
        try:
            await self.student.unload_adapter(name)
        except Exception:  # noqa: BLE001 - a failed unload leaks server memory, never a request
            log.exception("could not unload adapter %s", name)

    async def drain(self) -> None:
        if self._unloads:
            await asyncio.gather(*self._unloads, return_exceptions=True)
