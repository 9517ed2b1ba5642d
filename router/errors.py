"""Router errors.

RouterError
└── UnknownScorer (ValueError)   the config names a scorer that is not registered
"""

from __future__ import annotations


class RouterError(Exception):
    """Base class for router errors."""


class UnknownScorer(RouterError, ValueError):
    """The configured scorer name is not in router.confidence.SCORERS."""
