"""Command line for distillation: run the loop as its own process, list versions, roll back, export.

`python -m distill_loop run` trains against the same signal database and registry as the
gateway (shared disk), so training can live on another machine; the gateway's watcher
hot-swaps whatever CURRENT names. Settings come from the gateway's YAML and TIERGATE_* vars,
read through the shared settings (distill_loop/settings.py); nothing here imports the gateway.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import time
from pathlib import Path
from typing import Annotated

import typer

from distill_loop.config import SignalConfig
from distill_loop.db import signal_db
from distill_loop.redact import Redactor, install_log_redaction
from distill_loop.registry import Registry, open_registry
from distill_loop.settings import SharedSettings, load_shared_settings
from distill_loop.store import export_jsonl

app = typer.Typer(add_completion=False, help="tiergate distillation tools")
ConfigOpt = Annotated[Path | None, typer.Option("--config", help="the gateway's YAML config")]


def _settings(config: Path | None) -> SharedSettings:
    # The gateway's config file and TIERGATE_* variables, through the settings every process
    # shares: the trainer and the gateways agree on every path and default.
    return load_shared_settings(config)


@app.callback()
def _main() -> None:
    """tiergate distillation tools."""


@app.command()
def run(config: ConfigOpt = None, once: Annotated[bool, typer.Option(help="one run now, then exit")] = False) -> None:
    """Run the distillation loop in this process (same store and registry as the gateway)."""
    from distill_loop.loop import DistillLoop

    settings = _settings(config)
    logging.basicConfig(level=settings.runtime.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if settings.signal.redact:
        install_log_redaction(Redactor())

    def show(event: str, data: dict[str, object]) -> None:
        if event != "step":
            typer.echo(f"{event}: {json.dumps(data, default=str)}")

    loop = DistillLoop.from_settings(settings, listener=show)
    if loop is None:
        raise typer.BadParameter("a remote student needs distill.student_base (its weights, held locally)")
    if once:
        outcome = asyncio.run(loop.arun_once())  # under the trainer lease, as the loop's own runs
        typer.echo(f"{outcome.result}: {outcome.reason} {outcome.version or ''}")
        return
    stop = asyncio.Event()

    async def main() -> None:
        aio = asyncio.get_running_loop()

        def shutdown() -> None:
            stop.set()
            loop.cancel()

        for sig in (signal.SIGINT, signal.SIGTERM):
            aio.add_signal_handler(sig, shutdown)
        await loop.run_forever(stop)

    asyncio.run(main())


def _registry(config: Path | None, folder: Path | None) -> Registry:
    """The configured registry (its pointer in the shared database with signal.url), or a folder's."""
    settings = _settings(config)
    distill = settings.distill if folder is None else settings.distill.model_copy(update={"registry_dir": folder})
    return open_registry(distill, settings.signal)


@app.command()
def versions(
    config: ConfigOpt = None,
    registry: Annotated[Path | None, typer.Option(help="registry folder (default: from config)")] = None,
) -> None:
    """List kept student versions and the pointer history."""
    reg = _registry(config, registry)
    current = reg.current()
    typer.echo(f"current: {current}")
    for name in reg.versions():
        meta = reg.meta(name)
        gate = meta.gate.get("heldout_candidate", {})
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(meta.created_at))
        mark = "*" if name == current else " "
        typer.echo(f"{mark} {name}  parent={meta.parent}  created={created}  heldout={gate}")


@app.command()
def rollback(
    version: Annotated[str, typer.Argument(help="a kept version, or 'base'")],
    config: ConfigOpt = None,
    registry: Annotated[Path | None, typer.Option(help="registry folder (default: from config)")] = None,
) -> None:
    """Point the serving student at a kept version; running gateways swap within a second."""
    reg = _registry(config, registry)
    old = reg.set_current(version, "rollback by cli")
    typer.echo(f"rolled back: {old} -> {version}")


@app.command()
def export(
    out: Annotated[Path, typer.Argument(help="JSONL file to write")],
    db: Annotated[Path, typer.Option(help="signal database (SQLite file)")] = Path("data/signal.db"),
    url: Annotated[str | None, typer.Option(help="a PostgreSQL signal database instead (signal.url)")] = None,
    kind: Annotated[str | None, typer.Option(help="only 'escalation', 'audit', 'label' or 'cache_hit' records")] = None,
    since_hours: Annotated[float | None, typer.Option(help="only records newer than this")] = None,
    redact: Annotated[bool, typer.Option(help="replace personal identifiers (docs/privacy.md)")] = True,
) -> None:
    """Write stored records as chat-format JSONL: prompt messages + the teacher's answer."""
    since = time.time() - since_hours * 3600 if since_hours else 0.0
    where = signal_db(SignalConfig(path=db, url=url))
    n = export_jsonl(where, out, since=since, kind=kind, redact=redact)
    typer.echo(f"wrote {n} records to {out}")


if __name__ == "__main__":
    app()
