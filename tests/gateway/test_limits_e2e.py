"""Per-key limits end to end over real sockets: the gateway under uvicorn on loopback, both tiers
fake OpenAI-compatible servers, real SQLite. The 429 and its headers, the teacher budget serving
degraded answers, the admin API with its audit trail, and one key flooding beside a quiet one."""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import statistics
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from distill_loop import read_samples
from gateway import Settings, create_app
from gateway.routes import key_id
from gateway.settings import LimitsConfig, ServerConfig, TenantLimits
from tests.fakes import UpstreamScript
from tests.gateway.test_e2e import settings_for
from tests.servers import metric, serve_in_thread

ADMIN = "limits-admin"
RATE_HEADERS = {
    f"x-ratelimit-{what}-{name}" for what in ("limit", "remaining", "reset") for name in ("requests", "tokens")
}


def limited(base: Settings, keys: list[str], default: TenantLimits, **tenants: TenantLimits) -> Settings:
    return base.model_copy(
        update={
            "server": ServerConfig(api_keys=keys, admin_api_key=ADMIN),
            "limits": LimitsConfig(default=default, tenants=tenants),
        }
    )


def chat(client: httpx.Client, key: str, text: str, **body: Any) -> httpx.Response:
    payload = {"model": "tiered", "messages": [{"role": "user", "content": text}], "max_tokens": 20, **body}
    return client.post("/v1/chat/completions", json=payload, headers={"authorization": f"Bearer {key}"})


def test_over_the_request_limit_is_a_429_with_retry_after_and_openais_headers(
    student_url: str, teacher_url: str, tmp_path: Path
) -> None:
    base = settings_for(student_url, teacher_url, tmp_path / "signal.db")
    settings = limited(base, ["k1", "k2"], TenantLimits(requests_per_minute=2, tokens_per_minute=1000))
    with serve_in_thread(create_app(settings), ready_path="/health/ready") as url, httpx.Client(base_url=url) as c:
        first = chat(c, "k1", "where is my parcel")
        assert first.status_code == 200 and set(first.headers) >= RATE_HEADERS
        assert (first.headers["x-ratelimit-limit-requests"], first.headers["x-ratelimit-remaining-requests"]) == (
            "2",
            "1",
        )
        # Charged 4 + 20 tokens on arrival, then settled to the 11 + 8 the student used.
        assert 981 <= int(first.headers["x-ratelimit-remaining-tokens"]) <= 983
        assert first.headers["x-ratelimit-reset-requests"].endswith("s")
        assert chat(c, "k1", "and now?").headers["x-ratelimit-remaining-requests"] == "0"

        refused = chat(c, "k1", "third")
        assert refused.status_code == 429
        assert refused.json()["error"] == {
            "message": refused.json()["error"]["message"],
            "type": "rate_limit_exceeded",
            "param": None,
            "code": "rate_limit_exceeded",
        }
        assert "requests per minute" in refused.json()["error"]["message"]
        assert set(refused.headers) >= RATE_HEADERS
        assert refused.headers["x-ratelimit-remaining-requests"] == "0"
        assert 25 <= int(refused.headers["retry-after"]) <= 30  # one request back every 30 s
        assert chat(c, "k2", "another key").status_code == 200  # its own bucket
        assert metric(url, "tiergate_rate_limited_total", limit="requests") == 1
        assert metric(url, "tiergate_rate_limited_total", limit="tokens") == 0
        # No limits, no headers: a gateway without limits answers as it always has.
    with serve_in_thread(create_app(base), ready_path="/health/ready") as url, httpx.Client(base_url=url) as c:
        plain = chat(c, "k1", "hello")
        assert plain.status_code == 200 and not any(h.startswith("x-ratelimit") for h in plain.headers)


