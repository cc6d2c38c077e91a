"""LoRA on Megatron's tensor-parallel linears (apt/model/lora.py), on real Megatron-core and
DeepSpeed (CPU, gloo).

One process: merged weights give the adapter model's logits; only adapters train (the base
stays bit-identical) on both engines, and only they sit in the optimizer; training checkpoints
hold only the adapters and their optimizer state, and a run resumes from them. Two processes
(one launch of the parallel matrix's worker, from the same initial checkpoint as the one-
process reference): TP2, TP2 + sequence parallel, PP2 and DP2 ZeRO-2 LoRA losses and gradient
norms equal one process for 3 steps, merging is exact under TP2 and TP2 + SP, and a TP2 LoRA
checkpoint resumes on one process.
"""
import json
import math

import pytest
import torch

from apt.core.config import ConfigError, load_profile
from apt.model.architectures import APTModel
from apt.trainops.interop import export_hf
from apt.model.lora import adapters, apply_lora, merge_lora
from apt.core.config.sizing import count_lora_parameters
from apt.trainops.checkpoints import save_model_weights
from apt.trainops.distributed.engines.base import torch_optimizers
from apt.trainops.distributed.plan import PlanError, make_plan
from apt.trainops.runtime.process_groups import seed_everything, setup_distributed
from apt.trainops.trainers import Trainer
from apt.trainops.callbacks import Callback
from tests.test_parallel_matrix import HYBRID, TOLERANCE, _common, _launch

LORA = ["lora.rank=4", "lora.alpha=8"]
TP2 = [HYBRID, "training.distributed.tensor_parallel=2"]
SP = ["training.distributed.sequence_parallel=true"]


# ---------------------------------------------------------------------------- config
def test_lora_config_section():
    assert not load_profile("tiny").lora.enabled            # off unless asked
    cfg = load_profile("lora-tiny")
    assert (cfg.lora.rank, cfg.lora.scale) == (8, 2.0)
    assert cfg.lora.targets == ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"]
    with pytest.raises(ConfigError) as err:
        load_profile("tiny", ["lora.rank=8", "lora.targets=[linear_qkv, q_proj]"])
    assert "lora.targets" in str(err.value) and "q_proj" in str(err.value)
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="lora.rank"):
        load_profile("tiny", ["lora.rank=-1"])
    with pytest.raises(ConfigError, match="MoE"):
        load_profile("tiny", ["lora.rank=8", "model.num_experts=4"])
    with pytest.raises(PlanError, match="ZeRO-3"):
        make_plan(load_profile("lora-tiny", ["training.distributed.strategy=fsdp"]), 2,
                  device_type="cpu")


# ---------------------------------------------------------------------------- one process
def _small_model(extra=()):
    cfg = load_profile("tiny", ["model.hidden_size=64", "model.num_layers=2",
                                "model.ffn_hidden_size=128", *LORA, *extra])
    setup_distributed(plan=None)
    seed_everything(cfg.training.seed)
    return cfg, APTModel(cfg.model)


def test_merged_weights_give_the_adapter_logits():
    cfg, model = _small_model()
    plain_keys = set(model.state_dict())
    tokens = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(1))
    positions = torch.arange(32).expand(2, -1)
    model.eval()
    with torch.no_grad():
        base = model(tokens, positions, None)
        added = apply_lora([model], cfg.lora, seed=cfg.training.seed)
        assert torch.equal(model(tokens, positions, None), base)   # B = 0: unchanged at init
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        assert added == trainable == count_lora_parameters(cfg.model, cfg.lora)[0]
        assert len(list(adapters([model]))) == 2 * 4
        generator = torch.Generator().manual_seed(0)
        for *_, adapter in adapters([model]):
            adapter.B.copy_(torch.randn(adapter.B.shape, generator=generator) * 0.1)
        with_adapters = model(tokens, positions, None)
        assert (with_adapters - base).abs().max() > 0.1        # the adapters matter
        with pytest.raises(ValueError, match="merge_lora"):   # never export them unmerged
            export_hf(model, cfg.model, "unused")
        assert merge_lora([model]) == 8
        merged = model(tokens, positions, None)
    print(f"max |merged - adapter logits| {(merged - with_adapters).abs().max():.2e}")
    assert (merged - with_adapters).abs().max() < 1e-5
    assert set(model.state_dict()) == plain_keys        # an ordinary model again, for export
    assert all(p.requires_grad for p in model.parameters())


