"""The seed README's Python API, in this process (a one-process gloo group)."""
import json

import pytest
import torch

from apt.core.config import ConfigError, load_profile
from apt.model.architectures import APTLargeModel, APTModel
from apt.trainops.data import create_dataloader
from apt.trainops.data.build import build_datasets
from apt.trainops.trainers import Trainer

SMALL = dict(hidden_size=64, num_layers=2, num_attention_heads=4, num_query_groups=2,
             ffn_hidden_size=128, vocab_size=384, max_seq_len=64)


def test_model_is_a_megatron_gpt_with_llama_parts():
    from megatron.core.models.gpt import GPTModel
    model = APTLargeModel(**SMALL)
    assert isinstance(model, GPTModel) and isinstance(model, APTModel)
    names = dict(model.named_parameters())
    # GQA: q is 64 wide, k and v 2 groups x 16 = 32 each; SwiGLU: fc1 holds gate and up.
    assert names["decoder.layers.0.self_attention.linear_qkv.weight"].shape == (64 + 2 * 32, 64)
    assert names["decoder.layers.0.mlp.linear_fc1.weight"].shape == (2 * 128, 64)
    assert "output_layer.weight" not in names      # APTLargeModel ties (Llama-3.2-1B style)
    assert "output_layer.weight" in dict(APTModel(**SMALL).named_parameters())  # untied default
    assert model.config.normalization == "RMSNorm" and model.config.gated_linear_unit
    from apt.core.config.sizing import count_parameters
    assert model.num_parameters() == count_parameters(model.arch).total


def test_trainer_with_dataloaders_and_seed_arguments(tmp_path):
    cfg = load_profile("tiny", ["data.max_corpus_bytes=300000", "data.seq_length=64"])
    train, val, tokenizer = build_datasets(cfg.data)
    model = APTModel(**SMALL)
    trainer = Trainer(model=model, train_dataloader=create_dataloader(train, batch_size=8),
                      eval_dataloader=create_dataloader(val, batch_size=8, shuffle=False,
                                                        infinite=False),
                      max_steps=12, learning_rate=3e-3, tokenizer=tokenizer,
                      output_dir=str(tmp_path), distributed_config={"strategy": "ddp"})
    assert trainer.plan.global_batch == 8 and trainer.plan.grad_accum == 1
    summary = trainer.train()
    losses = [r["loss"] for r in trainer.history]
    assert len(losses) == 12 and losses[-1] < losses[0] - 0.5
    assert summary["val_loss"] < losses[0] - 0.5 and summary["unigram_entropy_nats"] > 3
    (run,) = [p for p in tmp_path.iterdir() if (p / "metrics.jsonl").exists()]  # not the checkpoints
    assert {"config.yaml", "plan.txt", "metrics.jsonl", "summary.json", "sample.txt"} <= {
        p.name for p in run.iterdir()}
    weights = torch.load(run / "model" / "model.pt", weights_only=True)
    assert torch.equal(weights["embedding.word_embeddings.weight"],
                       model.embedding.word_embeddings.weight.detach())
    assert json.loads((run / "summary.json").read_text())["steps"] == 12


def test_gradient_accumulation_matches_one_big_batch(tmp_path):
    """Micro-batch 1 x 8 accumulation steps equals micro-batch 8 x 1 on the same global batch."""
    base = ["data.max_corpus_bytes=200000", "training.max_steps=3", "training.warmup_steps=1",
            "training.batch_size=8", "training.eval_interval=0", "output.sample_tokens=0",
            f"output.dir={tmp_path}", "training.log_interval=1"]
    histories = []
    for micro in (8, 1):
        trainer = Trainer.from_config(load_profile(
            "tiny", base + [f"training.micro_batch_size={micro}"]))
        assert trainer.plan.grad_accum == 8 // micro
        trainer.train()
        histories.append(trainer.history)
    for one, many in zip(*histories):
        assert abs(one["loss"] - many["loss"]) < 1e-5
        assert abs(one["grad_norm"] - many["grad_norm"]) < 1e-4 * max(1.0, one["grad_norm"])


