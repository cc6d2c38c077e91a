"""Data: offline corpora, tokenizers, token datasets, the global resumable sampler, loaders."""
from .corpus import is_validation, stdlib_documents, text_documents
from .datasets import TokenDataset, nats_to_bits
from .loader import APTDataLoader, create_dataloader
from .sampler import GlobalBatchSampler
from .tokenizer import ByteTokenizer, build_tokenizer, load_tokenizer

__all__ = ["APTDataLoader", "ByteTokenizer", "GlobalBatchSampler", "TokenDataset",
           "build_tokenizer", "create_dataloader", "load_tokenizer", "is_validation", "nats_to_bits",
           "stdlib_documents", "text_documents"]
