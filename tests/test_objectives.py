"""The objective seam: one loss definition that both engines and the Evaluator call.

The loss is normalised by the unmasked tokens of the whole global batch, so splitting a batch
of variable-length SFT records into more micro-batches changes nothing: each micro-batch has a
different number of trained tokens, where a mean of per-micro-batch means would weight them
differently (checked below: the two differ on this data)."""
import json

import pytest
import torch

from apt.core.config import load_profile
from apt.trainops.data import LMBatch, SFTDataset
from apt.trainops.data.tokenizers.tokenizer import ByteTokenizer
from apt.trainops.trainers import Trainer
from apt.trainops.objectives import LanguageModelObjective, build_objective


def _records(n=48):
    """Chats whose answers run from 1 to ~40 bytes: trained tokens differ per record."""
    out = []
    for i in range(n):
        word = "ab" * (1 + i % 7)
        out.append({"messages": [{"role": "user", "content": f"repeat {word} {1 + i % 5} times"},
                                 {"role": "assistant", "content": " ".join([word] * (1 + i % 5))}]})
    return out


@pytest.fixture(scope="module")
def sft_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("sft") / "chats.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in _records()) + "\n")
    return path


def _run(sft_file, out, engine, micro):
    cfg = load_profile("tiny", [
        "data.corpus=sft", f"data.path={sft_file}", "data.val_fraction=0.3",
        "data.seq_length=64", "model.max_seq_len=64",
        "training.max_steps=3", "training.warmup_steps=1", "training.batch_size=8",
        f"training.micro_batch_size={micro}", "training.eval_interval=0",
        "training.log_interval=1", "output.sample_tokens=0", f"output.dir={out}",
        f"training.distributed.engine={engine}"])
    trainer = Trainer.from_config(cfg)
    assert trainer.plan.grad_accum == 8 // micro and trainer.engine is None
    trainer.train()
    assert trainer.engine.kind == engine
    return trainer.history


@pytest.mark.parametrize("engine", ["deepspeed", "megatron"])
def test_variable_length_accumulation_is_exact(sft_file, tmp_path, engine):
    one, many = _run(sft_file, tmp_path, engine, 8), _run(sft_file, tmp_path, engine, 1)
    for a, b in zip(one, many):
        assert abs(a["loss"] - b["loss"]) < 1e-5, (a["step"], a["loss"], b["loss"])
        assert abs(a["grad_norm"] - b["grad_norm"]) < 1e-4 * a["grad_norm"]


def test_global_token_mean_differs_from_mean_of_micro_batch_means(sft_file):
    """The data above makes the normalisation matter (else the test above proves nothing)."""
    data = SFTDataset([json.loads(l) for l in sft_file.read_text().splitlines()],
                      ByteTokenizer(), seq_length=64)
    masks = [data.get_batch([i]).loss_mask for i in range(8)]
    counts = torch.stack([m.sum() for m in masks])
    per_row_loss = torch.linspace(1.0, 2.0, 8)          # any losses that differ per row
    global_mean = (per_row_loss * counts).sum() / counts.sum()
    assert abs(global_mean - per_row_loss.mean()) > 1e-2 and counts.min() < counts.max()


def test_batches_are_typed_and_checked():
    objective = build_objective("lm")
    assert isinstance(objective, LanguageModelObjective) and build_objective(objective) is objective
    plain = {"tokens": torch.zeros(2, 4, dtype=torch.long),
             "labels": torch.zeros(2, 4, dtype=torch.long), "loss_mask": torch.ones(2, 4)}
    batch = objective.coerce(plain)
    assert isinstance(batch, LMBatch) and batch.attention_mask is None
    assert objective.loss_units(batch) == 8
    with pytest.raises(ValueError, match="no field.*segment"):
        objective.coerce({**plain, "segment": torch.zeros(2, 4)})
    with pytest.raises(ValueError, match="must have one shape"):
        objective.coerce({**plain, "loss_mask": torch.ones(2, 5)})
    with pytest.raises(ValueError, match="unknown objective"):
        build_objective("dpo-typo")


def test_packed_sft_equals_the_records_run_unpacked(sft_file):
    """Through the whole seam (SFT dataset -> LMBatch -> objective -> model, the Evaluator's
    schedule): packed records score exactly the sum of the records run one per row. Without
    the document mask the records see each other and the sums differ."""
    from apt.model.architectures import APTModel
    from apt.trainops.data import create_dataloader
    from apt.trainops.runtime.process_groups import ensure_runtime, seed_everything
    from apt.trainops.eval import Evaluator

    # Short records (one or two repetitions), so that several fit in a row.
    records = [json.loads(line) for i, line in enumerate(sft_file.read_text().splitlines())
               if i % 5 < 2]
    ensure_runtime()
    seed_everything(0)
    model = APTModel(hidden_size=64, num_layers=2, num_attention_heads=4, num_query_groups=2,
                     ffn_hidden_size=128, vocab_size=384, max_seq_len=256, init_std=0.2)

    def totals(packing, drop_mask=False):
        data = SFTDataset(records, ByteTokenizer(), seq_length=256, packing=packing)
        if packing:
            assert len(data) < len(records) / 2   # several records share each row

        class Rows:   # the dataset, optionally with its mask dropped (what the test guards)
            def __len__(self):
                return len(data)

            def __getitems__(self, indices):
                batch = data.get_batch(indices)
                if drop_mask:
                    batch.attention_mask = None
                return batch

        loader = create_dataloader(Rows(), batch_size=1, shuffle=False, infinite=False)
        out = Evaluator(model, dataloader=loader, metrics=["loss"]).evaluate()
        return out["loss"] * out["tokens"], out["tokens"]

    (packed, n_packed), (alone, n_alone) = totals(True), totals(False)
    assert n_packed == n_alone > 0
    assert abs(packed - alone) < 1e-5 * n_alone, (packed, alone)
    leaked, _ = totals(True, drop_mask=True)
    assert abs(leaked - alone) > 1e-3 * n_alone   # 100x the tolerance above
