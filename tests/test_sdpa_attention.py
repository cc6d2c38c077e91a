"""The local spec's SDPA core attention (apt/model/sdpa_attention.py) against Megatron's own
DotProductAttention, which it replaces for speed: the same outputs and gradients for q, k, v,
causal and with a block-diagonal document mask, with grouped-query attention, in fp32."""
import pytest
import torch
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType

from apt.model.megatron_gpt import layer_spec, make_transformer_config
from apt.model.sdpa_attention import SDPAttention
from apt.trainops.data.datasets.tokens import block_causal_mask
from apt.trainops.runtime.process_groups import ensure_runtime

SEQ, BATCH, HEAD_DIM = 24, 3, 8


def _pair(heads: int, groups: int):
    ensure_runtime()   # Megatron's one-process groups (TP 1)
    config = make_transformer_config(num_layers=1, hidden_size=heads * HEAD_DIM,
                                     num_attention_heads=heads, num_query_groups=groups,
                                     ffn_hidden_size=32)
    kwargs = dict(layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self")
    return DotProductAttention(config, **kwargs), SDPAttention(config, **kwargs)


def _run(module, q, k, v, mask):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = module(q, k, v, mask)
    out.backward(torch.cos(torch.arange(out.numel(), dtype=out.dtype)).view_as(out))
    return out.detach(), q.grad, k.grad, v.grad


def _document_mask():
    # rows of 2-4 documents: [b, 1, s, s], True = masked, as the data pipeline builds them
    ids = torch.stack([torch.arange(SEQ) // span for span in (5, 9, SEQ // 2)])
    return block_causal_mask(ids)


@pytest.mark.parametrize("heads,groups", [(4, 4), (4, 2)], ids=["mha", "gqa"])
@pytest.mark.parametrize("masked", [False, True], ids=["causal", "documents"])
def test_sdpa_matches_dot_product_attention(heads, groups, masked):
    torch.manual_seed(0)
    reference, sdpa = _pair(heads, groups)
    q = torch.randn(SEQ, BATCH, heads, HEAD_DIM)
    k, v = (torch.randn(SEQ, BATCH, groups, HEAD_DIM) for _ in range(2))
    mask = _document_mask() if masked else None
    want, got = _run(reference, q, k, v, mask), _run(sdpa, q, k, v, mask)
    assert got[0].shape == (SEQ, BATCH, heads * HEAD_DIM)
    for name, a, b in zip(("output", "dq", "dk", "dv"), want, got):
        diff = (a - b).abs().max().item()
        assert diff <= 1e-5, f"{name}: max |SDPA - DotProductAttention| = {diff:.2e}"


def test_local_spec_uses_sdpa():
    ensure_runtime()
    config = make_transformer_config(num_layers=1, hidden_size=32, num_attention_heads=4,
                                     num_query_groups=2, ffn_hidden_size=32)
    spec = layer_spec(config, use_transformer_engine=False)
    assert spec.submodules.self_attention.submodules.core_attention is SDPAttention


@pytest.mark.parametrize("masked", [False, True], ids=["causal", "documents"])
def test_sliding_window_is_a_banded_causal_mask(masked):
    """Megatron's window_size (W - 1, 0) on SDPA: the same as Megatron's own attention given
    the banded causal mask (key j visible to query i when i - W < j <= i), combined with a
    document mask when the batch has one."""
    torch.manual_seed(1)
    window, heads, groups = 5, 4, 2
    ensure_runtime()
    config = make_transformer_config(num_layers=1, hidden_size=heads * HEAD_DIM,
                                     num_attention_heads=heads, num_query_groups=groups,
                                     ffn_hidden_size=32, sliding_window=window)
    kwargs = dict(layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self")
    sdpa = SDPAttention(config, **kwargs)
    plain, _ = _pair(heads, groups)
    i, j = torch.arange(SEQ)[:, None], torch.arange(SEQ)[None, :]
    band = (j > i) | (j <= i - window)
    doc = _document_mask() if masked else torch.zeros(BATCH, 1, SEQ, SEQ, dtype=torch.bool)
    q = torch.randn(SEQ, BATCH, heads, HEAD_DIM)
    k, v = (torch.randn(SEQ, BATCH, groups, HEAD_DIM) for _ in range(2))
    want = _run(plain, q, k, v, doc | band)
    got = _run(sdpa, q, k, v, doc if masked else None)
    for name, a, b in zip(("output", "dq", "dk", "dv"), want, got):
        diff = (a - b).abs().max().item()
        assert diff <= 1e-5, f"{name}: max |SDPA window - DotProductAttention band| = {diff:.2e}"
    # The window matters at this length: without it the output differs.
    assert (_run(plain, q, k, v, doc)[0] - got[0]).abs().max() > 1e-3
