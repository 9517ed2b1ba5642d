"""tiergate's HTTP surface and composition root. Nothing imports this package."""

from __future__ import annotations

from gateway.app import create_app
from gateway.settings import Settings, load_settings

__all__ = ["Settings", "create_app", "load_settings"]
