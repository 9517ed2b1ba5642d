"""Errors of the distillation package.

DistillError
└── SignalStoreError
    └── StoreClosed (RuntimeError)   a record was submitted after close()
"""

from __future__ import annotations


class DistillError(Exception):
    """Base class for distillation errors."""


class SignalStoreError(DistillError):
    """The signal store could not be opened or migrated."""


class StoreClosed(SignalStoreError, RuntimeError):
    """The store no longer accepts records."""
