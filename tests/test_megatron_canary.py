"""Canary for the Megatron-core CPU compatibility layer (apt/core/cpu_compat.py).

It exists so that a torch or megatron-core version change that breaks the CPU layer fails
loudly: the layer patches torch/megatron internals (CUDA stubs, RNG, a device-remap
TorchFunctionMode re-entered inside autograd backward, gloo collectives), and such breakage
often shows up as WRONG numbers rather than errors. The test trains a tiny Llama-style GPTModel
(fp32, hidden 64, 4 layers, 4 heads, 2 query groups, vocab 128, seq 32) for 3 SGD steps, once
single-process (TP1/PP1) and once on 4 processes (TP2 x PP2, 1F1B schedule) starting from the
same weights (TP1 saves a dist_checkpointing checkpoint, the 4-process run loads it with
resharding; it also uses full activation recompute), and requires every per-step loss to match
within 1e-6.
"""
import json
from pathlib import Path

from tests._launch import run_distributed

WORKER = Path(__file__).parent / "workers" / "megatron_canary.py"


def test_tp2_pp2_matches_single_process(tmp_path):
    ckpt, ref_out, par_out = tmp_path / "ckpt", tmp_path / "ref.json", tmp_path / "par.json"
    run_distributed(WORKER, 1, ["--save", str(ckpt), "--out", str(ref_out)])
    # Full activation recompute on the 4-process side only: same math, and it runs the forward
    # again inside autograd backward, where the CPU layer must re-enter its device remap.
    run_distributed(WORKER, 4, ["--tp", "2", "--pp", "2", "--recompute", "full",
                                "--load", str(ckpt), "--out", str(par_out)])
    ref, par = json.loads(ref_out.read_text()), json.loads(par_out.read_text())

    assert ref["compat_active"] and par["compat_active"]
    assert par["schedule"] == "forward_backward_pipelining_without_interleaving"  # 1F1B
    assert par["tp_marked"], "TP-sharded params must carry tensor_model_parallel=True"
    assert len(ref["losses"]) == 3
    assert ref["losses"][-1] < ref["losses"][0] - 0.1, f"training did not move: {ref['losses']}"
    for losses in par["all_last_stage_losses"]:  # both TP ranks of the last stage
        diffs = [abs(a - b) for a, b in zip(ref["losses"], losses)]
        assert len(losses) == 3 and max(diffs) < 1e-6, (
            f"TP2xPP2 diverged from TP1: ref={ref['losses']} par={losses} diffs={diffs}"
        )
