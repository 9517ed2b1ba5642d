"""Settings precedence (CLI > env > YAML > defaults), tier merging and the CLI flags."""

from __future__ import annotations

from operator import attrgetter
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from gateway.__main__ import parse_args
from gateway.settings import Settings, cli_overrides, load_settings

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "config.example.yaml"


def _section(model: type[BaseModel], name: str) -> type[BaseModel] | None:
    """The settings class of field `name` when it is a nested section, else None (a leaf)."""
    field = model.model_fields.get(name)
    annotation = field.annotation if field is not None else None
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def setting_keys(model: type[BaseModel], prefix: str = "") -> set[str]:
    """Every leaf setting as a dotted path (`distill.lora.r`), walking nested sections."""
    keys: set[str] = set()
    for name in model.model_fields:
        section = _section(model, name)
        keys |= setting_keys(section, f"{prefix}{name}.") if section else {prefix + name}
    return keys


def documented_keys(doc: dict[str, Any], model: type[BaseModel] | None, prefix: str = "") -> set[str]:
    """The dotted paths the YAML names, descending only where the settings have a section, so a
    dict-valued setting (`engine_args: {}`) is one key and an unknown key is kept as written."""
    keys: set[str] = set()
    for name, value in doc.items():
        section = _section(model, name) if model is not None else None
        if section is not None and isinstance(value, dict):
            keys |= documented_keys(value, section, f"{prefix}{name}.")
        else:
            keys.add(prefix + name)
    return keys


def test_setting_keys_walk_nested_sections() -> None:
    keys = setting_keys(Settings)
    assert {"distill.lora.r", "pricing.teacher.output_per_mtok", "teacher.system_prompt", "server.port"} <= keys
    assert "distill.lora" not in keys and "r" not in keys
    doc = {"distill": {"lora": {"r": 16}, "nope": 1}, "student": {"engine_args": {"x": 1}}}
    assert documented_keys(doc, Settings) == {"distill.lora.r", "distill.nope", "student.engine_args"}


def test_example_config_documents_every_key_with_its_default() -> None:
    doc = yaml.safe_load(EXAMPLE.read_text())
    documented, settings = documented_keys(doc, Settings), setting_keys(Settings)
    assert not settings - documented, f"settings missing from config.example.yaml: {sorted(settings - documented)}"
    assert not documented - settings, f"config.example.yaml names unknown keys: {sorted(documented - settings)}"
    example, defaults = load_settings(EXAMPLE), Settings()
    wrong = {
        key: (attrgetter(key)(example), attrgetter(key)(defaults))
        for key in sorted(documented)
        if attrgetter(key)(example) != attrgetter(key)(defaults)
    }
    assert not wrong, f"config.example.yaml values that are not the defaults (example, default): {wrong}"


def test_precedence_cli_over_env_over_yaml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("router: {threshold: 0.2}\nserver: {port: 9000}\nteacher: {device: cpu}\n")
    assert load_settings(cfg).router.threshold == 0.2
    monkeypatch.setenv("TIERGATE_ROUTER__THRESHOLD", "0.4")
    monkeypatch.setenv("TIERGATE_SIGNAL__AUDIT_FRACTION", "0.5")
    s = load_settings(cfg)
    assert (s.router.threshold, s.server.port, s.signal.audit_fraction) == (0.4, 9000, 0.5)
    assert s.teacher.device == "cpu" and s.teacher.model == "gemma-3-270m"
    assert load_settings(cfg, router={"threshold": 0.9}).router.threshold == 0.9


def test_tier_url_flags_switch_to_remote_and_ask_the_server_for_its_model() -> None:
    args = parse_args(["--student-url", "http://127.0.0.1:1/v1", "--threshold", "0.6", "--port", "0"])
    base = load_settings()
    s = load_settings(
        **cli_overrides(base=base, port=args.port, student_url=args.student_url, threshold=args.threshold)
    )
    assert s.student.kind == "remote" and s.student.url == "http://127.0.0.1:1/v1" and s.student.model == "auto"
    assert s.teacher.kind == "local" and s.router.threshold == 0.6 and s.server.port == 0


def test_bad_config_is_rejected(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("router: {threshold: 3}\n")
    with pytest.raises(ValueError, match="threshold"):
        load_settings(cfg)
    cfg.write_text("routr: {}\n")
    with pytest.raises(ValueError):
        load_settings(cfg)
    with pytest.raises(FileNotFoundError):
        load_settings(tmp_path / "missing.yaml")


def test_benchmark_gives_the_pass_through_the_gateways_gc_tuning() -> None:
    from bench.gateway_overhead import GC_GEN0_THRESHOLD

    assert Settings().runtime.gc_gen0_threshold == GC_GEN0_THRESHOLD
