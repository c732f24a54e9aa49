"""Errors that are the user's to fix: the CLI prints them as one line, without a traceback."""

from __future__ import annotations

import os


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


# What gloo's TCP transport says when its connection to another process of a launch breaks: the
# other end closed it (that process exited) or reset it, and the read or write that noticed fails.
LOST_CONNECTION = ("Connection closed by peer", "Connection reset by peer", "Broken pipe")


def lost_process(exc: BaseException) -> LoraDpoError | None:
    """The one-line error for a collective (an all-reduce, a barrier) that failed because another
    process of the launch exited; None for anything else.

    Under torchrun or accelerate launch, a process that stops with its own one-line error (out of
    memory on its GPU) exits while the others wait for it in a collective, and gloo raises a
    RuntimeError in each of them, whose traceback would bury the line that says why. Only these
    transport messages count, and only in a launch (WORLD_SIZE above 1): any other RuntimeError
    is a bug and keeps its traceback.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not isinstance(exc, RuntimeError):
        return None
    text = one_line(exc)
    phrase = next((phrase for phrase in LOST_CONNECTION if phrase in text), None)
    if phrase is None:
        return None
    detail = text[text.index(phrase):].split(". ")[0]  # "Connection closed by peer [127.0.0.1]:23956"
    return LoraDpoError(f"another process of this launch stopped (its message is above), so this one stops too "
                        f"({detail}). Fix: what that message says, then launch again (--resume continues from "
                        "the last checkpoint)")
