"""Settings precedence (CLI > env > YAML > defaults), tier merging and the CLI flags."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.__main__ import parse_args
from gateway.settings import Settings, cli_overrides, load_settings

ROOT = Path(__file__).resolve().parents[2]


def test_example_config_documents_every_key_and_loads() -> None:
    s = load_settings(ROOT / "config.example.yaml")
    assert s.teacher.model == "gemma-3-270m" and s.teacher.system_prompt  # partial tier keeps defaults
    text = (ROOT / "config.example.yaml").read_text()
    models = [getattr(s, section) for section in ("server", "student", "router", "signal", "pricing", "runtime")]
    models += [s.distill, s.distill.lora, s.distill.losses, s.distill.gate, s.tuning]
    for model in models:
        for key in type(model).model_fields:
            assert f"{key}:" in text, f"{type(model).__name__}.{key} is not documented in config.example.yaml"


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
