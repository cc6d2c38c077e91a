"""Worker for tests/test_kernels_linear_ce.py: the fused linear + cross-entropy under tensor
parallelism (2 processes, gloo) against Megatron's vocab-parallel cross-entropy and an fp64
one-process reference.

Run under torchrun with 2 processes. For TP2 and then TP1 (Megatron parallel_state, the same
2 processes re-initialised), every rank takes its vocabulary shard of the same seeded weight,
runs the fused op and ``tensor_parallel.vocab_parallel_cross_entropy(logits.float(), labels)``
on ``hidden @ shard^T``, sums the hidden gradient over the TP group (what the output layer's TP
mapping does) and gathers the weight-gradient shards. Rank 0 writes the largest differences
per case to ``--out``.
"""
import argparse
import json

import torch
import torch.distributed as dist

from apt.core import cpu_compat

# (tokens, hidden, vocab, chunk_tokens, chunk_vocab): vocab even (TP2 shards) but no multiple
# of the blocks; the last one takes the default block shape.
CASES = [(45, 24, 302, 16, 40), (33, 16, 130, 7, None), (64, 32, 1000, None, None)]


def case_data(n, hidden, vocab, seed):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, hidden, generator=g)
    w = torch.randn(vocab, hidden, generator=g) * 0.3
    labels = torch.randint(0, vocab, (n,), generator=g)
    upstream = torch.rand(n, generator=g) + 0.5
    upstream[::5] = 0.0   # masked tokens: zero upstream gradient
    return h, w, labels, upstream


def reference(h, w, labels, upstream):
    """One process, full vocabulary, fp64."""
    h = h.double().requires_grad_()
    w = w.double().requires_grad_()
    loss = torch.nn.functional.cross_entropy(h @ w.t(), labels, reduction="none")
    (loss * upstream.double()).sum().backward()
    return loss.detach(), h.grad, w.grad


def run_sharded(fn, h, w_shard, labels, upstream, group, tp):
    """Loss, TP-summed hidden gradient and gathered full weight gradient of ``fn``."""
    h = h.clone().requires_grad_()
    w_shard = w_shard.clone().requires_grad_()
    loss = fn(h, w_shard)
    (loss * upstream).sum().backward()
    grad_h = h.grad.clone()
    dist.all_reduce(grad_h, group=group)
    shards = [torch.empty_like(w_shard.grad) for _ in range(tp)]
    dist.all_gather(shards, w_shard.grad.contiguous(), group=group)
    return loss.detach(), grad_h, torch.cat(shards)


def max_err(a, b):
    return float((a.double() - b.double()).abs().max())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    cpu_compat.activate()
    dist.init_process_group("gloo")
    from megatron.core import parallel_state, tensor_parallel

    from apt.kernels import load
    from apt.kernels.linear_cross_entropy import linear_cross_entropy

    # One rank after the other: the loader's no-op ninja run in the shared build folder is
    # locked, but a failure is clearer here (KernelUnavailable with its reason) than as an
    # eager fallback caught below.
    for rank in range(dist.get_world_size()):
        if rank == dist.get_rank():
            load("linear_cross_entropy", "cpu")
        dist.barrier()

    results = []
    for tp in (2, 1):
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)
        group = parallel_state.get_tensor_model_parallel_group()
        rank = parallel_state.get_tensor_model_parallel_rank()
        for seed, (n, hidden, vocab, chunk_tokens, chunk_vocab) in enumerate(CASES):
            h, w, labels, upstream = case_data(n, hidden, vocab, seed)
            part = vocab // tp
            shard = w[rank * part:(rank + 1) * part]

            def fused(hh, ww):
                out = linear_cross_entropy(hh, ww, labels, group, chunk_tokens=chunk_tokens,
                                           chunk_vocab=chunk_vocab)
                assert type(out.grad_fn).__name__ == "_FusedLinearCrossEntropyBackward", \
                    f"the fused op did not run: {out.grad_fn}"
                return out

            def megatron(hh, ww):
                logits = (hh @ ww.t()).float()
                return tensor_parallel.vocab_parallel_cross_entropy(logits[None],
                                                                    labels[None])[0]

            got = run_sharded(fused, h, shard, labels, upstream, group, tp)
            mega = run_sharded(megatron, h, shard, labels, upstream, group, tp)
            ref = reference(h, w, labels, upstream)
            results.append({
                "tp": tp, "shape": [n, hidden, vocab], "chunks": [chunk_tokens, chunk_vocab],
                "vs_megatron": [max_err(a, b) for a, b in zip(got, mega)],
                "vs_fp64": [max_err(a, b) for a, b in zip(got, ref)],
                "megatron_vs_fp64": [max_err(a, b) for a, b in zip(mega, ref)],
            })
        parallel_state.destroy_model_parallel()
    if dist.get_rank() == 0:
        with open(args.out, "w") as f:
            json.dump(results, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
