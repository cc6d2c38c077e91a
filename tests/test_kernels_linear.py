"""The linear layers' GEMMs through oneDNN (``model.kernels: linear``, apt/kernels/linear.py):
against an fp64 reference (forward, input, weight and bias gradients), taken by every linear
layer of a real model built from a profile, and left to Megatron's own implementation where
it does not apply. Tensor parallelism (the input gradient's all-reduce) is covered by the
parallel matrix, whose layouts run with every kernel on."""
from __future__ import annotations

import os

import pytest
import torch

import apt.kernels.linear as linear_mod
from apt.core.config import load_profile
from apt.kernels.linear import OneDNNColumnParallelLinear, OneDNNRowParallelLinear, linear

pytestmark = pytest.mark.skipif(not linear_mod.available("cpu") or
                                os.environ.get("APT_KERNELS") == "none",
                                reason="this torch has no oneDNN linear op")


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", [(7, 3, 33, 65), (128, 64, 352)])
def test_linear_matches_fp64(shape, bias):
    torch.manual_seed(0)
    *lead, n_in, n_out = shape
    x = torch.randn(*lead, n_in, requires_grad=True)
    w = (torch.randn(n_out, n_in) / n_in ** 0.5).requires_grad_()
    b = torch.randn(n_out, requires_grad=True) if bias else None
    y = linear(x, w, b)
    grad = torch.randn_like(y)
    y.backward(grad)
    leaves = [t.detach().double().requires_grad_() for t in (x, w) + ((b,) if bias else ())]
    ref = torch.nn.functional.linear(*leaves)
    ref.backward(grad.double())
    tol = dict(rtol=1e-5, atol=1e-5)
    assert y.shape == (*lead, n_out) and y.dtype == torch.float32
    torch.testing.assert_close(y.double(), ref, **tol)
    for got, want in zip((x, w) + ((b,) if bias else ()), leaves):
        torch.testing.assert_close(got.grad.double(), want.grad, **tol)


def test_frozen_weight_gets_no_gradient_and_input_one_does():
    torch.manual_seed(1)
    x = torch.randn(4, 2, 16, requires_grad=True)
    w = torch.randn(8, 16)   # frozen, as LoRA's base weights or a preference reference
    linear(x, w).sum().backward()
    assert w.grad is None
    torch.testing.assert_close(x.grad, torch.ones(4, 2, 8) @ w)


def test_megatron_keeps_what_onednn_does_not_cover():
    x, w = torch.randn(4, 8), torch.randn(3, 8)
    assert linear_mod._plain_case(x, w, {"allreduce_dgrad": True})
    assert not linear_mod._plain_case(x, w, {"sequence_parallel": True})
    assert not linear_mod._plain_case(x, w, {"gradient_accumulation_fusion": True})
    assert not linear_mod._plain_case(x, w, {"grad_output_buffer": []})
    assert not linear_mod._plain_case(x.bfloat16(), w.bfloat16(), {})   # ATen's mm: oneDNN


def _tiny_model(tmp_path, kernels: str):
    from apt.model.architectures import APTModel
    from apt.trainops.runtime.process_groups import seed_everything, setup_distributed
    cfg = load_profile("tiny", [f"model.kernels={kernels}", "model.num_layers=2",
                                f"output.dir={tmp_path}"])
    setup_distributed(plan=None)
    seed_everything(cfg.training.seed)
    return APTModel(cfg.model)


def test_every_linear_layer_of_a_model_takes_the_onednn_path(tmp_path, monkeypatch):
    calls = []
    real = linear_mod.onednn_linear
    monkeypatch.setattr(linear_mod, "onednn_linear",
                        lambda *args: calls.append(args[0].shape) or real(*args))
    outputs = {}
    # linear alone: with the fused loss on too, its block products would also count (it calls
    # the same function, apt/kernels/linear_cross_entropy.py)
    for kernels in ("[linear]", "none"):
        model = _tiny_model(tmp_path, kernels)
        layers = [m for m in model.modules()
                  if isinstance(m, (OneDNNColumnParallelLinear, OneDNNRowParallelLinear))]
        calls.clear()
        tokens = torch.randint(0, model.arch.vocab_size, (2, 16))
        positions = torch.arange(16).expand(2, 16)
        loss = model(tokens, positions, None, labels=tokens).sum()
        loss.backward()
        outputs[kernels] = (loss.item(), len(layers), len(calls))
    loss_on, layers_on, calls_on = outputs["[linear]"]
    # 2 layers x (qkv, proj, fc1, fc2); each one oneDNN call forward, one for dX backward
    assert layers_on == 8 and calls_on == 2 * layers_on, outputs
    assert outputs["none"][1:] == (0, 0), outputs
    assert abs(loss_on - outputs["none"][0]) <= 1e-5 * abs(loss_on), outputs


def test_fused_cross_entropy_blocks_use_onednn_and_match_mm(monkeypatch):
    """The fused loss's logits and dh products (apt/kernels/linear_cross_entropy.py) go
    through oneDNN too, with the same results as its mm path."""
    import apt.kernels.linear_cross_entropy as lce
    torch.manual_seed(2)
    h, w = torch.randn(300, 64), torch.randn(1000, 64) * 0.1
    labels, mask = torch.randint(0, 1000, (300,)), (torch.rand(300) > 0.2).float()

    def run():
        hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
        for weights in (mask, None):   # the one-pass walk, then the recomputing one
            (lce.linear_cross_entropy(hh, ww, labels, weights=weights) * mask).sum().backward()
        return hh.grad, ww.grad

    calls = []
    real = lce.onednn_linear
    monkeypatch.setattr(lce, "onednn_linear", lambda *a: calls.append(1) or real(*a))
    with_onednn = run()
    assert len(calls) >= 4, calls
    monkeypatch.setattr(lce, "onednn_supported", lambda *a: False)
    for got, want in zip(with_onednn, run()):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
