"""Which training examples helped or hurt a test example: TracIn over checkpoints, per-example gradients."""
