"""Checkpoints: atomic and verified (manager.py, manifest.py), resharding model weights
(model_weights.py) and optimizer state (optimizer_state.py), RNG (rng.py)."""
from .manager import CheckpointError, CheckpointManager, CheckpointState
from .model_weights import load_model_weights, save_model_weights

__all__ = ["CheckpointError", "CheckpointManager", "CheckpointState", "load_model_weights",
           "save_model_weights"]
