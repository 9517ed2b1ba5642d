"""Student version registry on disk: immutable versions and an atomic CURRENT pointer.

    <root>/versions/<name>/adapter/    peft adapter weights and config
    <root>/versions/<name>/meta.json   parent, data window, gate report, creation time
    <root>/COUNTER                     last version number handed out; names are never reused

and its mutable part (`pointer.py`), in files beside them or, with `signal.url`, in PostgreSQL:
the serving version's name (CURRENT; "base" = no adapter), every pointer change (time, from,
to, reason), and each version's routing state (floor, calibrator), which changes after
promotion, so it lives outside the version.

Writers are the loop (promote) and rollback (admin endpoint, CLI, auto-rollback); readers are
the gateway's publisher, which hot-swaps when CURRENT changes. A version is written to a
temporary folder and renamed into place, so a reader never sees half a version, and is never
written again: what is learned about it later (a calibrator fitted on its live traffic) goes
into its routing state, replaced whole by an atomic rename.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distill_loop.config import DistillConfig, SignalConfig
from distill_loop.errors import DistillError
from distill_loop.pointer import FileState, RegistryState, atomic_write, flocked, registry_state
from router import IDENTITY, PRIOR, Calibrator, Floor, PrefixScorer, quality_floor

BASE = "base"
# A staging folder untouched this long was left by a trainer that died while writing it.
STALE_STAGING_S = 3600.0


class UnknownVersion(DistillError, LookupError):
    """No such version in the registry (or it was pruned). To a client: 404."""

    http_status = 404
    error_type = "invalid_request_error"
    code = "version_not_found"


@dataclass(frozen=True, slots=True)
class VersionMeta:
    name: str
    parent: str
    created_at: float
    data_window: dict[str, Any] = field(default_factory=dict)
    gate: dict[str, Any] = field(default_factory=dict)
    base_model: str = ""


@dataclass(frozen=True, slots=True)
class RoutingState:
    """How the gateway routes one student version, beyond the tenant's threshold."""

    # The lowest threshold the version may be routed with (None: no floor). Set at promotion
    # from the gate's routing replay (its report's `routing_threshold`).
    floor: float | None = None
    # Raw confidence -> P(answer acceptable), fitted on this version's own traffic.
    calibrator: Calibrator = IDENTITY
    # What the floor rests on: (raw confidence, agreed with the teacher) per held-out or
    # audited item, so a tenant with its own quality target gets its own floor (`floor_for`).
    evidence: tuple[tuple[float, bool], ...] = ()
    # The version's early-decision model (router/prefix.py), fitted on its own full drafts; the
    # prior until there are enough.
    prefix: PrefixScorer = PRIOR

    def floor_for(self, target: float, z: float) -> Floor | None:
        """The quality-target floor on this version's evidence, in the router's confidence
        (through the calibrator); None without evidence."""
        if not self.evidence:
            return None
        return quality_floor([self.calibrator(c) for c, _ in self.evidence], [a for _, a in self.evidence], target, z)

    def to_json(self) -> dict[str, Any]:
        return {
            "floor": self.floor,
            "calibrator": self.calibrator.to_json(),
            "evidence": [[c, a] for c, a in self.evidence],
            "prefix": self.prefix.to_json(),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RoutingState:
        floor = data.get("floor")
        cal = data.get("calibrator")
        evidence = tuple((float(c), bool(a)) for c, a in data.get("evidence") or ())
        prefix = PrefixScorer.from_json(data["prefix"]) if data.get("prefix") else PRIOR
        return cls(
            None if floor is None else float(floor), Calibrator.from_json(cal) if cal else IDENTITY, evidence, prefix
        )


class Registry:
    def __init__(self, root: Path, keep: int = 5, state: RegistryState | None = None) -> None:
        self.root = root
        self.keep = keep
        self.state = state or FileState(root)
        (root / "versions").mkdir(parents=True, exist_ok=True)

    # -- reading -----------------------------------------------------------------------------
    def current(self) -> str:
        return self.state.current(BASE)

    def _folder(self, name: str) -> Path:
        """A version's folder. A staging folder (`.<name>.tmp`) is none: a trainer that died
        while writing a version leaves one behind, whole or not, and it must never serve."""
        if name.startswith("."):
            raise UnknownVersion(f"{name!r} is a version being written, or left half-written")
        return self.root / "versions" / name

    def adapter_dir(self, name: str) -> Path | None:
        if name == BASE:
            return None
        path = self._folder(name) / "adapter"
        if not path.is_dir():
            raise UnknownVersion(f"version {name!r} is not in the registry")
        return path

    def meta(self, name: str) -> VersionMeta:
        path = self._folder(name) / "meta.json"
        if not path.is_file():
            raise UnknownVersion(f"version {name!r} is not in the registry")
        return VersionMeta(**json.loads(path.read_text()))

    def routing_state(self, name: str) -> RoutingState:
        """The version's routing state as last saved; before any save, its floor is the
        threshold the gate promoted it with (none for the base model or without a replay)."""
        saved = self.state.routing(name)
        if saved is not None:
            return RoutingState.from_json(saved)
        if name == BASE:
            return RoutingState()
        floor = (self.meta(name).gate or {}).get("routing_threshold")
        return RoutingState(floor=None if floor is None else float(floor))

    def routing_stamp(self) -> int:
        """Changes whenever any version's routing state is saved (a floor raised by the loop,
        a refit, another process): readers re-apply floors without waiting for a swap."""
        return self.state.stamp()

    def versions(self) -> list[str]:
        """Kept versions, oldest first (by version number)."""
        names = [
            p.name
            for p in (self.root / "versions").iterdir()
            if not p.name.startswith(".") and (p / "meta.json").is_file()
        ]
        return sorted(names)

    def history(self) -> list[dict[str, Any]]:
        return self.state.history()

    def previous(self) -> str | None:
        """The version served before the current one, if any."""
        hist = self.history()
        return str(hist[-1]["from"]) if hist else None

    # -- writing -----------------------------------------------------------------------------
    def new_name(self) -> str:
        with flocked(self.root / ".lock"):
            counter = self.root / "COUNTER"
            n = int(counter.read_text()) + 1 if counter.exists() else 1
            atomic_write(counter, str(n))
        return f"v{n:04d}"

    def add(self, name: str, adapter_src: Path, meta: VersionMeta) -> None:
        """Move a trained adapter folder into the registry as an immutable version."""
        target = self.root / "versions" / name
        if target.exists():
            raise DistillError(f"version {name!r} exists; names are never reused")
        staging = self.root / "versions" / f".{name}.tmp"
        if staging.exists():
            shutil.rmtree(staging)
        staging.mkdir()
        shutil.copytree(adapter_src, staging / "adapter")
        (staging / "meta.json").write_text(json.dumps(_asdict(meta), indent=2))
        os.replace(staging, target)

    def save_routing_state(self, name: str, state: RoutingState) -> None:
        """Replace a version's routing state whole (atomic rename); the version stays untouched."""
        if name != BASE:
            self.meta(name)
        self.state.save_routing(name, state.to_json())

    def set_current(self, name: str, reason: str) -> str:
        """Point CURRENT at `name` (which must exist); returns the old pointer."""
        if name != BASE:
            self.meta(name)
        old = self.state.set_current(name, reason, BASE)
        self.prune()
        return old

    def prune(self) -> list[str]:
        """Delete the oldest versions beyond `keep`, never the current or previous one, and
        the staging folders that trainers which died while writing a version left behind
        (untouched for `STALE_STAGING_S`: one being written now is seconds old)."""
        protected = {self.current(), self.previous() or BASE}
        names = self.versions()
        removed = []
        for name in names[: max(0, len(names) - self.keep)]:
            if name not in protected:
                shutil.rmtree(self.root / "versions" / name)
                self.state.drop_routing(name)
                removed.append(name)
        stale = time.time() - STALE_STAGING_S
        for staging in (self.root / "versions").glob(".*.tmp"):
            try:
                if staging.stat().st_mtime < stale:
                    shutil.rmtree(staging)
                    removed.append(staging.name)
            except FileNotFoundError:  # another process pruned it first
                continue
        return removed


def _asdict(meta: VersionMeta) -> dict[str, Any]:
    return dataclasses.asdict(meta)


def open_registry(distill: DistillConfig, signal: SignalConfig) -> Registry:
    """The registry as configured: its pointer and routing state in the signal database when
    that is shared (`signal.url`), else in files in the registry folder."""
    return Registry(
        distill.registry_dir, keep=distill.keep_versions, state=registry_state(distill.registry_dir, signal.url)
    )
