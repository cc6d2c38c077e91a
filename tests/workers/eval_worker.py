"""Evaluator worker: evaluate one set of weights on a TP x PP layout (run under torchrun).

The model is built the way the Trainer builds it (profile -> plan -> setup_distributed ->
APTModel). ``--save``: write the freshly initialised weights as a dist_checkpointing checkpoint
(the single-process reference does); ``--load``: reshard that checkpoint onto this layout.
Every rank's result is gathered; rank 0 writes {"results": [per rank], ...} to ``--out``.
"""
import json
import os
import time
from pathlib import Path

import torch.distributed as dist

from layout_args import layout_parser

REPO = Path(__file__).resolve().parents[2]
SMALL = ["model.hidden_size=64", "model.num_layers=4", "model.num_attention_heads=4",
         "model.num_query_groups=2", "model.ffn_hidden_size=128", "model.max_seq_len=64",
         "data.seq_length=64", "model.init_std=0.2"]


def main() -> None:
    t0 = time.perf_counter()
    a = layout_parser().parse_args()

    from apt.core.config import load_profile
    from apt.trainops.distributed.plan import make_plan
    from apt.trainops.runtime.process_groups import seed_everything, setup_distributed
    from apt.model.architectures import APTModel
    from apt.trainops.data import ByteTokenizer, TokenDataset
    from apt.trainops.eval import Evaluator

    strategy = "hybrid" if a.tp * a.pp > 1 else "ddp"
    cfg = load_profile("tiny", SMALL + [f"training.distributed.strategy={strategy}",
                                        f"training.distributed.tensor_parallel={a.tp}",
                                        f"training.distributed.pipeline_parallel={a.pp}"])
    world = int(os.environ.get("WORLD_SIZE", 1))
    plan = make_plan(cfg, world, device_type="cpu")
    setup_distributed(plan=plan, seed=cfg.training.seed)
    seed_everything(cfg.training.seed)
    model = APTModel(cfg.model, plan=plan)
    from megatron.core import dist_checkpointing
    if a.save:
        os.makedirs(a.save, exist_ok=True)
        dist_checkpointing.save(model.sharded_state_dict(), a.save)
    if a.load:
        model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(), a.load))

    text = "".join(p.read_text() for p in sorted((REPO / "apt" / "trainops" / "eval").glob("*.py")))
    dataset = TokenDataset(ByteTokenizer().encode(text), cfg.data.seq_length)
    evaluator = Evaluator(model, dataset, metrics=["loss", "perplexity", "accuracy"],
                          micro_batch_size=4, max_batches=4, tasks=["python_completion"])
    result = evaluator.evaluate()

    from megatron.core import parallel_state as ps
    schedule = __import__("megatron.core.pipeline_parallel", fromlist=["x"]) \
        .get_forward_backward_func().__name__
    reports = [None] * dist.get_world_size()
    dist.all_gather_object(reports, {"result": result, "tp_rank": ps.get_tensor_model_parallel_rank(),
                                     "pp_rank": ps.get_pipeline_model_parallel_rank()})
    if dist.get_rank() == 0:
        Path(a.out).write_text(json.dumps({"results": reports, "schedule": schedule,
                                           "wall_s": time.perf_counter() - t0}))
    from apt.trainops.distributed import shutdown_distributed
    shutdown_distributed()


if __name__ == "__main__":  # dist_checkpointing's async writer uses spawn: guard the entry
    main()
