"""Training: the torchrun/DDP loop and checkpoints (atomic save, exact resume)."""