def test_a_spent_teacher_budget_serves_the_draft_degraded_and_counts_it(
    student_url: str, teacher_url: str, tmp_path: Path, student_script: UpstreamScript
) -> None:
    db = tmp_path / "signal.db"
    base = settings_for(student_url, teacher_url, db, audit=1.0)  # every confident answer audited
    settings = limited(base, ["k1"], TenantLimits(teacher_calls_per_minute=1))
    with serve_in_thread(create_app(settings), ready_path="/health/ready") as url, httpx.Client(base_url=url) as c:
        escalated = chat(c, "k1", "HARD one")
        assert escalated.headers["x-tiergate-tier"] == "teacher"

        degraded = chat(c, "k1", "HARD two")
        assert degraded.status_code == 200
        assert (degraded.headers["x-tiergate-tier"], degraded.headers["x-tiergate-reason"]) == (
            "student",
            "teacher_budget",
        )
        body = degraded.json()
        assert body["tiergate"]["degraded"] is True and body["tiergate"]["reason"] == "teacher_budget"
        assert body["choices"][0]["message"]["content"] == student_script.text

        payload = {"model": "tiered", "messages": [{"role": "user", "content": "HARD"}], "stream": True}
        with c.stream("POST", "/v1/chat/completions", json=payload, headers={"authorization": "Bearer k1"}) as s:
            assert s.headers["x-tiergate-reason"] == "teacher_budget"
            assert "data: [DONE]" in s.read().decode()

        forced = chat(c, "k1", "straight to the teacher", model="teacher")  # no draft to fall back on
        assert forced.status_code == 429 and forced.json()["error"]["code"] == "teacher_budget_exceeded"
        assert int(forced.headers["retry-after"]) >= 1

        assert chat(c, "k1", "an easy one").headers["x-tiergate-reason"] == "confident"  # its audit is skipped
        deadline = time.monotonic() + 10
        while metric(url, "tiergate_teacher_budget_denials_total", call="audit", limit="calls") < 1:
            assert time.monotonic() < deadline, "the audit was not refused"
            time.sleep(0.05)
        assert metric(url, "tiergate_fallbacks_total", reason="teacher_budget") == 2
        assert metric(url, "tiergate_teacher_budget_denials_total", call="request", limit="calls") == 3
        assert metric(url, "tiergate_teacher_budget_denials_total", call="request", limit="usd") == 0
    # No teacher answer, no record: only the first escalation was written, and no audit.
    assert [(s.kind, s.reason) for s in read_samples(db)] == [("escalation", "low_confidence")]


def test_a_restart_does_not_hand_a_key_its_days_teacher_budget_again(
    student_url: str, teacher_url: str, tmp_path: Path
) -> None:
    """The day's spend is read back from the signal store at start-up: a deploy, or a crash,
    used to reset every key's budget. Each teacher answer here costs 310 µUSD (11 prompt and
    10 completion tokens) and is admitted on an estimate of 420 (20 max_tokens)."""
    db = tmp_path / "signal.db"
    settings = limited(settings_for(student_url, teacher_url, db), ["k1"], TenantLimits(teacher_usd_per_day=0.001))
    for texts, expected in ((["HARD 1", "HARD 2", "HARD 3"], ["low_confidence", "low_confidence", "teacher_budget"]),
                            (["HARD 4"], ["teacher_budget"])):  # fmt: skip
        with serve_in_thread(create_app(settings), ready_path="/health/ready") as url, httpx.Client(base_url=url) as c:
            assert [chat(c, "k1", t).headers["x-tiergate-reason"] for t in texts] == expected
    assert len(list(read_samples(db))) == 2


def test_limits_change_at_runtime_through_the_admin_api_audited_and_kept_across_restarts(
    student_url: str, teacher_url: str, tmp_path: Path
) -> None:
    base = settings_for(student_url, teacher_url, tmp_path / "signal.db")
    settings = limited(base, ["k1"], TenantLimits(requests_per_minute=100))
    admin = {"authorization": f"Bearer {ADMIN}"}
    tenant = key_id("k1")
    with serve_in_thread(create_app(settings), ready_path="/health/ready") as url, httpx.Client(base_url=url) as c:
        assert c.put("/admin/limits", json={"tenant": tenant, "requests_per_minute": 1}).status_code == 401
        put = c.put("/admin/limits", json={"tenant": tenant, "requests_per_minute": 1}, headers=admin)
        assert put.status_code == 200
        assert (put.json()["previous"]["requests_per_minute"], put.json()["limits"]["requests_per_minute"]) == (100, 1)
        assert chat(c, "k1", "one").status_code == 200
        assert chat(c, "k1", "two").status_code == 429
        bad = c.put("/admin/limits", json={"tenant": tenant, "requests_per_minute": -1}, headers=admin)
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "requests_per_minute"

        got = c.get("/admin/limits", params={"tenant": tenant}, headers=admin).json()
        assert got["limits"]["requests_per_minute"] == 1 and got["usage"]["remaining"]["requests"] == 0
        (row,) = c.get("/admin/limits/audit", headers=admin).json()["audit"]
        assert (row["tenant"], row["actor"]) == (tenant, key_id(ADMIN))
        assert (row["old"]["requests_per_minute"], row["new"]["requests_per_minute"]) == (100, 1)
        assert c.get("/admin/policy/audit", headers=admin).json()["audit"] == []  # its own trail
    with serve_in_thread(create_app(settings), ready_path="/health/ready") as url, httpx.Client(base_url=url) as c:
        listed = c.get("/admin/limits", headers=admin).json()["limits"]
        assert listed[tenant]["requests_per_minute"] == 1 and listed["*"]["requests_per_minute"] == 100


