"""Canary worker: train a tiny Llama-style Megatron GPTModel for a few steps on CPU/gloo.

Run under torchrun. ``--tp/--pp`` pick the layout; the TP1/PP1 run saves its initial weights
as a dist_checkpointing checkpoint (``--save``), other layouts load (reshard) them (``--load``).
Rank 0 writes {"losses": [...], ...} to ``--out``.
"""
import json
import os
import time

import torch
import torch.distributed as dist

from layout_args import layout_parser

from apt.core import cpu_compat

SEQ, MBS, NUM_MB, VOCAB, STEPS = 32, 2, 4, 128, 3


def main() -> None:
    t0 = time.perf_counter()
    ap = layout_parser()
    ap.add_argument("--recompute", choices=["full", "selective"])
    a = ap.parse_args()

    compat = cpu_compat.activate()
    dist.init_process_group("gloo" if compat else "nccl")
    from megatron.core import dist_checkpointing, parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from apt.model.megatron_gpt import build_gpt_model, make_transformer_config

    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=a.tp, pipeline_model_parallel_size=a.pp
    )
    torch.manual_seed(1234)
    model_parallel_cuda_manual_seed(1234)
    config = make_transformer_config(
        num_layers=4, hidden_size=64, num_attention_heads=4, num_query_groups=2,
        ffn_hidden_size=128, tensor_model_parallel_size=a.tp, pipeline_model_parallel_size=a.pp,
        recompute=a.recompute,
    )
    model = build_gpt_model(
        config, vocab_size=VOCAB, max_sequence_length=SEQ,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
    )
    if a.save:
        os.makedirs(a.save, exist_ok=True)  # save() wants an existing, empty directory
        dist_checkpointing.save(model.sharded_state_dict(), a.save)
    if a.load:  # reshards TP1/PP1 tensors onto this rank's TP/PP slice
        model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(), a.load))
    tp_marked = all(
        getattr(p, "tensor_model_parallel", False)
        for n, p in model.named_parameters()
        if n.endswith(("linear_qkv.weight", "linear_proj.weight", "linear_fc1.weight",
                       "linear_fc2.weight", "word_embeddings.weight", "output_layer.weight"))
    )

    # Same seeded batches on every rank and layout, [step][microbatch][seq] of SEQ+1 tokens.
    # Learnable (next token = previous + 1 mod VOCAB from a random start) so the loss moves.
    g = torch.Generator().manual_seed(0)
    start = torch.randint(0, VOCAB, (STEPS, NUM_MB, MBS, 1), generator=g)
    data = (start + torch.arange(SEQ + 1)) % VOCAB
    position_ids = torch.arange(SEQ).unsqueeze(0).expand(MBS, SEQ)

    def loss_func(output_tensor):
        loss = output_tensor.float().mean()  # per-token CE [b, s] -> mean
        # clone: the schedule divides the returned loss in place by num_microbatches
        return loss, {"lm loss": loss.detach().clone()}

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        # attention_mask=None: the causal mask is built by Megatron (device="cuda" literal).
        out = model(batch[:, :-1], position_ids, None, labels=batch[:, 1:])
        return out, loss_func

    # Plain SGD: the update is linear in the gradient, so TP/PP reduction-order noise (~1e-7)
    # stays that small. (Measured: AdamW lr 1e-2 amplifies it to 3e-6 by step 3; lr 3e-3 4.8e-7.)
    # No DP and untied embeddings: each rank's grads are already complete, no grad sync needed
    # (TP-replicated RMSNorm weights get identical grads on every TP rank without SP).
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    forward_backward = get_forward_backward_func()
    losses = []
    for step in range(STEPS):
        opt.zero_grad(set_to_none=True)
        stats = forward_backward(
            forward_step_func=forward_step, data_iterator=iter(data[step]), model=model,
            num_microbatches=NUM_MB, seq_length=SEQ, micro_batch_size=MBS, forward_only=False,
        )
        opt.step()
        if stats:  # last pipeline stage only
            losses.append(torch.stack([s["lm loss"] for s in stats]).mean().item())

    # Gather the reports; the last stage holds the losses.
    reports = [None] * dist.get_world_size()
    dist.all_gather_object(reports, {"losses": losses, "tp_marked": tp_marked})
    if dist.get_rank() == 0:
        with_losses = [r for r in reports if r["losses"]]
        result = {
            "losses": with_losses[0]["losses"],
            "all_last_stage_losses": [r["losses"] for r in with_losses],
            "tp_marked": all(r["tp_marked"] for r in reports),
            "schedule": forward_backward.__name__,
            "compat_active": compat,
            "wall_s": time.perf_counter() - t0,
        }
        with open(a.out, "w") as f:
            json.dump(result, f)
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


if __name__ == "__main__":  # dist_checkpointing's async writer uses spawn: guard the entry
    main()
