"""The traditional script's experiment folders: reading, importing as run folders, resuming a Trainer checkpoint."""
