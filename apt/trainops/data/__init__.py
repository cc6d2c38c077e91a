"""Data: corpora, tokenizers, indexed (Megatron .bin/.idx) token datasets, blending, SFT and
preference data, augmentations, the global resumable sampler, loaders, preprocessing."""
from .batches import LMBatch, PreferenceBatch
from .augment import DocumentShuffle, SpanCorruption
from .blend import BlendedDataset
from .corpus import is_validation, stdlib_documents, text_documents
from .datasets import TokenDataset, nats_to_bits
from .errors import DataError
from .indexed import IndexedReader, IndexedWriter
from .loader import APTDataLoader, create_dataloader
from .sampler import FeistelPermutation, GlobalBatchSampler
from .preference import PreferenceDataset
from .sft import SFTDataset
from .tokenizer import (ByteTokenizer, HFTokenizer, SentencePieceTokenizer, build_tokenizer,
                        load_tokenizer, train_bpe)

__all__ = ["APTDataLoader", "BlendedDataset", "ByteTokenizer", "DataError", "DocumentShuffle",
           "FeistelPermutation", "GlobalBatchSampler", "HFTokenizer", "IndexedReader",
           "IndexedWriter", "LMBatch", "PreferenceBatch", "PreferenceDataset", "SFTDataset",
           "SentencePieceTokenizer",
           "SpanCorruption", "TokenDataset", "build_tokenizer", "create_dataloader",
           "is_validation", "load_tokenizer", "nats_to_bits", "stdlib_documents",
           "text_documents", "train_bpe"]
