"""Packed documents on parallel layouts: per-token losses of packed rows (document mask and
restarting positions) against each document run alone, through Megatron's forward-only
schedule (run under torchrun).

    torchrun --nproc_per_node 2 tests/workers/packed_documents_worker.py --layouts tp2,pp2 \
        --weights DIR --out o.json

Every layout is built in the same launch (Megatron's groups are rebuilt between layouts) and
loads the same weights (``--weights``, written by the one-process reference). Rank 0 writes
{layout: {"max_diff": packed vs alone, "no_mask_diff": the same without the mask, "packed" and
"no_mask": the per-token losses [rows, SEQ], "schedule", "layout"}}. The model stays in
training mode (dropout is 0) so recompute layouts take their checkpointed forward paths.

``packed_case`` is shared with tests/test_document_masking.py (one process).
"""
import argparse
import json
import os

import torch

EOD = 0
VOCAB = 384
SEQ = 16
# Rows of SEQ tokens, each filled exactly with documents of these lengths (10 documents).
# Even lengths keep the unpacked rows divisible by TP under sequence parallelism.
ROWS = [[6, 10], [4, 6, 6], [8, 8], [2, 4, 10]]
COMMON = ["model.hidden_size=64", "model.num_layers=4", "model.num_attention_heads=4",
          "model.num_query_groups=2", "model.ffn_hidden_size=128", f"model.vocab_size={VOCAB}",
          "model.max_seq_len=32", f"data.seq_length={SEQ}", "model.init_std=0.2",
          "training.batch_size=4", "training.micro_batch_size=2"]
HYBRID = "training.distributed.strategy=hybrid"
LAYOUTS = {
    "tp2": [HYBRID, "training.distributed.tensor_parallel=2"],
    "tp2_sp": [HYBRID, "training.distributed.tensor_parallel=2",
               "training.distributed.sequence_parallel=true"],
    "tp2_sp_recompute_selective": [HYBRID, "training.distributed.tensor_parallel=2",
                                   "training.distributed.sequence_parallel=true",
                                   "training.distributed.recompute=selective"],
    "pp2": [HYBRID, "training.distributed.pipeline_parallel=2"],
    "pp2_vp2": [HYBRID, "training.distributed.pipeline_parallel=2",
                "training.distributed.virtual_pipeline_stages=2"],
    "pp2_recompute_full": [HYBRID, "training.distributed.pipeline_parallel=2",
                           "training.distributed.recompute=full"],
}


def packed_case(seed: int = 0) -> dict:
    """Documents (each ending in EOD, no EOD inside) packed into rows, with the positions and
    mask the data pipeline builds for them (``document_layout``), and the same documents one
    per row, unpacked: at the start of a row, plain positions, no mask, the rest of the row
    filler (causal attention keeps it invisible to the document)."""
    from apt.trainops.data.datasets.tokens import document_layout
    g = torch.Generator().manual_seed(seed)
    docs, spans = [], []  # spans: (packed row, start, length) per document
    for r, lengths in enumerate(ROWS):
        start = 0
        for n in lengths:
            tokens = torch.randint(1, VOCAB, (n,), generator=g)
            tokens[-1] = EOD
            # Labels: the next token inside the document, then any token (same in both runs).
            labels = torch.cat([tokens[1:], torch.randint(1, VOCAB, (1,), generator=g)])
            docs.append((tokens, labels))
            spans.append((r, start, n))
            start += n
        assert start == SEQ, f"row {r} must fill {SEQ} tokens"
    packed_tokens = torch.stack([torch.cat([docs[i][0] for i, s in enumerate(spans) if s[0] == r])
                                 for r in range(len(ROWS))])
    packed_labels = torch.stack([torch.cat([docs[i][1] for i, s in enumerate(spans) if s[0] == r])
                                 for r in range(len(ROWS))])
    layout = document_layout(packed_tokens, EOD, reset_position_ids=True,
                             reset_attention_mask=True)
    filler = torch.randint(1, VOCAB, (len(docs), SEQ), generator=g)
    alone_tokens, alone_labels = filler.clone(), filler.roll(-1, dims=1)
    for i, (tokens, labels) in enumerate(docs):
        alone_tokens[i, :len(tokens)], alone_labels[i, :len(labels)] = tokens, labels
    return {"docs": docs, "spans": spans,
            "packed": {"tokens": packed_tokens, "labels": packed_labels,
                       "position_ids": layout["position_ids"],
                       "attention_mask": layout["attention_mask"]},
            "alone": {"tokens": alone_tokens, "labels": alone_labels,
                      "position_ids": torch.arange(SEQ).expand(len(docs), SEQ),
                      "attention_mask": None}}


