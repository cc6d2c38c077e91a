"""Checkpoints: atomic and verified (manager.py composing writing.py, commit.py, lineage.py,
listing.py, loading.py; manifest.py), resharding model weights (model_weights.py) and optimizer
state (optimizer_state.py), RNG (rng.py). Below the model-loading layer (apt/trainops/interop):
nothing here imports apt.model."""
from .manager import CheckpointError, CheckpointManager, CheckpointState
from .model_weights import load_model_weights, save_model_weights

__all__ = ["CheckpointError", "CheckpointManager", "CheckpointState", "load_model_weights",
           "save_model_weights"]
