"""Text <-> token ids: tokenizer.py (byte, Hugging Face, SentencePiece, BPE training; save and
load), hf_tokenizer.py (the same ids as files ``transformers`` loads), tokenizer_files.py (a
tokenizer directory's JSON read as untrusted data), chat_template.py (chat rendering and the
assistant-token mask), special_tokens.py."""
