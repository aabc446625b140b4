"""Training runs: settings, the run folder and the trainer."""
