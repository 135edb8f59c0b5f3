"""Data: reading sources into the run's splits (prepare at scale), the split files, and streaming them to training."""
