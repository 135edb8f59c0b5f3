"""Evaluation: feature summaries and reference statistics, FID and friends, the NLL bound, class accuracy."""
