"""Proving and testing the record: re-execute a run's recorded training from its checkpoints (`verify`), or train it
again with examples left out (`replay`, the ground truth `influence --validate` judges attribution against)."""
