"""NEFTune (Jain et al. 2023, "NEFTune: Noisy Embeddings Improve Instruction Finetuning"):
uniform noise in [-1, 1] scaled by alpha / sqrt(L * d) added to the token embeddings while
training, L the sequence length and d the hidden size. Evaluation and generation see clean
embeddings.

A forward hook on Megatron's embedding module (``model.embedding``, present on the first
pipeline stage only) adds it. Megatron's embedding output is [s, b, h]; under sequence parallel
(and context parallel) each rank holds a slice of s, so L counts the whole sequence. The noise
comes from a generator seeded from (seed, step, data-parallel rank, sequence slice): the same
step draws the same noise again (resume, reruns), tensor-parallel ranks holding the same
activations draw the same noise, and different data draw different noise.
"""
from __future__ import annotations

import hashlib
import math

import torch


class NEFTune:
    """``NEFTune(alpha, seed).attach(model_chunks)``; call ``set_step(step)`` before each
    optimizer step and ``remove()`` to take the hooks off."""

    def __init__(self, alpha: float, seed: int = 0):
        if alpha < 0:
            raise ValueError(f"NEFTune alpha must be >= 0, got {alpha}")
        self.alpha, self.seed = float(alpha), int(seed)
        self.generator: torch.Generator | None = None
        self._handles = []
        self._step = 0

    def attach(self, modules) -> "NEFTune":
        found = [e for e in (_embedding_of(m) for m in modules) if e is not None]
        for embedding in found:
            self._handles.append(embedding.register_forward_hook(self._hook))
        return self

    @property
    def attached(self) -> int:
        """How many embedding modules carry the hook (0 on later pipeline stages)."""
        return len(self._handles)

    def set_step(self, step: int) -> None:
        self._step = int(step)
        self.generator = None  # reseeded on the next forward, on the output's device

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _hook(self, module, inputs, output):
        if not module.training or self.alpha == 0:
            return None
        seq_slices, slice_index = _sequence_slices(module)
        length = output.shape[0] * seq_slices   # [s, b, h]: the whole sequence's length
        scale = self.alpha / math.sqrt(length * output.shape[-1])
        if self.generator is None or self.generator.device != output.device:
            self.generator = torch.Generator(device=output.device)
            self.generator.manual_seed(_mix(self.seed, self._step, _data_parallel_rank(),
                                            slice_index))
        noise = torch.rand(output.shape, generator=self.generator, device=output.device,
                           dtype=torch.float32)
        return output + ((noise * 2 - 1) * scale).to(output.dtype)


def attach_neftune(modules, alpha: float, seed: int = 0) -> NEFTune | None:
    """Hooks on the embedding of every model chunk that has one; None when ``alpha`` is 0."""
    if not alpha:
        return None
    return NEFTune(alpha, seed).attach(modules)


def _embedding_of(module):
    while module is not None and not hasattr(module, "embedding"):
        module = getattr(module, "module", None)   # DDP / DeepSpeed / Float16 wrappers
    return getattr(module, "embedding", None)


def _sequence_slices(module) -> tuple[int, int]:
    """(how many ranks split the sequence, which slice this rank holds)."""
    from megatron.core import parallel_state
    if not parallel_state.model_parallel_is_initialized():
        return 1, 0
    slices, index = 1, 0
    if module.config.sequence_parallel:
        tp = parallel_state.get_tensor_model_parallel_world_size()
        slices, index = tp, parallel_state.get_tensor_model_parallel_rank()
    cp = parallel_state.get_context_parallel_world_size()
    return slices * cp, parallel_state.get_context_parallel_rank() * slices + index


def _data_parallel_rank() -> int:
    from megatron.core import parallel_state
    if not parallel_state.model_parallel_is_initialized():
        return 0
    return parallel_state.get_data_parallel_rank()


def _mix(*values: int) -> int:
    digest = hashlib.sha256(",".join(map(str, values)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)
