"""NEFTune on the real Megatron embedding, greedy generation and the chat scorer (one process)."""
import math

import pytest
import torch
import torch.nn.functional as F

from apt.core.config import load_profile
from apt.model.architectures import APTModel
from apt.model.neftune import NEFTune, attach_neftune
from apt.trainops.data import ByteTokenizer
from apt.trainops.data.tokenizers.chat_template import BUILTIN, ChatTemplate, encode_chat
from apt.trainops.eval.generation import ChatScorer, greedy_generate, score_chats

SMALL = dict(hidden_size=64, num_layers=2, num_attention_heads=4, num_query_groups=2,
             ffn_hidden_size=128, vocab_size=384, max_seq_len=64, init_std=0.2)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return APTModel(**SMALL)


def test_neftune_noises_embeddings_in_train_mode_only(model):
    tokens = torch.randint(0, 256, (2, 16))
    positions = torch.arange(16).expand(2, -1)
    model.train()
    clean = model.embedding(tokens, positions)                    # [s, b, h]
    logits_clean = model.eval()(tokens, positions, None)
    alpha, bound = 5.0, 5.0 / math.sqrt(16 * 64)                  # alpha / sqrt(L * d)
    neftune = NEFTune(alpha, seed=1).attach([model])
    assert neftune.attached == 1
    try:
        neftune.set_step(3)
        model.train()
        noisy = model.embedding(tokens, positions)
        noise = noisy - clean
        assert noise.abs().max() <= bound * (1 + 1e-5) and noise.abs().max() > 0.9 * bound
        assert abs(float(noise.mean())) < 0.1 * bound             # uniform in [-bound, bound]
        neftune.set_step(3)                                       # the same step: the same noise
        assert torch.equal(model.embedding(tokens, positions), noisy)
        neftune.set_step(4)
        assert not torch.equal(model.embedding(tokens, positions), noisy)
        model.eval()                                              # evaluation sees clean ones
        assert torch.equal(model.embedding(tokens, positions), clean)
        assert torch.equal(model(tokens, positions, None), logits_clean)
    finally:
        neftune.remove()
    model.train()
    assert torch.equal(model.embedding(tokens, positions), clean)
    assert attach_neftune([model], 0.0) is None
    model.eval()


def test_greedy_generation_is_the_models_argmax(model):
    tok = ByteTokenizer()
    prompts = [tok.encode(text) for text in ("<|user|>\nhi\n", "a", "<|assistant|>\nabc")]
    batched = greedy_generate(model, prompts, 6, valid_vocab=tok.vocab_size)
    one_by_one = [greedy_generate(model, [p], 6, valid_vocab=tok.vocab_size)[0]
                  for p in prompts]
    assert batched == one_by_one                  # right padding does not change a row
    for prompt, out in zip(prompts, batched):     # top-1 sampling is greedy decoding
        sampled = model.generate(torch.as_tensor(prompt), 6, top_k=1,
                                 valid_vocab=tok.vocab_size)
        assert out == sampled.tolist()
        end = out[3]   # taken as the end-of-document token: sampling stops before it
        assert model.generate(torch.as_tensor(prompt), 6, top_k=1, valid_vocab=tok.vocab_size,
                              eod_id=end).tolist() == out[:out.index(end)]
    stop = batched[0][2]
    assert greedy_generate(model, prompts[:1], 6, stop_id=stop,
                           valid_vocab=tok.vocab_size)[0] == batched[0][:3]


class Oracle(torch.nn.Module):
    """A hand-made model: logit 10 on the next token of any sequence it was taught, else on
    token ``wrong``; with labels it returns the per-token loss [b, s] as APTModel does."""

    def __init__(self, sequences, vocab: int, wrong: int):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))          # where the model lives
        self.vocab, self.wrong = vocab, wrong
        self.next = {tuple(s[:i]): s[i] for s in sequences for i in range(1, len(s))}

    def forward(self, tokens, positions, attention_mask, labels=None):
        logits = torch.zeros(*tokens.shape, self.vocab)
        for b in range(tokens.shape[0]):
            for t in range(tokens.shape[1]):
                logits[b, t, self.next.get(tuple(tokens[b, :t + 1].tolist()), self.wrong)] = 10
        if labels is None:
            return logits
        return F.cross_entropy(logits.transpose(1, 2), labels, reduction="none")


def test_scorer_on_a_hand_made_case():
    tok, template = ByteTokenizer(), ChatTemplate(BUILTIN)
    records = [{"messages": [{"role": "user", "content": "Repeat: ab"},
                             {"role": "assistant", "content": "ab"}], "task": "repeat"},
               {"messages": [{"role": "user", "content": "Uppercase: cd"},
                             {"role": "assistant", "content": "CD"}], "task": "upper"},
               {"messages": [{"role": "user", "content": "1+1=?"},
                             {"role": "assistant", "content": "2"},
                             {"role": "user", "content": "Reverse: xy"},
                             {"role": "assistant", "content": "yx"}], "task": "reverse"}]
    encoded = [encode_chat(r["messages"], template, tok, "r")[0].tolist() for r in records]
    # Record 1 is known up to its answer but not its end: after "CD\n" it says "x", not EOD.
    taught = [encoded[0], encoded[1][:-1] + [ord("x")], encoded[2]]
    oracle = Oracle(taught, vocab=300, wrong=ord("?"))
    scores = score_chats(oracle, records, tok, template, seq_length=96)
    assert scores["exact_match"] == pytest.approx(2 / 3)
    assert (scores["exact_match_repeat"], scores["exact_match_upper"],
            scores["exact_match_reverse"]) == (1.0, 0.0, 1.0)
    # Every assistant token is predicted with logit 10 except record 1's EOD (one miss).
    n = sum(int(encode_chat(r["messages"], template, tok, "r")[1][1:].sum()) for r in records)
    assert scores["assistant_tokens"] == n == 4 + 4 + (2 + 4)
    log_z = math.log(math.exp(10) + 299)
    assert scores["assistant_loss"] == pytest.approx(((n - 1) * (log_z - 10) + log_z) / n,
                                                     abs=1e-5)          # float32 logits
    assert scores["samples"][1] == {"prompt": "<|user|>\nUppercase: cd\n<|assistant|>\n",
                                    "expected": "CD\n", "generated": "CD\nx"}
    knows_nothing = score_chats(Oracle([], 300, ord("?")), records, tok, template, seq_length=96)
    assert knows_nothing["exact_match"] == 0 and knows_nothing["assistant_loss"] > 9


def test_chat_scorer_reads_the_profiles_held_out_chats(model, tmp_path):
    cfg = load_profile("sft-tiny", [f"data.cache_dir={tmp_path}"])
    scorer = ChatScorer.from_data(cfg.data, ByteTokenizer(), max_records=5)
    assert [r["task"] for r in scorer.records] == ["repeat", "upper", "next", "reverse", "add"]
    scores = scorer(model)
    assert scores["records"] == 5 and scores["assistant_loss"] > 0
    assert 0 <= scores["exact_match"] <= 1
