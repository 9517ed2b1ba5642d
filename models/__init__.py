"""Model backends behind one protocol: in-process transformers, remote OpenAI-compatible, fake."""

from __future__ import annotations

from pathlib import Path

from models.base import (
    Backend,
    BackendInfo,
    ChatMessage,
    Generation,
    GenerationDelta,
    SamplingParams,
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
    "FakeBackend",
    "Generation",
    "GenerationDelta",
    "InvalidGenerationRequest",
    "SamplingParams",
    "Scripted",
    "TokenLogprob",
    "TopLogprob",
    "Usage",
    "build_backend",
    "collect",
    "resolve_model_dir",
]


def build_backend(config: BackendConfig, *, cache_dir: Path | None = None) -> Backend:
    """The backend a config names. Torch is imported only for the local kind."""
    if config.kind == "remote":
        from models.remote import RemoteBackend

        return RemoteBackend(config)
    if config.kind == "fake":
        return FakeBackend(config)
    from models.local import LocalBackend

    return LocalBackend(config, cache_dir=cache_dir)
