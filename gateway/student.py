"""Owns which student version serves: follows the registry's CURRENT, runs the loop, rolls back.

The same registry is written by the in-gateway loop, by `python -m distill_loop run` on
another machine, and by rollbacks (admin endpoint, CLI, auto). A watcher polls CURRENT and
hot-swaps the student when it changes, so every writer takes effect the same way. What a
student can do is asked through the capability protocols in models/base.py, never its class:
a `SwappableStudent` (in-process) loads versions itself and swaps between decode steps, a
`RuntimeLoraStudent` (vLLM server or in-process AsyncLLM) swaps runtime LoRA adapters. Nothing
here imports torch: the loop and publishers load only when this student needs them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from distill_loop import Registry, UnknownVersion, open_registry, training_student
from gateway.metrics import Metrics
from gateway.settings import Settings
from models import Backend, RuntimeLoraStudent, SwappableStudent

if TYPE_CHECKING:
    from distill_loop import DistillLoop, LocalPublisher, VllmPublisher

log = logging.getLogger(__name__)
# Called with the serving version once the student is up (`swapped` False) and after each swap.
OnServing = Callable[[str, bool], Awaitable[None]]


class StudentManager:
    def __init__(
        self,
        settings: Settings,
        student: Backend,
        teacher: Backend,
        metrics: Metrics,
        on_serving: OnServing | None = None,
    ) -> None:
        self.settings = settings
        self._on_serving = on_serving
        self.metrics = metrics
        self.student = student
        cfg = settings.distill
        self.registry: Registry | None = None
        self.publisher: LocalPublisher | VllmPublisher | None = None
        trainable = training_student(settings.student, cfg) is not None
        if isinstance(student, SwappableStudent):
            from distill_loop import LocalPublisher

            self.registry = open_registry(cfg, settings.signal)
            self.publisher = LocalPublisher(self.registry, student)
        elif isinstance(student, RuntimeLoraStudent) and trainable:
            # The publisher is made once the engine has told us its model name (start()).
            self.registry = open_registry(cfg, settings.signal)
        self.loop: DistillLoop | None = None
        if cfg.enabled and self.registry is not None:
            from distill_loop import DistillLoop

            critic = teacher if cfg.losses.critique else None
            self.loop = DistillLoop.from_settings(settings, listener=metrics.on_distill_event, critic=critic)
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self, student_started: asyncio.Task[None]) -> None:
        """Once the student is loaded: serve CURRENT, then watch it and run the loop."""

        async def begin() -> None:
            await student_started
            if self.registry is not None and self.publisher is None and isinstance(self.student, RuntimeLoraStudent):
                from distill_loop import VllmPublisher

                self.publisher = VllmPublisher(self.registry, self.student)
            if await self.sync(initial=True) is None and self._on_serving is not None:
                await self._on_serving(self.student.info.version, False)
            if self.registry is None:
                return
            self._tasks.append(asyncio.create_task(self._watch(), name="student-watch"))
            if self.loop is not None:
                self._tasks.append(asyncio.create_task(self.loop.run_forever(self._stop), name="distill-loop"))

        self._tasks.append(asyncio.create_task(begin(), name="student-begin"))

    async def sync(self, *, initial: bool = False) -> str | None:
        """Serve the registry's CURRENT if it is not served yet; returns the version swapped to.
        `initial`: the start-up sync, which restores what was served rather than changing it."""
        if self.publisher is None:
            return None
        name = await self.publisher.sync()
        if name is not None:
            hist = self.publisher.registry.history()
            reason = str(hist[-1]["reason"]) if hist else "start"
            self.metrics.on_swap(name, self.student.info.name, reason)
            if self._on_serving is not None:
                await self._on_serving(name, not initial)  # routing state and policies follow the student
        return name

    async def _watch(self) -> None:
        stamp = await asyncio.to_thread(self.require_registry().routing_stamp)
        while not self._stop.is_set():
            try:
                swapped = await self.sync()
                now = await asyncio.to_thread(self.require_registry().routing_stamp)
                if now != stamp and swapped is None and self._on_serving is not None:
                    # A floor raised by the loop (or another process) applies without a swap.
                    await self._on_serving(self.student.info.version, False)
                stamp = now
            except Exception:  # noqa: BLE001 - a bad version must not stop the watcher or serving
                log.exception("student swap failed; still serving %s", self.student.info.version)
            await self._until_change_or(self.settings.sync.interval_s)

    async def _until_change_or(self, timeout: float) -> None:
        """Until the registry's state changes elsewhere (PostgreSQL: LISTEN), `stop`, or `timeout`."""
        state = self.require_registry().state
        if not state.notifies:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), timeout=timeout)
            return
        changed = asyncio.ensure_future(asyncio.to_thread(state.wait_for_change, timeout))
        stopped = asyncio.ensure_future(self._stop.wait())
        await asyncio.wait({changed, stopped}, return_when=asyncio.FIRST_COMPLETED)
        stopped.cancel()

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
        if self.publisher is not None:
            await self.publisher.drain()  # a vLLM student's pending adapter unloads
        if self.loop is not None:
            self.loop.cancel()
        if self._tasks:
            _, pending = await asyncio.wait(self._tasks, timeout=timeout)
            for task in pending:
                task.cancel()
