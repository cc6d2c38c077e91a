"""A whole profile (``APTConfig``): its sections, the short names people type for keys, and the
rules between keys, each section's own in its module, checked in this order."""
from __future__ import annotations

from dataclasses import dataclass, field

from .data import DataConfig, data_checks, data_fits_model
from .model import LoRAConfig, ModelConfig, lora_checks, model_checks
from .objectives import objective_checks
from .output import MonitoringConfig, OutputConfig
from .parallel import HardwareConfig, parallel_checks
from .training import FinetuneConfig, TrainingConfig, training_checks


@dataclass(frozen=True)
class APTConfig:
    name: str = "unnamed"
    description: str = ""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    hardware: HardwareConfig = field(default_factory=HardwareConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    monitoring: MonitoringConfig = field(default_factory=MonitoringConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    # Filled by the loader: the files this profile was resolved from, and its content hash.
    sources: tuple = field(default=(), compare=False)
    config_hash: str = field(default="", compare=False)


# Short names people type that are not keys: the "did you mean" hint names the real key.
KEY_ALIASES = {
    "lr": "learning_rate",
    "min_lr": "min_learning_rate",
    "steps": "max_steps",
    "train_steps": "max_steps",
    "global_batch_size": "batch_size",
    "micro_batch": "micro_batch_size",
    "clip_grad": "grad_clip",
    "gradient_clipping": "grad_clip",
    "tp": "tensor_parallel",
    "pp": "pipeline_parallel",
    "dp": "data_parallel",
    "ep": "expert_parallel",
    "cp": "context_parallel",
    "layers": "num_layers",
    "heads": "num_attention_heads",
    "n_heads": "num_attention_heads",
    "n_layers": "num_layers",
    "dim": "hidden_size",
    "kv_heads": "num_query_groups",
    "num_kv_heads": "num_query_groups",
    "seq_len": "seq_length",
}


def cross_checks(cfg: APTConfig):
    """Rules between keys. Yields (dotted key, message) for each violation; the loader reports
    the first, so the order (model, data, LoRA, objective, training, parallelism) is kept."""
    yield from model_checks(cfg.model)
    yield from data_fits_model(cfg.data, cfg.model)
    yield from data_checks(cfg.data)
    yield from lora_checks(cfg.lora, cfg.model)
    yield from objective_checks(cfg)
    yield from training_checks(cfg.training)
    yield from parallel_checks(cfg)
