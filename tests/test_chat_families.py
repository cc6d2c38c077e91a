"""The tokenizer and chat template of a Hugging Face model directory drive SFT, DPO and GRPO, for
the families people fine-tune: Llama 3.2, Qwen2.5, Qwen3 (with its thinking markers) and
Mistral (v0.3). Each directory holds a small byte-level BPE trained here (offline) with the
family's special tokens, and the family's published chat template (tests/fixtures/
chat_templates, verbatim). Also: tokenizer files and templates are untrusted data."""
import json
from pathlib import Path

import numpy as np
import pytest

from apt.trainops.data import DataError, HFTokenizer, PreferenceDataset, load_tokenizer
from apt.trainops.data.tokenizers.chat_template import (ChatTemplate, encode_chat, last_turn,
                                                        resolve_chat_template, stop_ids)
from apt.trainops.data.datasets.prompts import PromptDataset
from apt.trainops.data.datasets.sft import SFTDataset

TEMPLATES = Path(__file__).parent / "fixtures" / "chat_templates"
# Qwen2's pre-tokenizer split (Llama 3's differs only in grouping digits by three): a newline
# never joins the word after it, so a generation prompt's tokens are a prefix of the answer's.
SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+"
         r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

# name: (template file, special tokens in tokenizer.json, tokenizer_config.json's named tokens,
#        tokens only tokenizer_config.json's added_tokens_decoder declares (id after the rest),
#        the end-of-turn token)
FAMILIES = {
    "llama3.2": ("llama3_2.jinja",
                 ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                  "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"],
                 {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}, [], "<|eot_id|>"),
    "qwen2.5": ("qwen2_5.jinja", ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "bos_token": None},
                [], "<|im_end|>"),
    # Qwen3's <think> and </think> are added tokens that are not special.
    "qwen3": ("qwen3.jinja", ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
              {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "bos_token": None},
              ["<think>", "</think>"], "<|im_end|>"),
    "mistral": ("mistral_v0_3.jinja", ["<unk>", "<s>", "</s>", "[INST]", "[/INST]",
                                       "[TOOL_CALLS]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]",
                                       "[TOOL_RESULTS]", "[/TOOL_RESULTS]"],
                {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}, [], "</s>"),
}

CHAT = [{"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 3+3?"},
        {"role": "assistant", "content": "6 of course"}]
TEXTS = ([m["content"] for m in CHAT] * 20
         + ["system user assistant Cutting Knowledge Date Today You are a helpful the of"] * 20)


def _family_dir(root: Path, name: str) -> Path:
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    template, specials, named, declared, _ = FAMILIES[name]
    directory = root / name
    directory.mkdir()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(TEXTS, trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(directory / "tokenizer.json"))
    size = tok.get_vocab_size(with_added_tokens=True)
    decoder = {str(tok.token_to_id(t)): {"content": t, "special": True} for t in specials}
    decoder.update({str(size + i): {"content": t, "special": False, "normalized": False}
                    for i, t in enumerate(declared)})
    config = {"chat_template": (TEMPLATES / template).read_text(), "added_tokens_decoder": decoder,
              "tokenizer_class": "PreTrainedTokenizerFast",
              **named}
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return directory


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {name: _family_dir(root, name) for name in FAMILIES}


def _text(tok, ids) -> str:
    return tok._tok.decode([int(i) for i in ids], skip_special_tokens=False)


def _trained(tok, tokens, mask) -> list[str]:
    """The text of each run of trained tokens."""
    edges = np.diff(np.concatenate([[0], mask, [0]]))
    return [_text(tok, tokens[a:b])
            for a, b in zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1))]


