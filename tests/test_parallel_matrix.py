"""Every parallel layout against a one-process reference from the same weights.

Real Megatron-core and DeepSpeed code on CPU/gloo. All layouts start from one
dist_checkpointing checkpoint (resharded on load) and train 3 optimizer steps on the same
global batches; per-step losses must match the reference within 1e-5 (fp32). Layouts are
grouped per process launch (one 2-process and one 4-process launch) to keep the suite fast.

Every run uses the fused kernels (``model.kernels: auto``, apt/kernels); the reference and
a TP2 + SP layout also run without them (``model.kernels=none``): on or off, the same losses.

The model-family features (issue 26) run on the same launches (``fam_*`` layouts against
their own one-process references): a dense model with every attention feature at once (q/k/v
bias, per-head q/k norms, a head dimension other than hidden / heads, a sliding window shorter
than the sequence, Llama 3 RoPE scaling whose original context is inside the sequence, and
Gemma's GeGLU, 1 + w norms and scaled embeddings; the swiglu kernel is not for GeGLU), and
a Qwen3-MoE-routed one (softmax over all experts, top-k not renormalised, its own expert width,
q/k norms) on EP2 and TP2 x EP2 + SP.
"""
import json

import pytest

from apt.core.config import load_profile
from apt.model.architectures import APTModel
from apt.trainops.checkpoints import save_model_weights
from apt.trainops.runtime.process_groups import seed_everything, setup_distributed
from apt.trainops.trainers import Trainer
from apt.trainops.objectives.base import unwrap
from tests._launch import run_distributed
from pathlib import Path

WORKER = Path(__file__).parent / "workers" / "train_layouts.py"
TOLERANCE = 1e-5
# MoE with both router losses on: their gradients (scaled by MoEAuxLossAutoScaler, on the
# one-process reference by the DeepSpeed engine) must match over EP and TP x EP + SP too.
MOE = ["model.num_experts=4", "model.moe_top_k=2", "model.moe_load_balancing=aux_loss",
       "model.moe_aux_loss_coeff=1e-2", "model.moe_z_loss_coeff=1e-3"]
FAMILIES = ["model.qkv_bias=true", "model.qk_norm=true", "model.head_dim=24",
            "model.sliding_window=8", "model.rope_scaling=llama3", "model.rope_scaling_factor=4",
            "model.rope_high_freq_factor=2", "model.rope_original_max_seq_len=16",
            "model.activation=geglu", "model.norm_zero_centered=true",
            "model.scale_embeddings=true"]
FAMILIES_MOE = MOE + ["model.qk_norm=true", "model.moe_norm_topk_prob=false",
                      "model.moe_ffn_hidden_size=48"]
VARIANTS = {"dense": [], "moe": MOE, "families": FAMILIES, "families_moe": FAMILIES_MOE}
HYBRID = "training.distributed.strategy=hybrid"
KERNELS_OFF = ["model.kernels=none"]
ALL_KERNELS = ["rmsnorm", "rope", "swiglu", "linear", "linear_cross_entropy"]


def _common(tmp, init):
    return ["model.hidden_size=64", "model.num_layers=4", "model.num_attention_heads=4",
            "model.num_query_groups=2", "model.ffn_hidden_size=128", "model.max_seq_len=32",
            "data.seq_length=32", "data.max_corpus_bytes=300000", "training.batch_size=8",
            "training.micro_batch_size=2", "training.max_steps=3", "training.warmup_steps=1",
            "training.learning_rate=3e-3", "training.min_learning_rate=3e-4",
            "training.log_interval=1", "training.eval_interval=0", "training.eval_batches=1",
            "output.sample_tokens=0", f"output.dir={tmp / 'runs'}",
            f"training.init_from={init}"]


