"""Backend for any OpenAI-compatible server (vLLM, a hosted teacher) over aiohttp.

One `aiohttp.ClientSession` per backend, with a bounded connection pool and explicit connect
and read timeouts. aiohttp was chosen by measurement (bench/README.md): per call it costs a
fraction of httpx's request layer, which dominated the gateway's CPU under concurrency.
aiohttp errors are translated into `models.errors` where they enter. It does not retry:
retrying is the caller's policy, and a stream is never retried after its first byte.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import email.utils
import math
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from typing import Any

import aiohttp
import msgspec
import orjson
from yarl import URL

from models.base import (
    BackendInfo,
    Candidate,
    ChatMessage,
    FinishReason,
    Generation,
    GenerationDelta,
    SamplingParams,
    TokenLogprob,
    TopLogprob,
    Usage,
    error_for_status,
    rank_position,
)
from models.config import BackendConfig
from models.errors import BackendError, BackendResponseError, BackendTimeout, BackendUnavailable
from models.served import ServedByName, ServedNames

MAX_RESPONSE_BYTES = 8 * 1024 * 1024  # a completion larger than this is garbage, not an answer
MAX_LINE_BYTES = 1024 * 1024  # one SSE line (a chunk with top-20 logprobs is a few KiB)
JSON_HEADERS = {"content-type": "application/json"}


# What is read of a completion, decoded by msgspec straight from the bytes: the fields named
# here and nothing else (the tokens' `bytes` arrays, a teacher answer's bulk, are skipped, not
# built). Not tracked by the GC: they hold only strings and numbers, and live for one parse.
class _Top(msgspec.Struct, gc=False):
    token: str
    logprob: float


class _Token(msgspec.Struct, gc=False):
    token: str
    logprob: float
    top_logprobs: list[_Top] | None = None


class _Logprobs(msgspec.Struct, gc=False):
    content: list[_Token] | None = None


class _Message(msgspec.Struct, gc=False):
    content: str | None = None


class _Choice(msgspec.Struct, gc=False):
    message: _Message
    finish_reason: str | None = None
    logprobs: _Logprobs | None = None


class _Usage(msgspec.Struct, gc=False):
    prompt_tokens: int = 0
    completion_tokens: int = 0


class _Completion(msgspec.Struct, gc=False):
    choices: list[_Choice]
    model: str | None = None
    usage: _Usage | None = None


class _Delta(msgspec.Struct, gc=False):
    content: str | None = None


class _ChunkChoice(msgspec.Struct, gc=False):
    delta: _Delta | None = None
    finish_reason: str | None = None
    logprobs: _Logprobs | None = None


class _Chunk(msgspec.Struct):
    choices: list[_ChunkChoice] | None = None
    usage: _Usage | None = None
    error: Any = None  # a server's error mid-stream: {"message": ...} or a string


_COMPLETION = msgspec.json.Decoder(_Completion)
_CHUNK = msgspec.json.Decoder(_Chunk)


@contextlib.contextmanager
def map_client_errors(name: str) -> Iterator[None]:
    """Translate aiohttp exceptions, most specific first."""
    try:
        yield
    except BackendError:
        raise  # ours, raised inside the block (some subclass OSError or ValueError)
    except aiohttp.ConnectionTimeoutError as exc:  # no connection (or pool slot) in time
        raise BackendUnavailable(f"{name}: connect timed out") from exc
    except TimeoutError as exc:  # aiohttp's read timeouts subclass it
        raise BackendTimeout(f"{name}: timed out ({type(exc).__name__})") from exc
    except (aiohttp.ClientError, OSError) as exc:  # refused, reset, disconnected, bad HTTP, payload
        raise BackendUnavailable(f"{name}: {type(exc).__name__}: {exc}") from exc
    except ValueError as exc:  # aiohttp's StreamReader: a line over the limit
        raise BackendResponseError(f"{name}: {exc}") from exc


def retry_after_seconds(value: str | None, now: float | None = None) -> float | None:
    """A Retry-After header in seconds from `now` (default: the wall clock): delta-seconds or
    an HTTP-date (RFC 9110, 10.2.3). None when absent or unreadable: a garbage header is
    ignored, not passed on."""
    if value is None or not value.strip():
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        return seconds if math.isfinite(seconds) and seconds >= 0 else None
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:  # no zone, or "-0000": HTTP-dates are always UTC
        when = when.replace(tzinfo=datetime.UTC)
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def _status_error(name: str, status: int, body: bytes, headers: Mapping[str, str]) -> BackendError:
    try:
        message = orjson.loads(body)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = body[:300].decode("utf-8", "replace")
    retry_after = retry_after_seconds(headers.get("retry-after")) if status == 429 else None
    return error_for_status(f"{name} answered {status}: {message}", status, retry_after=retry_after)


def _token(raw: Any) -> tuple[str, int | None]:
    """vLLM's `return_tokens_as_token_ids` renders tokens as "token_id:123"; keep the id."""
    text = str(raw)
    if text.startswith("token_id:") and text[9:].isdigit():
        return text, int(text[9:])
    return text, None


