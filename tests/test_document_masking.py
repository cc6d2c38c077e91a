"""Packed documents reach the model: a block-diagonal causal mask in attention and restarting
positions in RoPE (apt/model/packed_documents.py), on one process and on parallel layouts.

The oracle for the mask: each document run alone, unpacked, gives the same per-token losses
(and the packed loss the summed gradients). The oracle for positions: Hugging Face Llama,
which applies ``position_ids`` itself. RoPE scores depend only on the distance between tokens,
so with the mask in place restarting positions change nothing (a per-document shift); they
matter where documents see each other, so positions are checked on rows without a mask.
"""
import json
from pathlib import Path

import pytest
import torch

from apt.core.config import load_profile
from apt.model.architectures import APTModel
from apt.trainops.data.datasets.batches import LMBatch, require_supported
from apt.trainops.distributed.plan import make_plan
from apt.trainops.runtime.process_groups import seed_everything, setup_distributed
from tests._launch import run_distributed
from tests.workers.packed_documents_worker import (COMMON, LAYOUTS, SEQ, max_document_diff,
                                                   packed_case)

WORKER = Path(__file__).parent / "workers" / "packed_documents_worker.py"
TOLERANCE = 1e-5


def _model(*overrides):
    cfg = load_profile("tiny", COMMON + list(overrides))
    plan = make_plan(cfg, 1, device_type="cpu")
    setup_distributed(plan=plan, seed=cfg.training.seed)
    seed_everything(cfg.training.seed)
    return APTModel(cfg.model, plan=plan), cfg


@pytest.fixture(scope="module")
def reference():
    model, cfg = _model()
    return model, cfg, packed_case()


def _losses(model, batch):
    return model(batch["tokens"], batch["position_ids"], batch["attention_mask"],
                 labels=batch["labels"])


@torch.no_grad()
def test_packed_rows_equal_each_document_alone(reference):
    model, _, case = reference
    assert model.supported_batch_fields == {"position_ids", "attention_mask"}
    packed = _losses(model, case["packed"])
    worst = 0.0
    for i, (tokens, labels) in enumerate(case["docs"]):  # each document at its own length
        alone = model(tokens[None], None, None, labels=labels[None])[0]
        row, start, n = case["spans"][i]
        worst = max(worst, (packed[row, start:start + n] - alone).abs().max().item())
    print(f"\npacked vs alone, one process: max |per-token loss diff| = {worst:.2e}")
    assert worst <= TOLERANCE
    # The comparison has teeth: without the mask documents attend to each other.
    no_mask = _losses(model, dict(case["packed"], attention_mask=None))
    alone_rows = _losses(model, case["alone"])
    assert max_document_diff(case, packed, alone_rows) <= TOLERANCE
    assert max_document_diff(case, no_mask, alone_rows) > 0.1


@pytest.mark.parametrize("recompute", ["none", "selective", "full"])
def test_packed_gradients_equal_summed_document_gradients(recompute):
    model, _ = _model(f"training.distributed.recompute={recompute}")
    # Recompute runs only in training mode, with the granularity the plan asked for.
    assert model.training
    assert model.config.recompute_granularity == (None if recompute == "none" else recompute)
    case = packed_case()
    params = list(model.parameters())

    def grads(loss):  # .backward(): Megatron's checkpointing does not support autograd.grad
        model.zero_grad(set_to_none=True)
        loss.backward()
        return [p.grad.clone() for p in params]

    tokens_in_batch = case["packed"]["tokens"].numel()  # the loss is a mean over tokens
    packed = grads(_losses(model, case["packed"]).sum() / tokens_in_batch)
    summed = [torch.zeros_like(p) for p in params]
    for tokens, labels in case["docs"]:
        document = grads(model(tokens[None], None, None, labels=labels[None]).sum()
                         / tokens_in_batch)
        summed = [s + g for s, g in zip(summed, document)]
    worst = max((a - b).abs().max().item() for a, b in zip(packed, summed))
    scale = max(g.abs().max().item() for g in summed)
    print(f"\nrecompute={recompute}: max |grad diff| = {worst:.2e} (largest grad {scale:.2f})")
    assert worst <= TOLERANCE
    no_mask = grads(_losses(model, dict(case["packed"], attention_mask=None)).sum()
                    / tokens_in_batch)
    assert max((a - b).abs().max().item() for a, b in zip(no_mask, summed)) > 100 * TOLERANCE


