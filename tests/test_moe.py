"""MoE pretraining: router options, the same router steps on both engines, expert metrics.

One process, real Megatron-core and DeepSpeed on CPU. The layouts (EP2, TP2xEP2+SP) with the
aux and z losses on are compared in tests/test_parallel_matrix.py.
"""
import json

import pytest

from apt.core.config import ConfigError, load_profile

SMALL = ["model.hidden_size=64", "model.num_layers=2", "model.num_attention_heads=4",
         "model.ffn_hidden_size=128", "model.max_seq_len=32", "data.seq_length=32",
         "data.max_corpus_bytes=200000", "training.batch_size=8", "training.warmup_steps=1",
         "training.eval_interval=0", "training.eval_batches=1", "output.sample_tokens=0"]
MOE = SMALL + [
       "training.max_steps=3", "training.log_interval=3", "model.num_experts=8",
       "model.moe_top_k=2",
       # seq_aux_loss: the per-sequence balance loss, the same whatever the micro-batch split
       # (aux_loss is per micro-batch by definition: a different split is a different loss)
       "model.moe_load_balancing=seq_aux_loss", "model.moe_aux_loss_coeff=1e-2",
       "model.moe_z_loss_coeff=1e-3", "model.moe_score_function=sigmoid",
       "model.moe_expert_bias=true", "model.moe_bias_update_rate=1e-2"]


@pytest.mark.parametrize("overrides, key", [
    (["model.moe_expert_bias=true"], "model.moe_expert_bias"),            # softmax scores
    (["model.moe_load_balancing=sinkhorn", "model.moe_capacity_factor=1.25"],
     "model.moe_capacity_factor"),
    (["model.moe_top_k=9"], "model.moe_top_k"),
    (["model.moe_top_k=1"], "model.moe_top_k"),                           # softmax over one
    (["model.moe_load_balancing=aux"], "model.moe_load_balancing"),
])
def test_router_settings_that_cannot_combine_are_refused(overrides, key):
    with pytest.raises(ConfigError) as err:
        load_profile("moe-tiny", overrides)
    assert err.value.key == key and "\n" not in str(err.value), str(err.value)


def test_profiles_carry_balancing_defaults():
    big, tiny = load_profile("moe").model, load_profile("moe-tiny").model
    for m in (big, tiny):
        assert m.moe_load_balancing == "aux_loss" and m.moe_aux_loss_coeff == 1e-2
        assert m.moe_z_loss_coeff == 1e-3


def _train(tmp_path, name, extra):
    from apt.model.moe_routing import routers
    from apt.trainops.trainers import trainer_for
    cfg = load_profile("tiny", MOE + [f"output.dir={tmp_path / name}"] + extra)
    trainer = trainer_for(cfg).from_config(cfg)
    trainer.train()
    biases = [r.expert_bias.clone() for r in routers(trainer.modules)]
    return trainer, biases


def test_accumulation_split_and_engines_step_the_router_alike(tmp_path):
    """micro 1 x 8 = micro 8 x 1 on the DeepSpeed engine and on Megatron's, aux + z losses and
    the expert bias on: DeepSpeed gets the aux-loss gradient scale and the bias update that
    Megatron's schedule gives (without them the 1 x 8 run's router gradient is 8x too big)."""
    from apt.trainops.trainers import GPT5Trainer
    runs = {}
    for name, extra in (("deepspeed_1x8", ["training.micro_batch_size=1"]),
                        ("deepspeed_8x1", ["training.micro_batch_size=8"]),
                        ("megatron_1x8", ["training.micro_batch_size=1",
                                          "training.distributed.engine=megatron"]),
                        ("megatron_8x1", ["training.micro_batch_size=8",
                                          "training.distributed.engine=megatron"])):
        trainer, biases = _train(tmp_path, name, extra)
        assert type(trainer) is GPT5Trainer and trainer.engine.kind == name.split("_")[0]
        runs[name] = trainer.history, biases
    ref_history, ref_biases = runs["deepspeed_8x1"]
    assert all(float(b.abs().max()) > 0 for b in ref_biases)   # the bias did move
    for name, (history, biases) in runs.items():
        for ref, got in zip(ref_history, history):
            assert abs(ref["loss"] - got["loss"]) <= 1e-5, (name, ref["loss"], got["loss"])
            assert abs(ref["grad_norm"] - got["grad_norm"]) <= 1e-4 * ref["grad_norm"], name
        for ref, got in zip(ref_biases, biases):
            assert (ref - got).abs().max() <= 1e-7, (name, ref, got)
    # expert metrics at the log interval, the same numbers on both engines
    last = {name: history[-1] for name, (history, _) in runs.items()}
    ref = last["deepspeed_8x1"]
    for key in ("moe/layer0/tokens_max", "moe/layer1/max_violation", "moe/aux_loss",
                "moe/z_loss", "moe/router_entropy", "moe/expert_bias_norm"):
        assert all(abs(r[key] - ref[key]) <= 1e-5 * max(1.0, abs(ref[key])) for r in
                   last.values()), key
    assert ref["moe/aux_loss"] > 0 and ref["moe/z_loss"] > 0 and ref["moe/dropped_fraction"] == 0
    assert ref["moe/expert_bias_norm"] == pytest.approx(
        sum(float(b.square().sum()) ** 0.5 for b in ref_biases) / len(ref_biases), rel=1e-6)
    # per step tokens: 8 x 32 tokens x top-2 over 8 experts
    assert sum(ref["moe/layer0/load"]) == pytest.approx(8)
    run_dir = next((tmp_path / "deepspeed_8x1").glob("*/metrics.jsonl")).parent
    saved = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert any("moe/layer1/dead_experts" in r for r in saved)
    assert (run_dir / "plots" / "expert_load.png").is_file()


def test_gpt5_trainer_router_arguments_and_token_dropping(tmp_path):
    """GPT5Trainer's keyword arguments set the router; a capacity drops the overflow, which the
    metrics count; a dense model is refused."""
    from apt.trainops.trainers import GPT5Trainer
    dense = load_profile("tiny", SMALL + [f"output.dir={tmp_path}", "training.max_steps=2",
                                          "training.log_interval=2"])
    with pytest.raises(ConfigError, match="model.num_experts"):
        GPT5Trainer(config=dense)
    trainer = GPT5Trainer(config=dense, num_experts=4, top_k=2, capacity_factor=0.5,
                          load_balancing="aux_loss", z_loss_coeff=1e-3)
    assert trainer.config.model.moe_capacity_factor == 0.5
    trainer.train()
    last = trainer.history[-1]
    # capacity = 0.5 x 256 tokens x 2 / 4 = 64 per expert: at most half the assignments kept
    assert 0.5 <= last["moe/dropped_fraction"] < 1, last["moe/dropped_fraction"]
    assert last["moe/aux_loss"] > 0 and last["moe/z_loss"] > 0
    assert last["moe/layer0/tokens_max"] >= 64 and last["moe/layer0/dead_experts"] == 0