def _top(raw: _Top) -> TopLogprob:
    token, token_id = _token(raw.token)
    return TopLogprob(token, raw.logprob, token_id)


_tuple = tuple.__new__  # builds a named tuple in C: its own __new__ is Python, per token and alternative


def _parse_logprobs(raw: _Logprobs | None) -> tuple[TokenLogprob, ...]:
    """OpenAI `logprobs.content` into TokenLogprobs (on the hot path for every draft, and for
    every teacher answer with its top-k alternatives: 21 tokens with 5 each, 59 us built through
    the named tuples' own constructors, 29 us this way).
    vLLM renders all of a response's tokens as "token_id:N" or none, so the first token decides."""
    content = raw.content if raw is not None else None
    if not content:
        return ()
    if content[0].token.startswith("token_id:"):
        out = []
        for item in content:
            alts = item.top_logprobs
            token, token_id = _token(item.token)
            out.append(TokenLogprob(token, item.logprob, token_id, tuple(map(_top, alts)) if alts else ()))
        return tuple(out)
    return tuple(
        _tuple(
            TokenLogprob,
            (
                item.token,
                item.logprob,
                None,
                tuple([_tuple(TopLogprob, (x.token, x.logprob, None)) for x in alts])
                if (alts := item.top_logprobs)
                else (),
            ),
        )
        for item in content
    )


def _finish(value: Any) -> FinishReason:
    return "length" if value == "length" else "stop"


