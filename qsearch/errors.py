"""Exception hierarchy. Every error a user can cause is a QsearchError; the CLI turns these
into one clear message and exit code 2. Wrap backend errors at the boundary with ``from e``."""

from __future__ import annotations


class QsearchError(Exception):
    """Base class of every error qsearch raises on purpose."""


class ConfigError(QsearchError, ValueError):
    """A configuration value is invalid. The message names the field and what is allowed."""

    def __init__(self, field: str, message: str):
        self.field = field
        super().__init__(f"{field}: {message}" if field else message)


class DataError(QsearchError):
    """A dataset is missing or unreadable (message says where and how to get it)."""


class StorageError(QsearchError):
    """The database could not be reached or an operation on it failed."""


class TrialError(QsearchError):
    """A trial failed (diverged, raised); the message is stored with the trial."""


class CheckpointError(QsearchError):
    """A checkpoint is missing, torn or does not match the trial."""
