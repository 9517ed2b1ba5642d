"""The soak (bench/soak.py): its identifier scan can fail, and one shortened cycle holds every invariant.

The slow test runs the real thing (two fake upstreams behind chaos proxies, `python -m gateway`,
kill -9 and a restart) for one 30 s cycle: faults shorter than the breaker's stall_s, so it
checks the invariants, not the breakers' timings (the 3-minute run in bench/README.md does).
"""

from __future__ import annotations

import json
import random
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from bench.soak import REPO, identifier, scan
from distill_loop import Redactor


def test_generated_identifiers_are_ones_the_redactor_promises_to_catch() -> None:
    rng, redactor = random.Random(0), Redactor()
    for _ in range(200):
        written, forms = identifier(rng)
        out = redactor.text(f"Order #12: can I change the delivery address? Reach me at {written}. HARD question.")
        assert written in forms and not any(f in out for f in forms), (written, out)


def test_the_scan_finds_a_raw_identifier_in_a_database_and_its_wal(tmp_path: Path) -> None:
    written, forms = identifier(random.Random(3))
    db = tmp_path / "signal.db"
    conn = sqlite3.connect(db)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("CREATE TABLE t (x TEXT)")
    conn.execute("INSERT INTO t VALUES (?)", (json.dumps({"content": f"mail {written}"}),))
    conn.commit()
    found = scan([db, tmp_path / "signal.db-wal", tmp_path / "absent.log"], set(forms))
    conn.close()
    assert found["signal.db-wal"] >= 1 and "absent.log" not in found
    assert scan([db], {"nobody@example.org"}) == {"signal.db": 0}


@pytest.mark.slow
def test_one_short_soak_cycle_holds_every_invariant(tmp_path: Path) -> None:
    out = tmp_path / "soak.json"
    cmd = [sys.executable, "-m", "bench.soak", "--minutes", "0.5", "--cycle-s", "30", "--output", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=85)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    report = json.loads(out.read_text())
    assert report["all_passed"] and all(c["passed"] for c in report["invariants"])
    (cycle,) = report["cycles"]
    assert cycle["quiet_failures_outside_burst"] == 0
    assert cycle["database"] == {**cycle["database"], "integrity": "ok", "acked_missing": 0}
    assert cycle["database"]["acked"] > 0  # escalations the teacher answered were checked
    assert cycle["burst"]["shed_503"] > 0  # the burst really overloaded the student's admission
    assert cycle["flood"]["rate_limited_429"] > 0 and cycle["flood"]["teacher_usd"] <= cycle["flood"]["budget_usd"]
    assert cycle["dropper"]["disconnects_metric"] > 0
    assert report["raw_identifiers_written"] > 0 and sum(report["raw_identifiers_found"].values()) == 0
