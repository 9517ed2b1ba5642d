"""Errors of the distillation package.

DistillError
└── SignalStoreError
    ├── StoreClosed (RuntimeError)   a record was submitted after close()
    └── SignalDBError                the database failed (down, full, locked): try again later
        └── RecordRejected           a row broke a constraint (a duplicate id): it never will fit
"""

from __future__ import annotations


class DistillError(Exception):
    """Base class for distillation errors."""


class SignalStoreError(DistillError):
    """The signal store could not be opened or migrated."""


class StoreClosed(SignalStoreError, RuntimeError):
    """The store no longer accepts records."""


class SignalDBError(SignalStoreError):
    """The signal database failed; what was being written was not."""


class RecordRejected(SignalDBError):
    """The database refused a row on its own merits (a constraint): retrying cannot help."""
