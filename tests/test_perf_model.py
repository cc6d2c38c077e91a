"""The performance model (apt/trainops/perf): arithmetic checks by hand, the published-runs
table's integrity, the CLI (`trainops plan --gpu`, `--search`, goodput), and calibration from a
gpu_check-shaped report. All in-process and analytic: no training runs here."""
from __future__ import annotations

import copy
import json
import math
from dataclasses import replace
from pathlib import Path

import pytest

from apt.cli import main
from apt.core.config import ConfigError
from apt.trainops.perf import comms
from apt.trainops.perf.calibration import calibrate
from apt.trainops.perf.compute import gemm_shape_efficiency, gemm_time
from apt.trainops.perf.goodput import daly_interval, default_rate_per_gpu_day, goodput
from apt.trainops.perf.hardware import load_hardware
from apt.trainops.perf.predict import predict
from apt.trainops.perf.published import compare, load_runs, row_hash, verify_hashes
from apt.trainops.perf.shape import Layout, ModelShape

DATA = Path(__file__).parent / "data"
H100 = load_hardware("h100-sxm")
SHAPE = ModelShape(hidden=8192, layers=80, heads=64, kv_heads=8, head_dim=128, ffn=28672,
                   vocab=128256, seq=8192)


def test_gemm_rate_is_the_measured_fraction_for_aligned_shapes_and_drops_with_waves():
    # 132 SMs x (128 x 256) tiles exactly: one full wave, no padding -> MAMF's fraction
    t = gemm_time(128 * 12, 256 * 11, 8192, H100, "bf16")
    assert 2 * 128 * 12 * 256 * 11 * 8192 / t == pytest.approx(989.4e12 * 0.801)
    # one tile more than a wave: two waves, the second almost empty -> about half the rate
    assert gemm_shape_efficiency(128 * 133, 256, H100) == pytest.approx(133 / 264)
    # a wide GEMM with k = 8: bound by HBM traffic (roofline), not by the peak
    thin = gemm_time(8192, 8192, 8, H100, "bf16")
    assert thin == pytest.approx(2 * (8192 * 8 + 8 * 8192 + 8192 * 8192) / (3.35e12 * 0.9))


def test_ring_collectives_use_nvlink_inside_a_node_and_the_nic_across():
    inside = comms.all_reduce(1e9, 8, 1, H100, 8)
    across = comms.all_reduce(1e9, 8, 8, H100, 8)     # stride 8: one rank per node
    assert inside == pytest.approx(2 * 7 / 8 * 1e9 / (450e9 * 0.8) + 14 * 1e-5)
    assert across == pytest.approx(2 * 7 / 8 * 1e9 / (50e9 * 0.8) + 14 * 3e-5)


def test_schedule_terms_answer_to_the_layout():
    lay = Layout(tp=8, pp=8, dp=1, micro_batch=1, grad_accum=8, sp=True, gpus_per_node=8)
    p1 = predict(SHAPE, lay, H100)
    p4 = predict(SHAPE, replace(lay, vp=5), H100)
    mb = (p1.step_s - sum(v for k, v in p1.breakdown.items()
                          if k in ("pp bubble", "pp p2p", "dp/zero comm exposed",
                                   "optimizer step"))) / 8
    assert p1.breakdown["pp bubble"] == pytest.approx(7 * mb)        # (PP-1) micro-batches
    assert p4.breakdown["pp bubble"] == pytest.approx(7 / 5 * mb)    # / VP
    assert p4.bubble_without_vp_s == pytest.approx(p1.breakdown["pp bubble"])
    full = predict(SHAPE, replace(lay, recompute="full"), H100)
    assert full.breakdown["recompute"] > 0.2 * full.breakdown["gemm"]
    overlap = predict(SHAPE, replace(lay, tp_overlap=True), H100)
    assert overlap.breakdown["tp comm exposed"] < p1.breakdown["tp comm exposed"]
    moe = replace(SHAPE, experts=8, top_k=2)
    assert predict(moe, replace(lay, ep=1), H100).breakdown["ep all-to-all"] == 0
    ep = Layout(tp=1, pp=1, dp=8, ep=8, micro_batch=1, grad_accum=1, gpus_per_node=8)
    assert predict(moe, ep, H100).breakdown["ep all-to-all"] > 0
    tokens = lay.global_batch * SHAPE.seq
    assert p1.tokens_per_s_per_gpu == pytest.approx(tokens / p1.step_s / 64)


