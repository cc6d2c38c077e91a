"""Datasets for a profile's ``data:`` section."""
from __future__ import annotations

from apt.core.config import DataConfig
from .corpus import is_validation, stdlib_documents, text_documents
from .datasets import TokenDataset
from .tokenizer import build_tokenizer


def build_datasets(data: DataConfig):
    """Return (train, validation, tokenizer), split by a stable hash of each document's name."""
    tokenizer = build_tokenizer(data.tokenizer)
    if data.corpus == "stdlib":
        documents = stdlib_documents(data.max_corpus_bytes)
    else:
        documents = text_documents(data.path, data.max_corpus_bytes)
    train_docs = [d for d in documents if not is_validation(d[0], data.val_fraction)]
    val_docs = [d for d in documents if is_validation(d[0], data.val_fraction)]
    if not val_docs:  # a tiny corpus: hold out its last document
        train_docs, val_docs = train_docs[:-1], train_docs[-1:]
    train = TokenDataset.from_documents(train_docs, tokenizer, data.seq_length, "train")
    val = TokenDataset.from_documents(val_docs, tokenizer, data.seq_length, "validation")
    return train, val, tokenizer