EXPECTED_TURNS = {   # what each family trains of CHAT's two answers, end-of-turn included
    "llama3.2": ["4<|eot_id|>", "6 of course<|eot_id|>"],
    "qwen2.5": ["4<|im_end|>", "6 of course<|im_end|>"],
    # Qwen3 renders the last turn with an (empty) thinking block, earlier ones without.
    "qwen3": ["4<|im_end|>", "<think>\n\n</think>\n\n6 of course<|im_end|>"],
    "mistral": [" 4</s>", " 6 of course</s>"],
}


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_each_familys_template_masks_its_assistant_turns(family_dirs, name):
    transformers = pytest.importorskip("transformers")
    tok = HFTokenizer(family_dirs[name])          # the directory, as a model directory is given
    template = resolve_chat_template(tok, "auto")
    assert template.source == (TEMPLATES / FAMILIES[name][0]).read_text()
    chat = CHAT[1:] if name == "mistral" else CHAT   # Mistral's system prompt: see below
    tokens, mask = encode_chat(chat, template, tok, "chat")
    # The tokens are transformers' own rendering and tokenization of the conversation.
    hf = transformers.PreTrainedTokenizerFast.from_pretrained(str(family_dirs[name]))
    rendered = hf.apply_chat_template(chat, tokenize=True, return_dict=False)
    assert tokens[:len(rendered)].tolist() == list(rendered)
    assert _trained(tok, tokens, mask) == EXPECTED_TURNS[name]
    end_of_turn = tok._tok.token_to_id(FAMILIES[name][4])
    # The end-of-turn token ends answers (eval, DPO) and generation (GRPO, samples).
    assert end_of_turn in stop_ids(tok) and end_of_turn in stop_ids(tok, template)
    prompt, answer = last_turn(chat, template, tok, "chat")
    assert _text(tok, answer) == EXPECTED_TURNS[name][1] and answer[-1] == end_of_turn
    assert prompt.tolist() == list(hf.apply_chat_template(chat[:-1], tokenize=True,
                                                          add_generation_prompt=True,
                                                          return_dict=False))
    # Special tokens are never split, wherever they appear in text.
    for special in FAMILIES[name][1] + FAMILIES[name][3]:
        ids = tok.encode(f"a{special}b").tolist()
        assert tok._tok.token_to_id(special) in ids and len(ids) == 3, special


def test_qwen3_trains_reasoning_as_the_whole_conversation_renders_it(family_dirs):
    """Qwen3's template drops the reasoning of turns before the last user message: rendered
    alone, an earlier turn keeps its <think> block, in the whole conversation it has none. The
    mask marks what the trained sequence holds: that turn's answer without its reasoning,
    the last turn with it."""
    tok = HFTokenizer(family_dirs["qwen3"])
    template = resolve_chat_template(tok, "auto")
    chat = [{"role": "user", "content": "What is 2+2?"},
            {"role": "assistant", "content": "<think>\nadd two\n</think>\n\n4"},
            {"role": "user", "content": "And 3+3?"},
            {"role": "assistant", "content": "6 of course", "reasoning_content": "add three"}]
    tokens, mask = encode_chat(chat, template, tok, "chat")
    assert _trained(tok, tokens, mask) == [
        "4<|im_end|>", "<think>\nadd three\n</think>\n\n6 of course<|im_end|>"]
    assert "add two" not in _text(tok, tokens)
    think = tok._tok.token_to_id("<think>")      # declared in tokenizer_config.json only
    assert think is not None and tokens.tolist().count(think) == 1
    # The same record through SFT, and its last turn as a DPO pair and a GRPO prompt.
    sft = SFTDataset([{"messages": chat}], tok, 128, template=template)
    row = sft[0]
    assert _text(tok, row["labels"][row["loss_mask"] > 0].tolist()) == \
        "4<|im_end|><think>\nadd three\n</think>\n\n6 of course<|im_end|>"
    pairs = PreferenceDataset([{"messages": chat[:3], "chosen": "6", "rejected": "7"}], tok, 96,
                              template=template)
    item = pairs[0]
    assert _text(tok, item.chosen.labels[item.chosen.loss_mask > 0].tolist()) == \
        "<think>\n\n</think>\n\n6<|im_end|>"
    prompts = PromptDataset([{"messages": chat[:3]}], tok, 96, template=template)
    assert prompts.texts[0].endswith("<|im_start|>assistant\n")


def test_an_exported_tokenizer_keeps_the_models_template_and_tokens(family_dirs, tmp_path):
    transformers = pytest.importorskip("transformers")
    tok = HFTokenizer(family_dirs["qwen3"])
    tok.save_pretrained(tmp_path / "hf")          # what export-hf writes next to the weights
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert hf.eos_token == "<|im_end|>" and hf.pad_token == "<|endoftext|>"
    assert hf.chat_template == resolve_chat_template(tok, "auto").source
    tokens, _ = encode_chat(CHAT, resolve_chat_template(tok, "auto"), tok, "chat")
    assert list(hf.apply_chat_template(CHAT, return_dict=False)) == tokens[:-1].tolist()


