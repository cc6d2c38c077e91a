"""Training engines. ``Trainer`` owns the loop; the seed's trainer family specialises the
objective, the data and the defaults (never the loop)."""
from apt.trainops.callbacks import Callback
from .claude_trainer import ClaudeTrainer
from .finetuner import Finetuner
from .gpt5_trainer import GPT5Trainer
from .o1_trainer import O1Trainer
from .pretrainer import PreTrainer
from .trainer import Trainer



def trainer_for(config) -> type[Trainer]:
    """The trainer class a profile asks for (launch/train.py): preference pairs align
    (training.objective dpo), SFT data fine-tunes (epochs, NEFTune, before/after scores),
    anything else pretrains (an MoE model with GPT5Trainer); prompts with rewards learn by
    reinforcement (grpo, O1Trainer)."""
    if config.training.objective == "dpo":
        return ClaudeTrainer
    if config.training.objective == "grpo":
        return O1Trainer
    if config.data.corpus == "sft":
        return Finetuner
    return GPT5Trainer if config.model.num_experts else PreTrainer


__all__ = ["Callback", "ClaudeTrainer", "Finetuner", "GPT5Trainer", "O1Trainer", "PreTrainer",
           "Trainer", "trainer_for"]
