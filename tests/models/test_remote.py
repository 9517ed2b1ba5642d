"""The remote backend against a real OpenAI-compatible server on loopback."""

from __future__ import annotations

import contextlib
import email.utils
import socket
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from models import (
    BackendConfig,
    BackendRateLimited,
    BackendResponseError,
    BackendTimeout,
    BackendUnavailable,
    ChatMessage,
    DraftScorer,
    SamplingParams,
    TokenLogprob,
    TopLogprob,
    Usage,
)
from models.remote import RemoteBackend, retry_after_seconds
from tests.fakes import UpstreamScript
from tests.servers import serve_in_thread

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


NOW = 1_700_000_000.0


@pytest.mark.parametrize(
    ("header", "seconds"),
    [
        ("120", 120.0),
        (" 7 ", 7.0),
        ("1.5", 1.5),
        (email.utils.formatdate(NOW + 30, usegmt=True), 30.0),
        (email.utils.formatdate(NOW - 30, usegmt=True), 0.0),  # already past: retry now
        (None, None),
        ("", None),
        ("soon", None),
        ("-5", None),
        ("nan", None),
        ("inf", None),
        ("Wed, 21 Oct 2015 25:28:00 GMT", None),
    ],
)
def test_retry_after_is_seconds_or_an_http_date_and_garbage_is_ignored(
    header: str | None, seconds: float | None
) -> None:
    assert retry_after_seconds(header, now=NOW) == (pytest.approx(seconds) if seconds is not None else None)


def scoring_upstream(prompt_logprobs: list[Any], retry_after: str | None = None) -> FastAPI:
    """A vLLM-like server whose prompt is tokens [1, 2, 3] and whose draft is [7, 8]; with
    `retry_after` set it answers every request 429 with that Retry-After."""
    app = FastAPI()

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": "scorer", "object": "model", "created": 0, "owned_by": "t"}]}

    @app.post("/v1/chat/completions", response_model=None)
    async def chat(request: Request) -> Any:
        body = await request.json()
        if retry_after is not None:
            error = {"message": "slow down", "type": "rate_limit_error", "param": None, "code": None}
            return JSONResponse({"error": error}, status_code=429, headers={"retry-after": retry_after})
        if "prompt_logprobs" not in body:
            return {"prompt_token_ids": [1, 2, 3]}
        return {"prompt_token_ids": [1, 2, 3, 7, 8], "prompt_logprobs": prompt_logprobs}

    return app


def entry(token: str, logprob: float, rank: int) -> dict[str, Any]:
    return {"logprob": logprob, "rank": rank, "decoded_token": token}


@pytest.fixture
def scored_rows() -> list[Any]:
    return [
        None,
        {"2": entry("b", -0.1, 1)},
        {"3": entry("c", -0.1, 1)},
        {"7": entry("Your", -1.0, 2), "5": entry("Our", -0.5, 1), "6": entry("A", -2.0, 3)},
        {"8": entry(" refund", -0.2, 1), "9": entry(" order", -1.7, 2)},
    ]


@contextlib.contextmanager
def scoring_server(rows: list[Any], retry_after: str | None = None) -> Iterator[str]:
    with serve_in_thread(scoring_upstream(rows, retry_after)) as url:
        yield url + "/v1"


async def test_score_ranks_alternatives_and_keeps_each_draft_tokens_own_logprob(scored_rows: list[Any]) -> None:
    with scoring_server(scored_rows) as url:
        b = remote(url)
        assert isinstance(b, DraftScorer)
        await b.start()
        try:
            scores = await b.score(MSG, "Your refund", top_k=2)
        finally:
            await b.aclose()
    assert scores == (
        TokenLogprob("Your", -1.0, 7, (TopLogprob("Our", -0.5, 5), TopLogprob("Your", -1.0, 7))),
        TokenLogprob(" refund", -0.2, 8, (TopLogprob(" refund", -0.2, 8), TopLogprob(" order", -1.7, 9))),
    )


async def test_a_draft_token_without_its_own_logprob_is_an_error_not_a_made_up_score(
    scored_rows: list[Any],
) -> None:
    scored_rows[4] = {"9": entry(" order", -1.7, 1)}  # the server left out draft token 8
    with scoring_server(scored_rows) as url:
        b = remote(url)
        await b.start()
        try:
            with pytest.raises(BackendResponseError, match="omit draft token 1"):
                await b.score(MSG, "Your refund", top_k=2)
        finally:
            await b.aclose()


