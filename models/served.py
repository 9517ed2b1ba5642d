"""Which served model name new requests use, and how many requests each name has in flight.

Shared by the backends that swap students by name (vLLM runtime LoRA, over HTTP or in-process):
a switch is one assignment, requests keep the name they started with, and an old name can be
retired once its count reaches zero. `ServedByName` gives those backends the name-switching half
of `models.RuntimeLoraStudent`; loading adapters is each backend's own. No I/O here.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from collections.abc import Iterator


class ServedNames:
    def __init__(self, model: str, version: str | None = None) -> None:
        self.model = model
        self.version = version  # a student's registry version; None: report the model name
        self._inflight: collections.Counter[str] = collections.Counter()

    def use(self, model: str, version: str | None = None) -> None:
        self.model, self.version = model, version

    def inflight(self, model: str) -> int:
        return self._inflight[model]

    async def wait_idle(self, model: str, timeout: float = 120.0) -> bool:
        """Wait until no request uses `model`; False if that took longer than `timeout`."""
        deadline = time.monotonic() + timeout
        while self._inflight[model] > 0:
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.02)
        return True

    @contextlib.contextmanager
    def using(self, default_version: str) -> Iterator[tuple[str, str]]:
        """Pin one request to the current name; yields (model, version) and counts it in flight."""
        model, version = self.model, self.version or default_version
        self._inflight[model] += 1
        try:
            yield model, version
        finally:
            self._inflight[model] -= 1


class ServedByName:
    """`served_model`, `use_model`, `inflight` and `wait_idle` of `models.RuntimeLoraStudent`,
    read from `self._names`, which the subclass sets in its `__init__`."""

    _names: ServedNames

    @property
    def served_model(self) -> str:
        return self._names.model

    def use_model(self, model: str, version: str | None = None) -> None:
        """Send later requests to another served name (a LoRA adapter, for instance).

        One assignment, so a request sees the old or the new name, never a mix. Requests
        already sent finish on the name they started with.
        """
        self._names.use(model, version)

    def inflight(self, model: str) -> int:
        """Requests now running against a served name."""
        return self._names.inflight(model)

    async def wait_idle(self, model: str, timeout: float = 120.0) -> bool:
        return await self._names.wait_idle(model, timeout)