def test_adapter_checkpoint_entries_are_global():
    """Adapter ShardedTensors use global keys and shapes (layers stacked), fc1's B through
    Megatron's SwiGLU factory: what lets dist_checkpointing reshard them."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory
    cfg, model = _small_model()
    apply_lora([model], cfg.lora)
    entries = {k: v for k, v in model.sharded_state_dict().items() if ".lora_" in k}
    assert len(entries) == 2 * 4 * 2
    qkv_a = entries["decoder.layers.0.self_attention.lora_qkv.A"]
    assert isinstance(qkv_a, ShardedTensor)
    assert qkv_a.key == "decoder.layers.self_attention.lora_qkv.A"
    assert qkv_a.global_shape == (2, 4, 64)
    assert isinstance(entries["decoder.layers.1.mlp.lora_fc1.B"], ShardedTensorFactory)


class _Snapshot(Callback):
    """The weights and optimizer size at the last step, before the run merges its adapters."""

    def on_log(self, trainer, records):
        if trainer.step == trainer.config.training.max_steps:
            self.params = {n: p.detach().clone() for n, p in trainer.modules[0].named_parameters()}
            self.optimizer_numel = sum(p.numel() for o in torch_optimizers(trainer.engine.optimizer)
                                       for g in o.param_groups for p in g["params"])


def _train(cfg_overrides, tmp, name, **kwargs):
    snapshot = _Snapshot()
    trainer = Trainer.from_config(load_profile("tiny", cfg_overrides + [
        f"output.experiment_name={name}", f"training.checkpoints.dir={tmp / name}"]),
        callbacks=[snapshot], **kwargs)
    initial = {n: p.detach().clone() for n, p in trainer.modules[0].named_parameters()}
    trainer.train()
    return trainer, initial, snapshot


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Initial weights on disk, and a one-process LoRA run from them (DeepSpeed engine) that
    checkpoints at steps 2 and 3."""
    tmp = tmp_path_factory.mktemp("lora")
    init = tmp / "init"
    cfg = load_profile("tiny", _common(tmp, init) + ["training.init_from=null"])
    setup_distributed(plan=None)
    seed_everything(cfg.training.seed)
    save_model_weights([APTModel(cfg.model)], init)
    run = _train(_common(tmp, init) + LORA + ["training.checkpoints.save_interval=2"], tmp, "ds")
    return tmp, init, run


def _check_only_adapters_trained(trainer, initial, snapshot):
    changed = {n for n, p in snapshot.params.items() if not torch.equal(p, initial[n])}
    lora = {n for n in initial if ".lora_" in n}
    assert changed == lora, sorted(changed ^ lora)[:5]     # base bit-identical, adapters moved
    trainable = sum(initial[n].numel() for n in lora)
    assert trainable == count_lora_parameters(trainer.config.model, trainer.config.lora)[0]
    assert snapshot.optimizer_numel == trainable           # only adapters in the optimizer
    assert trainer.plan.memory.trainable_per_gpu == trainable
    return trainable


def test_only_adapters_train_deepspeed(reference):
    tmp, init, (trainer, initial, snapshot) = reference
    assert trainer.plan.engine == "deepspeed"
    trainable = _check_only_adapters_trained(trainer, initial, snapshot)
    print(f"trainable parameters {trainable:,} of {sum(p.numel() for p in initial.values()):,}")
    losses = [r["loss"] for r in trainer.history]
    assert len(losses) == 3 and losses[-1] < losses[0]
    assert not any(n for n in trainer.modules[0].state_dict() if "lora" in n)   # exported merged


def test_only_adapters_train_megatron_engine(reference):
    tmp, init, (ds_trainer, _, _) = reference
    trainer, initial, snapshot = _train(_common(tmp, init) + LORA + [
        "training.distributed.engine=megatron"], tmp, "megatron")
    assert trainer.plan.engine == "megatron"
    _check_only_adapters_trained(trainer, initial, snapshot)
    ref = [r["loss"] for r in ds_trainer.history]
    got = [r["loss"] for r in trainer.history]
    assert max(abs(a - b) for a, b in zip(ref, got)) < TOLERANCE, (ref, got)


def test_small_checkpoints_and_resume(reference):
    from megatron.core import dist_checkpointing
    tmp, init, (trainer, _, _) = reference
    lora_bytes = trainer.checkpoints.last_save["bytes"]
    ckpt = tmp / "ds" / "checkpoint-2"
    stored = dist_checkpointing.load_tensors_metadata(str(ckpt / "model"))
    assert stored and all(".lora_" in key for key in stored), sorted(stored)[:5]
    assert json.loads((ckpt / "state.json").read_text())["model_contents"] == "trainable"
    # The same model without LoRA, checkpointed after one step.
    full, _, _ = _train(_common(tmp, init) + ["training.max_steps=1",
                                             "training.checkpoints.save_interval=1"], tmp, "full")
    full_bytes = full.checkpoints.last_save["bytes"]
    print(f"checkpoint: LoRA {lora_bytes:,} B, full {full_bytes:,} B")
    assert lora_bytes < full_bytes / 3
    # Resume at step 2: the base comes back from init_from, adapters and their Adam state from
    # the checkpoint; step 3 must be the uninterrupted run's step 3.
    resumed, _, _ = _train(_common(tmp, init) + LORA, tmp, "resumed",
                           resume_from_checkpoint=str(ckpt))
    assert [r["step"] for r in resumed.history] == [3]
    assert abs(resumed.history[0]["loss"] - trainer.history[2]["loss"]) < TOLERANCE
    # A LoRA checkpoint is not a full one: resuming it without LoRA is refused clearly.
    from apt.trainops.checkpoints import CheckpointError
    with pytest.raises(CheckpointError, match="only LoRA adapters"):
        Trainer.from_config(load_profile("tiny", _common(tmp, init)),
                            resume_from_checkpoint=str(ckpt))


