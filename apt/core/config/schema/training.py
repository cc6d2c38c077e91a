"""The ``training:`` section (optimisation, evaluation, the objective) with its subsections, and
``finetune:`` (what supervised fine-tuning changes besides the data)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from .objectives import DPOConfig, GRPOConfig
from .parallel import DistributedConfig
from .rules import rule
from .run_control import AnomalyConfig, CheckpointConfig, TargetConfig, WatchdogConfig


@dataclass(frozen=True)
class TrainingConfig:
    # Global batch in sequences (all data-parallel ranks, all accumulation steps together).
    batch_size: int = rule(32, gt=0)
    # Largest per-rank micro-batch (what fits in memory); the plan takes the largest divisor
    # of global batch / DP not above it. None: global batch / DP (no accumulation).
    micro_batch_size: Optional[int] = rule(None, gt=0)
    learning_rate: float = rule(3e-4, gt=0, le=1)
    min_learning_rate: float = rule(3e-5, ge=0)
    warmup_steps: int = rule(100, ge=0)
    max_steps: int = rule(1000, gt=0)
    weight_decay: float = rule(0.1, ge=0)
    adam_beta1: float = rule(0.9, ge=0, lt=1)
    adam_beta2: float = rule(0.95, ge=0, lt=1)
    adam_eps: float = rule(1e-8, gt=0)
    grad_clip: float = rule(1.0, ge=0)
    # auto: bf16 on GPUs that have it, fp32 on CPU.
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    seed: int = rule(1234, ge=0)
    log_interval: int = rule(10, gt=0)
    eval_interval: int = rule(200, ge=0)
    eval_batches: int = rule(10, gt=0)
    # Initial weights: a dist_checkpointing directory (e.g. a run's model/dist), any layout.
    init_from: Optional[str] = None
    # A multiple-choice task scored at every evaluation: a JSONL file or a built-in task name
    # (apt/trainops/eval/tasks/, e.g. python_completion). None: token metrics only.
    eval_task: Optional[str] = None
    # What the loss is (apt/trainops/objectives): lm = next-token cross-entropy on the labels
    # the data's loss mask selects (pretraining, SFT). Trainer classes set it.
    # dpo = preference pairs (data.corpus preference), losses and reference in training.dpo.
    # grpo = RL on prompts (data.corpus prompts) with rewards, settings in training.grpo.
    objective: Literal["lm", "dpo", "grpo"] = "lm"
    dpo: DPOConfig = field(default_factory=DPOConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    checkpoints: CheckpointConfig = field(default_factory=CheckpointConfig)
    anomaly: AnomalyConfig = field(default_factory=AnomalyConfig)
    watchdog: WatchdogConfig = field(default_factory=WatchdogConfig)
    target: TargetConfig = field(default_factory=TargetConfig)


@dataclass(frozen=True)
class FinetuneConfig:
    """Supervised fine-tuning (the Finetuner): what differs from pretraining besides the data."""
    # NEFTune: uniform noise of scale alpha / sqrt(seq_len * hidden) added to the embeddings
    # while training (apt/model/neftune.py); 0 = off. The paper uses 5 to 15.
    neftune_alpha: float = rule(0.0, ge=0)
    # Passes over the training set; None: training.max_steps decides.
    num_epochs: Optional[int] = rule(None, gt=0)


def training_checks(t: TrainingConfig):
    """Rules between the optimisation keys of ``training``."""
    if t.min_learning_rate > t.learning_rate:
        yield "training.min_learning_rate", (f"{t.min_learning_rate} exceeds "
                                             f"training.learning_rate={t.learning_rate}")
    if t.target.metric is not None and not t.eval_interval:
        yield "training.target.metric", (f"{t.target.metric!r} is checked at evaluations: set "
                                         f"training.eval_interval above 0")
    if t.warmup_steps > t.max_steps:
        yield "training.warmup_steps", f"{t.warmup_steps} exceeds training.max_steps={t.max_steps}"
    if t.micro_batch_size and t.micro_batch_size > t.batch_size:
        yield "training.micro_batch_size", (f"{t.micro_batch_size} exceeds the global "
                                            f"training.batch_size={t.batch_size}")
