"""`LoratraceError`: the base of every error a user can cause (a bad config, data row, checkpoint, query, ...).

Each module raises its own subclass (`ConfigError`, `DataError`, `StoreError`, ...); the CLI catches this base once
and prints the message's first line, exiting with the subclass's `exit_code`: 2 for input that cannot run (before any
work starts), 1 for a query or lookup that cannot be answered.
"""

from __future__ import annotations


class LoratraceError(ValueError):
    """An error the user caused; its message is one line that says what was wrong and what to do."""

    exit_code = 2


def first_line(exc: BaseException) -> str:
    """An exception's message cut to its first line (its type's name when it has none): what a one-line error shows."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class ConfigError(LoratraceError):
    """A config the user wrote (file, override or value) that cannot run (raised by config.py and overrides.py)."""
