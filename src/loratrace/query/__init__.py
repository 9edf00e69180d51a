"""The read side: DuckDB views over run folders, the read-only sandbox, output formats, the samples index."""
