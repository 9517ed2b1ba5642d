"""`python -m gateway`: start the gateway under uvicorn.

Flags cover the common cases; everything else comes from `--config FILE` (YAML) and
`TIERGATE_<SECTION>__<KEY>` variables. This is where Settings is built, once.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path

import uvicorn

from distill_loop import Redactor, install_log_redaction
from gateway.app import create_app
from gateway.settings import cli_overrides, load_settings


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m gateway", description="tiergate: tiered LLM serving gateway")
    p.add_argument("--config", type=Path, help="YAML config file (see config.example.yaml)")
    p.add_argument("--host", help="interface to listen on (server.host)")
    p.add_argument("--port", type=int, help="port to listen on (server.port)")
    p.add_argument("--student-url", help="OpenAI-compatible base URL (…/v1) serving the student")
    p.add_argument("--teacher-url", help="OpenAI-compatible base URL (…/v1) serving the teacher")
    p.add_argument("--threshold", type=float, help="escalate when confidence < this (router.threshold)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        base = load_settings(args.config)
        settings = load_settings(
            args.config,
            **cli_overrides(
                base=base,
                host=args.host,
                port=args.port,
                student_url=args.student_url,
                teacher_url=args.teacher_url,
                threshold=args.threshold,
            ),
        )
    except (FileNotFoundError, ValueError) as exc:
        print(f"tiergate: invalid configuration: {exc}", file=sys.stderr)  # noqa: T201
        raise SystemExit(2) from exc
    logging.basicConfig(level=settings.runtime.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if settings.signal.redact:  # every logger's records, uvicorn's included (docs/privacy.md)
        install_log_redaction(Redactor())
    app = create_app(settings)
    # uvicorn drains on SIGTERM, then re-raises the signal under the handler it found. A no-op
    # handler here makes a clean drain exit 0, as orchestrators expect of a graceful stop.
    signal.signal(signal.SIGTERM, lambda *_: None)
    uvicorn.run(
        app,
        host=settings.server.host,
        port=settings.server.port,
        log_level=settings.runtime.log_level.lower(),
        access_log=False,
        # Nothing reads the client's address or scheme (no access log, keys name tenants), so
        # X-Forwarded-* rewriting would be work for no one, on every request.
        proxy_headers=False,
        timeout_graceful_shutdown=int(settings.server.shutdown_grace_s) + 10,
        timeout_keep_alive=settings.server.keep_alive_s,
    )


if __name__ == "__main__":
    main()
