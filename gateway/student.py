"""Owns which student version serves: follows the registry's CURRENT, runs the loop, rolls back.

The same registry is written by the in-gateway loop, by `python -m distill_loop run` on
another machine, and by rollbacks (admin endpoint, CLI, auto). A watcher polls CURRENT and
hot-swaps the student when it changes, so every writer takes effect the same way: an
in-process student swaps models between batches, a vLLM student swaps runtime LoRA adapters.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from distill_loop import (
    DistillLoop,
    Judge,
    LocalPublisher,
    Registry,
    UnknownVersion,
    VllmPublisher,
    training_student,
)
from gateway.metrics import Metrics
from gateway.settings import Settings
from models import Backend, LocalBackend, RemoteBackend

log = logging.getLogger(__name__)
WATCH_S = 1.0


class StudentManager:
    def __init__(
        self,
        settings: Settings,
        student: Backend,
        teacher: Backend,
        metrics: Metrics,
        on_swap: Callable[[str], Awaitable[None]] | None = None,
        judge: Judge | None = None,
    ) -> None:
        """`judge` is the gateway's routing rule, replayed by the distillation gate."""
        self.settings = settings
        self._on_swap = on_swap
        self.metrics = metrics
        self.student = student
        cfg = settings.distill
        self.registry: Registry | None = None
        self.publisher: LocalPublisher | VllmPublisher | None = None
        train_as = training_student(settings.student, cfg)
        if isinstance(student, LocalBackend):
            self.registry = Registry(cfg.registry_dir, keep=cfg.keep_versions)
            self.publisher = LocalPublisher(self.registry, student, settings.runtime.cache_dir)
        elif isinstance(student, RemoteBackend) and train_as is not None:
            # The publisher is made once the server has told us its model name (start()).
            self.registry = Registry(cfg.registry_dir, keep=cfg.keep_versions)
        else:
            train_as = None
        self.loop: DistillLoop | None = None
        if cfg.enabled and train_as is not None:
            self.loop = DistillLoop(
                cfg,
                settings.signal.path,
                train_as,
                cache_dir=settings.runtime.cache_dir,
                listener=metrics.on_distill_event,
                critic=teacher if cfg.losses.critique else None,
                judge=judge,
            )
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self, student_started: asyncio.Task[None]) -> None:
        """Once the student is loaded: serve CURRENT, then watch it and run the loop."""
        if self.registry is None:
            return

        async def begin() -> None:
            await student_started
            if self.publisher is None and isinstance(self.student, RemoteBackend):
                self.publisher = VllmPublisher(self.registry, self.student)  # type: ignore[arg-type]
            await self.sync()
            self._tasks.append(asyncio.create_task(self._watch(), name="student-watch"))
            if self.loop is not None:
                self._tasks.append(asyncio.create_task(self.loop.run_forever(self._stop), name="distill-loop"))

        self._tasks.append(asyncio.create_task(begin(), name="student-begin"))

    async def sync(self) -> str | None:
        if self.publisher is None:
            return None
        name = await self.publisher.sync()
        if name is not None:
            hist = self.publisher.registry.history()
            reason = str(hist[-1]["reason"]) if hist else "start"
            self.metrics.on_swap(name, self.student.info.name, reason)
            if self._on_swap is not None:
                await self._on_swap(name)  # policies re-fit to the new student's confidences
        return name

    async def _watch(self) -> None:
        while not self._stop.is_set():
            try:
                await self.sync()
            except Exception:  # noqa: BLE001 - a bad version must not stop the watcher or serving
                log.exception("student swap failed; still serving %s", self.student.info.version)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), timeout=WATCH_S)

    def version_floors(self) -> dict[str, float]:
        """Each kept version's routing floor, from its gate report (promoted with one)."""
        registry = self.registry
        if registry is None:
            return {}
        floors = {name: registry.routing_floor(name) for name in registry.versions()}
        return {name: floor for name, floor in floors.items() if floor is not None}

    def require_registry(self) -> Registry:
        if self.registry is None:
            raise UnknownVersion("this student is not served in-process; it has no version registry here")
        return self.registry

    async def rollback(self, version: str, actor: str) -> tuple[str, str]:
        """Point CURRENT at a kept version and swap to it now. Returns (old, new)."""
        old = await asyncio.to_thread(self.require_registry().set_current, version, f"rollback by {actor}")
        await self.sync()
        return old, version

    async def stop(self, timeout: float) -> None:
        self._stop.set()
        if isinstance(self.publisher, VllmPublisher):
            await self.publisher.drain()
        if self.loop is not None:
            self.loop.cancel()
        if self._tasks:
            _, pending = await asyncio.wait(self._tasks, timeout=timeout)
            for task in pending:
                task.cancel()