# ---------------------------------------------------------------------------- two processes
LAYOUTS = {
    "lora_tp2": TP2 + LORA,                                   # DeepSpeed engine
    "lora_tp2_sp": TP2 + SP + LORA,                           # Megatron engine
    "lora_pp2": [HYBRID, "training.distributed.pipeline_parallel=2"] + LORA,
    "lora_dp2_zero2": ["training.distributed.zero_stage=2"] + LORA,   # DeepSpeed, frozen base
}
# Dropout differs from one process after step 1; at step 1 B = 0 hides it (same loss).
DROPOUT = {"lora_tp2_dropout": TP2 + LORA + ["lora.dropout=0.1"]}
MERGE_CHECKS = {"lora_tp2_merge": TP2 + LORA, "lora_tp2_sp_merge": TP2 + SP + LORA}


def test_tensor_parallel_lora_matches_one_process(reference):
    tmp, init, (trainer, _, _) = reference
    ref_losses = [r["loss"] for r in trainer.history]
    ref_norms = [r["grad_norm"] for r in trainer.history]
    extra = {name: {"set": overrides + [f"training.init_from={init}"], "lora_merge_check": True}
             for name, overrides in MERGE_CHECKS.items()}
    # _launch starts the layouts from <tmp>/init_dense: our initial weights.
    (tmp / "init_dense").symlink_to(init)
    layouts = {**LAYOUTS, **DROPOUT}
    # TP2 also checkpoints at step 2: one process resumes it below (adapters reshard).
    layouts["lora_tp2"] = LAYOUTS["lora_tp2"] + ["training.checkpoints.save_interval=2",
                                                 f"training.checkpoints.dir={tmp / 'tp2'}"]
    results = _launch(tmp, 2, layouts, extra)
    failures = []
    for name in LAYOUTS:
        r = results[name]
        loss_diff = max(abs(a - b) for a, b in zip(ref_losses, r["losses"]))
        norm_diff = max(abs(a - b) / b for a, b in zip(ref_norms, r["grad_norms"]))
        print(f"{name:12s} engine {r['engine']:9s} max |loss - 1 process| {loss_diff:.2e}, "
              f"grad norm rel. {norm_diff:.2e}")
        if len(r["losses"]) != 3 or loss_diff > TOLERANCE or norm_diff > 1e-4:
            failures.append(f"{name}: losses {r['losses']} vs {ref_losses}, grad norms "
                            f"{r['grad_norms']} vs {ref_norms}")
        print(f"{'':12s} losses {r['losses']} (1 process {ref_losses})")
        # The plan counts gradients and optimizer state for adapters only. (Weights are
        # measured after the run merged its adapters away, so they are not compared.)
        for kind in ("gradients", "optimizer"):
            if kind not in r["memory_measured"]:
                continue
            real = r["memory_measured"][kind]
            estimated = r["memory_estimated"][kind]
            print(f"{name:12s} {kind:9s} estimated {estimated:>10,.0f} B, "
                  f"measured {real:>10,.0f} B")
            if abs(real - estimated) > 0.02 * estimated:
                failures.append(f"{name} {kind}: estimated {estimated}, measured {real}")
    assert results["lora_tp2"]["engine"] == results["lora_dp2_zero2"]["engine"] == "deepspeed"
    assert results["lora_tp2_sp"]["engine"] == results["lora_pp2"]["engine"] == "megatron"
    dropout = results["lora_tp2_dropout"]["losses"]
    print(f"lora_tp2_dropout losses {dropout}")
    assert dropout[0] == pytest.approx(ref_losses[0], abs=TOLERANCE)
    assert all(map(math.isfinite, dropout)) and dropout[1:] != ref_losses[1:]
    for name in MERGE_CHECKS:
        print(f"{name:18s} max |merged - adapter logits| {results[name]['merge_change']:.2e}")
        assert results[name]["merged"] == 4 * 4, results[name]
        if results[name]["merge_change"] > 1e-5:
            failures.append(f"{name}: merged logits differ by {results[name]['merge_change']}")
    assert not failures, "\n".join(failures)
    resumed, _, _ = _train(_common(tmp, init) + LORA, tmp, "from_tp2",
                           resume_from_checkpoint=str(tmp / "tp2" / "checkpoint-2"))
    print(f"TP2 checkpoint resumed on 1 process: step 3 loss {resumed.history[0]['loss']} "
          f"(uninterrupted {ref_losses[2]})")
    assert abs(resumed.history[0]["loss"] - ref_losses[2]) < TOLERANCE
