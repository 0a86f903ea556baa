"""Offline MNPO and its baselines: `precompute` (opponent log-probs) and `train-mnpo` (every `--loss_type`)."""