def max_document_diff(case: dict, packed_loss: torch.Tensor, alone_loss: torch.Tensor) -> float:
    """Largest |packed - alone| per-token loss over every token of every document."""
    worst = 0.0
    for i, (row, start, n) in enumerate(case["spans"]):
        diff = (packed_loss[row, start:start + n] - alone_loss[i, :n]).abs().max().item()
        worst = max(worst, diff)
    return worst


def _micro_batches(batch: dict, size: int) -> list[dict]:
    rows = batch["tokens"].shape[0]
    return [{k: (None if v is None else v[i:i + size]) for k, v in batch.items()}
            for i in range(0, rows, size)]


def schedule_losses(chunks: list, batch: dict):
    """Per-token losses [rows, SEQ] through Megatron's forward-only schedule, in two
    micro-batches (the interleaved schedule wants a multiple of PP): on the last pipeline
    stage, None elsewhere. The model is called as model(tokens, position_ids, attention_mask,
    labels=...) on every stage, as the engines do."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    def loss_func(output):
        return torch.zeros(()), {"loss": output.detach()}

    def forward_step(data_iterator, model):
        b = next(data_iterator)
        out = model(b["tokens"], b["position_ids"], b["attention_mask"], labels=b["labels"])
        return out, loss_func

    micro_batch_size = batch["tokens"].shape[0] // 2
    micro = _micro_batches(batch, micro_batch_size)
    with torch.no_grad():
        outputs = get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=[iter(micro) for _ in chunks] if len(chunks) > 1 else iter(micro),
            model=chunks if len(chunks) > 1 else chunks[0], num_microbatches=len(micro),
            seq_length=SEQ, micro_batch_size=micro_batch_size, forward_only=True)
    losses = [o["loss"] for o in outputs if isinstance(o, dict)]
    return torch.cat(losses) if losses else None


def run_layout(overrides: list[str], weights: str) -> dict:
    from megatron.core.pipeline_parallel import get_forward_backward_func
    import torch.distributed as dist
    from apt.core.config import load_profile
    from apt.model.architectures import APTModel
    from apt.trainops.checkpoints import load_model_weights
    from apt.trainops.distributed.plan import make_plan
    from apt.trainops.runtime.process_groups import setup_distributed
    from megatron.core import parallel_state as ps

    cfg = load_profile("tiny", COMMON + overrides)
    plan = make_plan(cfg, int(os.environ["WORLD_SIZE"]), device_type="cpu")
    setup_distributed(plan=plan, seed=cfg.training.seed)
    chunks = [APTModel(cfg.model, plan=plan, vp_stage=i if plan.vp > 1 else None)
              for i in range(plan.vp)]
    load_model_weights(chunks, weights)  # the one-process reference's weights, resharded
    assert all(c.supported_batch_fields == {"position_ids", "attention_mask"} for c in chunks)
    case = packed_case()
    packed = schedule_losses(chunks, case["packed"])
    alone = schedule_losses(chunks, case["alone"])
    no_mask = schedule_losses(chunks, dict(case["packed"], attention_mask=None))
    result = None
    if packed is not None:
        result = {"max_diff": max_document_diff(case, packed, alone),
                  "no_mask_diff": max_document_diff(case, no_mask, alone),
                  "packed": packed.tolist(), "no_mask": no_mask.tolist()}
    reports = [None] * dist.get_world_size()
    dist.all_gather_object(reports, {"result": result,
                                     "tp": ps.get_tensor_model_parallel_world_size(),
                                     "pp": ps.get_pipeline_model_parallel_world_size(),
                                     "vp": plan.vp, "sp": plan.sequence_parallel,
                                     "recompute": plan.recompute})
    last = [r for r in reports if r["result"] is not None]
    return {**last[0]["result"], "ranks_with_losses": len(last),
            "schedule": get_forward_backward_func().__name__,
            "layout": {k: reports[0][k] for k in ("tp", "pp", "vp", "sp", "recompute")}}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layouts", required=True, help="comma-separated names of LAYOUTS")
    parser.add_argument("--weights", required=True, help="dist_checkpointing weights to load")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    import torch.distributed as dist
    from apt.trainops.distributed import shutdown_distributed
    results = {name: run_layout(LAYOUTS[name], args.weights)
               for name in args.layouts.split(",")}
    if dist.get_rank() == 0:
        with open(args.out, "w") as f:
            json.dump(results, f)
    shutdown_distributed()


if __name__ == "__main__":
    main()
