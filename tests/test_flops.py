"""The FLOPs-per-token formula and MFU, checked by hand on the tiny profile's model."""
import pytest

from apt.core.config import load_profile
from apt.core.config.sizing import matmul_parameters
from apt.trainops.eval.flops import (device_peak_flops, mfu, table_peak_flops,
                                     training_flops_per_token)


def test_mfu_formula_by_hand_on_the_tiny_model():
    m = load_profile("tiny").model   # h=128, L=4, 4 heads / 2 kv groups, ffn 352, V=384, s=128
    # Per layer: q 128x128 + k,v 2 x 128x64 (2 groups x head dim 32) + out 128x128 = 49,152;
    # SwiGLU gate+up+down 3 x 128x352 = 135,168. Four layers: 4 x 184,320 = 737,280.
    # Output projection 384 x 128 = 49,152. Input embedding and norms are not matmuls.
    assert matmul_parameters(m) == 737_280 + 49_152 == 786_432
    # 6 x 786,432 = 4,718,592 (forward 2N + backward 4N) plus causal attention
    # 6 x L x s x h = 6 x 4 x 128 x 128 = 393,216.
    assert training_flops_per_token(m, 128) == 4_718_592 + 393_216 == 5_111_808
    # 10,000 tokens/s on one device with a 1 TFLOP/s peak: 5.111808e10 / 1e12.
    assert mfu(10_000, 5_111_808, 1e12, 1) == pytest.approx(0.05111808, rel=1e-12)
    # Four devices share the tokens: a quarter of the utilisation.
    assert mfu(10_000, 5_111_808, 1e12, 4) == pytest.approx(0.01277952, rel=1e-12)


def test_moe_counts_only_the_routed_experts():
    dense = load_profile("tiny").model
    moe = load_profile("tiny", ["model.num_experts=8", "model.moe_top_k=2"]).model
    # Two of eight experts per token, plus the 128 x 8 router, in each of 4 layers.
    assert matmul_parameters(moe) - matmul_parameters(dense) == 4 * (135_168 + 128 * 8)


def test_peak_flops_table_and_configuration():
    assert table_peak_flops("NVIDIA H100 80GB HBM3", "bf16") == pytest.approx(989.4e12)
    assert table_peak_flops("NVIDIA H100 PCIe", "bf16") == pytest.approx(756e12)
    assert table_peak_flops("NVIDIA H200", "bf16") == pytest.approx(989.4e12)
    assert table_peak_flops("NVIDIA A100-SXM4-80GB", "fp32") == pytest.approx(156e12)
    assert table_peak_flops("Some Future GPU", "bf16") is None
    assert device_peak_flops("bf16", configured_tflops=400.0) == (400e12, "configured")
    measured, source = device_peak_flops("fp32")   # CPU here: a timed matmul
    assert measured > 1e8 and "measured" in source
