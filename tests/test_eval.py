"""Evaluator and metrics in one process, against computations written out by hand."""
import math

import pytest
import torch

from apt.model.architectures import APTModel
from apt.trainops.data import ByteTokenizer, TokenDataset
from apt.trainops.eval import Evaluator, MultipleChoiceTask, compute_metrics
from apt.trainops.eval.tasks import Question

SMALL = dict(hidden_size=64, num_layers=2, num_attention_heads=4, num_query_groups=2,
             ffn_hidden_size=128, vocab_size=384, max_seq_len=64, init_std=0.2)


def test_compute_metrics_by_hand():
    # Two positions, vocab 3. Position 0: logits (0, log 3, 0), label 1 -> p = 3/5, correct.
    # Position 1: logits (0, 0, 0), label 2 -> p = 1/3; argmax is token 0 (ties: first), wrong.
    logits = torch.tensor([[[0.0, math.log(3), 0.0], [0.0, 0.0, 0.0]]])
    labels = torch.tensor([[1, 2]])
    loss = (-math.log(3 / 5) - math.log(1 / 3)) / 2
    m = compute_metrics(logits, labels)
    assert m["loss"] == pytest.approx(loss) and m["perplexity"] == pytest.approx(math.exp(loss))
    assert m["accuracy"] == 0.5 and m["tokens"] == 2
    assert m["bits_per_token"] == pytest.approx(loss / math.log(2))
    masked = compute_metrics(logits, labels, loss_mask=torch.tensor([[1.0, 0.0]]))
    assert masked["accuracy"] == 1.0 and masked["loss"] == pytest.approx(-math.log(3 / 5))


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return APTModel(**SMALL)


def test_evaluator_equals_a_plain_forward(model):
    text = "".join(open(p).read() for p in ("apt/trainops/eval/evaluator.py",
                                            "apt/trainops/objectives/token_metrics.py"))
    dataset = TokenDataset(ByteTokenizer().encode(text), 32)
    result = Evaluator(model, dataset, metrics=["loss", "perplexity", "accuracy"],
                       micro_batch_size=4, max_batches=3).evaluate()
    samples = [dataset[i] for i in range(12)]
    tokens = torch.stack([s["tokens"] for s in samples])
    with torch.no_grad():
        logits = model(tokens, torch.arange(32).expand(12, 32), None)
    expected = compute_metrics(logits, torch.stack([s["labels"] for s in samples]))
    assert result["tokens"] == expected["tokens"] == 12 * 32
    for key in ("loss", "perplexity", "accuracy"):
        assert result[key] == pytest.approx(expected[key], rel=1e-6), key
    assert model.training  # the evaluator restores the mode it found


def test_multiple_choice_is_log_likelihood_argmax(model):
    tok = ByteTokenizer()
    task = MultipleChoiceTask("hand", (Question("def f(", (" x):", "self, y):", "]"), 1),
                                       Question("import ", ("os", "zz"), 0),
                                       Question("a = ", ("1", "[]", "None"), 2)))

    def loglik(context, choice):  # sum of log p(choice bytes | context), one sequence
        ids = torch.tensor(tok.encode(context + choice).tolist())
        with torch.no_grad():
            logp = torch.log_softmax(model(ids[None, :-1], torch.arange(len(ids) - 1)[None],
                                           None)[0].double(), -1)
        n = len(tok.encode(choice))
        return sum(logp[len(ids) - 1 - n + i, ids[len(ids) - n + i]].item() for i in range(n))

    acc = acc_norm = 0
    for q in task.questions:
        scores = [loglik(q.context, c) for c in q.choices]
        normed = [s / len(c.encode()) for s, c in zip(scores, q.choices)]
        acc += scores.index(max(scores)) == q.answer
        acc_norm += normed.index(max(normed)) == q.answer
    result = Evaluator(model, metrics=["multiple_choice"], tasks=[task],
                       micro_batch_size=4).evaluate()
    assert result["mc_hand_questions"] == 3
    assert result["mc_hand_acc"] == pytest.approx(acc / 3)
    assert result["mc_hand_acc_norm"] == pytest.approx(acc_norm / 3)


def test_builtin_task_and_bad_inputs(tmp_path, model):
    task = MultipleChoiceTask.load("python_completion")
    assert len(task.questions) == 24 and {q.answer for q in task.questions} == {0, 1, 2}
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"context": "x", "choices": ["a", "b"], "answer": 2}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        MultipleChoiceTask.load(bad)
    with pytest.raises(FileNotFoundError, match="no-such-task"):
        MultipleChoiceTask.load("no-such-task")
    with pytest.raises(ValueError, match="unknown metric"):
        Evaluator(model, metrics=["bleu"])
