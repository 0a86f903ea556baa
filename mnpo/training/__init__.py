"""Training primitives shared by every trainer: pure losses, chunked log-probs, checkpoints, non-finite guards.

The trainers themselves live with their product: `mnpo.offline` (precompute + train-mnpo and its
baselines), `mnpo.online` (train-egpo, the online NLHF family) and `mnpo.supervised` (train-sft,
train-rm, train-pm). They import from here; nothing here imports them.
"""
