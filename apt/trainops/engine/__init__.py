"""Training engines. ``Trainer`` owns the loop; the seed's trainer family specialises the
objective, the data and the defaults (never the loop)."""
from .callbacks import Callback
from .finetuner import Finetuner
from .pretrainer import PreTrainer
from .trainer import Trainer

__all__ = ["Callback", "Finetuner", "PreTrainer", "Trainer"]
