"""Reinforcement learning's own machinery: sampling from the policy on its training layout
(sampling.py) and turning samples into scored, advantage-weighted rollouts (rollouts.py). The
loss is an objective (apt/trainops/objectives/grpo.py); the trainer is O1Trainer."""
