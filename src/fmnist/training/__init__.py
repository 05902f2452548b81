"""Training: the typed configuration and presets, batch augmentation, the loop, DDP glue, ensembles."""
