"""A bare FastAPI pass-through proxy: the floor for a Python ASGI gateway on this machine.

It parses the JSON body, forwards it to the upstream with one shared client and relays the
answer's bytes back. The client is the gateway's own (one aiohttp.ClientSession, as in
models/remote.py) unless `--client httpx-aiohttp|httpx`. `--gc-gen0-threshold N` gives it the
gateway's GC tuning, for a like-for-like comparison. No auth, routing, metrics or streaming.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from types import ModuleType
from typing import Literal

import aiohttp
import httpx
import uvicorn
from fastapi import FastAPI, Request, Response

ClientKind = Literal["aiohttp", "httpx-aiohttp", "httpx"]


class Forwarder:
    """One shared upstream client; `post` and `get` return (status, body bytes)."""

    def __init__(self, upstream: str, kind: ClientKind, max_connections: int) -> None:
        self._base = upstream.rstrip("/")
        self._kind = kind
        self._max = max_connections
        self._session: aiohttp.ClientSession | None = None
        self._httpx: httpx.AsyncClient | None = None

    async def __aenter__(self) -> Forwarder:
        if self._kind == "aiohttp":  # the gateway's own stack (models/remote.py)
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self._max),
                headers={"user-agent": "tiergate-bench-passthrough"},
                timeout=aiohttp.ClientTimeout(total=None, connect=5.0, sock_read=60.0),
            )
        else:
            self._httpx = make_httpx_client(self._base, self._kind, self._max)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()
        if self._httpx is not None:
            await self._httpx.aclose()

    async def request(self, method: str, path: str, body: object | None = None) -> tuple[int, bytes]:
        if self._session is not None:
            async with self._session.request(method, self._base + path, json=body) as resp:
                return resp.status, await resp.read()
        assert self._httpx is not None
        r = await self._httpx.request(method, path, json=body)
        return r.status_code, r.content


def make_httpx_client(upstream: str, kind: ClientKind, max_connections: int) -> httpx.AsyncClient:
    """httpx with explicit limits and timeouts, over the aiohttp transport or its own pool."""
    limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
    transport: httpx.AsyncBaseTransport
    if kind == "httpx-aiohttp":
        from httpx_aiohttp import AiohttpTransport

        transport = AiohttpTransport(limits=limits)
    else:
        transport = httpx.AsyncHTTPTransport(limits=limits)
    return httpx.AsyncClient(
        base_url=upstream.rstrip("/"),
        transport=transport,
        headers={"user-agent": "tiergate-bench-passthrough"},
        timeout=httpx.Timeout(connect=5.0, read=60.0, write=60.0, pool=5.0),
    )


def gateway_gc_tuning() -> ModuleType:
    """gateway/gc_tuning.py, loaded by path: importing the `gateway` package would pull in the
    whole gateway (torch included) and change the very heap being compared."""
    path = Path(__file__).resolve().parents[1] / "gateway" / "gc_tuning.py"
    spec = importlib.util.spec_from_file_location("tiergate_gc_tuning", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def create_app(
    upstream: str, kind: ClientKind = "aiohttp", max_connections: int = 256, gc_gen0_threshold: int | None = None
) -> FastAPI:
    """`gc_gen0_threshold`: apply the gateway's GC tuning (freeze + this threshold) once started."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with Forwarder(upstream, kind, max_connections) as client:
            app.state.client = client
            if gc_gen0_threshold is not None:
                gateway_gc_tuning().tune_gc(True, gc_gen0_threshold)
            yield

    app = FastAPI(title="bench pass-through", lifespan=lifespan)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        body = json.loads(await request.body())  # parsed, as any gateway must to pick an upstream
        client: Forwarder = request.app.state.client
        status, content = await client.request("POST", "/chat/completions", body)
        return Response(content, status_code=status, media_type="application/json")

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        client: Forwarder = request.app.state.client
        status, content = await client.request("GET", "/models")
        return Response(content, status_code=status, media_type="application/json")

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    return app


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.passthrough", description=__doc__)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8090)
    p.add_argument("--upstream", required=True, help="upstream base URL including /v1")
    p.add_argument("--client", choices=["aiohttp", "httpx-aiohttp", "httpx"], default="aiohttp", help="upstream client")
    p.add_argument("--max-connections", type=int, default=256)
    p.add_argument(
        "--gc-gen0-threshold", type=int, help="apply the gateway's GC tuning (gc.freeze + this gen0 threshold)"
    )
    args = p.parse_args(argv)
    app = create_app(args.upstream, args.client, args.max_connections, args.gc_gen0_threshold)
    # Same server settings as `python -m gateway`: uvloop + httptools (uvicorn's "auto"), no access log.
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
