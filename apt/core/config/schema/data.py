"""The ``data:`` section (corpus, tokenizer, split, shuffling, packing, augmentations) and the
rules between its keys and against the model it feeds."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from .model import ModelConfig
from .rules import rule

BYTE_VOCAB = 258  # 256 bytes + end-of-document + padding (apt.trainops.data.tokenizers.tokenizer)
AUGMENTATIONS = ("doc_shuffle", "span_corruption")


@dataclass(frozen=True)
class DataConfig:
    # "stdlib": the Python standard library's own sources, present offline on every machine.
    # "text": every *.txt/*.py file under `path` (a file or a directory).
    # "indexed": Megatron .bin/.idx written by `trainops preprocess` (or Megatron-LM): `path` is the
    #   prefix, or `blend: [[0.7, prefix_a], [0.3, prefix_b]]` mixes several by weight.
    # "sft": chat/instruction JSONL at `path`, loss on the responses only; `path: synthetic:qa`
    #   is a built-in offline set of programmatic question/answer chats (synthetic_chat.py),
    #   `synthetic:arith` one of integer sums (synthetic_arith.py), `synthetic:roman` one of
    #   numbers to write in Roman numerals (synthetic_roman.py).
    # "preference": {prompt, chosen, rejected} JSONL at `path` (or messages + two answers), for
    #   preference alignment; `path: synthetic:arith` gives correct sums against near misses.
    # "prompts": prompts for reinforcement learning (training.objective grpo): JSONL records
    #   with `prompt` (or `messages`) and the fields its rewards check (e.g. `answer`); a chat
    #   whose last message is the assistant's becomes its prompt + `answer`
    #   (`synthetic:arith`: the sums as questions; `synthetic:roman`: the numbers).
    corpus: Literal["stdlib", "text", "indexed", "sft", "preference", "prompts"] = "stdlib"
    path: Optional[str] = None
    # sft, preference, prompts: a held-out JSONL file of one's own, used as the validation
    # split instead of holding out val_fraction of `path`'s records (all of `path` trains).
    val_path: Optional[str] = None
    blend: Optional[list] = None
    # "byte" needs no file; "hf" reads a tokenizer.json or a Hugging Face model directory (its
    # tokenizer_config.json: special tokens, chat template), "sentencepiece" a .model.
    tokenizer: Literal["byte", "hf", "sentencepiece"] = "byte"
    tokenizer_path: Optional[str] = None
    seq_length: int = rule(128, gt=0)
    # Fraction of documents held out for validation (chosen by a stable hash of the document).
    val_fraction: float = rule(0.02, gt=0, lt=1)
    # indexed: train,validation,test shares of each file's documents (contiguous ranges).
    split: str = "98,2,0"
    max_corpus_bytes: int = rule(8_000_000, gt=0)
    num_workers: int = rule(0, ge=0)
    shuffle: bool = True
    # Global sample order: "full" permutation per epoch, "feistel" (O(1) memory and resume at
    # any size), "auto" = full up to 4M samples.
    shuffle_method: Literal["auto", "full", "feistel"] = "auto"
    # Restart position ids / confine attention at each end-of-document token.
    reset_position_ids: bool = False
    reset_attention_mask: bool = False
    # sft: pack several records into one sample.
    packing: bool = False
    # preference: a pair longer than seq_length + 1 keeps at most this many of the prompt's last
    # tokens, then its answers are cut; None: half of seq_length + 1. A pair left with an empty
    # answer (a prompt kept longer than the row allows) is dropped and counted.
    # prompts: a longer prompt keeps its last max_prompt_length tokens (counted); None:
    # seq_length - training.grpo.max_new_tokens.
    max_prompt_length: Optional[int] = rule(None, gt=0)
    # sft: how records become text. auto: the tokenizer's own chat template when it has one
    # (chat_template.jinja or tokenizer_config.json next to tokenizer.json), else builtin
    # ("<|role|>\n{content}\n" per message).
    chat_template: Literal["auto", "builtin"] = "auto"
    # Opt-in augmentations of training samples: doc_shuffle, span_corruption.
    augment: list = rule([])
    span_corruption_rate: float = rule(0.15, gt=0, lt=1)
    # Where index files (blend order, token-range scans) are cached; default <data dir>/.apt_cache.
    cache_dir: Optional[str] = None


def data_fits_model(data: DataConfig, m: ModelConfig):
    """The samples fit the model: their length, and the byte tokenizer's ids in its vocabulary."""
    if data.seq_length > m.max_seq_len:
        yield "data.seq_length", (f"{data.seq_length} exceeds model.max_seq_len="
                                  f"{m.max_seq_len}")
    if data.tokenizer == "byte" and m.vocab_size < BYTE_VOCAB:
        yield "model.vocab_size", (f"{m.vocab_size} is smaller than the byte tokenizer's "
                                   f"{BYTE_VOCAB} tokens")


