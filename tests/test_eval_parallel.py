"""The Evaluator on TP2 x PP2 (4 processes) equals a single-process evaluation of the same
weights: loss, perplexity, next-token accuracy and multiple-choice accuracy, to 1e-5.

The single process saves its initial weights with dist_checkpointing; the 4-process run loads
them resharded (TP splits the vocabulary of the output layer, so accuracy needs the TP-aware
argmax and the loss Megatron's vocab-parallel cross-entropy; PP runs Megatron's 1F1B schedule
forward-only and the last stage's sums reach every rank).
"""
import json
from pathlib import Path

from tests._launch import run_distributed

WORKER = Path(__file__).parent / "workers" / "eval_worker.py"


def test_tp2_pp2_evaluator_matches_single_process(tmp_path):
    ckpt, ref_out, par_out = tmp_path / "ckpt", tmp_path / "ref.json", tmp_path / "par.json"
    run_distributed(WORKER, 1, ["--save", str(ckpt), "--out", str(ref_out)])
    run_distributed(WORKER, 4, ["--tp", "2", "--pp", "2", "--load", str(ckpt),
                                "--out", str(par_out)])
    ref = json.loads(ref_out.read_text())["results"][0]["result"]
    par = json.loads(par_out.read_text())
    assert par["schedule"] == "forward_backward_pipelining_without_interleaving"
    assert {(r["tp_rank"], r["pp_rank"]) for r in par["results"]} == {(0, 0), (0, 1), (1, 0), (1, 1)}
    assert ref["tokens"] == 16 * 64 and ref["mc_python_completion_questions"] == 24
    assert 0 < ref["accuracy"] < 1 and ref["loss"] > 0
    for report in par["results"]:  # every rank returns the same numbers
        got = report["result"]
        assert got.keys() == ref.keys()
        for key, value in ref.items():
            assert abs(got[key] - value) <= 1e-5 * max(1.0, abs(value)), (key, value, got[key])
    diffs = {k: abs(par["results"][0]["result"][k] - v) for k, v in ref.items()}
    print("TP2xPP2 vs single-process differences:", diffs)
