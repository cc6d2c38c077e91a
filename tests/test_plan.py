"""The parallel plan: strategy table, divisibility, batch arithmetic, memory breakdown."""
import pytest

from apt.core.config import load_profile
from apt.core.config.sizing import count_parameters
from apt.trainops.distributed.memory import GIB
from apt.trainops.distributed.plan import PlanError, make_plan
from apt.trainops.perf.hardware import load_hardware
from apt.trainops.perf.search import search
from apt.trainops.perf.shape import layout_from_plan
from tests._profiles import AUTO_LAYOUT_70B


def plan(profile, world, gpus=8, device="cuda", overrides=()):
    return make_plan(load_profile(profile, list(overrides)), world, gpus, device_type=device)


def test_seed_size_table():
    assert plan("tiny", 2, device="cpu").strategy == "ddp"
    p1b = plan("1b", 8)
    assert (p1b.strategy, p1b.zero_stage, p1b.engine) == ("fsdp", 3, "deepspeed")
    p13 = plan("13b", 64)
    assert p13.strategy == "hybrid" and p13.pp > 1 and p13.tp == 1 and p13.distributed_optimizer
    p70 = plan("70b", 64, overrides=AUTO_LAYOUT_70B)   # the profile sets its layout itself
    assert (p70.tp, p70.sequence_parallel, p70.engine) == (8, True, "megatron")
    assert p70.tp * p70.pp * p70.dp == 64
    assert p70.memory.total < 80 * GIB        # the table's layout fits an 80 GB GPU


def test_70b_profile_carries_the_searchs_first_pick():
    """profiles/70b.yaml's layout is what `trainops plan --profile 70b --gpu h100-sxm --nodes 8
    --gpus-per-node 8 --search` ranks first: if the performance model or the profile changes,
    this fails instead of the profile drifting from the tool that picked it. Fields, not
    tokens/s: the model's numbers may move as long as the winner does not."""
    cfg = load_profile("70b")
    (first,), _, _ = search(cfg, 64, 8, load_hardware("h100-sxm"), top=1)
    picked, profile = layout_from_plan(first.plan), layout_from_plan(make_plan(cfg, 64, 8))
    assert profile == picked, f"profile {profile.describe()}, search {picked.describe()}"
    assert first.plan.strategy == cfg.training.distributed.strategy == "hybrid"


def test_one_fp32_data_parallel_rank_needs_no_zero1():
    """ZeRO-1 on one data-parallel rank shards nothing and only adds a flat fp32 copy: ZeRO-0
    there in fp32; bf16 keeps ZeRO-1 (fp32 gradient accumulation), DP > 1 keeps it too."""
    assert plan("tiny", 1, device="cpu").zero_stage == 0
    assert plan("tiny", 2, device="cpu").zero_stage == 1
    assert plan("tiny", 1, overrides=["training.precision=bf16"]).zero_stage == 1
    assert plan("tiny", 1, device="cpu",
                overrides=["training.distributed.zero_stage=1"]).zero_stage == 1


def test_batch_arithmetic_and_explicit_layout():
    p = plan("70b", 64, overrides=["training.distributed.strategy=hybrid",
                                   "training.distributed.tensor_parallel=8",
                                   "training.distributed.pipeline_parallel=4",
                                   "training.distributed.virtual_pipeline_stages=2",
                                   "training.distributed.context_parallel=1",
                                   "training.eval_batches=8"])
    assert (p.tp, p.pp, p.vp, p.dp) == (8, 4, 2, 2)
    assert p.global_batch == p.micro_batch * p.grad_accum * p.dp == 1024
    assert any("batch_p2p_comm=False" in n for n in p.notes)


def test_static_memory_is_exact_for_a_simple_layout():
    cfg = load_profile("tiny", ["training.distributed.zero_stage=0"])
    p = make_plan(cfg, 1, 1, device_type="cpu")
    params = count_parameters(cfg.model).total
    assert p.memory.params_per_gpu == params
    # fp32 Adam without sharding: 4 B weights, 4 B grads, 8 B moments per parameter.
    assert (p.memory.weights, p.memory.gradients, p.memory.optimizer) == (4 * params, 4 * params,
                                                                        8 * params)
    sharded = make_plan(load_profile("tiny", ["training.distributed.strategy=fsdp"]), 2, 2,
                        device_type="cpu")
    # ZeRO-3 fp32: weights, grads, fp32 master clone and moments all split over DP=2.
    assert sharded.memory.static == pytest.approx(20 * params / 2)


@pytest.mark.parametrize("overrides,world,key", [
    (["training.distributed.pipeline_parallel=2", "training.distributed.zero_stage=3"], 4,
     "zero_stage"),
    (["training.distributed.context_parallel=2"], 2, "context_parallel"),
    (["training.batch_size=30"], 4, "batch_size"),
    (["training.distributed.data_parallel=3"], 4, "data_parallel"),
    (["training.distributed.world_size=8"], 4, "world_size"),
])
def test_refused_layouts_name_the_key(overrides, world, key):
    with pytest.raises(PlanError) as err:
        plan("tiny", world, gpus=world, device="cpu", overrides=overrides)
    assert key in str(err.value)


def test_moe_expert_parallel_and_zero3_refused():
    with pytest.raises(PlanError, match="ZeRO-3 cannot be combined with expert parallel"):
        plan("moe", 16, overrides=["training.distributed.strategy=hybrid",
                                   "training.distributed.expert_parallel=8",
                                   "training.distributed.zero_stage=3"])


def test_moe_plan_counts_active_parameters_and_the_expert_all_to_all():
    """Memory holds every expert (split over EP), activations and FLOPs follow the k experts
    a token passes through, and expert parallel adds its all-to-all traffic and buffers."""
    from apt.core.config.sizing import matmul_parameters
    layout = ["training.distributed.strategy=hybrid", "training.distributed.tensor_parallel=2",
              "training.distributed.sequence_parallel=true"]
    ep1 = plan("moe", 16, overrides=layout)
    ep8 = plan("moe", 16, overrides=layout + ["training.distributed.expert_parallel=8"])
    m = load_profile("moe").model
    counts = count_parameters(m)
    assert (ep8.params_total, ep8.params_active) == (counts.total, counts.active)
    assert counts.active < counts.total / 3                       # 2 of 8 experts
    assert matmul_parameters(m) < counts.active                   # no input embedding
    assert ep8.memory.params_per_gpu < ep1.memory.params_per_gpu / 3  # experts split 8 ways
    assert ep1.expert_all_to_all == 0
    # tokens per rank (SP) x k copies x hidden x bf16 x 4 all-to-alls x 7/8 leave the rank
    per_layer = 4096 / 2 * 2 * 4096 * 2 * 4 * 7 / 8
    assert ep8.expert_all_to_all == pytest.approx(per_layer * 32 * ep8.grad_accum)
    assert "expert all-to-all" in ep8.describe()
    assert ep8.memory.communication > ep1.memory.communication   # the all-to-all buffers
    # the k = 2 expert passes per token: more MLP activations than one dense MLP
    dense = plan("7b", 16, overrides=layout + ["model.num_query_groups=8",
                                               "model.ffn_hidden_size=14336"])
    assert ep1.memory.activations > dense.memory.activations * 1.3