# -- one key floods, another sends alone ---------------------------------------------------------

FLOOD_RPM = 300  # the flooder's limit: 5 requests a second
FLOOD_RATE = 10 * FLOOD_RPM / 60  # it sends ten times that
FLOOD_CLIENTS = 16
FLOOD_USD_PER_DAY = 0.005  # about 16 escalations at this test's teacher price
TEACHER_CALL_USD = (11 * 10 + 10 * 20) / 1e6  # the fake teacher's usage at settings_for's prices


class Flood:
    """`FLOOD_CLIENTS` concurrent clients of one key, asyncio in a process of its own (so their
    work does not hold this process's GIL, where the gateway runs): first as fast as they can
    until the key's burst is spent, then `FLOOD_RATE` requests a second between them while `on`
    is set. Counts come back when it stops."""

    def __init__(self, url: str, key: str) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.on, self.drained, self.stop = ctx.Event(), ctx.Event(), ctx.Event()
        self._results: multiprocessing.Queue[dict[str, Any]] = ctx.Queue()
        self._process = ctx.Process(
            target=_flood, args=(url, key, self.on, self.drained, self.stop, self._results), daemon=True
        )
        self.burst: Counter[int] = Counter()  # statuses until the first 429
        self.paced: Counter[int] = Counter()  # statuses once paced
        self.reasons: Counter[str] = Counter()
        self.retry_after_missing = 0

    def __enter__(self) -> Flood:
        self._process.start()
        assert self.drained.wait(60), "the flooder's burst was never spent"
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        results = self._results.get(timeout=30)
        self._process.join(30)
        self.burst, self.paced = Counter(results["burst"]), Counter(results["paced"])
        self.reasons, self.retry_after_missing = Counter(results["reasons"]), results["retry_after_missing"]


def _flood(url: str, key: str, on: Any, drained: Any, stop: Any, results: Any) -> None:
    """The flood's process. Its clients speak HTTP/1.1 over raw keep-alive sockets: an HTTP
    library spent a quarter of a core at this rate, CPU the 2-core machine then lacked for the
    gateway, which is not what the test measures."""
    burst: Counter[int] = Counter()
    paced: Counter[int] = Counter()
    reasons: Counter[str] = Counter()
    missing = 0
    host, port = url.removeprefix("http://").split(":")

    def request(i: int) -> bytes:
        body = json.dumps({"messages": [{"role": "user", "content": f"HARD flood {i}"}], "max_tokens": 16}).encode()
        head = f"POST /v1/chat/completions HTTP/1.1\r\nhost: {host}\r\nauthorization: Bearer {key}\r\n"
        return f"{head}content-length: {len(body)}\r\n\r\n".encode() + body

    async def send(stream: tuple[asyncio.StreamReader, asyncio.StreamWriter], i: int, counts: Counter[int]) -> None:
        nonlocal missing
        reader, writer = stream
        writer.write(request(i))
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").lower().split("\r\n")
        headers = dict(line.split(": ", 1) for line in head[1:] if ": " in line)
        await reader.readexactly(int(headers["content-length"]))
        status = int(head[0].split()[1])
        counts[status] += 1
        if status == 429:
            drained.set()
            missing += "retry-after" not in headers
        elif status == 200:
            reasons[headers["x-tiergate-reason"]] += 1

    async def one_client(i: int, tickets: asyncio.Queue[bool]) -> None:
        stream = await asyncio.open_connection(host, int(port))
        while not drained.is_set():
            await send(stream, i, burst)
        while await tickets.get():
            await send(stream, i, paced)
        stream[1].close()

    async def pace(tickets: asyncio.Queue[bool]) -> None:
        """A send ticket every 1 / FLOOD_RATE seconds while `on` is set, for whichever client is free."""
        while not drained.is_set():
            await asyncio.sleep(0.01)
        due = time.perf_counter()
        while not stop.is_set():
            if not on.is_set():
                await asyncio.sleep(0.005)
                due = time.perf_counter()
                continue
            tickets.put_nowait(True)
            due += 1 / FLOOD_RATE
            await asyncio.sleep(max(0.0, due - time.perf_counter()))

    async def run() -> None:
        tickets: asyncio.Queue[bool] = asyncio.Queue()
        clients = [asyncio.create_task(one_client(i, tickets)) for i in range(FLOOD_CLIENTS)]
        await pace(tickets)
        for _ in clients:
            tickets.put_nowait(False)
        await asyncio.gather(*clients)

    asyncio.run(run())
    results.put({"burst": dict(burst), "paced": dict(paced), "reasons": dict(reasons), "retry_after_missing": missing})


