"""The special tokens of APT's own tokenizers (the byte tokenizer, a BPE trained here): the text
that tokenizer.py gives ids 256/257 (byte) or trains in (BPE), and that hf_tokenizer.py writes
into the ``tokenizer.json`` a Hugging Face ``transformers`` loads. One home, below both."""
EOD_TOKEN, PAD_TOKEN = "<|endoftext|>", "<|pad|>"
