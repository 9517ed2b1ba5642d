"""Run ASGI apps under real uvicorn on 127.0.0.1, in a thread, for end-to-end tests; start a
subprocess gateway or trainer; read a running server's metrics.

Follows httpx's `serve_in_thread`, but binds port 0 first so tests never race for ports.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from prometheus_client.parser import text_string_to_metric_families

from bench.chaos import free_port

ROOT = Path(__file__).resolve().parents[1]


class _Server(uvicorn.Server):
    def install_signal_handlers(self) -> None:  # the main thread owns signals, not us
        pass


@contextlib.contextmanager
def serve_in_thread(app: Any, *, ready_path: str | None = None, timeout: float = 120.0) -> Iterator[str]:
    """Serve `app` on a free loopback port; yields its base URL ("http://127.0.0.1:PORT")."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on")
    server = _Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("server did not start")
        time.sleep(0.01)
    if ready_path:
        import httpx

        while True:
            try:
                if httpx.get(url + ready_path, timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{url}{ready_path} never became ready")
            time.sleep(0.05)
    try:
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=60)
        sock.close()


def metric(url: str, name: str, **labels: str) -> float:
    """The value of one sample of the server at `url`'s `/metrics`, by name and labels (those
    given must match; others are free)."""
    for family in text_string_to_metric_families(httpx.get(url + "/metrics").text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return float(s.value)
    raise KeyError(f"{name}{labels} not exported")


def wait_healthy(proc: subprocess.Popen[bytes], url: str, log: Path, timeout: float = 400, poll_s: float = 0.5) -> None:
    """Wait for a server subprocess's `url` to answer 200; fail with the end of its log if it
    exits first or does not answer within `timeout` seconds."""
    import httpx

    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{url} exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url} not healthy after {timeout}s:\n{log.read_text()[-3000:]}")
        time.sleep(poll_s)


def _tiergate_env(env: dict[str, str]) -> dict[str, str]:
    """This process's environment with `TIERGATE_*` settings from `env` only (the test's own
    environment's are dropped)."""
    return {**{k: v for k, v in os.environ.items() if not k.startswith("TIERGATE_")}, **env}


def start_gateway(
    env: dict[str, str], log: Path, *args: str, timeout: float = 60
) -> tuple[subprocess.Popen[bytes], str]:
    """`python -m gateway` in a subprocess on a free port, with `TIERGATE_*` settings from
    `env` only; returns it once it is ready."""
    port = free_port()
    cmd = [sys.executable, "-m", "gateway", "--port", str(port), *args]
    with log.open("a") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=_tiergate_env(env), stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    wait_healthy(proc, url + "/health/ready", log, timeout=timeout, poll_s=0.1)
    return proc, url


class TrainerProcess:
    """`python -m distill_loop run` in a subprocess, with `TIERGATE_*` settings from `env` only.

    What it prints (the loop's events on stdout, its log on stderr) is read line by line as it
    comes, kept in `lines` and copied to `log`. Tests find out what the trainer is doing there,
    as an operator would; it has no other hook."""

    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.log = log
        self.lines: list[str] = []
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "distill_loop", "run"],
            cwd=ROOT,
            env=_tiergate_env(env) | {"PYTHONUNBUFFERED": "1"},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        with self.log.open("a") as out:
            for line in self.proc.stdout:
                out.write(line)
                out.flush()
                self.lines.append(line.rstrip("\n"))

    def wait_for(self, found: Callable[[str], bool], *, after: int = 0, timeout: float = 60) -> int:
        """The index of the first line from `after` on for which `found` is true, once printed."""
        deadline = time.monotonic() + timeout
        while True:
            hit = next((i for i in range(after, len(self.lines)) if found(self.lines[i])), None)
            if hit is not None:
                return hit
            if self.proc.poll() is not None and not self._reader.is_alive():
                raise RuntimeError(f"trainer exited ({self.proc.returncode}):\n" + "\n".join(self.lines[-40:]))
            if time.monotonic() > deadline:
                raise TimeoutError("trainer did not print the line waited for:\n" + "\n".join(self.lines[-40:]))
            time.sleep(0.02)

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait(30)
        self._reader.join(30)
        assert self.proc.stdout is not None
        self.proc.stdout.close()
