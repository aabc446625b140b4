"""Data streams: splits, preprocessing, augmentation, particle and simulated batches for the model."""