def test_goodput_young_daly_and_llama3_default():
    assert default_rate_per_gpu_day() == pytest.approx(419 / (54 * 16384))
    assert daly_interval(60, 36000) == pytest.approx(
        math.sqrt(2 * 60 * 36000) * (1 + math.sqrt(60 / 72000) / 3 + 60 / (18 * 36000)) - 60)
    g = goodput(gpus=16384, checkpoint_bytes=405e9 * 16, train_s=86400 * 50)
    assert 0.5 < g.useful_fraction < 1 and g.wall_s == pytest.approx(g.train_s / g.useful_fraction)
    slower = goodput(gpus=16384, checkpoint_bytes=405e9 * 16, train_s=86400 * 50,
                     storage_bytes_s=2e10)
    assert slower.useful_fraction < g.useful_fraction and slower.interval_s > g.interval_s


def test_published_runs_are_hashed_and_compared(tmp_path):
    rows = load_runs()
    assert len(rows) >= 10 and not verify_hashes(rows)
    assert len({r["source"].split(",")[0] for r in rows}) >= 4
    edited = copy.deepcopy(rows[0])
    edited["published"] = {k: v * 1.1 for k, v in edited["published"].items()}
    assert row_hash(edited) != edited["hash"] and verify_hashes([edited]) == [edited["id"]]
    c = compare(rows[0])
    assert c.predicted > 0 and c.error == pytest.approx(c.predicted / c.published - 1)


def test_plan_gpu_prints_breakdown_goodput_and_search(capsys):
    assert main(["plan", "--profile", "70b", "--gpu", "h100-sxm", "--nodes", "8",
                 "--gpus-per-node", "8", "--search", "--tokens", "1e12"]) == 0
    out = capsys.readouterr().out
    for needle in ("tokens/s per GPU, MFU", "tp comm exposed", "pp bubble", "dp/zero comm",
                   "optimizer step", "recompute", "checkpoint   every", "goodput", "top 5:"):
        assert needle in out
    ranked = [float(line.split("tok/s/GPU")[0].split()[-1].replace(",", ""))
              for line in out.splitlines() if line.startswith(("  1.", "  2.", "  5."))]
    assert len(ranked) == 3 and ranked == sorted(ranked, reverse=True)


