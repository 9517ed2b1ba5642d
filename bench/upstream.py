"""A fast fake OpenAI-compatible upstream for benchmarks: raw asyncio + httptools (uvloop if present).

POST /v1/chat/completions answers a fixed, cached completion with usage and per-token logprobs (-3.0
a token when the last user message contains "HARD", else -0.05); GET /v1/models and /health answer.
`--latency-ms` delays each completion, as a model's generation would (default: none).
It does not stream, sample, authenticate or validate beyond what the benchmark needs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Coroutine
from typing import Any, TypeVar, cast

import httptools

log = logging.getLogger("bench.upstream")
T = TypeVar("T")

MODEL_ID = "bench-model"
HARD_MARKER = "HARD"
EASY_LOGPROB = -0.05
HARD_LOGPROB = -3.0
# A support-style answer, pre-split into tokens the way a BPE tokenizer roughly would.
ANSWER_TOKENS: tuple[str, ...] = (
    "Yes", ",", " you", " can", " change", " the", " delivery", " address", " under", " Orders",
    " >", " Edit", " address", " until", " the", " order", " ships", ".", " Anything", " else", "?",
)  # fmt: skip
ALTERNATIVES: tuple[str, ...] = (" the", " a", " your", " it", " we", " to", " and", " of", " in", " for")
CREATED = int(time.time())


def _response(status: str, body: bytes, keep_alive: bool = True) -> bytes:
    head = (
        f"HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
        + ("" if keep_alive else "connection: close\r\n")
        + "\r\n"
    )
    return head.encode() + body


def _error(status: str, message: str) -> bytes:
    return _response(status, json.dumps({"error": {"message": message, "type": "invalid_request_error"}}).encode())


MODELS = _response(
    "200 OK",
    json.dumps(
        {"object": "list", "data": [{"id": MODEL_ID, "object": "model", "created": CREATED, "owned_by": "bench"}]}
    ).encode(),
)
HEALTH = _response("200 OK", b'{"status":"ok"}')
NOT_FOUND = _error("404 Not Found", "no such route")


def _token_entry(token: str, logprob: float, top_k: int) -> dict[str, Any]:
    top = [{"token": token, "logprob": logprob, "bytes": list(token.encode())}]
    alternatives = [alt for alt in ALTERNATIVES if alt != token][: max(0, top_k - 1)]
    top += [
        {"token": alt, "logprob": logprob - 1.5 - i, "bytes": list(alt.encode())} for i, alt in enumerate(alternatives)
    ]
    return {"token": token, "logprob": logprob, "bytes": list(token.encode()), "top_logprobs": top[:top_k]}


def build_completion(*, hard: bool, top_k: int, n_tokens: int, prompt_tokens: int) -> bytes:
    """The full HTTP response for one completion shape."""
    logprob = HARD_LOGPROB if hard else EASY_LOGPROB
    tokens = ANSWER_TOKENS[:n_tokens]
    body = {
        "id": "chatcmpl-bench",
        "object": "chat.completion",
        "created": CREATED,
        "model": MODEL_ID,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "".join(tokens)},
                "logprobs": {"content": [_token_entry(t, logprob, top_k) for t in tokens]},
                "finish_reason": "stop" if n_tokens == len(ANSWER_TOKENS) else "length",
            }
        ],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": len(tokens),
            "total_tokens": prompt_tokens + len(tokens),
        },
    }
    return _response("200 OK", json.dumps(body, separators=(",", ":")).encode())


def _last_user_text(messages: Any) -> str:
    for message in reversed(messages):
        if message.get("role") == "user":
            content = message.get("content") or ""
            if isinstance(content, list):
                return "".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
            return str(content)
    return ""


class Answers:
    """Completion bytes per (hard, top_k, n_tokens, prompt_tokens bucket), built once each."""

    def __init__(self) -> None:
        self._cache: dict[tuple[bool, int, int, int], bytes] = {}

    def chat(self, raw: bytes) -> bytes:
        try:
            req = json.loads(raw)
            messages = req["messages"]
            hard = HARD_MARKER in _last_user_text(messages)
            top_k = min(20, int(req.get("top_logprobs") or 0)) if req.get("logprobs") else 0
            n_tokens = max(1, min(len(ANSWER_TOKENS), int(req.get("max_tokens") or len(ANSWER_TOKENS))))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            return _error("400 Bad Request", f"malformed request: {exc!r}")
        if req.get("stream"):
            return _error("400 Bad Request", "this fake upstream does not stream")
        # Rough token count (4 characters of message content a token, the gateway's own estimate),
        # bucketed so the cache stays small.
        chars = sum(len(str(m.get("content") or "")) for m in messages)
        prompt_tokens = max(1, chars // 4 // 8 * 8)
        key = (hard, top_k, n_tokens, prompt_tokens)
        answer = self._cache.get(key)
        if answer is None:
            if len(self._cache) > 4096:
                self._cache.clear()
            answer = self._cache[key] = build_completion(
                hard=hard, top_k=top_k, n_tokens=n_tokens, prompt_tokens=prompt_tokens
            )
        return answer


class UpstreamProtocol(asyncio.Protocol):
    """One HTTP/1.1 connection: keep-alive and pipelining, answers written in request order."""

    def __init__(self, answers: Answers, latency_s: float = 0.0) -> None:
        self._answers = answers
        self._latency_s = latency_s
        self._parser = httptools.HttpRequestParser(self)
        self._transport: asyncio.Transport | None = None
        self._url = b""
        self._body: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport, so no isinstance check here.
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError:
            if self._transport is not None:
                self._transport.write(_error("400 Bad Request", "unparseable HTTP"))
                self._transport.close()

    # httptools callbacks
    def on_message_begin(self) -> None:
        self._url = b""
        self._body = []

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        transport = self._transport
        if transport is None:
            return
        method, path = self._parser.get_method(), self._url.split(b"?", 1)[0]
        if method == b"POST" and path in (b"/v1/chat/completions", b"/chat/completions"):
            out = self._answers.chat(b"".join(self._body))
            if self._latency_s:  # a constant delay keeps the answers in request order
                keep_alive = self._parser.should_keep_alive()
                asyncio.get_running_loop().call_later(self._latency_s, self._send_later, out, keep_alive)
                return
        elif method == b"GET" and path in (b"/v1/models", b"/models"):
            out = MODELS
        elif method == b"GET" and path == b"/health":
            out = HEALTH
        else:
            out = NOT_FOUND
        transport.write(out)
        if not self._parser.should_keep_alive():
            transport.close()

    def _send_later(self, out: bytes, keep_alive: bool) -> None:
        transport = self._transport
        if transport is None or transport.is_closing():
            return  # the client went away while it waited
        transport.write(out)
        if not keep_alive:
            transport.close()


def run_fast(main: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine on uvloop when it is installed (as uvicorn does), else on asyncio's loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


async def serve(host: str, port: int, latency_s: float = 0.0) -> None:
    loop = asyncio.get_running_loop()
    answers = Answers()
    server = await loop.create_server(lambda: UpstreamProtocol(answers, latency_s), host, port, backlog=1024)
    bound = server.sockets[0].getsockname()
    log.warning("fake upstream listening on http://%s:%d/v1", bound[0], bound[1])
    async with server:
        await server.serve_forever()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.upstream", description=__doc__)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8100)
    p.add_argument("--latency-ms", type=float, default=0.0, help="delay before each completion is sent")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    with contextlib.suppress(KeyboardInterrupt):
        run_fast(serve(args.host, args.port, args.latency_ms / 1000))


if __name__ == "__main__":
    main()
