"""A TCP proxy that fails on command, for fault tests and the soak (bench/soak.py).

It stands on a fixed loopback port in front of an upstream. `up` forwards bytes both ways;
`down` stops listening and resets what was open, as a killed server does (new connections are
refused); `hang` accepts and reads but never answers, as a wedged server does. It knows nothing
about HTTP, and does not delay, corrupt or reorder bytes.
"""

from __future__ import annotations

import asyncio
import socket
import threading


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ChaosProxy:
    """A TCP proxy on loopback in front of an upstream, for fault tests. Modes: `up` forwards,
    `down` stops listening and resets open connections (a killed server: connections are
    refused), `hang` accepts and reads but never answers (a wedged server)."""

    def __init__(self, upstream: str) -> None:
        host, _, port = upstream.removeprefix("http://").partition("/")[0].partition(":")
        self._target = (host, int(port))
        self.port = free_port()
        self.mode = "up"
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None
        self._conns: set[asyncio.StreamWriter] = set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> ChaosProxy:
        self._thread.start()
        self.set("up")
        return self

    def __exit__(self, *exc: object) -> None:
        self.set("down")
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    def set(self, mode: str) -> None:
        asyncio.run_coroutine_threadsafe(self._set(mode), self._loop).result(timeout=10)

    async def _set(self, mode: str) -> None:
        self.mode = mode
        for w in list(self._conns):
            w.transport.abort()  # a mode change cuts what was open, as a restart would
        self._conns.clear()
        if mode == "down":
            if self._server is not None:
                self._server.close()
                self._server = None
        elif self._server is None:
            self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port, reuse_address=True)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._conns.add(writer)
        try:
            if self.mode == "hang":
                while await reader.read(65536):
                    pass
                return
            up_reader, up_writer = await asyncio.open_connection(*self._target)
            self._conns.add(up_writer)

            async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
                dst.close()

            await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer), return_exceptions=True)
        except OSError:
            pass
        finally:
            self._conns.discard(writer)
            writer.close()
