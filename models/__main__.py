"""`python -m models convert [NAME ...]`: convert the bundled GGUF models into the cache now.

Serving converts on first use anyway; this lets setup scripts and images do it up front.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from models.convert import BUNDLED, DEFAULT_CACHE_DIR, resolve_model_dir


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m models")
    sub = p.add_subparsers(dest="cmd", required=True)
    conv = sub.add_parser("convert", help="convert bundled GGUF models to cached transformers folders")
    conv.add_argument("names", nargs="*", default=list(BUNDLED), help=f"default: {' '.join(BUNDLED)}")
    conv.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_DIR)
    args = p.parse_args()
    for name in args.names:
        path = resolve_model_dir(name, args.cache_dir)
        print(f"{name}: {path}")  # noqa: T201 - a CLI reports its result


if __name__ == "__main__":
    main()
