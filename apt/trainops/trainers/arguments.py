"""What ``Trainer``'s arguments become: the seed API's keywords (``Trainer(max_steps=...,
learning_rate=..., distributed_config=...)``) as dotted config keys, so that they are checked
like a profile's, and the model chunks this rank trains."""
from __future__ import annotations

from apt.trainops.data import APTDataLoader
from apt.trainops.runtime.process_groups import seed_everything


def model_chunks(model, cfg, plan, device) -> list:
    """``model`` (the caller's), else the config's, one chunk per virtual pipeline stage (one
    without interleaving), on ``device``."""
    if model is not None:
        return [model.to(device)]
    from apt.model.architectures import APTModel
    seed_everything(cfg.training.seed)  # same config, same initial weights, always
    return [APTModel(cfg.model, plan=plan, vp_stage=i if plan.vp > 1 else None).to(device)
            for i in range(plan.vp)]


def keyword_overrides(cfg, max_steps, learning_rate, distributed_config, distributed,
                      monitoring, output_dir, experiment_name, train_dataloader) -> dict:
    out = {}
    if max_steps is not None:
        out["training.max_steps"] = max_steps
        out["training.warmup_steps"] = min(cfg.training.warmup_steps, max_steps)
    if learning_rate is not None:
        out["training.learning_rate"] = learning_rate
        out["training.min_learning_rate"] = min(cfg.training.min_learning_rate,
                                                learning_rate / 10)
    for key, value in (distributed_config or {}).items():
        out[f"training.distributed.{key}"] = value
    if distributed is not None:
        out["training.distributed.enabled"] = distributed
    for key, value in (monitoring or {}).items():
        out[f"monitoring.{key}"] = value
    if output_dir is not None:
        out["output.dir"] = output_dir
    if experiment_name is not None:
        out["output.experiment_name"] = experiment_name
    if isinstance(train_dataloader, APTDataLoader):
        # A loader built by the caller fixes the batch; the plan must agree with it.
        out["training.batch_size"] = train_dataloader.global_batch
        out["training.micro_batch_size"] = train_dataloader.batch_sampler.micro_batch
    seq_length = getattr(getattr(train_dataloader, "dataset", None), "seq_length", None)
    if seq_length:
        out["data.seq_length"] = seq_length
    return out
