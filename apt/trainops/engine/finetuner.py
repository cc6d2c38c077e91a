"""Finetuner: supervised fine-tuning (chat SFT, optionally LoRA) on the one training loop.

It changes what a fine-tuning user expects to set, not the loop: the length in epochs, the
data (SFT records, loss on assistant tokens only: apt/trainops/data/sft.py), and the output
(``save_model``: APT weights any layout loads, plus a Hugging Face directory). The objective is
the language-model one: the SFT data's loss mask does the rest.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch.distributed as dist

from apt.core.config import APTConfig, config_to_dict
from apt.trainops.objectives import LanguageModelObjective
from .trainer import Trainer


class Finetuner(Trainer):
    """``Finetuner(model=model, train_dataset=data, learning_rate=1e-5, num_epochs=3)``,
    ``.finetune()``, ``.save_model(dir)``.

    ``num_epochs`` sets ``training.max_steps`` to that many passes over ``train_dataset`` (or
    the profile's data); a dataset smaller than the global batch shrinks the batch to it."""

    def __init__(self, model=None, train_dataset=None, eval_dataset=None, *,
                 num_epochs: float | None = None, config: APTConfig | None = None, **kwargs):
        kwargs.setdefault("objective", LanguageModelObjective())
        self.num_epochs = num_epochs
        if num_epochs is not None and train_dataset is not None:
            base = config or APTConfig(model=getattr(model, "arch", APTConfig().model))
            batch = min(base.training.batch_size, len(train_dataset))
            steps = max(1, math.ceil(num_epochs * len(train_dataset) / batch))
            kwargs.setdefault("max_steps", steps)
            overrides = {"training.batch_size": batch}
            if base.training.micro_batch_size and base.training.micro_batch_size > batch:
                overrides["training.micro_batch_size"] = batch
            from apt.core.config import with_overrides
            config = with_overrides(base, overrides)
        super().__init__(model=model, train_dataset=train_dataset, eval_dataset=eval_dataset,
                         config=config, **kwargs)

    def finetune(self) -> dict:
        return self.train()

    def save_model(self, directory: str | Path) -> Path:
        """Collective. ``<dir>/model/dist`` (APT weights, any layout loads them),
        ``<dir>/config.yaml``, ``<dir>/tokenizer`` and, when this process holds the whole model, ``<dir>/hf``
        (transformers' ``from_pretrained`` loads it; otherwise run ``apt export-hf --weights
        <dir>``). ``APTModel.from_pretrained(<dir>)`` reads it back."""
        from apt.trainops.checkpoints import save_model_weights
        directory = Path(directory)
        save_model_weights(self.modules, directory / "model" / "dist",
                           zero3=self.plan.zero3_partitioned)
        if self.runtime.is_main:
            import yaml
            (directory / "config.yaml").write_text(
                f"# config hash {self.config.config_hash}\n"
                + yaml.safe_dump(config_to_dict(self.config), sort_keys=False))
            if self.tokenizer is not None:   # load_tokenizer(<dir>/tokenizer) reads it
                self.tokenizer.save(directory / "tokenizer")
            if max(self.plan.tp, self.plan.pp, self.plan.ep, self.plan.vp) == 1 \
                    and not self.plan.zero3_partitioned:
                from apt.model.hf_interop import export_hf
                export_hf(self.modules, self.config.model, directory / "hf")
        dist.barrier()
        return directory
