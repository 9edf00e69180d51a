"""Runs side by side (`compare`) and the self-contained HTML report of runs and sweeps."""
