"""Errors that are the user's to fix: the CLI prints them as one line, without a traceback."""

from __future__ import annotations


def one_line(exc: BaseException, limit: int = 300) -> str:
    """The most telling line of a library error, short enough for a one-line message: the first
    line naming a mismatch or a missing file, else all lines joined."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    telling = [line for line in lines if "mismatch" in line or "not found" in line]
    text = telling[0] if telling else " ".join(lines) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def joined(message: str) -> str:
    """A message built around a library's multi-line text, as the one line the CLI promises."""
    return " ".join(line.strip() for line in message.splitlines() if line.strip())


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
