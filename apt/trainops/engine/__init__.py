"""Training engines. ``Trainer`` owns the loop; specialised trainers change batch, loss, data."""
from .trainer import Trainer

__all__ = ["Trainer"]