def data_checks(data: DataConfig):
    if data.corpus in ("text", "sft", "preference", "prompts") and not data.path:
        yield "data.path", f"required when data.corpus is '{data.corpus}'"
    if data.corpus == "indexed":
        if not data.path and not data.blend:
            yield "data.path", "data.corpus 'indexed' needs data.path (a .bin/.idx prefix) or data.blend"
        elif data.path and data.blend:
            yield "data.blend", "give data.path or data.blend, not both"
    if data.blend is not None:
        if data.corpus != "indexed":
            yield "data.blend", "only data.corpus 'indexed' can be blended"
        if not isinstance(data.blend, list) or not data.blend:
            yield "data.blend", "expected a list of [weight, path] pairs"
            return
        for i, entry in enumerate(data.blend):
            if (not isinstance(entry, (list, tuple)) or len(entry) != 2
                    or isinstance(entry[0], bool) or not isinstance(entry[0], (int, float))
                    or not isinstance(entry[1], str)):
                yield "data.blend", f"entry {i} is {entry!r}; expected [weight, path]"
            elif entry[0] < 0:
                yield "data.blend", f"weight {entry[0]} of {entry[1]} is negative"
        if all(isinstance(e, (list, tuple)) and len(e) == 2 and isinstance(e[0], (int, float))
               for e in data.blend) and sum(e[0] for e in data.blend) <= 0:
            yield "data.blend", "weights sum to zero"
    if data.tokenizer != "byte" and not data.tokenizer_path:
        yield "data.tokenizer_path", f"required for data.tokenizer '{data.tokenizer}'"
    parts = data.split.replace("/", ",").split(",")
    try:
        shares = [float(p) for p in parts]
        if len(shares) > 3 or min(shares) < 0 or shares[0] <= 0:
            raise ValueError
    except ValueError:
        yield "data.split", (f"{data.split!r}: expected up to 3 non-negative numbers, train "
                             f"first and positive (e.g. 98,2,0)")
    if not isinstance(data.augment, list) or any(a not in AUGMENTATIONS for a in data.augment):
        yield "data.augment", f"{data.augment!r}: expected a list of {', '.join(AUGMENTATIONS)}"
    if data.path and data.path.startswith("synthetic:") and data.corpus not in ("sft", "prompts",
                                                                                "preference"):
        yield "data.path", (f"{data.path!r} is a built-in set: needs data.corpus 'sft' or "
                            f"'preference'")
    if data.packing and data.corpus != "sft":
        yield "data.packing", ("packs SFT records: needs data.corpus 'sft' (preference pairs "
                               "are never packed: a row is one prompt and one answer)"
                               if data.corpus == "preference" else
                               "packs SFT records: needs data.corpus 'sft'")
    if data.val_path is not None:
        if data.corpus not in ("sft", "preference", "prompts"):
            yield "data.val_path", (f"names held-out JSONL records: needs data.corpus 'sft', "
                                    f"'preference' or 'prompts' (got {data.corpus!r})")
        elif data.path and data.path.startswith("synthetic:"):
            yield "data.val_path", (f"{data.path!r} brings its own held-out set: give "
                                    f"data.val_path with a file of your own in data.path")
    if data.max_prompt_length is not None and data.corpus not in ("preference", "prompts"):
        yield "data.max_prompt_length", ("truncates preference prompts: needs data.corpus "
                                         "'preference'")