LAYOUTS_2 = {
    "dp2_zero1": ["training.distributed.zero_stage=1"],
    "dp2_zero2": ["training.distributed.zero_stage=2"],
    "dp2_zero3": ["training.distributed.strategy=fsdp"],
    "tp2": [HYBRID, "training.distributed.tensor_parallel=2"],
    "tp2_sp": [HYBRID, "training.distributed.tensor_parallel=2",
               "training.distributed.sequence_parallel=true"],
    "tp2_sp_kernels_off": KERNELS_OFF + [HYBRID, "training.distributed.tensor_parallel=2",
                                         "training.distributed.sequence_parallel=true"],
    "pp2": [HYBRID, "training.distributed.pipeline_parallel=2"],
    "pp2_vp2": [HYBRID, "training.distributed.pipeline_parallel=2",
                "training.distributed.virtual_pipeline_stages=2", "training.eval_batches=2"],
    "moe_ep2": [HYBRID, "training.distributed.expert_parallel=2"],
    "pp2_recompute_full": [HYBRID, "training.distributed.pipeline_parallel=2",
                           "training.distributed.recompute=full"],
    "tp2_sp_recompute_selective": [HYBRID, "training.distributed.tensor_parallel=2",
                                   "training.distributed.sequence_parallel=true",
                                   "training.distributed.recompute=selective"],
    # DeepSpeed engine: the head norms' TP gradient sum must happen inside autograd
    "fam_tp2": [HYBRID, "training.distributed.tensor_parallel=2"],
    "fam_tp2_sp": [HYBRID, "training.distributed.tensor_parallel=2",
                   "training.distributed.sequence_parallel=true"],
    "fam_pp2": [HYBRID, "training.distributed.pipeline_parallel=2"],
    "fam_moe_ep2": [HYBRID, "training.distributed.expert_parallel=2"],
}
LAYOUTS_4 = {
    "tp2_pp2": [HYBRID, "training.distributed.tensor_parallel=2",
                "training.distributed.pipeline_parallel=2"],
    "dp2_tp2_distopt": [HYBRID, "training.distributed.tensor_parallel=2",
                        "training.distributed.engine=megatron"],
    "moe_tp2_ep2_sp": [HYBRID, "training.distributed.tensor_parallel=2",
                       "training.distributed.expert_parallel=2",
                       "training.distributed.sequence_parallel=true"],
    "fam_tp2_pp2": [HYBRID, "training.distributed.tensor_parallel=2",
                    "training.distributed.pipeline_parallel=2"],
    "fam_moe_tp2_ep2_sp": [HYBRID, "training.distributed.tensor_parallel=2",
                           "training.distributed.expert_parallel=2",
                           "training.distributed.sequence_parallel=true"],
}
EXPECTED_ENGINE = {"dp2_zero1": "deepspeed", "dp2_zero2": "deepspeed", "dp2_zero3": "deepspeed",
                   "tp2": "deepspeed", "fam_tp2": "deepspeed"}


def _variant(name: str) -> str:
    """The model a layout trains: fam_moe_* / fam_* / moe_* / the dense one."""
    for prefix, variant in (("fam_moe", "families_moe"), ("fam_", "families"), ("moe", "moe")):
        if name.startswith(prefix):
            return variant
    return "dense"


def _kernels(name: str) -> list:
    """The fused kernels a layout or a reference (named by its variant) runs: all, none, or
    all but swiglu for the GeGLU families model."""
    if "kernels_off" in name:
        return []
    geglu = "families" in (name, _variant(name))
    return [k for k in ALL_KERNELS if k != "swiglu"] if geglu else ALL_KERNELS


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    """One-process runs (dense, MoE and the family variants) from freshly initialised weights
    saved to disk; the dense one also with the kernels off."""
    tmp = tmp_path_factory.mktemp("matrix")
    refs = {}
    for kind, extra in (*VARIANTS.items(), ("dense_kernels_off", KERNELS_OFF)):
        init = tmp / f"init_{kind.removesuffix('_kernels_off')}"
        if not init.exists():
            cfg = load_profile("tiny", _common(tmp, init) + extra + ["training.init_from=null"])
            setup_distributed(plan=None)
            seed_everything(cfg.training.seed)
            save_model_weights([APTModel(cfg.model)], init)
        trainer = Trainer.from_config(load_profile("tiny", _common(tmp, init) + extra))
        trainer.train()
        refs[kind] = [r["loss"] for r in trainer.history]
        assert len(refs[kind]) == 3 and refs[kind][-1] < refs[kind][0]
        assert unwrap(trainer.modules[0]).kernels == tuple(_kernels(kind))
    return tmp, refs


