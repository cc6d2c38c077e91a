"""Training engines. ``Trainer`` owns the loop; the seed's trainer family specialises the
objective, the data and the defaults (never the loop)."""
from .callbacks import Callback
from .finetuner import Finetuner
from .pretrainer import PreTrainer
from .trainer import Trainer



def trainer_for(config) -> type[Trainer]:
    """The trainer class a profile asks for (launch/train.py): SFT data fine-tunes (epochs,
    NEFTune, before/after scores), anything else pretrains."""
    return Finetuner if config.data.corpus == "sft" else PreTrainer


__all__ = ["Callback", "Finetuner", "PreTrainer", "Trainer", "trainer_for"]
