"""Where token streams come from: corpus.py (text documents, the validation split),
indexed.py (Megatron ``.bin/.idx``), preprocess.py (``trainops preprocess``: corpus ->
``.bin/.idx``), jsonl.py (records read as untrusted data), synthetic_*.py (the built-in sets),
cache.py (index files built once and shared by the ranks)."""
