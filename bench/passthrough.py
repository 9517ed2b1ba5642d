"""A bare FastAPI pass-through proxy: the floor for a Python ASGI gateway on this machine.

It parses the JSON body, forwards it to the upstream with one shared client and relays the
answer's bytes back. The client is the gateway's own remote stack (httpx.AsyncClient over
httpx_aiohttp.AiohttpTransport) unless `--client httpx`. No auth, routing, metrics or streaming.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Literal

import httpx
import uvicorn
from fastapi import FastAPI, Request, Response

ClientKind = Literal["aiohttp", "httpx"]


def make_client(upstream: str, kind: ClientKind, max_connections: int) -> httpx.AsyncClient:
    """The same client construction as `models/remote.py`: explicit limits and timeouts."""
    limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
    transport: httpx.AsyncBaseTransport
    if kind == "aiohttp":
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


def create_app(upstream: str, kind: ClientKind = "aiohttp", max_connections: int = 256) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with make_client(upstream, kind, max_connections) as client:
            app.state.client = client
            yield

    app = FastAPI(title="bench pass-through", lifespan=lifespan)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        body = json.loads(await request.body())  # parsed, as any gateway must to pick an upstream
        client: httpx.AsyncClient = request.app.state.client
        resp = await client.post("/chat/completions", json=body)
        return Response(resp.content, status_code=resp.status_code, media_type="application/json")

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        client: httpx.AsyncClient = request.app.state.client
        resp = await client.get("/models")
        return Response(resp.content, status_code=resp.status_code, media_type="application/json")

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    return app


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.passthrough", description=__doc__)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8090)
    p.add_argument("--upstream", required=True, help="upstream base URL including /v1")
    p.add_argument("--client", choices=["aiohttp", "httpx"], default="aiohttp", help="httpx transport")
    p.add_argument("--max-connections", type=int, default=256)
    args = p.parse_args(argv)
    app = create_app(args.upstream, args.client, args.max_connections)
    # Same server settings as `python -m gateway`: uvloop + httptools (uvicorn's "auto"), no access log.
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