@torch.no_grad()
def test_restarting_positions_reach_rope_like_hugging_face(reference, tmp_path):
    transformers = pytest.importorskip("transformers")
    from apt.trainops.interop import export_hf
    model, cfg, case = reference
    export_hf(model, cfg.model, tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    model.eval()
    try:
        tokens, positions = case["packed"]["tokens"], case["packed"]["position_ids"]
        ours = model(tokens, positions, None)
        theirs = hf(input_ids=tokens, position_ids=positions).logits
        ignored = model(tokens, None, None)
    finally:
        model.train()
    diff = (ours - theirs).abs().max().item()
    print(f"\nrestarting positions vs Hugging Face: max |logit diff| = {diff:.2e}; "
          f"positions ignored: {(ignored - theirs).abs().max().item():.2e}")
    assert diff <= 1e-4
    assert (ignored - theirs).abs().max().item() > 1e-2


@torch.no_grad()
def test_plain_positions_and_causal_mask_are_megatrons_own_results(reference):
    """0..s-1 positions and a plain causal mask give bit-identical results to Megatron's
    GPTModel with the same weights and layer spec (stored losses elsewhere stay valid). Logits:
    with labels both would differ only by the fused loss kernel, which the parallel matrix
    compares (kernels on and off)."""
    from megatron.core.models.gpt import GPTModel
    from apt.model.megatron_gpt import gpt_model_kwargs
    from apt.model.packed_documents import rotary_table_at
    model, _, case = reference
    arch = model.arch
    stock = GPTModel(**gpt_model_kwargs(
        model.config, vocab_size=arch.vocab_size, max_sequence_length=arch.max_seq_len,
        tie_embeddings=arch.tie_embeddings, rotary_base=arch.rope_base, kernels=model.kernels))
    stock.load_state_dict(model.state_dict())
    tokens = case["alone"]["tokens"]
    b, s = tokens.shape
    arange = torch.arange(s).expand(b, s)
    causal = torch.ones(s, s, dtype=torch.bool).triu(1).expand(b, 1, s, s)
    expected = stock(tokens, arange, None)
    assert torch.equal(model(tokens, arange, None), expected)
    assert torch.equal(model(tokens, None, None), expected)
    assert torch.equal(model(tokens, arange, causal), expected)
    # A mask that forgot causality still hides the future (a given mask replaces the causal one).
    nothing_masked = torch.zeros(b, 1, s, s, dtype=torch.bool)
    assert torch.equal(model(tokens, arange, nothing_masked), expected)
    # The per-row table for 0..s-1 is Megatron's table, broadcast over the rows.
    table = rotary_table_at(model.rotary_pos_emb, arange)
    assert torch.equal(table, model.rotary_pos_emb(s).expand(s, b, 1, -1))


@torch.no_grad()
def test_a_model_that_cannot_honour_the_mask_refuses_it(reference):
    model, cfg, case = reference
    batch = LMBatch(tokens=case["packed"]["tokens"], labels=case["packed"]["labels"],
                    loss_mask=torch.ones(case["packed"]["tokens"].shape),
                    position_ids=case["packed"]["position_ids"],
                    attention_mask=case["packed"]["attention_mask"])
    require_supported(batch, model.supported_batch_fields, "APTModel")  # honoured: no error
    with pytest.raises(ValueError, match=r"attention_mask must be bool \[b, 1, s, s\]"):
        model(batch.tokens, batch.position_ids, batch.attention_mask.float())
    # The fused causal softmax kernel ignores a given mask: such a model refuses one (the
    # Transformer Engine spec does the same, for the same reason; no TE on this machine).
    seed_everything(cfg.training.seed)
    fused = APTModel(cfg.model)
    fused.config.masked_softmax_fusion = True
    fused._refusals = fused._why_unsupported()
    assert fused.supported_batch_fields == {"position_ids"}
    with pytest.raises(ValueError, match="cannot honour the batch's attention_mask: the fused"):
        fused(batch.tokens, batch.position_ids, batch.attention_mask)
    with pytest.raises(ValueError, match="cannot honour the batch's attention_mask"):
        require_supported(batch, fused.supported_batch_fields, "APTModel")
    fused(batch.tokens, batch.position_ids, None)  # positions alone are still honoured


def test_parallel_layouts_honour_mask_and_positions(reference, tmp_path):
    """TP2, TP2+SP (+selective recompute), PP2, PP2+VP2, PP2+full recompute in one 2-process
    launch, through Megatron's forward-only schedule, from the reference's weights."""
    from apt.trainops.checkpoints import save_model_weights
    model, _, case = reference
    save_model_weights([model], tmp_path / "weights")
    with torch.no_grad():
        expected = {"packed": _losses(model, case["packed"]),
                    "no_mask": _losses(model, dict(case["packed"], attention_mask=None))}
    out = tmp_path / "layouts.json"
    run_distributed(WORKER, 2, ["--layouts", ",".join(LAYOUTS), "--weights",
                                str(tmp_path / "weights"), "--out", str(out)], timeout=400)
    results = json.loads(out.read_text())
    assert set(results) == set(LAYOUTS)
    assert results["pp2_vp2"]["schedule"] == "forward_backward_pipelining_with_interleaving"
    assert results["pp2_vp2"]["layout"]["vp"] == 2 and results["tp2_sp"]["layout"]["sp"]
    versus_one_process = {}
    for name, r in results.items():
        assert r["ranks_with_losses"] == (2 if r["layout"]["tp"] == 2 else 1), name
        assert r["max_diff"] <= TOLERANCE, (name, r["max_diff"])    # mask: packed == alone
        assert r["no_mask_diff"] > 0.1, name
        for key in ("packed", "no_mask"):  # same numbers as one process, positions included
            got = torch.tensor(r[key])
            assert got.shape == (len(case["packed"]["tokens"]), SEQ)
            diff = (got - expected[key]).abs().max().item()
            assert diff <= TOLERANCE, (name, key, diff)
            versus_one_process[name] = max(diff, versus_one_process.get(name, 0.0))
    print("\n" + "\n".join(f"{n}: packed vs alone {r['max_diff']:.2e}, without mask "
                           f"{r['no_mask_diff']:.2f}; vs one process {versus_one_process[n]:.2e}"
                           for n, r in results.items()))
