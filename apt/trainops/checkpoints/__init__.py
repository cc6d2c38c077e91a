"""Checkpoints. Today: model weights in Megatron's resharding format (model_weights.py)."""
from .model_weights import load_model_weights, save_model_weights

__all__ = ["load_model_weights", "save_model_weights"]