def _launch(tmp, nproc, layouts, extra=None):
    spec = {"common": _common(tmp, "INIT"), "layouts": {}}
    for name, overrides in layouts.items():
        kind = _variant(name)
        spec["layouts"][name] = {"set": VARIANTS[kind] + overrides
                                 + [f"training.init_from={tmp / f'init_{kind}'}"]}
    spec["layouts"].update(extra or {})
    spec_path, out = tmp / f"spec{nproc}.json", tmp / f"out{nproc}.json"
    spec_path.write_text(json.dumps(spec))
    run_distributed(WORKER, nproc, ["--spec", str(spec_path), "--out", str(out)], timeout=600)
    return json.loads(out.read_text())


def _check(results, refs, layouts):
    failures = []
    for name in layouts:
        ref = refs[_variant(name)]
        losses = results[name]["losses"]
        diff = max(abs(a - b) for a, b in zip(ref, losses))
        print(f"{name:18s} engine {results[name]['engine']:9s} max |loss - reference| {diff:.2e}")
        if len(losses) != len(ref) or diff > TOLERANCE:
            failures.append(f"{name} {results[name]['layout']}: max diff {diff:.2e} "
                            f"ref={ref} got={losses}")
        assert results[name]["kernels"] == _kernels(name), (name, results[name]["kernels"])
        if name in EXPECTED_ENGINE:
            assert results[name]["engine"] == EXPECTED_ENGINE[name], name
        elif not name.startswith("dp2_zero"):
            assert results[name]["engine"] == "megatron", name
    assert not failures, "\n".join(failures)


def _check_memory(results, names):
    """The plan's static estimate against the bytes the busiest rank really holds."""
    for name in names:
        measured, estimated = results[name]["memory_measured"], results[name]["memory_estimated"]
        for kind, real in measured.items():
            print(f"{name:18s} {kind:9s} estimated {estimated[kind]:>10,.0f} B, "
                  f"measured {real:>10,.0f} B")
            assert abs(real - estimated[kind]) <= 0.01 * estimated[kind], (name, kind)


def test_kernels_on_and_off_give_the_same_losses(references):
    """One process: the fused kernels change no per-step loss (fp32)."""
    _, refs = references
    diff = max(abs(a - b) for a, b in zip(refs["dense"], refs["dense_kernels_off"]))
    print(f"one process, kernels on vs off: max |loss difference| {diff:.2e}")
    assert diff <= TOLERANCE, (refs["dense"], refs["dense_kernels_off"])


def test_two_process_layouts_match_single_process(references):
    tmp, refs = references
    sabotaged = {"tp2_sp_no_sp_allreduce": {
        "set": LAYOUTS_2["tp2_sp"] + [f"training.init_from={tmp / 'init_dense'}"],
        "sabotage_sp": True}}
    results = _launch(tmp, 2, LAYOUTS_2, sabotaged)
    _check(results, refs, LAYOUTS_2)
    on, off = results["tp2_sp"]["losses"], results["tp2_sp_kernels_off"]["losses"]
    print(f"TP2 + SP, kernels on vs off: max |loss difference| "
          f"{max(abs(a - b) for a, b in zip(on, off)):.2e}")
    assert max(abs(a - b) for a, b in zip(on, off)) <= TOLERANCE, (on, off)
    _check_memory(results, ["dp2_zero1", "dp2_zero2", "dp2_zero3", "pp2"])
    # The same layout with the sequence-parallel gradient all-reduce removed must NOT match:
    broken = results["tp2_sp_no_sp_allreduce"]["losses"]
    assert max(abs(a - b) for a, b in zip(refs["dense"], broken)) > 2 * TOLERANCE, broken


def test_four_process_layouts_match_single_process(references):
    tmp, refs = references
    results = _launch(tmp, 4, LAYOUTS_4)
    _check(results, refs, LAYOUTS_4)
    _check_memory(results, ["tp2_pp2", "dp2_tp2_distopt"])
