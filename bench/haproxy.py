"""The deployment's HAProxy config (deploy/haproxy.cfg), read and rewritten for loopback.

`tests/test_deploy.py` reads its backend servers and health check; `bench.replicas` runs the same
file with its bind and server lines pointed at local gateways, so each rule is stated once. It
parses only the line-oriented subset that file uses (no quoting, no conditions, no includes) and
does not start HAProxy.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Sequence
from pathlib import Path

CONFIG = Path(__file__).resolve().parents[1] / "deploy" / "haproxy.cfg"
INSTALL_HINT = "apt-get install -y haproxy (Debian bookworm ships 2.6, the deployment's version)"
# Keywords that open a section; every other non-blank line belongs to the last one opened.
SECTION_KEYWORDS = ("global", "defaults", "frontend", "backend", "listen", "resolvers", "peers", "userlist")


def haproxy_bin() -> str | None:
    """The haproxy executable, if installed."""
    return shutil.which("haproxy") or next((p for p in ("/usr/sbin/haproxy",) if Path(p).exists()), None)


def sections(text: str) -> dict[str, list[list[str]]]:
    """Section header ("backend gateways") -> its lines, each split into words, comments dropped."""
    out: dict[str, list[list[str]]] = {}
    current: list[list[str]] | None = None
    for raw in text.splitlines():
        words = raw.split("#", 1)[0].split()
        if not words:
            continue
        if words[0] in SECTION_KEYWORDS:
            current = out.setdefault(" ".join(words), [])
        elif current is not None:
            current.append(words)
    return out


def _backend(text: str) -> str:
    """The header of the backend the (one) frontend sends requests to."""
    (frontend,) = [lines for header, lines in sections(text).items() if header.startswith("frontend ")]
    (name,) = [words[1] for words in frontend if words[0] == "default_backend"]
    return f"backend {name}"


def servers(text: str) -> dict[str, str]:
    """The load-balanced servers: name -> address (host:port)."""
    return {words[1]: words[2] for words in sections(text)[_backend(text)] if words[0] == "server"}


def health_check(text: str) -> tuple[str, str]:
    """(method, path) of the backend's HTTP health check."""
    for words in sections(text)[_backend(text)]:
        if words[:2] == ["http-check", "send"]:
            return words[words.index("meth") + 1], words[words.index("uri") + 1]
    raise ValueError("the backend has no `http-check send meth M uri PATH`")


def for_loopback(text: str, port: int, addresses: Sequence[str]) -> str:
    """The same config listening on 127.0.0.1:`port`, balancing over `addresses` (host:port)
    as servers gateway-1..N with the first server line's options; every other line unchanged."""
    backend, section, out, replaced = _backend(text), "", [], False
    for raw in text.splitlines():
        words = raw.split("#", 1)[0].split()
        if words and words[0] in SECTION_KEYWORDS:
            section = " ".join(words)
        if words[:1] == ["bind"]:
            out.append(re.sub(r"bind\s+\S+", f"bind 127.0.0.1:{port}", raw))
        elif section == backend and words[:1] == ["server"]:
            if not replaced:  # the first server line stands for all of them
                indent = raw[: len(raw) - len(raw.lstrip())]
                options = "".join(f" {w}" for w in words[3:])
                out += [f"{indent}server gateway-{i} {a}{options}" for i, a in enumerate(addresses, 1)]
                replaced = True
        else:
            out.append(raw)
    if not replaced:
        raise ValueError(f"{backend} has no server lines to replace")
    return "\n".join(out) + "\n"
