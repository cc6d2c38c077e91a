"""Evaluation says how many held-out samples it scored and why any were left out (issue 30:
DPO's held-out preference accuracy covered 288 of 300 pairs without a word: 300 pairs fill 9
global batches of 32 and 12 are left over)."""
import json

from apt.core.config import load_profile
from apt.trainops.data import ByteTokenizer, PreferenceDataset, create_dataloader
from apt.trainops.eval.coverage import eval_coverage


def test_pairs_left_out_by_whole_global_batches_the_batch_cap_and_truncation():
    pairs = [{"prompt": f"{i}+1=", "chosen": str(i + 1), "rejected": str(i)} for i in range(300)]
    too_long = [{"prompt": "x" * 64, "chosen": "1", "rejected": "2"}] * 2  # answers cut to nothing
    data = PreferenceDataset(pairs + too_long, ByteTokenizer(), seq_length=40,
                             max_prompt_length=41)
    assert (len(data), data.dropped) == (300, 2)
    loader = create_dataloader(data, 8, shuffle=False, global_batch_size=32, infinite=False,
                               data_parallel_rank=0, data_parallel_size=1)
    whole = eval_coverage(loader, max_batches=None)
    assert sum(b.rows for b in loader) == whole.scored == 288   # what is scored
    assert whole.line() == (
        "scored 288 of 302 held-out samples; left out: 12 after the last whole global batch of "
        "32 (training.batch_size: evaluation takes whole global batches, as training does); 2 "
        "dropped when the data was read (data.seq_length cuts their answer off entirely)")
    capped = eval_coverage(loader, max_batches=10)
    assert capped.scored == 80 and "208 beyond training.eval_batches=10 micro-batches of 8" \
        in capped.line()


def test_the_trainers_evaluation_records_how_many_it_scored(tmp_path):
    from apt.trainops.trainers import Finetuner
    chats = [{"prompt": f"q{i}", "response": f"a{i}"} for i in range(50)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(c) + "\n" for c in chats))
    (tmp_path / "val.jsonl").write_text("".join(json.dumps(c) + "\n" for c in chats[:21]))
    cfg = load_profile("tiny", [
        "model.hidden_size=32", "model.num_layers=1", "model.num_attention_heads=2",
        "model.max_seq_len=48", "data.corpus=sft", f"data.path={tmp_path / 'train.jsonl'}",
        f"data.val_path={tmp_path / 'val.jsonl'}", "data.seq_length=48",
        "training.batch_size=8", "training.eval_batches=8", f"output.dir={tmp_path}"])
    trainer = Finetuner.from_config(cfg)
    assert trainer.evaluate()["val_samples"] == 16
    assert trainer.eval_coverage.line().startswith("scored 16 of 21 held-out samples; left "
                                                   "out: 5 after the last whole global batch")
