"""Training engines. ``Trainer`` owns the loop; specialised trainers change batch, loss, data."""
from .callbacks import Callback
from .trainer import Trainer

__all__ = ["Callback", "Trainer"]
