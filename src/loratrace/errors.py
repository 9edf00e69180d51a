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


def duckdb_message(exc: BaseException) -> str:
    """A DuckDB error as one line that keeps its hints: the first line, then each further line DuckDB prints
    ('Did you mean "batches"?', 'Candidate bindings: "step"') after it, and its `LINE n: ...` excerpt with the text
    its caret line marks quoted (the caret alone means nothing once the lines are joined). Empty lines are dropped:
    `Catalog Error: Table with name batchs does not exist! Did you mean "batches"?`."""
    lines = [line.rstrip() for line in str(exc).split("\n") if line.strip()]
    if not lines:
        return type(exc).__name__
    parts = [lines[0].strip()]
    at = 1
    while at < len(lines):
        line = lines[at]
        caret = lines[at + 1] if at + 1 < len(lines) else ""
        if line.startswith("LINE ") and caret.strip() and set(caret.strip()) == {"^"}:
            start = caret.index("^")
            marked = line[start:start + len(caret.strip())]
            parts.append(f"{line.strip()} (at {marked!r})" if marked.strip() else f"{line.strip()} (at its end)")
            at += 2
        else:
            parts.append(" ".join(line.split()))
            at += 1
    text = parts[0]
    for part in parts[1:]:  # a sentence or a "Candidate functions:" heading goes on with a space, a list item after ;
        text += (" " if text.endswith((".", "!", "?", ":")) else "; ") + part
    return text


class ConfigError(LoratraceError):
    """A config the user wrote (file, override or value) that cannot run (raised by config/ and overrides.py)."""


class CheckpointError(LoratraceError):
    """A checkpoint a command was asked to use that cannot serve: a selection naming none, an unreadable file, another
    run's file, or LoRA tensors that do not fit the model (raised by training/checkpoints.py, training/selection.py,
    training/model.py and the resume check)."""
