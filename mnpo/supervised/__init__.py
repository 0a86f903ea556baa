"""Supervised training of the models around the policy: `train-sft` (reference policy), `train-rm` (Bradley-Terry
reward model) and `train-pm` (pairwise preference model)."""
