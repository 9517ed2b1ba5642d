"""The settings every tiergate process shares: the tiers, routing, signal store, distillation,
tuning and runtime, from one YAML file and `TIERGATE_<SECTION>__<KEY>` variables.

The gateway's `Settings` (gateway/settings.py) extends these with its HTTP server and pricing;
`python -m distill_loop` reads these alone from the same file and variables, ignoring the
gateway's own sections, so a trainer process and the gateways agree on every path and
default without importing the gateway. Precedence, highest first: explicit overrides,
environment, YAML file, defaults. Inner packages never read the environment; entry points
build settings here and pass the frozen sections down.
"""

from __future__ import annotations

from contextvars import ContextVar
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

from distill_loop.config import DistillConfig, SignalConfig
from models import BackendConfig
from router import JudgeSource, RouterConfig, Where

DEFAULT_TEACHER_PROMPT = (
    "The following is a conversation between a customer and a support agent. "
    "The agent answers in one short, accurate, friendly sentence.\n\n"
    "Customer: Can I change the delivery address of my order?\n"
    "Agent: Yes, you can change it under Orders > Edit address until the order ships."
)


DEFAULT_STUDENT = BackendConfig(model="smollm2-135m-instruct", prompt_format="chat_template")
DEFAULT_TEACHER = BackendConfig(model="gemma-3-270m", prompt_format="transcript", system_prompt=DEFAULT_TEACHER_PROMPT)


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
    # Refit each version's early-decision model (router/prefix.py) on its logged full drafts
    # after every swap and every `refit_s`; until one is fitted, the prior decides.
    prefix: bool = True
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


class SharedSettings(BaseSettings):
    """What every process reads. Sections it does not know (the gateway's) are ignored here."""

    model_config = SettingsConfigDict(env_prefix="TIERGATE_", env_nested_delimiter="__", extra="ignore", frozen=True)

    # The tier that answers first. Default: SmolLM2-135M-Instruct in-process.
    student: BackendConfig = DEFAULT_STUDENT
    # The tier low-confidence requests escalate to. Default: Gemma-3-270M in-process,
    # prompted as a support agent (it is a base model, so a transcript prompt).
    teacher: BackendConfig = DEFAULT_TEACHER
    router: RouterConfig = RouterConfig()
    signal: SignalConfig = SignalConfig()
    distill: DistillConfig = DistillConfig()
    tuning: TuningConfig = TuningConfig()
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

    @property
    def policy_store(self) -> Where:
        """Where per-tenant policies and limits live: the shared database when there is one
        (`signal.url`, so every replica applies a change), else this process's `policy_db`."""
        return self.signal.url or self.policy_db

    def judge_source(self) -> JudgeSource:
        """What the distillation gate replays routing with: the same in every process."""
        return JudgeSource(self.router, self.policy_store, self.tuning.calibrate)

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


S = TypeVar("S", bound=SharedSettings)


def training_student(student: BackendConfig, config: DistillConfig) -> BackendConfig | None:
    """The local model the loop trains for this student, or None when it cannot train one.

    An in-process student trains as itself. A remote (vLLM) student trains from
    `distill.student_base`, the same weights held locally, rendered with its chat template.
    """
    if student.kind == "local":
        return student
    if config.student_base:
        return student.model_copy(
            update={"kind": "local", "model": config.student_base, "prompt_format": "chat_template"}
        )
    return None


def load_settings_as(cls: type[S], config_file: Path | None = None, **overrides: Any) -> S:
    """Build Settings from an optional YAML file, the environment and explicit overrides.

    `overrides` are nested dicts by section, e.g. `router={"threshold": 0.4}`; they win.
    """
    if config_file is not None and not config_file.is_file():
        raise FileNotFoundError(f"config file {config_file} does not exist")
    token = _yaml_file.set(config_file)
    try:
        return cls(**overrides)
    finally:
        _yaml_file.reset(token)


def load_shared_settings(config_file: Path | None = None, **overrides: Any) -> SharedSettings:
    """The shared sections of a gateway config, for processes other than the gateway."""
    return load_settings_as(SharedSettings, config_file, **overrides)