def test_one_process_fp32_skips_zero1_and_clips_as_zero1_does(tmp_path):
    """One fp32 process defaults to ZeRO-0 (no flat fp32 copy to shard); APT then computes,
    reports and clips the gradient norm itself (DeepSpeed's ZeRO-0 drops it). With clipping
    active every step, ZeRO-0 and ZeRO-1 give the same losses and norms."""
    base = ["data.max_corpus_bytes=200000", "training.max_steps=3", "training.warmup_steps=1",
            "training.batch_size=8", "training.eval_interval=0", "output.sample_tokens=0",
            f"output.dir={tmp_path}", "training.log_interval=1", "training.grad_clip=0.5"]
    histories = {}
    for stage in (None, 1):
        cfg = load_profile("tiny", base + ([] if stage is None else
                                           [f"training.distributed.zero_stage={stage}"]))
        trainer = Trainer.from_config(cfg)
        assert trainer.plan.zero_stage == (0 if stage is None else 1)
        trainer.train()
        histories[stage] = trainer.history
    for zero0, zero1 in zip(histories[None], histories[1]):
        assert zero0["grad_norm"] > 0.5 and zero1["grad_norm"] > 0.5   # clipped every step
        assert abs(zero0["grad_norm"] - zero1["grad_norm"]) < 1e-5 * zero1["grad_norm"]
        assert abs(zero0["loss"] - zero1["loss"]) < 1e-5


def test_training_ends_at_its_target_with_a_checkpoint_there(tmp_path):
    """training.target: the first evaluation that reaches it ends the run, checkpointed at that
    step and not evaluated twice; resuming from that checkpoint trains no further (unless the
    target changed); a metric the evaluation does not produce is named."""
    base = ["data.max_corpus_bytes=200000", "training.max_steps=12", "training.warmup_steps=1",
            "training.batch_size=8", "training.eval_interval=3", "training.eval_batches=1",
            "output.sample_tokens=0", f"output.dir={tmp_path}",
            "training.checkpoints.save_interval=100",
            f"training.checkpoints.dir={tmp_path / 'ck'}"]
    trainer = Trainer.from_config(load_profile("tiny", base + [
        "training.target.metric=val_loss", "training.target.mode=min",
        "training.target.value=100"]))
    summary = trainer.train()
    assert summary["steps"] == 3 and summary["stopped_at_target"]
    assert [p.name for p in (tmp_path / "ck").iterdir() if p.is_dir()] == ["checkpoint-3"]
    (run,) = [p for p in tmp_path.iterdir() if (p / "metrics.jsonl").exists()]
    evals = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
             if "val_loss" in r]
    assert [r["step"] for r in evals] == [3] and summary["val_loss"] == evals[0]["val_loss"]

    # Resumed from there (auto-resume, e.g. a restarted job): nothing left to train; with
    # another target it trains on.
    target = ["training.target.metric=val_loss", "training.target.mode=min",
              "training.checkpoints.auto_resume=true"]
    resumed = Trainer.from_config(load_profile("tiny", base + target + [
        "training.target.value=100"]))
    summary = resumed.train()
    assert summary["steps"] == 3 and summary["stopped_at_target"] and resumed.history == []
    resumed = Trainer.from_config(load_profile("tiny", base + target + [
        "training.target.value=0"]))
    assert resumed.train()["steps"] == 12 and len(resumed.history) == 9

    trainer = Trainer.from_config(load_profile("tiny", base + [
        "training.target.metric=val_exact_match", f"output.dir={tmp_path / 'typo'}",
        # its own checkpoints: a new run beside the one above would save step 12 where that
        # run's checkpoint-12 is, which refuses the start (a foreign checkpoint in the way)
        f"training.checkpoints.dir={tmp_path / 'typo' / 'ck'}"]))
    with pytest.raises(ConfigError, match=r"training\.target\.metric: 'val_exact_match' is not "
                                          r"among this run's evaluation results \(val_loss, "):
        trainer.train()
