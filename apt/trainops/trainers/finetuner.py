"""Finetuner: supervised fine-tuning (chat SFT, optionally LoRA) on the one training loop.

It changes what a fine-tuning user expects to set, not the loop: the length in epochs, the
data (SFT records, loss on assistant tokens only: apt/trainops/data/datasets/sft.py), NEFTune
noise on
the embeddings, an evaluation before the first step and after the last (held-out
assistant-token loss, and exact-match of greedy answers for the profile's chats), and the
output (``save_model``: APT weights any layout loads, plus a Hugging Face directory). The
objective is the language-model one: the SFT data's loss mask does the rest.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch.distributed as dist

from apt.core.config import APTConfig, config_to_dict, with_overrides
from apt.trainops.artifacts.manager import config_yaml
from apt.trainops.objectives import LanguageModelObjective
from apt.trainops.callbacks import Callback
from .trainer import Trainer


def epochs_overrides(cfg: APTConfig, dataset_size: int, num_epochs: float) -> dict:
    """``training.max_steps`` for ``num_epochs`` passes; a dataset smaller than the global batch
    shrinks the batch to it (and the micro-batch with it)."""
    batch = min(cfg.training.batch_size, dataset_size)
    out = {"training.batch_size": batch,
           "training.max_steps": max(1, math.ceil(num_epochs * dataset_size / batch))}
    if cfg.training.micro_batch_size and cfg.training.micro_batch_size > batch:
        out["training.micro_batch_size"] = batch
    out["training.warmup_steps"] = min(cfg.training.warmup_steps, out["training.max_steps"])
    return out


class _NEFTuneSteps(Callback):
    """NEFTune's noise is drawn per (seed, step, rank): a resumed run draws the same noise."""

    def __init__(self, neftune):
        self.neftune = neftune

    def on_step_start(self, trainer, step: int) -> None:
        self.neftune.set_step(step)


class Finetuner(Trainer):
    """``Finetuner(model=model, train_dataset=data, learning_rate=1e-5, num_epochs=3)``,
    ``.finetune()``, ``.save_model(dir)``.

    ``num_epochs`` (or ``finetune.num_epochs``) sets ``training.max_steps`` to that many passes
    over ``train_dataset`` (or the profile's data)."""

    eval_before_training = True

    def __init__(self, model=None, train_dataset=None, eval_dataset=None, *,
                 num_epochs: float | None = None, config: APTConfig | None = None,
                 tokenizer=None, callbacks=None, **kwargs):
        kwargs.setdefault("objective", LanguageModelObjective())
        cfg = config or APTConfig(model=getattr(model, "arch", APTConfig().model))
        num_epochs = num_epochs if num_epochs is not None else cfg.finetune.num_epochs
        if num_epochs is not None:
            if train_dataset is None:   # the epoch length needs the data before the plan
                from apt.trainops.data.build import build_datasets
                train_dataset, built_eval, tokenizer = build_datasets(
                    cfg.data, model_vocab_size=cfg.model.vocab_size, seed=cfg.training.seed)
                eval_dataset = eval_dataset or built_eval
            overrides = epochs_overrides(cfg, len(train_dataset), num_epochs)
            if kwargs.get("max_steps") is None:
                kwargs["max_steps"] = overrides["training.max_steps"]
            cfg = with_overrides(cfg, overrides)
        self.num_epochs = num_epochs
        super().__init__(model=model, train_dataset=train_dataset, eval_dataset=eval_dataset,
                         config=cfg, tokenizer=tokenizer, callbacks=callbacks, **kwargs)
        from apt.model.neftune import attach_neftune
        self.neftune = attach_neftune(self.modules, self.config.finetune.neftune_alpha,
                                      self.config.training.seed)
        if self.neftune is not None:
            self.callbacks.append(_NEFTuneSteps(self.neftune))
        self.chat_scorer = self.profile_chat_scorer(own_data=train_dataset is None)

    def finetune(self) -> dict:
        return self.train()

    def save_model(self, directory: str | Path) -> Path:
        """Collective. ``<dir>/model/dist`` (APT weights, any layout loads them),
        ``<dir>/config.yaml``, ``<dir>/tokenizer`` and, when this process holds the whole
        model, ``<dir>/hf`` (transformers' ``from_pretrained`` loads it; otherwise run
        ``trainops export-hf --weights <dir>``). ``APTModel.from_pretrained(<dir>)`` reads it back."""
        from apt.trainops.checkpoints import save_model_weights
        directory = Path(directory)
        save_model_weights(self.modules, directory / "model" / "dist",
                           zero3=self.plan.zero3_partitioned)
        if self.runtime.is_main:
            (directory / "config.yaml").write_text(
                config_yaml(config_to_dict(self.config), self.config.config_hash))
            if self.tokenizer is not None:   # load_tokenizer(<dir>/tokenizer) reads it
                self.tokenizer.save(directory / "tokenizer")
            if self.plan.whole_model_per_rank:
                from apt.trainops.interop import export_hf
                export_hf(self.modules, self.config.model, directory / "hf",
                          tokenizer=self.tokenizer)
        dist.barrier()
        return directory
