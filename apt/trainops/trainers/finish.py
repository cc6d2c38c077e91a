"""The end of a run: the summary, the exported model (LoRA adapters folded in) and a sample."""
from __future__ import annotations

import torch
import torch.distributed as dist

from apt.model.lora import merge_lora
from apt.trainops.checkpoints import save_model_weights
from apt.trainops.checkpoints.model_weights import zero3_gathered
from apt.trainops.data import nats_to_bits
from apt.trainops.reliability.watchdog import set_phase


def finish_run(trainer, eval_result: dict, elapsed: float, tokens_per_step: int,
               progress) -> dict:
    """Collective: summary.json, the model (model/dist on any layout; model.pt, and a sample,
    where this process holds the whole model), the ``on_train_end`` hooks."""
    set_phase("finish")
    history = trainer.history
    summary = {"steps": trainer.step, "config_hash": trainer.config.config_hash,
               "stopped_at_target": trainer.stopped_at_target,
               "train_seconds": elapsed,
               # A run resumed from its final checkpoint trains no step in this process.
               "final_train_loss": history[-1]["loss"] if history else None,
               "tokens_per_s": len(history) * tokens_per_step / elapsed,
               **{k: v for k, v in eval_result.items() if k != "step"},
               **{f"initial_{k}": v for k, v in trainer.initial_eval.items() if k != "step"}}
    train_set = getattr(trainer.train_dataloader, "dataset", None)
    if hasattr(train_set, "unigram_entropy"):
        entropy = train_set.unigram_entropy()
        summary.update(unigram_entropy_nats=entropy,
                       unigram_entropy_bits=nats_to_bits(entropy))
        if "val_loss" in eval_result:
            progress.line(f"result | validation loss {eval_result['val_loss']:.4f} nats "
                          f"({eval_result['val_bits_per_token']:.3f} bits/token) vs unigram "
                          f"entropy {entropy:.4f} nats ({nats_to_bits(entropy):.3f} bits)")
    plan, is_main = trainer.plan, trainer.runtime.is_main
    merge_lora(trainer.modules)   # the exported model is the base with its adapters folded in
    summary["model_dist_path"] = str(save_model_weights(
        trainer.modules, trainer.artifacts.path("model") / "dist",
        zero3=plan.zero3_partitioned))
    state = None if plan.model_parallel else _full_state_dict(trainer.model, plan)
    if is_main and state is not None:
        summary["model_path"] = str(trainer.artifacts.save_model(state))
        sample = _sample(trainer)
        if sample is not None:
            trainer.artifacts.save_text("sample.txt", sample)
            progress.line("sample | " + sample.replace("\n", "\n       | "))
    trainer._emit("on_train_end", summary)
    if is_main:
        trainer.artifacts.save_summary(summary)
    dist.barrier()
    return summary


def _full_state_dict(model, plan) -> dict:
    """Weights gathered when ZeRO-3 partitioned them (collective: every rank calls it)."""
    partitioned = plan.zero3_partitioned
    with zero3_gathered([model], partitioned):
        # Gathered tensors are released on leaving the block: keep copies of them.
        return {k: v.clone() if partitioned else v
                for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}


def _sample(trainer) -> str | None:
    out, tokenizer = trainer.config.output, trainer.tokenizer
    if not out.sample_tokens or tokenizer is None or not trainer.plan.whole_model_per_rank:
        return None
    generator = torch.Generator().manual_seed(trainer.config.training.seed)
    prompt = torch.as_tensor(tokenizer.encode(out.sample_prompt))
    new = trainer.model.generate(prompt.to(trainer.runtime.device), out.sample_tokens,
                                 valid_vocab=tokenizer.vocab_size, generator=generator,
                                 eod_id=tokenizer.eod_id)
    return out.sample_prompt + tokenizer.decode(new.tolist())
