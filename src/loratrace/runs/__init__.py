"""Run folders: run.json and config.yaml, finding runs and globs, local and fsspec storage, liveness records."""
