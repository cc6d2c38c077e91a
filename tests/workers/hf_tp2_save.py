"""Save the weights of a TP2 model (dist_checkpointing) and its logits on fixed tokens.

    torchrun --nproc_per_node 2 tests/workers/hf_tp2_save.py --weights DIR --logits FILE

The test exports DIR to Hugging Face and compares transformers' logits with these.
"""
import argparse

import torch

PROFILE = ["model.num_layers=2", "training.distributed.strategy=hybrid",
           "training.distributed.tensor_parallel=2", "training.precision=fp32"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--weights", required=True)
    parser.add_argument("--logits", required=True)
    args = parser.parse_args()
    import torch.distributed as dist
    from megatron.core import parallel_state
    from apt.core.config import load_profile
    from apt.model.architectures import APTModel
    from apt.trainops.checkpoints import save_model_weights
    from apt.trainops.distributed import shutdown_distributed
    from apt.trainops.distributed.plan import make_plan
    from apt.trainops.runtime.process_groups import setup_distributed

    cfg = load_profile("tiny", PROFILE)
    plan = make_plan(cfg, 2, 2, device_type="cpu")
    assert plan.tp == 2, plan.describe()
    setup_distributed(plan=plan, seed=cfg.training.seed)
    model = APTModel(cfg.model, plan=plan).eval()
    g = torch.Generator().manual_seed(11)  # same on both ranks: norms are replicated over TP
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight"):
                p.add_(0.3 * torch.randn(p.shape, generator=g))
    save_model_weights([model], args.weights)
    tokens = torch.randint(0, cfg.model.vocab_size, (2, 24), generator=g)
    with torch.no_grad():
        local = model(tokens, torch.arange(24).unsqueeze(0).expand_as(tokens), None)
    group = parallel_state.get_tensor_model_parallel_group()
    shards = [torch.empty_like(local) for _ in range(2)]
    dist.all_gather(shards, local.contiguous(), group=group)  # logits are split over vocab
    if dist.get_rank() == 0:
        torch.save({"tokens": tokens, "logits": torch.cat(shards, dim=-1)}, args.logits)
    shutdown_distributed()


if __name__ == "__main__":
    main()