def p99(samples: list[float]) -> float:
    return statistics.quantiles(samples, n=100, method="inclusive")[98]


@pytest.fixture
def fast_gil_handoff() -> Iterator[None]:
    before = sys.getswitchinterval()
    sys.setswitchinterval(0.0005)
    yield
    sys.setswitchinterval(before)


@pytest.mark.usefixtures("fast_gil_handoff")
def test_a_flooding_key_leaves_another_keys_latency_alone_and_stays_within_its_teacher_budget(
    student_url: str, teacher_url: str, tmp_path: Path, teacher_script: UpstreamScript
) -> None:
    """The issue's test. The flooder's limit is 5 requests a second; 16 clients send 50 a second
    between them, all escalating, from a process of their own. The quiet key sends alone, one
    request after another, in 24 alternating blocks of 50: flood off, flood on, so slow drift
    in the machine's load falls on both halves alike. 600 requests a side make the p99 the 6th
    slowest, not the 2nd: with 200 a side, one scheduler hiccup decided it (8.1 against 1.5 x
    5.4 ms in one CI run).

    The gateway, both fake tiers and the quiet client share this one interpreter, which a
    deployed gateway does not: at Python's 5 ms GIL switch interval, a thread of the fake tiers
    answering an admitted flood request held the gateway's thread off for up to 5 ms: the
    flooded p99 came out 1.2-2.6x the solo one over 5 runs (8.4 -> 13.1 ms, say), over 1.5x in
    3. At 0.5 ms that harness effect is gone: 0.79-1.15x over 7 runs, on a shared 2-core machine
    (load average 5-8) whose scheduler alone put the solo p99 anywhere from 6 to 70 ms while
    medians stayed near 3 ms. Without per-key limits the issue's probe saw this p99 rise
    16-fold (3 to 49 ms).
    """
    base = settings_for(student_url, teacher_url, tmp_path / "signal.db")
    flood_limits = TenantLimits(requests_per_minute=FLOOD_RPM, teacher_usd_per_day=FLOOD_USD_PER_DAY)
    settings = limited(base, ["quiet", "flood"], TenantLimits(), **{key_id("flood"): flood_limits})
    solo: list[float] = []
    flooded: list[float] = []
    quiet_failures, flood_on_s = 0, 0.0
    with serve_in_thread(create_app(settings), ready_path="/health/ready") as url:
        with httpx.Client(base_url=url) as quiet, Flood(url, "flood") as flood:
            for _ in range(20):
                chat(quiet, "quiet", "warm up")
            for block in range(24):
                block_started = time.perf_counter()
                flood.on.set() if block % 2 else flood.on.clear()
                time.sleep(0.1)
                for _ in range(50):
                    started = time.perf_counter()
                    r = chat(quiet, "quiet", "where is my refund")
                    (flooded if block % 2 else solo).append(time.perf_counter() - started)
                    quiet_failures += r.status_code != 200
                flood_on_s += (time.perf_counter() - block_started) if block % 2 else 0.0
        usage = httpx.get(
            url + "/admin/limits", params={"tenant": key_id("flood")}, headers={"authorization": f"Bearer {ADMIN}"}
        )
    flood_teacher_calls = sum("flood" in r["messages"][-1]["content"] for r in teacher_script.requests)
    print(  # noqa: T201 - the figures, for the report (pytest -s)
        f"quiet p99 solo {p99(solo) * 1e3:.2f} ms, flooded {p99(flooded) * 1e3:.2f} ms; "
        f"flood burst {dict(flood.burst)}, paced {dict(flood.paced)} "
        f"at {flood.paced.total() / flood_on_s:.1f}/s, {dict(flood.reasons)}; teacher calls {flood_teacher_calls}, "
        f"spent {usage.json()['usage']['teacher_usd_today']:.6f} USD"
    )
    assert quiet_failures == 0
    assert p99(flooded) <= 1.5 * p99(solo)
    assert flood.paced.total() / flood_on_s >= 0.8 * FLOOD_RATE  # it really flooded at ~10x its limit
    # Paced, about one in ten fits the limit (a few more: the bucket refills while the flood is off).
    assert flood.paced[429] >= 0.7 * flood.paced.total() and flood.retry_after_missing == 0
    assert flood.reasons["teacher_budget"] > 0  # it escalated past its budget, and was served the draft
    assert flood_teacher_calls * TEACHER_CALL_USD <= FLOOD_USD_PER_DAY
    assert usage.json()["usage"]["teacher_usd_today"] <= FLOOD_USD_PER_DAY