def test_a_template_whose_prompt_side_is_not_monotone_falls_back_in_one_line(family_dirs,
                                                                            caplog):
    """Mistral v0.3 puts the system prompt into the last user message only: rendered with the
    generation prompt, the conversation before an answer holds it, rendered with the answer it
    does not. Each answer is then found where its content is rendered in the whole
    conversation, said in one warning line; with no end-of-turn token to end a turn by, the
    record is refused in one line (tests/test_data_sft.py)."""
    tok = HFTokenizer(family_dirs["mistral"])
    template = resolve_chat_template(tok, "auto")
    with caplog.at_level("WARNING"):
        for chat in (CHAT, CHAT[:3], CHAT):
            tokens, mask = encode_chat(chat, template, tok, "chat")
            assert _trained(tok, tokens, mask) == EXPECTED_TURNS["mistral"][:len(chat) // 2]
    # (The template renders the system prompt only when a user message is last: a
    # conversation ending with an answer is trained without it, as Mistral's template says.)
    assert "Be brief" not in _text(tok, tokens)
    warnings = [r.getMessage() for r in caplog.records if "not monotone" in r.getMessage()]
    assert len(warnings) == 1 and "\n" not in warnings[0]
    # An answer that repeats its content later is still found at its own turn.
    echo = [dict(m) for m in CHAT]
    echo[3]["content"] = "4"
    tokens, mask = encode_chat(echo, template, tok, "chat")
    assert _trained(tok, tokens, mask) == EXPECTED_TURNS["mistral"]


def test_a_profile_points_sft_dpo_and_grpo_at_a_model_directory(family_dirs, tmp_path):
    from apt.core.config import load_profile
    from apt.trainops.data.build import build_datasets
    records = {"sft": {"messages": CHAT},
               "preference": {"messages": CHAT[:4], "chosen": "6", "rejected": "7"},
               "prompts": {"messages": CHAT[:4], "answer": "6"}}
    for corpus, record in records.items():
        path = tmp_path / f"{corpus}.jsonl"
        path.write_text((json.dumps(record) + "\n") * 4)
        profile = {"sft": "sft-tiny", "preference": "dpo-tiny", "prompts": "grpo-tiny"}[corpus]
        cfg = load_profile(profile, [f"data.corpus={corpus}", f"data.path={path}",
                                     "data.tokenizer=hf",
                                     f"data.tokenizer_path={family_dirs['llama3.2']}"])
        train, _, tok = build_datasets(cfg.data)
        if corpus == "sft":
            row = train[0]
            assert _text(tok, row["labels"][row["loss_mask"] > 0].tolist()) == \
                "4<|eot_id|>6 of course<|eot_id|>"
        elif corpus == "preference":
            chosen = train[0].chosen
            assert _text(tok, chosen.labels[chosen.loss_mask > 0].tolist()) == "6<|eot_id|>"
        else:
            assert train.texts[0].endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_generation_stops_at_the_end_of_turn_token(family_dirs):
    from apt.core.config import load_profile
    from apt.trainops.rl.rollouts import sampling_params
    tok = HFTokenizer(family_dirs["llama3.2"])
    grpo = load_profile("tiny", []).training.grpo
    params = sampling_params(grpo, tok, 128)
    assert tok._tok.token_to_id("<|eot_id|>") in params.stop_ids
    assert params.eod_id == tok._tok.token_to_id("<|end_of_text|>")


# ---------------------------------------------------------------- untrusted tokenizer files
def _one_line(exc_info, *parts):
    message = str(exc_info.value)
    assert "\n" not in message, message
    for part in parts:
        assert part in message, (part, message)


def test_a_saved_tokenizer_cannot_name_a_file_outside_its_directory(family_dirs, tmp_path):
    tok = HFTokenizer(family_dirs["qwen2.5"])
    saved = tmp_path / "run" / "tokenizer"
    tok.save(saved)
    assert load_tokenizer(saved).vocab_size == tok.vocab_size
    config = json.loads((saved / "apt_tokenizer.json").read_text())
    for outside in (str(family_dirs["qwen2.5"] / "tokenizer.json"),
                    "../../" + "/".join(family_dirs["qwen2.5"].parts[-2:]) + "/tokenizer.json"):
        (saved / "apt_tokenizer.json").write_text(json.dumps({**config, "file": outside}))
        with pytest.raises(DataError) as err:
            load_tokenizer(saved)
        _one_line(err, "apt_tokenizer.json", "file", "outside the tokenizer's directory")


@pytest.mark.parametrize("config, key", [
    ("{not json", "invalid JSON"),
    ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
    ('["a list"]', "must hold a JSON object"),
    ('{"eos_token": 5}', "eos_token"),
    ('{"eos_token": {"lstrip": false}}', "eos_token"),
    ('{"chat_template": 5}', "chat_template"),
    ('{"chat_template": [{"name": "tool_use", "template": "x"}]}', "chat_template"),
    ('{"chat_template": [7]}', "chat_template"),
    ('{"additional_special_tokens": "<x>"}', "additional_special_tokens"),
    ('{"added_tokens_decoder": [1]}', "added_tokens_decoder"),
    ('{"added_tokens_decoder": {"x": {"content": "<x>"}}}', "added_tokens_decoder.x"),
    ('{"added_tokens_decoder": {"3": {"content": 4}}}', "added_tokens_decoder.3"),
    ('{"added_tokens_decoder": {"3": {"content": "<|im_end|>"}}}', "added_tokens_decoder.3"),
    ('{"eos_token": "<|nowhere|>"}', "eos_token"),
])
def test_malformed_tokenizer_configs_are_one_line_naming_file_and_key(family_dirs, tmp_path,
                                                                      config, key):
    directory = tmp_path / "tok"
    directory.mkdir()
    (directory / "tokenizer.json").write_bytes(
        (family_dirs["qwen2.5"] / "tokenizer.json").read_bytes())
    (directory / "tokenizer_config.json").write_text(config)
    with pytest.raises(DataError) as err:
        HFTokenizer(directory)
    _one_line(err, "tokenizer_config.json", key)


@pytest.mark.parametrize("source", [
    "{{ 'x' * 400000000 }}",                                    # one huge value
    "{{ '%400000000s' % 'x' }}{{ 'x'|center(400000000) }}",     # a width
    "{% set ns = namespace(s='x') %}{% for i in range(24) %}{% set ns.s = ns.s ~ ns.s %}"
    "{% endfor %}{{ ns.s|length }}",                            # doubling in a loop
    "{% for i in range(100000) %}{% for j in range(100000) %}" + "x" * 1000 +
    "{% endfor %}{% endfor %}",                                 # streaming without end
])
def test_a_chat_templates_output_is_bounded(source):
    import tracemalloc
    from apt.trainops.data import ByteTokenizer
    tracemalloc.start()
    try:
        with pytest.raises(DataError) as err:   # (jinja2 folds constants as it compiles)
            encode_chat(CHAT, ChatTemplate(source, "huge.jinja"), ByteTokenizer(),
                        "chat: record 3")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    _one_line(err, "chat: record 3", "huge.jinja", "renders more than 8,388,608 characters")
    assert peak < 100 << 20, peak      # refused before building it (a char takes >= 1 byte)


def test_a_chat_template_runs_sandboxed():
    from apt.trainops.data import ByteTokenizer
    escape = ChatTemplate("{{ ''.__class__.__mro__[1].__subclasses__() }}", "escape.jinja")
    with pytest.raises(DataError) as err:
        encode_chat(CHAT, escape, ByteTokenizer(), "chat")
    _one_line(err, "escape.jinja", "failed")
    recursion = ChatTemplate("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", "loop.jinja")
    with pytest.raises(DataError) as err:
        encode_chat(CHAT, recursion, ByteTokenizer(), "chat")
    _one_line(err, "loop.jinja", "recurses too deeply")


@pytest.mark.parametrize("name", ["qwen2.5", "llama3.2"])
def test_exported_model_generates_until_the_end_of_turn(family_dirs, name, tmp_path):
    """export_hf with a chat tokenizer: config.json and generation_config.json list the chat
    template's end-of-turn token among the eos ids (not only the end-of-document token), so
    transformers' generate() stops at <|im_end|> / <|eot_id|> like APT's sampler."""
    transformers = pytest.importorskip("transformers")
    import torch
    from apt.core.config import ModelConfig
    from apt.model.architectures import APTModel
    from apt.trainops.interop import export_hf
    tok = HFTokenizer(family_dirs[name])
    end_of_turn = tok._tok.token_to_id(FAMILIES[name][4])
    torch.manual_seed(0)
    cfg = ModelConfig(hidden_size=32, num_layers=1, num_attention_heads=2, num_query_groups=1,
                      ffn_hidden_size=64, vocab_size=512, max_seq_len=32)
    out = export_hf(APTModel(cfg), cfg, tmp_path / "hf", tokenizer=tok)
    config = json.loads((out / "config.json").read_text())
    generation = json.loads((out / "generation_config.json").read_text())
    assert config["eos_token_id"] == generation["eos_token_id"] == list(stop_ids(tok))
    assert end_of_turn in config["eos_token_id"] and tok.eod_id in config["eos_token_id"]

    model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    prompt = torch.tensor([tok.encode("What is 2+2?").tolist()])
    forced = prompt.shape[1] + 2
    everything = [i for i in range(cfg.vocab_size) if i not in config["eos_token_id"]]

    def allowed(batch, ids):   # the end-of-turn token as the 3rd new token, no eos before
        return [end_of_turn] if ids.shape[0] == forced else everything
    with torch.no_grad():
        stopped = model.generate(prompt, max_new_tokens=8, do_sample=False,
                                 prefix_allowed_tokens_fn=allowed)
    assert stopped.shape[1] == forced + 1 and stopped[0, -1].item() == end_of_turn
