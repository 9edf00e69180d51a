"""The query layer's errors and warning (store.py re-exports them: `from loratrace.query.store import StoreError`)."""

from __future__ import annotations

from loratrace.errors import LoratraceError


class StoreError(LoratraceError):
    """A query or lookup the user made that cannot be answered."""

    exit_code = 1


class QueryTimeout(StoreError):
    """A query stopped at its time limit (`query --timeout`, `fetch_table(timeout=...)`)."""


class SqlTextError(StoreError):
    """SQL text that cannot be handed to DuckDB at all (not UTF-8): input that cannot run."""

    exit_code = 2


class StoreWarning(UserWarning):
    """A file or run the views skip: foreign, unreadable, damaged, or missing."""