class RemoteBackend(ServedByName):
    """A tier served by an OpenAI-compatible HTTP server."""

    def __init__(self, config: BackendConfig) -> None:
        if not config.url:
            raise ValueError(f"remote backend {config.name!r} needs a url")
        self.config = config
        self._names = ServedNames(config.model)
        self._base_model = config.model  # the served base model's name, fixed once known
        self._ready = False
        self._base = config.url.rstrip("/")
        self._urls: dict[str, URL] = {}
        self._headers = {"user-agent": "tiergate"}
        if config.api_key is not None:
            self._headers["authorization"] = f"Bearer {config.api_key.get_secret_value()}"
        self._timeout = aiohttp.ClientTimeout(
            total=None,
            connect=config.connect_timeout_s,  # pool wait + connect
            sock_connect=config.connect_timeout_s,
            sock_read=config.read_timeout_s,  # between bytes, so long streams are fine
        )
        self._http: aiohttp.ClientSession | None = None

    def _session(self) -> aiohttp.ClientSession:
        """Created on first use, inside the event loop that will use it."""
        if self._http is None or self._http.closed:
            self._http = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self.config.max_connections),
                headers=self._headers,
                timeout=self._timeout,
                read_bufsize=MAX_LINE_BYTES,
                max_line_size=MAX_LINE_BYTES,
            )
        return self._http

    def _url(self, path: str) -> URL:
        url = self._urls.get(path)
        if url is None:
            url = self._urls[path] = URL(self._base + path)
        return url

    async def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> bytes:
        """One request; returns the body of a 200, capped at MAX_RESPONSE_BYTES, and raises the
        typed error for any other status."""
        name = self.config.name
        data = orjson.dumps(body) if body is not None else None
        with map_client_errors(name):
            async with self._session().request(
                method, self._url(path), data=data, headers=JSON_HEADERS if data is not None else None
            ) as resp:
                if (resp.content_length or 0) > MAX_RESPONSE_BYTES:
                    raise BackendResponseError(f"{name}: response of {resp.content_length} bytes exceeds the cap")
                content = await resp.read()
                if resp.status != 200:
                    raise _status_error(name, resp.status, content, resp.headers)
                if len(content) > MAX_RESPONSE_BYTES:  # no Content-Length (chunked), and over the cap
                    raise BackendResponseError(f"{name}: response of {len(content)} bytes exceeds the cap")
                return content

    @property
    def info(self) -> BackendInfo:
        return BackendInfo(
            name=self.config.display_name or self._base_model,
            kind="remote",
            version=self._names.version or self._names.model,
            ready=self._ready,
            detail={"url": str(self.config.url)},
        )

    async def start(self) -> None:
        """Check the server answers `/models`; resolve model "auto" to its first model."""
        content = await self._call("GET", "/models")
        if self._names.model == "auto":
            try:
                self._base_model = str(orjson.loads(content)["data"][0]["id"])
                self._names.use(self._base_model)
            except (ValueError, KeyError, IndexError, TypeError) as exc:
                raise BackendResponseError(f"{self.config.name}: /models listed no model") from exc
        self._ready = True

    async def aclose(self) -> None:
        self._ready = False
        if self._http is not None:
            await self._http.close()

    # -- runtime LoRA (`served_model`, `use_model`, `inflight`, `wait_idle` from ServedByName) ---
    async def load_adapter(self, name: str, path: str) -> None:
        """vLLM runtime LoRA: register an adapter folder (readable by the server) under `name`."""
        await self._admin("/load_lora_adapter", {"lora_name": name, "lora_path": path})

    async def unload_adapter(self, name: str) -> None:
        await self._admin("/unload_lora_adapter", {"lora_name": name})

    async def _admin(self, path: str, body: dict[str, Any]) -> None:
        await self._call("POST", path, body)

    async def score(self, messages: tuple[ChatMessage, ...], draft: str, top_k: int = 1) -> tuple[TokenLogprob, ...]:
        """The server's logprobs of `draft` as the assistant reply (vLLM `prompt_logprobs`).

        Two prefills: the prompt alone (to find where the draft starts) and prompt + draft.
        Returns one entry per draft token, with up to `top_k` alternatives. A draft token whose
        own logprob the server left out is a BackendResponseError: no score is made up for it.
        """
        base = self._body(messages, SamplingParams(max_tokens=1, temperature=0), False)
        base.pop("logprobs", None)
        head = await self._call("POST", "/chat/completions", {**base, "return_token_ids": True})
        full = await self._call(
            "POST",
            "/chat/completions",
            {
                **base,
                "messages": [*base["messages"], {"role": "assistant", "content": draft}],
                "add_generation_prompt": False,
                "continue_final_message": True,
                "prompt_logprobs": top_k,
                "return_token_ids": True,
            },
        )
        try:
            start = len(orjson.loads(head)["prompt_token_ids"])
            data = orjson.loads(full)
            ids = data["prompt_token_ids"]
            rows = data["prompt_logprobs"]
            out = []
            for pos in range(start, len(ids)):
                table = {
                    int(k): Candidate(str(v.get("decoded_token") or ""), float(v["logprob"]), v.get("rank"))
                    for k, v in (rows[pos] or {}).items()
                }
                scored = rank_position(int(ids[pos]), table, top_k)
                if scored is None:
                    raise BackendResponseError(f"{self.config.name}: prompt_logprobs omit draft token {pos - start}")
                out.append(scored)
            return tuple(out)
        except (ValueError, KeyError, TypeError, IndexError, AttributeError) as exc:
            raise BackendResponseError(f"{self.config.name}: malformed prompt_logprobs: {exc!r}") from exc

    def _body(
        self, messages: tuple[ChatMessage, ...], params: SamplingParams, stream: bool, model: str | None = None
    ) -> dict[str, Any]:
        msgs = [{"role": m.role, "content": m.content} for m in messages]
        if self.config.system_prompt:
            msgs.insert(0, {"role": "system", "content": self.config.system_prompt})
        body: dict[str, Any] = {
            "model": model or self._names.model,
            "messages": msgs,
            "max_tokens": params.max_tokens,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "stream": stream,
        }
        stops = list(params.stop)
        if self.config.prompt_format == "transcript":
            stops.append("\n")  # one agent turn (see deploy/transcript.jinja)
        if stops:
            body["stop"] = stops
        if params.seed is not None:
            body["seed"] = params.seed
        if self.config.request_logprobs or params.top_logprobs:
            body["logprobs"] = True
            if params.top_logprobs:
                body["top_logprobs"] = params.top_logprobs
        if stream:
            body["stream_options"] = {"include_usage": True}
        return body

    async def generate(self, messages: tuple[ChatMessage, ...], params: SamplingParams) -> Generation:
        name = self.config.name
        with self._names.using(self._names.model) as (model, version):
            body = await self._call("POST", "/chat/completions", self._body(messages, params, False, model))
        try:
            data = _COMPLETION.decode(body)
            choice = data.choices[0]
            usage = data.usage or _Usage()
            text = choice.message.content or ""
            return Generation(
                text=text.lstrip() if self.config.prompt_format == "transcript" else text,
                finish_reason=_finish(choice.finish_reason),
                usage=Usage(usage.prompt_tokens, usage.completion_tokens),
                model=data.model or model,
                logprobs=_parse_logprobs(choice.logprobs),
                version=version,
            )
        except (msgspec.DecodeError, IndexError) as exc:
            raise BackendResponseError(f"{name}: malformed completion: {exc}") from exc

    async def stream(self, messages: tuple[ChatMessage, ...], params: SamplingParams) -> AsyncIterator[GenerationDelta]:
        name = self.config.name
        finish: FinishReason | None = None
        usage: Usage | None = None
        received = 0
        started = False  # a transcript answer's first text loses its leading space
        with self._names.using(self._names.model) as (model, version), map_client_errors(name):
            data = orjson.dumps(self._body(messages, params, True, model))
            async with self._session().post(self._url("/chat/completions"), data=data, headers=JSON_HEADERS) as resp:
                if resp.status != 200:
                    raise _status_error(name, resp.status, await resp.content.read(64 * 1024), resp.headers)
                async for raw in resp.content:
                    received += len(raw)
                    line = raw.decode("utf-8").rstrip("\r\n")
                    if received > MAX_RESPONSE_BYTES:
                        raise BackendResponseError(f"{name}: stream exceeds {MAX_RESPONSE_BYTES} bytes")
                    if not line.startswith("data:"):
                        continue
                    payload = line[5:].strip()
                    if payload == "[DONE]":
                        break
                    delta, f, u = self._parse_chunk(payload)
                    finish = f or finish
                    usage = u or usage
                    if delta is not None and not started and self.config.prompt_format == "transcript":
                        delta = dataclasses.replace(delta, text=delta.text.lstrip())
                    if delta is not None:
                        started = started or bool(delta.text)
                        yield delta
                else:
                    raise BackendResponseError(f"{name}: stream ended without [DONE]")
        if finish is None:
            raise BackendResponseError(f"{name}: stream ended without a finish_reason")
        yield GenerationDelta(finish_reason=finish, usage=usage or Usage(0, 0), version=version)

    def _parse_chunk(self, payload: str) -> tuple[GenerationDelta | None, FinishReason | None, Usage | None]:
        name = self.config.name
        try:
            data = _CHUNK.decode(payload)
        except msgspec.DecodeError as exc:
            raise BackendResponseError(f"{name}: malformed stream chunk: {exc}") from exc
        if data.error is not None:
            err = data.error
            message = err.get("message", err) if isinstance(err, dict) else err
            raise BackendResponseError(f"{name}: error mid-stream: {message}")
        usage = Usage(data.usage.prompt_tokens, data.usage.completion_tokens) if data.usage else None
        if not data.choices:
            return None, None, usage
        choice = data.choices[0]
        text = (choice.delta.content if choice.delta else None) or ""
        lps = _parse_logprobs(choice.logprobs)
        finish = _finish(choice.finish_reason) if choice.finish_reason else None
        delta = GenerationDelta(text=text, logprobs=lps) if (text or lps) else None
        return delta, finish, usage
