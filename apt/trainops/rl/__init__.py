"""Reinforcement learning's own machinery: sampling from the policy on its training layout
(sampling.py), turning samples into scored, advantage-weighted rollouts (rollouts.py) and
the held-out evaluation by greedy answers (evaluation.py). The loss is an objective
(apt/trainops/objectives/grpo.py); the trainer is O1Trainer."""
