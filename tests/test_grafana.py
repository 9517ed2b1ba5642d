"""The Grafana dashboard: valid JSON, sane layout, and every metric it queries is one the
gateway really exports (read from the app's own registry after real traffic)."""

from __future__ import annotations

import json
import re
from pathlib import Path

from fastapi.testclient import TestClient

from gateway import Settings, create_app
from models import BackendConfig, FakeBackend

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "deploy" / "grafana" / "tiergate.json"
SUFFIXES = ("_bucket", "_count", "_sum", "_created", "_total")


def exported_names(tmp_path: Path) -> set[str]:
    """Every series name the app's registry declares (labelled families too, before their first sample)."""
    settings = Settings(signal={"path": tmp_path / "s.db"})
    fake = BackendConfig(kind="fake", model="f")
    app = create_app(settings, student=FakeBackend(fake), teacher=FakeBackend(fake))
    with TestClient(app) as c:
        c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
    names = set()
    for family in app.state.service.metrics.registry.collect():
        kind = family.type
        names.add(family.name)
        names.update(
            family.name + s for s in {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum")}.get(kind, ())
        )
        names.update(s.name for s in family.samples)
    return names


def test_dashboard_is_valid_and_queries_only_real_metrics(tmp_path: Path) -> None:
    dash = json.loads(DASHBOARD.read_text())
    assert dash["title"] == "tiergate" and dash["uid"]
    panels = [p for p in dash["panels"] if p["type"] != "row"]
    assert len(panels) >= 12
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for p in dash["panels"]:
        g = p["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24 and g["h"] > 0
    exprs = [t["expr"] for p in panels for t in p["targets"]] + [a["expr"] for a in dash["annotations"]["list"]]
    exported = exported_names(tmp_path)
    used = {m for e in exprs for m in re.findall(r"\btiergate_[a-z_]+", e)}
    for name in used:
        assert name in exported or any(name.endswith(s) and name in exported for s in SUFFIXES), name
    for e in exprs:
        assert e.count("(") == e.count(")"), e
        # Prometheus scrapes each replica: a rate is only the deployment's once aggregated
        # over them (a bare one draws a line per replica, and dividing it by a sum matches nothing).
        for rate in re.finditer(r"\b(?:rate|increase)\(", e):
            assert re.search(r"\b(?:sum|max)(?: by \([^)]*\))? ?\($", e[: rate.start()]), e
    # The panels the SREs asked for: cost, latency, escalations by reason, the student version.
    titles = " ".join(p["title"].lower() for p in panels)
    for word in ("escalation", "spend", "latency", "version", "threshold"):
        assert word in titles
