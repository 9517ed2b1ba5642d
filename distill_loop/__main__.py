"""Command line for the signal store: `python -m distill_loop export --db data/signal.db out.jsonl`.

The background training loop (a later issue) will add its `run` command here.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from distill_loop.store import export_jsonl

app = typer.Typer(add_completion=False, help="tiergate distillation tools")


@app.callback()
def _main() -> None:
    """tiergate distillation tools."""


@app.command()
def export(
    out: Annotated[Path, typer.Argument(help="JSONL file to write")],
    db: Annotated[Path, typer.Option(help="signal database")] = Path("data/signal.db"),
    kind: Annotated[str | None, typer.Option(help="only 'escalation' or 'audit' records")] = None,
    since_hours: Annotated[float | None, typer.Option(help="only records newer than this")] = None,
) -> None:
    """Write stored records as chat-format JSONL: prompt messages + the teacher's answer."""
    since = time.time() - since_hours * 3600 if since_hours else 0.0
    n = export_jsonl(db, out, since=since, kind=kind)
    typer.echo(f"wrote {n} records to {out}")


if __name__ == "__main__":
    app()
