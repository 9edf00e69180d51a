"""The `loratrace` command: parsing, dispatch and printing; the library does the work."""

from loratrace.cli.app import _parser, main

__all__ = ["_parser", "main"]
