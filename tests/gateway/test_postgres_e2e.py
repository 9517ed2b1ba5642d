"""The gateway with its signal store on a real PostgreSQL server (`signal.url`), over loopback
HTTP with the openai SDK: records committed before the answer is sent, the day's teacher spend
read back at start, what-if reading the same store, and the export CLI."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from pydantic import SecretStr

from distill_loop import read_samples, signal_db, teacher_usage_since
from distill_loop.config import SignalConfig
from gateway import create_app
from tests.gateway.test_e2e import ask, sdk, settings_for
from tests.servers import serve_in_thread


def test_records_land_in_postgres_before_each_answer_and_every_reader_sees_them(
    student_url: str, teacher_url: str, tmp_path: Path, postgres_url: str
) -> None:
    settings = settings_for(student_url, teacher_url, tmp_path / "unused.db", audit=1.0, url=postgres_url)
    admin = {"admin_api_key": SecretStr("adm")}
    settings = settings.model_copy(update={"server": settings.server.model_copy(update=admin)})
    db = signal_db(settings.signal)
    app = create_app(settings)
    with serve_in_thread(app, ready_path="/health/ready") as url, sdk(url) as client:
        ids = []
        for stream in (False, True):
            raw = client.chat.completions.with_raw_response.create(
                model="tiered", messages=[{"role": "user", "content": "HARD: a lost parcel"}], stream=stream
            )
            if stream:
                list(raw.parse())
            ids.append(raw.headers["x-tiergate-request-id"])
            assert ids[-1] in {s.id for s in read_samples(db)}  # committed before the answer went out
        ask(client, "an easy one, audited", max_tokens=20)
        deadline = time.monotonic() + 10
        while len(list(read_samples(db))) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)  # the audit's teacher call and record come after its answer
        whatif = httpx.get(url + "/admin/whatif", headers={"authorization": "Bearer adm"}).json()
    assert not (tmp_path / "unused.db").exists()  # nothing went to SQLite
    records = list(read_samples(db))
    assert sorted(r.kind for r in records) == ["audit", "escalation", "escalation"]
    assert whatif["samples"] == 3
    # A restarted gateway reads back what each key spent today, from the same database.
    ((tenant, (prompt_tokens, completion_tokens)),) = teacher_usage_since(db, 0.0).items()
    assert tenant.startswith("key-") and prompt_tokens > 0 and completion_tokens > 0
    assert sum(r.teacher.usage.prompt_tokens for r in records) == prompt_tokens
    # The export CLI reads it too.
    out = tmp_path / "out.jsonl"
    cli = [sys.executable, "-m", "distill_loop", "export", str(out), "--url", postgres_url, "--kind", "escalation"]
    subprocess.run(cli, check=True, capture_output=True, timeout=120)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 2 and rows[0]["messages"][0]["content"] == "HARD: a lost parcel"


def test_a_signal_url_that_is_not_postgres_is_refused() -> None:
    with pytest.raises(ValueError, match="url"):
        SignalConfig(url="mysql://db/x")
