"""All gateway settings, from one YAML file, `TIERGATE_<SECTION>__<KEY>` variables and CLI flags.

Precedence, highest first: CLI flags, environment, YAML file, defaults. This is the only
module that reads the environment; every inner package gets its frozen config passed in.
"""

from __future__ import annotations

from contextvars import ContextVar
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

from distill_loop import DistillConfig, SignalConfig
from models import BUNDLED, BackendConfig
from router import RouterConfig

DEFAULT_TEACHER_PROMPT = (
    "The following is a conversation between a customer and a support agent. "
    "The agent answers in one short, accurate, friendly sentence.\n\n"
    "Customer: Can I change the delivery address of my order?\n"
    "Agent: Yes, you can change it under Orders > Edit address until the order ships."
)


DEFAULT_STUDENT = BackendConfig(model="smollm2-135m-instruct", prompt_format="chat_template")
DEFAULT_TEACHER = BackendConfig(model="gemma-3-270m", prompt_format="transcript", system_prompt=DEFAULT_TEACHER_PROMPT)


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


class TuningConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    # SQLite file with per-tenant policies and their audit trail (default: beside signal.path).
    policy_db: Path | None = None
    # Route on calibrated P(student answer acceptable) instead of the raw score; refit after
    # every swap and every `refit_s` from audit and escalation records.
    calibrate: bool = False
    # Use a learned scikit-learn router (confidence + prompt features) instead of the scorer.
    learned_router: bool = False
    # With the learned router: prompts it rates at least this likely to need the teacher skip the student.
    skip_student_above: float = Field(default=0.95, ge=0.0, le=1.0)
    # Seconds between scheduled refits.
    refit_s: float = Field(default=600.0, gt=0)
    # Hours of logged traffic used by refits and what-if (0 = everything).
    window_hours: float = Field(default=168.0, ge=0)


class RuntimeConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    # torch intra-op threads for in-process models. 1 is fastest on a busy 2-core machine.
    torch_threads: int = Field(default=1, ge=1)
    # Where bundled GGUF models are converted to transformers folders, once.
    cache_dir: Path = Path.home() / ".cache" / "tiergate" / "models"
    # Python log level.
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    # Once both tiers are up, take the start-up heap out of the garbage collector's reach
    # (gc.freeze), and collect the youngest generation every this many allocations instead of
    # Python's 700 (0 keeps Python's). Together they cut the gateway's CPU per request by a
    # quarter and its p99 by three quarters under load (bench/README.md).
    gc_freeze: bool = True
    gc_gen0_threshold: int = Field(default=20_000, ge=0)

    @field_validator("cache_dir")
    @classmethod
    def _expand(cls, v: Path) -> Path:
        return v.expanduser()


_yaml_file: ContextVar[Path | None] = ContextVar("tiergate_yaml_file", default=None)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TIERGATE_", env_nested_delimiter="__", extra="forbid", frozen=True)

    server: ServerConfig = ServerConfig()
    # The tier that answers first. Default: SmolLM2-135M-Instruct in-process.
    student: BackendConfig = DEFAULT_STUDENT
    # The tier low-confidence requests escalate to. Default: Gemma-3-270M in-process,
    # prompted as a support agent (it is a base model, so a transcript prompt).
    teacher: BackendConfig = DEFAULT_TEACHER
    router: RouterConfig = RouterConfig()
    signal: SignalConfig = SignalConfig()
    distill: DistillConfig = DistillConfig()
    tuning: TuningConfig = TuningConfig()
    pricing: PricingConfig = PricingConfig()
    runtime: RuntimeConfig = RuntimeConfig()

    @field_validator("student", "teacher", mode="before")
    @classmethod
    def _merge_tier_defaults(cls, v: Any, info: Any) -> Any:
        # `teacher: {device: cuda}` changes the device only; it must not reset the model.
        if isinstance(v, dict):
            defaults = (DEFAULT_STUDENT if info.field_name == "student" else DEFAULT_TEACHER).model_dump()
            return {**defaults, **v}
        return v

    @property
    def policy_db(self) -> Path:
        return self.tuning.policy_db or self.signal.path.with_name("policies.db")

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        path = _yaml_file.get()
        if path is not None:
            sources.append(YamlConfigSettingsSource(settings_cls, yaml_file=path))
        return tuple(sources)


def load_settings(config_file: Path | None = None, **overrides: Any) -> Settings:
    """Build Settings from an optional YAML file, the environment and explicit overrides.

    `overrides` are nested dicts by section, e.g. `router={"threshold": 0.4}`; they win.
    """
    if config_file is not None and not config_file.is_file():
        raise FileNotFoundError(f"config file {config_file} does not exist")
    token = _yaml_file.set(config_file)
    try:
        return Settings(**overrides)
    finally:
        _yaml_file.reset(token)


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
