"""Model backends behind one protocol: in-process transformers, remote OpenAI-compatible, fake."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from models.base import (
    Backend,
    BackendInfo,
    ChatMessage,
    DraftScorer,
    Generation,
    GenerationDelta,
    RuntimeLoraStudent,
    SamplingParams,
    SwappableStudent,
    TokenLogprob,
    TopLogprob,
    Usage,
    collect,
)
from models.config import BackendConfig
from models.convert import BUNDLED, resolve_model_dir
from models.errors import (
    BackendError,
    BackendRateLimited,
    BackendResponseError,
    BackendTimeout,
    BackendUnavailable,
    InvalidGenerationRequest,
)
from models.fake import FakeBackend, Scripted
from models.remote import RemoteBackend

if TYPE_CHECKING:
    from models.local import LoadedModel, LocalBackend, load_model, pick_device
    from models.prompt import build_prompt

__all__ = [
    "BUNDLED",
    "Backend",
    "BackendConfig",
    "BackendError",
    "BackendInfo",
    "BackendRateLimited",
    "BackendResponseError",
    "BackendTimeout",
    "BackendUnavailable",
    "ChatMessage",
    "DraftScorer",
    "FakeBackend",
    "Generation",
    "GenerationDelta",
    "InvalidGenerationRequest",
    "RemoteBackend",
    "LoadedModel",
    "LocalBackend",
    "RuntimeLoraStudent",
    "SamplingParams",
    "Scripted",
    "SwappableStudent",
    "TokenLogprob",
    "TopLogprob",
    "Usage",
    "build_backend",
    "build_prompt",
    "collect",
    "load_model",
    "pick_device",
    "resolve_model_dir",
]


def build_backend(config: BackendConfig, *, cache_dir: Path | None = None) -> Backend:
    """The backend a config names. Torch is imported only for the local kind."""
    if config.kind == "remote":
        return RemoteBackend(config)
    if config.kind == "fake":
        return FakeBackend(config)
    if config.kind == "vllm":
        from models.vllm_engine import VllmEngineBackend

        return VllmEngineBackend(config, cache_dir=cache_dir)
    from models.local import LocalBackend

    return LocalBackend(config, cache_dir=cache_dir)


_LOCAL = {"LocalBackend", "LoadedModel", "load_model", "pick_device", "build_prompt"}


def __getattr__(name: str) -> object:
    """In-process pieces import torch, so they load on first use, not with the package."""
    if name in _LOCAL:
        if name == "build_prompt":
            from models.prompt import build_prompt

            return build_prompt
        from models import local

        return getattr(local, name)
    raise AttributeError(f"module 'models' has no attribute {name!r}")
