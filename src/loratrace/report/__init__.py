"""Runs side by side (`compare`) and the self-contained HTML report of runs and sweeps."""

# compare's sections, in order: here so that `loratrace compare --help` names them without importing pandas
SECTIONS = ("runs", "config", "metrics", "evals", "data_order", "examples", "forgetting")

# what `compare` shows without --section: a summary (report/summary.py); metrics and forgetting on request
SUMMARY_SECTIONS = ("runs", "config", "evals", "data_order", "examples")
