"""The remote backend against a real OpenAI-compatible server on loopback."""

from __future__ import annotations

import socket

import pytest

from models import (
    BackendConfig,
    BackendRateLimited,
    BackendResponseError,
    BackendTimeout,
    BackendUnavailable,
    ChatMessage,
    SamplingParams,
)
from models.remote import RemoteBackend
from tests.fakes import UpstreamScript

pytestmark = pytest.mark.anyio
MSG = (ChatMessage("user", "Where is my refund?"),)


def remote(url: str, **kw: object) -> RemoteBackend:
    return RemoteBackend(BackendConfig(kind="remote", model="auto", url=url, **kw))  # type: ignore[arg-type]


async def test_generate_with_logprobs(student_url: str, student_script: UpstreamScript) -> None:
    b = remote(student_url)
    await b.start()
    try:
        assert b.info.ready and b.info.version == "student-upstream"  # "auto" resolved from /models
        gen = await b.generate(MSG, SamplingParams(max_tokens=50, temperature=0, top_logprobs=2, seed=3))
    finally:
        await b.aclose()
    assert gen.text == student_script.text
    assert gen.usage.completion_tokens == len(gen.logprobs) > 0
    assert all(lp.logprob == -0.05 for lp in gen.logprobs)
    sent = student_script.requests[-1]
    assert sent["logprobs"] is True and sent["top_logprobs"] == 2 and sent["seed"] == 3
    assert sent["model"] == "student-upstream"


async def test_stream_yields_deltas_then_usage(student_url: str, student_script: UpstreamScript) -> None:
    b = remote(student_url)
    await b.start()
    try:
        deltas = [d async for d in b.stream(MSG, SamplingParams(max_tokens=3))]
    finally:
        await b.aclose()
    assert "".join(d.text for d in deltas) == "Your refund will"
    assert deltas[-1].finish_reason == "length"
    assert deltas[-1].usage is not None and deltas[-1].usage.completion_tokens == 3
    assert student_script.requests[-1]["stream_options"] == {"include_usage": True}


@pytest.mark.parametrize(
    ("status", "error"),
    [(429, BackendRateLimited), (503, BackendUnavailable), (500, BackendResponseError)],
)
async def test_status_codes_map_to_typed_errors(
    student_url: str, student_script: UpstreamScript, status: int, error: type[Exception]
) -> None:
    b = remote(student_url)
    await b.start()
    student_script.status = status
    try:
        with pytest.raises(error, match="scripted failure"):
            await b.generate(MSG, SamplingParams())
    finally:
        await b.aclose()


async def test_slow_server_times_out(student_url: str, student_script: UpstreamScript) -> None:
    b = remote(student_url, read_timeout_s=0.2)
    await b.start()
    student_script.delay_s = 2.0
    try:
        with pytest.raises(BackendTimeout):
            await b.generate(MSG, SamplingParams())
    finally:
        await b.aclose()


async def test_stream_cut_midway_is_an_error_not_a_short_answer(
    student_url: str, student_script: UpstreamScript
) -> None:
    b = remote(student_url)
    await b.start()
    student_script.cut_stream_after = 2
    try:
        with pytest.raises((BackendUnavailable, BackendResponseError)):
            _ = [d async for d in b.stream(MSG, SamplingParams())]
    finally:
        await b.aclose()


async def test_refused_connection_is_unavailable() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again when we leave: nothing listens there
    b = remote(f"http://127.0.0.1:{port}/v1")
    with pytest.raises(BackendUnavailable):
        await b.start()
    await b.aclose()
