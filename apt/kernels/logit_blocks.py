"""Block sizes of the fused output projection + cross-entropy (apt/kernels/linear_cross_entropy.py).

Plain arithmetic without torch, so the memory estimate (``trainops plan``) can size the
logits block without importing torch or Megatron-core (apt/kernels/__init__.py loads its kernels lazily).
"""
from __future__ import annotations

# Default block sizes. CUDA: 1024-row blocks keep the matmuls tensor-core bound (a 128k-vocab
# weight is not re-read for every few rows), 2^25 logits per block = 64 MiB in bf16 (the
# unfused path holds about 10 bytes per logit: bf16 logits, fp32 copy, fp32 gradient). CPU:
# 2^22 logits (16 MiB in fp32) in blocks of at least 256 rows, so the weight is read once per
# 256 tokens. Neither is tuned: on the shared 2-core machine block-size timings were within
# its noise; the GPU numbers come from kernels/linear_cross_entropy/check.py on a lent GPU.
_ROWS = {"cuda": 1024, "cpu": 256}
_BLOCK_LOGITS = {"cuda": 1 << 25, "cpu": 1 << 22}


def block_shape(tokens: int, vocab: int, device_type: str, chunk_tokens: int | None = None,
                chunk_vocab: int | None = None, whole_rows: bool = False) -> tuple[int, int]:
    """(rows, vocabulary columns) of one logits block: the defaults above, or what the caller
    gave. Full vocabulary rows when they fit the block budget (no per-slice overhead), more
    rows then; otherwise the vocabulary is sliced (multiples of 128 columns). ``whole_rows``
    (the one-pass walk): never sliced, and as many rows as a sliced block would have at least:
    fewer would re-read the weight every few tokens (on CPU, 2048 x 512 x 32k fp32: 64-row
    blocks took 2.15 s forward + backward, 131 rows 1.72 s, 256 rows 1.50 s; eager 1.72 s)."""
    rows_target = _ROWS.get(device_type, 256)
    budget = _BLOCK_LOGITS.get(device_type, 1 << 22)
    if whole_rows:
        rows = chunk_tokens or max(rows_target, budget // max(vocab, 1))
        return min(rows, max(tokens, 1)), vocab
    if chunk_tokens is None and chunk_vocab is None:
        if vocab * rows_target <= budget:
            rows, cols = max(rows_target, budget // vocab), vocab
        else:
            rows, cols = rows_target, max(128, budget // rows_target // 128 * 128)
    else:
        rows = chunk_tokens or max(1, budget // (chunk_vocab or vocab))
        cols = chunk_vocab or max(1, budget // rows)
    if rows < 1 or cols < 1:
        raise ValueError(f"linear_cross_entropy: chunk sizes must be positive, got "
                         f"chunk_tokens={chunk_tokens}, chunk_vocab={chunk_vocab}")
    return min(rows, max(tokens, 1)), min(cols, vocab)