def test_bad_input_is_one_line_exit_2(tmp_path, capsys):
    assert main(["plan", "--profile", "70b", "--nodes", "8", "--gpus-per-node", "8",
                 "--search"]) == 2
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"sections": {"environment": {"gpu": "NVIDIA H100"}}}))
    assert main(["plan", "--profile", "70b", "--nodes", "8", "--gpus-per-node", "8", "--gpu",
                 "h100-sxm", "--calibration", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "--gpu" in err[0] and "matmul" in err[1]


def test_calibration_uses_the_measured_gemm_and_reports_the_step_error(capsys):
    cal = calibrate(DATA / "gpu_check_calibration.json")
    assert cal.hardware.name == "h100-sxm"
    # 640 TFLOP/s measured at 8192^3 (its own quantization divided out) replaces MAMF's 0.801
    assert cal.hardware.gemm_fraction == pytest.approx(
        640e12 / (989.4e12 * gemm_shape_efficiency(8192, 8192, H100)))
    assert cal.prediction.step_s != cal.uncalibrated_step_s
    assert cal.error == pytest.approx(cal.prediction.step_s / 0.5 - 1)
    assert main(["plan", "--profile", "125m", "--gpu", "h100-sxm", "--calibration",
                 str(DATA / "gpu_check_calibration.json")]) == 0
    assert "step measured 500.0 ms, predicted" in capsys.readouterr().out


def test_physical_mechanisms_unfused_attention_overlap_contention_and_exposed_edges():
    from apt.trainops.perf.compute import layer_compute, unfused_attention_times
    a100 = load_hardware("a100-80g")
    gpt = ModelShape(hidden=6144, layers=48, heads=64, kv_heads=64, head_dim=96, ffn=24576,
                     vocab=51200, seq=2048, gated=False, dropout=True)
    lay = Layout(tp=8, micro_batch=4, sp=True, attention="unfused", gpus_per_node=8)
    fwd, bwd = unfused_attention_times(gpt, lay, a100)
    # head_dim 96 < the A100's FLOP/byte: QK^T and AV stream their (queries x seq) scores
    # (the full square: the causal mask does not skip work), plus softmax and dropout passes
    batch, s, hd, stream = 4 * 8, 2048, 96, 2039e9 * 0.9
    gemms = 2 * 2 * batch * (s * s + 2 * s * hd)          # QK^T and AV operands, bf16
    assert fwd == pytest.approx((gemms + batch * s * s * (4 * 2 + 1)) / stream, rel=0.01)
    assert 1.3 * fwd < bwd < 2.5 * fwd          # four GEMMs (two forward), five passes
    flash = layer_compute(gpt, replace(lay, attention="flash"), a100)
    assert layer_compute(gpt, lay, a100).attention_fwd > 3 * flash.attention_fwd

    # hidden communication costs comm_sms / sms of compute; none on a machine without SMs
    fsdp = Layout(dp=64, zero=3, micro_batch=8, grad_accum=4, recompute="full", gpus_per_node=8)
    p = predict(SHAPE, fsdp, H100)
    hidden = sum(p.overlapped.values())
    assert p.breakdown["overlap contention"] == pytest.approx(hidden * 20 / 132)
    # FSDP: the first layer's gathers and the last reduce-scatter of each micro-batch stay
    # exposed even when compute is longer than the collectives
    slow_net = replace(H100, network_bytes_s=H100.network_bytes_s / 1000)
    fast_net = replace(H100, network_bytes_s=H100.network_bytes_s * 1000)
    assert predict(SHAPE, fsdp, fast_net).breakdown["dp/zero comm exposed"] > 0
    assert predict(SHAPE, fsdp, slow_net).breakdown["dp/zero comm exposed"] > 10 * p.step_s

    # expert-data-parallel ranks are EP apart: with EP = 8 GPUs per node, expert gradients
    # cross nodes (NIC speed) although the dense DP group's neighbours share a node
    moe = replace(SHAPE, layers=8, experts=64, top_k=2, expert_ffn=2048)
    ep = Layout(ep=8, dp=16, micro_batch=1, grad_accum=2, gpus_per_node=8)
    q = predict(moe, ep, H100)
    dp_total = q.breakdown["dp/zero comm exposed"] + q.overlapped.get("dp/zero comm exposed", 0)
    from apt.trainops.perf.predict import _dp_params
    dense, expert = _dp_params(moe, ep)
    expected = sum(2 * comms.reduce_scatter(2 * n, g, st, H100, 8)
                   for n, g, st in ((dense, 16, 1), (expert, 2, 8)))
    assert dp_total == pytest.approx(expected)
    assert comms.link(H100, 2, 8, 8)[0] == H100.network_bytes_s * 0.8

    # pipeline p2p is exposed (no overlap_p2p_comm) for every micro-batch and model chunk
    pipe = Layout(tp=8, pp=8, dp=1, micro_batch=1, grad_accum=8, sp=True, gpus_per_node=8)
    one = predict(SHAPE, pipe, H100).breakdown["pp p2p"]
    assert predict(SHAPE, replace(pipe, vp=5), H100).breakdown["pp p2p"] == pytest.approx(5 * one)


def test_plan_search_imports_neither_torch_nor_megatron():
    # `trainops plan --search` is arithmetic: importing torch and Megatron-core for it cost
    # about 6 s of CPU (of the 10 s budget) before the lazy package exports
    import subprocess
    import sys
    code = ("import sys; from apt.cli import main; "
            "rc = main(['plan', '--profile', '70b', '--gpu', 'h100-sxm', '--nodes', '8', "
            "'--gpus-per-node', '8', '--search']); "
            "heavy = sorted(m for m in ('torch', 'megatron') if m in sys.modules); "
            "print('HEAVY', heavy); sys.exit(rc)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "top 5:" in out.stdout and "HEAVY []" in out.stdout


def test_loss_passes_and_moe_sort_follow_megatron_cores_code():
    from apt.trainops.perf.compute import layer_compute, linear_times, logits_time
    stream = H100.hbm_bytes_s * H100.hbm_fraction
    # Megatron-core's unfused vocab-parallel cross-entropy (its default) moves 52 bytes per
    # logit: .float(), max, -max, exp, sum, /sum forward; scale and the cast back, backward
    lay = Layout(tp=8, micro_batch=2, gpus_per_node=8)
    f, b = linear_times(2 * 8192, 8192, 128256 / 8, H100, "bf16")
    assert logits_time(SHAPE, lay, H100) - f - b == pytest.approx(
        2 * 8192 * 128256 / 8 * 52 / stream)
    # the all-to-all dispatcher sorts received tokens by local expert and back (one read and
    # one write each, per routed copy x hidden, 2 bytes) when a rank holds several experts;
    # the elementwise backward is twice the forward
    moe = replace(SHAPE, experts=64, top_k=2, expert_ffn=2048)
    one = layer_compute(moe, Layout(ep=1, micro_batch=1, gpus_per_node=8), H100)
    ep8 = layer_compute(moe, Layout(ep=8, micro_batch=1, gpus_per_node=8), H100)
    sort = 4 * 8192 * 2 * 8192 * 2 / stream
    assert ep8.elementwise_fwd - one.elementwise_fwd == pytest.approx(sort)
    assert ep8.elementwise_bwd - one.elementwise_bwd == pytest.approx(2 * sort)
    single = replace(moe, experts=8)           # EP 8 over 8 experts: one per rank, no sort
    assert layer_compute(single, Layout(ep=8, micro_batch=1, gpus_per_node=8),
                         H100).elementwise_fwd == pytest.approx(
        layer_compute(single, Layout(ep=1, micro_batch=1, gpus_per_node=8),
                      H100).elementwise_fwd)


def test_attention_kernel_generation_and_fsdp_reduce_dtype():
    from apt.core.config import ConfigError
    from apt.trainops.perf.compute import layer_compute
    # FlashAttention-1-era kernels (llm-foundry's attn_impl: triton of 2023) run at the
    # FlashAttention-2 figure's FlashAttention (v1) bar for the row's own setting (causal, head
    # dim 128, 2k tokens: 108 TFLOP/s on H100, 69 on A100): the causal half of
    # 4 x tokens x keys x q_dim, backward 2.5x forward
    mpt = ModelShape(hidden=4096, layers=32, heads=32, kv_heads=32, head_dim=128, ffn=16384,
                     vocab=50368, seq=2048, gated=False)
    lay = Layout(dp=8, zero=3, micro_batch=6, attention="flash1", gpus_per_node=8)
    flops = 4.0 * 6 * 2048 * 1024 * 4096
    for gpu, tflops in (("h100-sxm", 108), ("a100-80g", 69)):
        hw = load_hardware(gpu)
        c = layer_compute(mpt, lay, hw)
        assert c.attention_fwd == pytest.approx(flops / (tflops * 1e12))
        assert c.attention_bwd == pytest.approx(2.5 * c.attention_fwd)
        flash = layer_compute(mpt, replace(lay, attention="flash"), hw)
        assert c.attention_fwd == pytest.approx(
            flash.attention_fwd * 0.58 * hw.peak("bf16") / (tflops * 1e12))
    # other settings: 4k tokens is its own bar, 3k between 2k and 4k in log2(seq), head dim
    # 112 runs the 128 kernel (the block pads the head) and keeps 112/128 of its FLOP/s, head
    # dim 64 its own panel; lengths past the figure hold its last bar
    a100 = load_hardware("a100-80g")
    assert a100.flash1_causal_tflops_at(128, 4096) == 76
    assert a100.flash1_causal_tflops_at(128, 3072) == pytest.approx(
        69 + 7 * (math.log2(3072) - 11))
    assert a100.flash1_causal_tflops_at(112, 2048) == pytest.approx(69 * 112 / 128)
    assert a100.flash1_causal_tflops_at(64, 2048) == 77
    assert a100.flash1_causal_tflops_at(128, 65536) == 83
    with pytest.raises(ConfigError, match="head_dim 256"):
        a100.flash1_causal_tflops_at(256, 2048)
    # no published FlashAttention-1 figure for B200, and an unknown kernel name: one clear error
    with pytest.raises(ConfigError, match="flash1_causal_tflops"):
        layer_compute(mpt, lay, load_hardware("b200"))
    with pytest.raises(ConfigError, match="not one of"):
        layer_compute(mpt, replace(lay, attention="flash-1"), H100)
    # Composer's FSDP DEFAULT mixed precision reduce-scatters fp32 gradients: with grad_bytes 4
    # the per-micro-batch FSDP traffic is 2 + 2 + 4 bytes per parameter instead of 2 + 2 + 2
    bf16 = predict(mpt, lay, H100)
    fp32 = predict(mpt, replace(lay, grad_bytes=4), H100)
    total = lambda p: (p.breakdown["dp/zero comm exposed"]          # noqa: E731
                       + p.overlapped.get("dp/zero comm exposed", 0.0))
    assert total(fp32) / total(bf16) == pytest.approx(8 / 6, rel=0.02)
    # the published MPT rows name the kernel (all) and the reduce dtype (DEFAULT rows)
    rows = {r["id"]: r for r in load_runs()}
    assert all(r["layout"]["attention"] == "flash1" for k, r in rows.items() if "mpt" in k)
    assert rows["mpt-7b-h100-8"]["layout"]["grad_bytes"] == 4


def test_host_framework_time_adds_on_a_cpu_and_hides_behind_a_gpus_queue():
    lay = Layout(tp=8, pp=2, dp=4, sp=True, grad_accum=4)
    base = predict(SHAPE, lay, H100)
    per_mb = sum(v for k, v in base.breakdown.items() if k not in (
        "pp bubble", "pp p2p", "dp/zero comm exposed", "optimizer step", "overlap contention",
        "host step overhead")) / lay.grad_accum
    # a GPU: host time under the device's own time per micro-batch changes nothing ...
    hidden = replace(H100, host_layer_s=0.5 * per_mb / 40)
    assert predict(SHAPE, lay, hidden).step_s == pytest.approx(base.step_s)
    # ... and shows only by what exceeds it; a CPU (host_serial) pays all of it
    over = replace(H100, host_layer_s=2 * per_mb / 40, host_step_s=0.25)
    slow = predict(SHAPE, lay, over)
    assert slow.breakdown["host framework"] == pytest.approx(per_mb * lay.grad_accum)
    serial = predict(SHAPE, lay, replace(over, host_serial=True))
    assert serial.breakdown["host framework"] == pytest.approx(2 * per_mb * lay.grad_accum)
    assert serial.breakdown["host step overhead"] == 0.25
    assert serial.step_s > slow.step_s > base.step_s


def test_fused_loss_clamped_glu_expert_bias_and_recompute_modules_follow_the_code():
    from apt.trainops.perf.compute import layer_compute, linear_times, logits_time
    from apt.trainops.perf.published import ConfigError
    stream = H100.hbm_bytes_s * H100.hbm_fraction
    # TE's fused cross-entropy: 5 passes over the bf16 logits (2 bytes), not 52 bytes
    lay = Layout(tp=8, micro_batch=2, gpus_per_node=8, loss="te")
    f, b = linear_times(2 * 8192, 8192, 128256 / 8, H100, "bf16")
    assert logits_time(SHAPE, lay, H100) - f - b == pytest.approx(
        2 * 8192 * 128256 / 8 * 10 / stream)
    # GPT-OSS's clamp before the fused GLU (8 x width forward, 10 backward per routed token)
    # and the experts' eager output bias (6 x hidden forward, 8 backward), bf16
    oss = ModelShape(hidden=2880, layers=36, heads=64, kv_heads=8, head_dim=64, ffn=2880,
                     vocab=201088, seq=4096, experts=128, top_k=4)
    ep8 = Layout(ep=8, dp=8, micro_batch=1, gpus_per_node=8)
    base = layer_compute(oss, ep8, H100)
    clamp = layer_compute(replace(oss, glu_clamp=True), ep8, H100)
    bias = layer_compute(replace(oss, linear_bias=True), ep8, H100)
    routed = 4096 * 4 * 2 / stream                       # routed tokens x bf16 bytes / HBM
    assert clamp.elementwise_fwd - base.elementwise_fwd == pytest.approx(8 * 2880 * routed)
    assert clamp.elementwise_bwd - base.elementwise_bwd == pytest.approx(10 * 2880 * routed)
    assert bias.elementwise_fwd - base.elementwise_fwd == pytest.approx(6 * 2880 * routed)
    assert bias.elementwise_bwd - base.elementwise_bwd == pytest.approx(8 * 2880 * routed)
    # recompute modules: layernorm redoes the MoE layer's pre-MLP norm (read + write), moe_act
    # the activation (read 2 x width, write width) with the clamp; selective is core_attn
    run = lambda rc: predict(replace(oss, glu_clamp=True),  # noqa: E731
                             replace(ep8, recompute=rc), H100).breakdown["recompute"]
    per = 36 * 4096 * 2 / stream                          # layers x tokens x bf16 / HBM
    assert run("layernorm") == pytest.approx(2 * 2880 * per)
    assert run("moe_act") == pytest.approx(4 * (3 + 8) * 2880 * per)
    assert run("layernorm+moe_act") == pytest.approx(run("layernorm") + run("moe_act"))
    assert run("core_attn") > 0 and run("selective") == pytest.approx(run("core_attn"))
    row = copy.deepcopy(next(r for r in load_runs() if r["id"] == "gpt-oss-120b-h100-64"))
    row["layout"]["recompute"] = "layernorm+mlp"
    with pytest.raises(ConfigError, match="recompute 'layernorm\\+mlp'"):
        compare(row)


def test_unfused_grad_accumulation_and_optimizer_passes_follow_megatrons_code():
    from apt.trainops.perf.predict import _dp_params, optimizer_bytes_per_param
    a100 = load_hardware("a100-80g")
    stream = a100.hbm_bytes_s * a100.hbm_fraction
    gpt = ModelShape(hidden=8192, layers=48, heads=64, kv_heads=64, head_dim=128, ffn=32768,
                     vocab=51200, seq=2048, gated=False, dropout=True)
    # Megatron-LM 2021 (fp16, no fusion): autograd adds each later micro-batch's weight
    # gradient to .grad: read the new gradient, read and write the accumulator, per parameter
    lay = Layout(tp=8, pp=2, dp=32, micro_batch=4, grad_accum=12, zero=0, recompute="full",
                 dtype="fp16", grad_bytes=2, grad_accum_fusion=False, gpus_per_node=8)
    dense, expert = _dp_params(gpt, lay)
    p = predict(gpt, lay, a100)
    assert p.breakdown["grad accumulation"] == pytest.approx(11 * dense * (2 + 2 * 2) / stream)
    fused = predict(gpt, replace(lay, grad_accum_fusion=True), a100)
    assert fused.breakdown["grad accumulation"] == 0
    # it is per micro-batch work of the stage, so the pipeline bubble grows with it too
    assert p.breakdown["pp bubble"] > fused.breakdown["pp bubble"]
    assert predict(gpt, replace(lay, grad_accum=1), a100).breakdown["grad accumulation"] == 0
    # ZeRO-3 accumulates the reduce-scattered shard only
    shard = predict(gpt, replace(lay, pp=1, zero=3), a100).breakdown["grad accumulation"]
    assert shard == pytest.approx(11 * _dp_params(gpt, replace(lay, pp=1))[0] / 32 * 6 / stream)

    # optimizer passes (Float16OptimizerWithFloat16Params.step): Adam 28 + grad norm 4, the
    # master -> 16-bit copy 4 + e, 16-bit grads cast to fp32 first, fp16 unscale + inf check
    assert optimizer_bytes_per_param(Layout(dtype="bf16", grad_bytes=4)) == 38
    assert optimizer_bytes_per_param(Layout(dtype="bf16", grad_bytes=2)) == 44
    assert optimizer_bytes_per_param(Layout(dtype="fp16", grad_bytes=2)) == 52
    assert optimizer_bytes_per_param(Layout(dtype="tf32", grad_bytes=4)) == 32
    assert p.breakdown["optimizer step"] == pytest.approx(dense * 52 / stream)
    # sequence parallelism keeps the sequence shard of each column-parallel input and
    # all-gathers it again in the backward (Korthikanti et al. 2022, section 4.2.2): five
    # all-reduces' bytes per layer instead of four
    tp8 = Layout(tp=8, micro_batch=4, grad_accum=1, gpus_per_node=8)
    one = comms.all_reduce(4 * 2048 * 8192 * 2, 8, 1, a100, 8)
    plain = predict(gpt, tp8, a100).breakdown["tp comm exposed"]
    seq = predict(gpt, replace(tp8, sp=True), a100).breakdown["tp comm exposed"]
    assert plain == pytest.approx(48 * 4 * one) and seq == pytest.approx(48 * 5 * one)


def test_search_ranks_layouts_at_a_scale_the_profiles_own_layout_does_not_fit(capsys):
    # profiles/70b.yaml carries a 64-GPU layout (TP4 PP4 CP2): on 16 GPUs the plan alone is
    # refused in one line, while --search still ranks what runs there
    assert main(["plan", "--profile", "70b", "--nodes", "2", "--gpus-per-node", "8"]) == 2
    assert "does not divide the world size 16" in capsys.readouterr().err
    assert main(["plan", "--profile", "70b", "--gpu", "h100-sxm", "--nodes", "2",
                 "--gpus-per-node", "8", "--search"]) == 0
    out = capsys.readouterr().out
    assert "the profile's layout does not run here" in out and "world        16" in out
    first = next(line for line in out.splitlines() if line.startswith("  1. "))
    assert first.split("  1. ")[1].split()[0] in out.split("strategy     hybrid: ")[1]


def test_mpt_software_optimizer_fsdp1_gradient_path_loss_and_positions():
    from apt.core.config import ConfigError
    from apt.trainops.perf.compute import layer_compute, linear_times, logits_time
    from apt.trainops.perf.predict import fsdp1_gradient_bytes
    stream = H100.hbm_bytes_s * H100.hbm_fraction
    mpt = ModelShape(hidden=4096, layers=32, heads=32, kv_heads=32, head_dim=128, ffn=16384,
                     vocab=50368, seq=2048, gated=False)
    lay = Layout(dp=8, zero=3, micro_batch=6, attention="flash1", gpus_per_node=8,
                 grad_bytes=4)
    base = predict(mpt, lay, H100)
    # Composer's DecoupledAdamW (unfused, per tensor) + FSDP's clip_grad_norm_: 92 bytes per
    # sharded parameter against Megatron's fused Adam's 38 (bf16, fp32 gradients); nothing
    # else moves
    from apt.trainops.perf.predict import optimizer_bytes_per_param
    assert optimizer_bytes_per_param(lay) == 38
    adamw = predict(mpt, replace(lay, optimizer="decoupled_adamw"), H100)
    assert adamw.breakdown["optimizer step"] == pytest.approx(
        base.breakdown["optimizer step"] * 92 / 38)
    assert adamw.step_s - base.step_s == pytest.approx(
        adamw.breakdown["optimizer step"] - base.breakdown["optimizer step"])
    # torch FSDP1's gradient path per micro-batch, bytes per parameter: the SplitWithSizes
    # backward's cat (bf16 read + write 4), the cast to the fp32 reduce dtype (2 + 4), the
    # pre-division by 4 of 8 ranks (fp32 read + write 8) on the unsharded gradient; the
    # post-division by 2 (8) and two low-precision casts of the fp32 shard (2 x 6) on the shard
    assert fsdp1_gradient_bytes(1.0, 8, lay) == pytest.approx(4 + 6 + 8 + (8 + 12) / 8)
    assert fsdp1_gradient_bytes(1.0, 8, replace(lay, grad_bytes=2)) == pytest.approx(
        4 + 4 + (4 + 12) / 8)                     # PURE: no cast, bf16 divisions
    two = replace(lay, grad_accum=2)
    f1, f2 = (predict(mpt, replace(x, fsdp1=True), H100) for x in (lay, two))
    assert "fsdp1 grad copies" not in base.breakdown
    assert f2.breakdown["fsdp1 grad copies"] == pytest.approx(
        2 * f1.breakdown["fsdp1 grad copies"])    # once per micro-batch
    params = mpt.layers * (mpt.attention_params + mpt.expert_params + 2 * 4096) \
        + 2 * 50368 * 4096
    assert f1.breakdown["fsdp1 grad copies"] == pytest.approx(
        fsdp1_gradient_bytes(params, 8, lay) / stream)
    assert f1.step_s - base.step_s == pytest.approx(f1.breakdown["fsdp1 grad copies"])
    # the fused xentropy loss: 4 passes of 2 bytes per logit instead of Megatron's 52
    f, b = linear_times(6 * 2048, 4096, 50368, H100, "bf16")
    assert logits_time(mpt, replace(lay, loss="xentropy"), H100) - f - b == pytest.approx(
        6 * 2048 * 50368 * 8 / stream)
    # learned positions (MPT): no RoPE pass over q and k (2 x 2 x 4096 elements per token)
    rope = layer_compute(mpt, lay, H100).elementwise_fwd
    learned = layer_compute(replace(mpt, rope=False), lay, H100).elementwise_fwd
    assert rope - learned == pytest.approx(6 * 2048 * 4 * 4096 * 2 / stream)
    for change, match in (({"optimizer": "sgd"}, "optimizer 'sgd'"),
                          ({"loss": "fused"}, "loss 'fused'")):
        with pytest.raises(ConfigError, match=match):
            predict(mpt, replace(lay, **change), H100)
    # the published MPT rows name what llm-foundry ran: all seven
    mpt_rows = [r for r in load_runs() if r["id"].startswith("mpt")]
    assert len(mpt_rows) == 7 and all(
        r["layout"]["optimizer"] == "decoupled_adamw" and r["layout"]["loss"] == "xentropy"
        and r["layout"]["fsdp1"] and r["model"]["rope"] is False for r in mpt_rows)
    seven = {r["id"]: compare(r).error for r in mpt_rows}
    assert 0.10 < seven["mpt-7b-h100-8"] < 0.20, seven


def test_calibration_takes_the_measured_hbm_copy_and_attention_rates(tmp_path):
    report = json.loads((DATA / "gpu_check_calibration.json").read_text())
    env = report["sections"]["environment"]
    env["hbm"] = {"bytes": 2 << 30, "gbs": 3000.0}
    env["attention"] = {"batch": 4, "heads": 16, "seq": 4096, "head_dim": 128,
                        "dtype": "bfloat16", "tflops": 450.0}
    path = tmp_path / "gpu_check.json"
    path.write_text(json.dumps(report))
    cal = calibrate(path)
    assert cal.hardware.hbm_fraction == pytest.approx(3000e9 / 3.35e12)
    assert cal.hardware.attention_fraction == pytest.approx(450e12 / 989.4e12)
    # the copy rate enters the step (element-wise work, the loss, the optimizer stream HBM)
    assert cal.prediction.step_s != calibrate(DATA / "gpu_check_calibration.json").prediction.step_s
    assert "HBM copy 3,000 GB/s" in cal.describe()
    env["hbm"]["gbs"] = -1
    path.write_text(json.dumps(report))
    with pytest.raises(ConfigError, match=r"environment\.hbm\.gbs: needs a number > 0"):
        calibrate(path)


def test_the_clusters_network_is_an_input_and_bad_values_stop_before_any_output(capsys):
    plan = ["plan", "--profile", "70b", "--gpu", "h100-sxm", "--nodes", "8",
            "--gpus-per-node", "8"]

    def step(*extra):
        assert main(plan + list(extra)) == 0
        out = capsys.readouterr().out
        network = next(line for line in out.splitlines() if line.startswith("network"))
        return float(out.split("step ")[1].split(" s,")[0]), network
    base, line = step()
    assert "NVLink 450 GB/s" in line and "400 Gb/s per GPU between nodes" in line
    # half the NIC: the cross-node p2p and DP traffic of this 8-node layout take longer
    slow, line = step("--network-gbps", "200")
    assert slow > base and "200 Gb/s per GPU between nodes" in line
    # a slower NVLink slows the TP collectives inside the node
    assert step("--nvlink-gbs", "100")[0] > base
    assert main(plan + ["--network-gbps", "0"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "--network-gbps: needs a number > 0" in captured.err