@pytest.mark.parametrize(("header", "seconds"), [("3", 3.0), ("whenever", None)])
async def test_429_passes_on_the_upstreams_retry_after(header: str, seconds: float | None) -> None:
    with scoring_server([], retry_after=header) as url:
        b = remote(url)
        await b.start()
        try:
            with pytest.raises(BackendRateLimited) as generated:
                await b.generate(MSG, SamplingParams())
            with pytest.raises(BackendRateLimited) as streamed:
                _ = [d async for d in b.stream(MSG, SamplingParams())]
        finally:
            await b.aclose()
        for caught in (generated.value, streamed.value):
            assert caught.retry_after == seconds and caught.http_status == 429 and "slow down" in str(caught)


def test_logprobs_parse_plain_tokens_and_vllms_token_id_form_alike() -> None:
    import msgspec

    from models.remote import _Logprobs
    from models.remote import _parse_logprobs as parse

    def entry(token: str, lp: float) -> dict[str, Any]:
        return {"token": token, "logprob": lp, "bytes": [1], "top_logprobs": [{"token": token, "logprob": lp}]}

    def _parse_logprobs(raw: dict[str, Any] | None) -> tuple[TokenLogprob, ...]:  # from the JSON, as served
        return parse(msgspec.json.decode(orjson.dumps(raw), type=_Logprobs | None))

    plain = _parse_logprobs({"content": [entry("Hi", -0.5), entry(" there", 0)]})
    assert plain == (
        TokenLogprob("Hi", -0.5, None, (TopLogprob("Hi", -0.5, None),)),
        TokenLogprob(" there", 0.0, None, (TopLogprob(" there", 0.0, None),)),
    )
    assert all(type(t) is TokenLogprob and type(t.top[0]) is TopLogprob for t in plain)
    assert isinstance(plain[1].logprob, float)
    ids = _parse_logprobs({"content": [entry("token_id:17", -0.5), {"token": "token_id:4", "logprob": -1}]})
    assert ids == (
        TokenLogprob("token_id:17", -0.5, 17, (TopLogprob("token_id:17", -0.5, 17),)),
        TokenLogprob("token_id:4", -1.0, 4, ()),
    )
    assert _parse_logprobs({"content": []}) == () == _parse_logprobs(None)


@pytest.mark.parametrize(
    "body",
    [b"not json", b'{"choices": []}', b'{"choices": [{"message": {"content": 7}}]}', b'{"model": "m"}'],
)
async def test_a_completion_that_is_not_one_is_a_response_error(body: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    b = remote("http://127.0.0.1:9/v1")

    async def answer(*_: Any) -> bytes:
        return body

    monkeypatch.setattr(b, "_call", answer)
    with pytest.raises(BackendResponseError, match="malformed completion"):
        await b.generate(MSG, SamplingParams())
    await b.aclose()


def test_stream_chunks_parse_and_a_mid_stream_error_is_raised() -> None:
    b = remote("http://127.0.0.1:9/v1")
    delta, finish, usage = b._parse_chunk(
        '{"choices": [{"delta": {"content": "Hi"}, "finish_reason": null,'
        ' "logprobs": {"content": [{"token": "Hi", "logprob": -1, "bytes": [72]}]}}], "usage": null}'
    )
    assert delta is not None and delta.text == "Hi" and delta.logprobs == (TokenLogprob("Hi", -1.0),)
    assert (finish, usage) == (None, None)
    assert b._parse_chunk('{"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2}}') == (
        None,
        None,
        Usage(3, 2),
    )
    assert b._parse_chunk('{"choices": [{"delta": {}, "finish_reason": "length"}]}') == (None, "length", None)
    for chunk, message in (('{"error": {"message": "out of memory"}}', "out of memory"), ('{"error": "gone"}', "gone")):
        with pytest.raises(BackendResponseError, match=f"error mid-stream: {message}"):
            b._parse_chunk(chunk)
    with pytest.raises(BackendResponseError, match="malformed stream chunk"):
        b._parse_chunk('{"choices": [{"delta": {"content": ["not", "text"]}}]}')
