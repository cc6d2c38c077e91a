"""Datasets for a profile's ``data:`` section: ``build_datasets(cfg.data)``.

Everything that can be wrong with the data (missing or corrupt files, an empty split, token ids
the vocabulary does not have, bad blend weights) is a ``DataError`` raised here, before the
first training step."""
from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from apt.core.config import DataConfig
from .errors import DataError
from .tokenizers.chat_template import resolve_chat_template
from .tokenizers.tokenizer import (build_tokenizer, describe_identity, saved_identity,
                                   tokenizer_identity)
from .sources.cache import cache_key, cached_json, file_fingerprint
from .sources.corpus import is_validation, stdlib_documents, text_documents
from .sources.indexed import IndexedReader, prefix_of
from .sources.jsonl import read_located_jsonl
from .sources.synthetic_chat import PREFIX, materialise
from .datasets.augment import build_transforms
from .datasets.blend import BlendedDataset, normalise_weights
from .datasets.preference import PreferenceDataset, pairs_as_chats
from .datasets.prompts import PromptDataset
from .datasets.sft import SFTDataset
from .datasets.tokens import TokenDataset

SPLITS = ("train", "validation", "test")
log = logging.getLogger(__name__)


def build_datasets(data: DataConfig, model_vocab_size: int | None = None, seed: int = 0,
                   with_test: bool = False, max_prompt_length: int | None = None,
                   required_fields=()):
    """Return (train, validation, tokenizer) (and test when ``with_test``). Prompts (RL) keep
    at most ``max_prompt_length`` tokens (default ``data.max_prompt_length``, else half of
    ``data.seq_length``) and must hold the ``required_fields`` their rewards read."""
    tokenizer = build_tokenizer(data.tokenizer, data.tokenizer_path)
    if model_vocab_size is not None and tokenizer.vocab_size > model_vocab_size:
        raise DataError(data.tokenizer_path or data.tokenizer,
                        f"tokenizer has {tokenizer.vocab_size} tokens but model.vocab_size is "
                        f"{model_vocab_size}", key="model.vocab_size")
    options = dict(eod_id=tokenizer.eod_id, reset_position_ids=data.reset_position_ids,
                   reset_attention_mask=data.reset_attention_mask)
    if data.corpus == "indexed":
        splits = _indexed_splits(data, tokenizer, options, seed)
    elif data.corpus == "sft":
        splits = _sft_splits(data, tokenizer)
    elif data.corpus == "preference":
        splits = _preference_splits(data, tokenizer)
    elif data.corpus == "prompts":
        splits = _prompt_splits(data, tokenizer,
                                max_prompt_length or data.max_prompt_length
                                or data.seq_length // 2, required_fields)
    else:
        splits = _document_splits(data, tokenizer, options, seed)
    train, val, test = splits
    return (train, val, test, tokenizer) if with_test else (train, val, tokenizer)


def _document_splits(data, tokenizer, options, seed):
    if data.corpus == "stdlib":
        documents = stdlib_documents(data.max_corpus_bytes)
    else:
        documents = text_documents(data.path, data.max_corpus_bytes)
    train_docs = [d for d in documents if not is_validation(d[0], data.val_fraction)]
    val_docs = [d for d in documents if is_validation(d[0], data.val_fraction)]
    if not val_docs:  # a tiny corpus: hold out its last document
        train_docs, val_docs = train_docs[:-1], train_docs[-1:]
    transforms = build_transforms(data.augment, tokenizer, seed, data.span_corruption_rate)
    train = TokenDataset.from_documents(train_docs, tokenizer, data.seq_length, "train",
                                        transforms=transforms, **options)
    val = TokenDataset.from_documents(val_docs, tokenizer, data.seq_length, "validation",
                                      **options)
    return train, val, None


def split_fractions(split: str) -> np.ndarray:
    """``"98,2,0"`` -> fractions of documents for train, validation, test."""
    try:
        parts = [float(p) for p in split.replace("/", ",").split(",")]
    except ValueError:
        raise DataError(None, f"{split!r} is not comma-separated numbers (e.g. 98,2,0)",
                        key="data.split") from None
    parts += [0.0] * (3 - len(parts))
    if len(parts) != 3 or min(parts) < 0 or sum(parts) <= 0 or parts[0] <= 0:
        raise DataError(None, f"{split!r}: need up to 3 non-negative numbers with a positive "
                              f"train share", key="data.split")
    return np.asarray(parts) / sum(parts)


def _indexed_splits(data, tokenizer, options, seed):
    entries = data.blend or [[1.0, data.path]]
    paths = [str(path) for _, path in entries]
    for weight, path in entries:
        if not isinstance(weight, (int, float)) or weight < 0:
            raise DataError(path, f"blend weight {weight!r} is negative or not a number",
                            key="data.blend")
    weights = normalise_weights([w for w, _ in entries])
    fractions = split_fractions(data.split)
    check_same_tokenizer(paths, tokenizer)
    cache_dir = data.cache_dir or str(Path(paths[0]).resolve().parent / ".apt_cache")
    per_split: list[list] = [[], [], []]
    for path in paths:
        reader = IndexedReader(path)
        check_token_range(reader, tokenizer, cache_dir)
        bounds = np.round(np.cumsum(np.concatenate([[0], fractions])) * reader.num_documents)
        bounds = bounds.astype(np.int64)
        for s in range(3):
            first, last = reader.document_offsets[bounds[s]], reader.document_offsets[bounds[s + 1]]
            if fractions[s] == 0:
                per_split[s].append(None)
                continue
            if last - first < data.seq_length + 1:
                raise DataError(reader.bin_path, f"the {SPLITS[s]} split ({fractions[s]:.1%} of "
                                                 f"{reader.num_documents} documents) has "
                                                 f"{last - first} tokens, fewer than one sample "
                                                 f"of {data.seq_length + 1}",
                                key="data.split" if s else None)
            transforms = (build_transforms(data.augment, tokenizer, seed,
                                           data.span_corruption_rate) if s == 0 else ())
            ds = TokenDataset(reader.tokens[first:last], data.seq_length,
                              f"{reader.bin_path}[{SPLITS[s]}]", transforms=transforms, **options)
            ds.fingerprint = [file_fingerprint(reader.bin_path), int(first), int(last)]
            per_split[s].append(ds)
    out = []
    for s, datasets in enumerate(per_split):
        if datasets[0] is None:
            out.append(None)
        elif len(datasets) == 1:
            out.append(datasets[0])
        else:
            out.append(BlendedDataset(datasets, weights, cache_dir, f"blend-{SPLITS[s]}"))
    return out


def check_same_tokenizer(paths: list[str], tokenizer) -> None:
    """Token ids mean something only under the tokenizer that made them: every file of a blend
    must come from one tokenizer, the profile's. ``trainops preprocess`` saves it next to the data
    (``<prefix>.tokenizer/``); files without one (Megatron-LM's, older ones) are trusted with a
    warning."""
    configured = tokenizer_identity(tokenizer)
    first = None   # (path, identity) of the first file that records one
    for path in paths:
        prefix = prefix_of(path)
        identity = saved_identity(prefix + ".tokenizer")
        if identity is None:
            log.warning("%s records no tokenizer (no %s.tokenizer/): cannot check that it was "
                        "made with %s", prefix, prefix, describe_identity(configured))
            continue
        if first is not None and identity != first[1]:
            raise DataError(prefix, f"preprocessed with {describe_identity(identity)} but "
                                    f"{first[0]} with {describe_identity(first[1])}: one blend "
                                    f"needs one tokenizer", key="data.blend")
        if identity != configured:
            raise DataError(prefix, f"preprocessed with {describe_identity(identity)} but the "
                                    f"profile's is {describe_identity(configured)}",
                            key="data.tokenizer")
        first = first or (prefix, identity)


def check_token_range(reader: IndexedReader, tokenizer, cache_dir: str) -> None:
    """Every token id must be inside the tokenizer's vocabulary. The scan of the ``.bin`` is
    done once per file version and cached."""
    def scan():
        return {"min": int(reader.tokens.min()), "max": int(reader.tokens.max())}
    key = cache_key("range", file_fingerprint(reader.bin_path))
    stats = cached_json(cache_dir, f"{Path(reader.prefix).name}-range-{key}", scan)
    if stats["min"] < 0 or stats["max"] >= tokenizer.vocab_size:
        bad = stats["max"] if stats["max"] >= tokenizer.vocab_size else stats["min"]
        raise DataError(reader.bin_path, f"token id {bad} is outside the vocabulary "
                                         f"[0, {tokenizer.vocab_size}) of the {tokenizer.name} "
                                         f"tokenizer (preprocessed with another tokenizer?)")


def sft_records(data: DataConfig) -> tuple[list[dict], list[dict], str]:
    """(train, validation, name) chat records of ``data.path``: a JSONL file whose held-out
    records are ``data.val_path``'s when given, else those picked by a stable hash of the
    record's position in the file (its index among the records, from 0; ``data.val_fraction``),
    or a built-in ``synthetic:`` set with its own held-out file. The chat scorer reads the same
    validation records."""
    train, val, name = _jsonl_splits(data, "sft")
    return [r for _, r in train], [r for _, r in val], name


def heldout_chats(data: DataConfig) -> list[dict]:
    """The validation records as chats for the chat scorer: SFT's own, or each preference
    pair's prompt answered by its chosen answer."""
    if data.corpus != "preference":
        return sft_records(data)[1]
    _, val, _ = preference_records(data)
    return pairs_as_chats([r for _, r in val], [where for where, _ in val])


def preference_records(data: DataConfig) -> tuple[list, list, str]:
    """(train, validation, name) of ``data.path``'s preference pairs, each a (``file:line``,
    record), split as ``sft_records`` splits chats."""
    return _jsonl_splits(data, "preference")


def prompt_records(data: DataConfig) -> tuple[list, list, str]:
    """(train, validation, name) of ``data.path``'s prompts, each a (``file:line``, record),
    split as ``sft_records`` splits chats."""
    return _jsonl_splits(data, "prompts")


def _jsonl_splits(data: DataConfig, corpus: str):
    if data.path.startswith(PREFIX):
        train_path, heldout_path = materialise(data.path, data.cache_dir, corpus)
        return read_located_jsonl(train_path), read_located_jsonl(heldout_path), data.path
    records = read_located_jsonl(data.path)
    if data.val_path:
        return records, read_located_jsonl(data.val_path), os.path.basename(data.path)
    train = [r for i, r in enumerate(records) if not is_validation(str(i), data.val_fraction)]
    val = [r for i, r in enumerate(records) if is_validation(str(i), data.val_fraction)]
    if not val:
        train, val = train[:-1], train[-1:]
    if not train:
        raise DataError(data.path, "too few records for a train and a validation split")
    return train, val, os.path.basename(data.path)


def _sft_splits(data, tokenizer):
    train, val, name = sft_records(data)
    template = resolve_chat_template(tokenizer, data.chat_template)
    return tuple(SFTDataset(records, tokenizer, data.seq_length, packing=data.packing,
                            name=f"{name}[{split}]", template=template)
                 for records, split in ((train, "train"), (val, "validation"))) + (None,)


def _preference_splits(data, tokenizer):
    train, val, name = preference_records(data)
    template = resolve_chat_template(tokenizer, data.chat_template)
    return tuple(PreferenceDataset([r for _, r in located], tokenizer, data.seq_length,
                                   name=f"{name}[{split}]", template=template,
                                   max_prompt_length=data.max_prompt_length,
                                   locations=[where for where, _ in located])
                 for located, split in ((train, "train"), (val, "validation"))) + (None,)


def _prompt_splits(data, tokenizer, max_prompt_length, required_fields):
    train, val, name = prompt_records(data)
    template = resolve_chat_template(tokenizer, data.chat_template)
    return tuple(PromptDataset([r for _, r in located], tokenizer, max_prompt_length,
                               name=f"{name}[{split}]", template=template,
                               locations=[where for where, _ in located],
                               required_fields=required_fields)
                 for located, split in ((train, "train"), (val, "validation"))) + (None,)
