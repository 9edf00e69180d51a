"""The training machinery the recipe assembles: model, LightningModule, launch, checkpoints, loggers, resume."""
