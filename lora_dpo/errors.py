"""Errors that are the user's to fix: the CLI prints them as one line, without a traceback."""

from __future__ import annotations


class LoraDpoError(Exception):
    """A mistake in the user's config, data or environment, with a message that says what to do."""


class ConfigError(LoraDpoError):
    def __init__(self, message: str, key: str | None = None):
        super().__init__(message)
        self.key = key


class DataError(LoraDpoError):
    """A preference file or row that cannot be used."""


class Interrupted(LoraDpoError):
    """Training stopped on request (Ctrl-C, SIGTERM) after saving a checkpoint."""

    def __init__(self, message: str, exit_code: int = 130):
        super().__init__(message)
        self.exit_code = exit_code
