"""The loop inside the gateway and `python -m distill_loop run` gate the same records alike.

Both build the gate's judge from the same sources (router config, the persisted policy book,
the serving version's routing state). Here the default tenant's persisted policy (0.0) differs
from the configured threshold (0.5): a trainer that read only its config would replay routing
at 0.5 and reach another routing floor.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from distill_loop import Registry, SignalConfig, SignalStore
from gateway.metrics import Metrics
from gateway.settings import load_settings
from gateway.student import StudentManager
from models import FakeBackend
from models.local import LocalBackend
from router import DEFAULT_TENANT, FixedThreshold, PolicyBook
from tests.fakes import intent_samples

ROOT = Path(__file__).resolve().parents[2]


def config(tmp_path: Path, model_dir: Path) -> Path:
    data = {
        "student": {"kind": "local", "model": str(model_dir), "device": "cpu", "dtype": "float32"},
        "teacher": {"kind": "fake"},
        "router": {"threshold": 0.5},
        "signal": {"path": str(tmp_path / "signal.db")},
        "tuning": {"policy_db": str(tmp_path / "policies.db")},
        "distill": {
            "registry_dir": str(tmp_path / "registry"),
            "trigger_records": 4,
            "holdout_fraction": 0.25,
            "losses": {"error_correction": False},
            "lora": {"r": 8, "alpha": 16, "lr": 2e-2, "epochs": 50, "batch_size": 8, "max_steps": 200},
            "gate": {"max_new_tokens": 12, "min_heldout": 4, "max_p_value": 1.0},
            # Routing at the persisted policy is what is compared; a quality-target floor would
            # sit above it (test_quality_floor.py).
            "quality_target": 0.0,
        },
    }
    path = tmp_path / "tiergate.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.anyio
async def test_in_gateway_loop_and_standalone_trainer_reach_the_same_gate_decision(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    cfg_file = config(tmp_path, tiny_model_dir)
    settings = load_settings(cfg_file)
    store = SignalStore(SignalConfig(path=settings.signal.path))
    store.open()
    for s in intent_samples():
        store.submit(s)
    store.close()
    policies = PolicyBook(settings.policy_db, settings.router.threshold)
    policies.open()
    await policies.set(DEFAULT_TENANT, FixedThreshold(0.0), "test")

    # In the gateway: the loop its StudentManager builds.
    manager = StudentManager(settings, LocalBackend(settings.student), FakeBackend(settings.teacher), Metrics())
    assert manager.loop is not None
    in_gateway = manager.loop.run_once()
    assert in_gateway.result == "promoted" and in_gateway.gate is not None, in_gateway
    assert in_gateway.gate.routing_threshold == 0.0  # routed at the persisted policy, not the config's 0.5
    gateway_gate = Registry(settings.distill.registry_dir).meta("v0001").gate

    # The same records, from scratch, in a trainer process of its own.
    for path in sorted(settings.distill.registry_dir.rglob("*"), reverse=True):
        path.unlink() if not path.is_dir() else path.rmdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("TIERGATE_")}
    done = subprocess.run(
        [sys.executable, "-m", "distill_loop", "run", "--once", "--config", str(cfg_file)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "promoted: passed v0001" in done.stdout, done.stdout[-3000:]
    assert Registry(settings.distill.registry_dir).meta("v0001").gate == gateway_gate
