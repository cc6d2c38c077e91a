"""The run control folds every rank's votes into the step's one all-reduce: a preemption
signal on one rank stops every rank, a NaN on one rank is handled by the anomaly policy on
every rank alike (real gloo processes; the RunControl of apt/trainops/reliability)."""
import json
import math
from pathlib import Path

from tests._launch import run_distributed

WORKER = Path(__file__).resolve().parent / "workers" / "run_control_worker.py"


def test_one_ranks_vote_decides_for_every_rank(tmp_path):
    out = tmp_path / "out.json"
    run_distributed(WORKER, 2, ["--dir", str(tmp_path), "--out", str(out)], timeout=300)
    runs = json.loads(out.read_text())
    for name, ranks in runs.items():
        assert len({r["decision"] for r in ranks}) == 1, (name, ranks)   # alike everywhere
    decision = {name: ranks[0]["decision"] for name, ranks in runs.items()}
    assert decision == {"clean": "continue", "preempt": "stop", "skip": "continue",
                        "rewind": "continue", "stop": "exit"}
    assert all(r["applied"] and r["anomaly"] is None and r["loss"] == 1.0
               for name in ("clean", "preempt") for r in runs[name])
    for name in ("skip", "rewind", "stop"):   # rank 0's NaN: no rank applies the update
        assert all(not r["applied"] and r["anomaly"].startswith("non-finite loss")
                   and math.isnan(r["loss"]) and r["flushed"] == 1 for r in runs[name])
    assert all("policy is stop" in r["reason"] for r in runs["stop"])
    # rewind with no committed checkpoint: the step is skipped, said in metrics.jsonl
    (metrics,) = (tmp_path / "rewind").glob("run-*/metrics.jsonl")
    assert json.loads(metrics.read_text().splitlines()[-1])["action"] == "skip"
