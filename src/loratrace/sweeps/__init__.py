"""Hyperparameter sweeps on Optuna: search space, workers, trial measures, the in-run reporter."""
