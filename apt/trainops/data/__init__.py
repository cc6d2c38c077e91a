"""Data, grouped by what it does, bottom-up (each folder imports only the ones above it here):

- ``tokenizers/``: text <-> token ids (byte, Hugging Face, SentencePiece, a BPE trained here),
  a tokenizer directory's files read as untrusted data, chat templates;
- ``sources/``: where token streams come from: text corpora, Megatron indexed ``.bin/.idx``
  files (and ``trainops preprocess``, which writes them), JSONL records, the synthetic sets, the
  on-disk cache of what was tokenized once;
- ``datasets/``: what a training step reads: the typed batches, pretraining token windows,
  SFT / preference / prompt records, blends, augmentations;
- ``loading/``: the global resumable sampler and the data loader;
- ``build.py``: the train / held-out datasets and tokenizer a profile's ``data:`` names.

``errors.py`` (``DataError``) is shared by all of them."""
from .errors import DataError
from .tokenizers.tokenizer import (ByteTokenizer, HFTokenizer, SentencePieceTokenizer,
                                   build_tokenizer, load_tokenizer, train_bpe)
from .sources.corpus import is_validation, stdlib_documents, text_documents
from .sources.indexed import IndexedReader, IndexedWriter
from .datasets.augment import DocumentShuffle, SpanCorruption
from .datasets.batches import LMBatch, PreferenceBatch
from .datasets.blend import BlendedDataset
from .datasets.preference import PreferenceDataset
from .datasets.sft import SFTDataset
from .datasets.tokens import TokenDataset, nats_to_bits
from .loading.loader import APTDataLoader, create_dataloader
from .loading.sampler import FeistelPermutation, GlobalBatchSampler

__all__ = ["APTDataLoader", "BlendedDataset", "ByteTokenizer", "DataError", "DocumentShuffle",
           "FeistelPermutation", "GlobalBatchSampler", "HFTokenizer", "IndexedReader",
           "IndexedWriter", "LMBatch", "PreferenceBatch", "PreferenceDataset", "SFTDataset",
           "SentencePieceTokenizer",
           "SpanCorruption", "TokenDataset", "build_tokenizer", "create_dataloader",
           "is_validation", "load_tokenizer", "nats_to_bits", "stdlib_documents",
           "text_documents", "train_bpe"]
