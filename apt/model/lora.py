"""LoRA on Megatron-core's tensor-parallel linears (megatron-core has none; PEFT does not know
ColumnParallelLinear / RowParallelLinear).

Each targeted linear W gets y = W x + (alpha / r) B A x with A (r x in) and B (out x r); W is
frozen, A starts Kaiming-uniform, B at zero (the model is unchanged at step 0). The adapter is a
sibling module of its base (``linear_qkv`` -> ``lora_qkv``) called from a forward hook on the
base, so the base's own parameters, state-dict keys and forward stay Megatron's.

Tensor parallelism (the adapter sees exactly the input the base sees):
- column-parallel base (qkv, fc1): A replicated, B sharded on its output dim like W. The
  rank-r activation u = A x is the same on every TP rank; its gradient (each rank holds only its
  B slice) is all-reduced over TP (``copy_to_tensor_model_parallel_region``). With sequence
  parallel the base's input is this rank's slice of the sequence: u is all-gathered over the
  sequence (the backward reduce-scatters), and A's gradient, partial per sequence slice, is
  all-reduced over TP by ``finalize_model_grads`` (A is marked ``sequence_parallel``).
- row-parallel base (proj, fc2): A sharded on its input dim like W, u = A x all-reduced over TP
  before B (replicated). With sequence parallel u is reduce-scattered over the sequence instead,
  and B's gradient, partial per slice, is all-reduced over TP (B marked ``sequence_parallel``).
TP-sharded adapter parameters carry Megatron's ``tensor_model_parallel`` attributes (DeepSpeed
and Megatron count them once per TP rank in the gradient norm); their ``sharded_state_dict``
gives global ShardedTensors (SwiGLU's fused gate/up B through Megatron's SwiGLU factory), so
dist_checkpointing reshards adapters like any weight. Initial A is drawn for the full matrix
from a generator seeded by (seed, global layer, target), then sliced: every layout starts from
the same adapters.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

TARGETS = {"linear_qkv": ("self_attention", "lora_qkv"),
           "linear_proj": ("self_attention", "lora_proj"),
           "linear_fc1": ("mlp", "lora_fc1"),
           "linear_fc2": ("mlp", "lora_fc2")}


class LoRAAdapter(torch.nn.Module):
    """The low-rank update of one (TP-sharded) Megatron linear: ``forward(x)`` is what the base's
    output gains."""

    def __init__(self, base: torch.nn.Module, *, rank: int, alpha: float, dropout: float,
                 generator: torch.Generator, swiglu: bool = False):
        super().__init__()
        from megatron.core.tensor_parallel import (ColumnParallelLinear, RowParallelLinear,
                                                   set_tensor_model_parallel_attributes)
        from megatron.core.utils import get_pg_rank, get_pg_size
        # Subclasses too: the layer spec's oneDNN ones (apt/kernels/linear.py) are these.
        if not isinstance(base, (ColumnParallelLinear, RowParallelLinear)):
            raise NotImplementedError(
                f"LoRA wraps Megatron's local ColumnParallelLinear/RowParallelLinear, not "
                f"{type(base).__name__} (Transformer Engine layers fuse the norm into the "
                f"linear, so an adapter would not see the base's input)")
        if getattr(base, "explicit_expert_comm", False) or getattr(base, "gather_output", False):
            raise NotImplementedError(f"LoRA does not support {type(base).__name__} with "
                                      f"expert communication or gathered output")
        self.column = isinstance(base, ColumnParallelLinear)
        self.tp_group = base.tp_group
        self.tp_size, tp_rank = get_pg_size(base.tp_group), get_pg_rank(base.tp_group)
        self.sequence_parallel = bool(base.sequence_parallel) and self.tp_size > 1
        self.swiglu = swiglu
        self.rank, self.scale = rank, alpha / rank
        self.dropout = torch.nn.Dropout(dropout) if dropout else torch.nn.Identity()
        dtype, device = base.weight.dtype, base.weight.device
        # Kaiming-uniform (a = sqrt(5)) on the full A, as torch's Linear and PEFT do.
        full_a = torch.empty(rank, base.input_size, dtype=torch.float32)
        bound = 1 / math.sqrt(base.input_size)
        full_a.uniform_(-bound, bound, generator=generator)
        if self.column:
            a = full_a
            b_shape = (base.output_size_per_partition, rank)
        else:
            part = base.input_size_per_partition
            a = full_a[:, tp_rank * part:(tp_rank + 1) * part]
            b_shape = (base.output_size, rank)
        self.A = torch.nn.Parameter(a.to(dtype=dtype, device=device).contiguous())
        self.B = torch.nn.Parameter(torch.zeros(b_shape, dtype=dtype, device=device))
        sharded, replicated = (self.B, self.A) if self.column else (self.A, self.B)
        set_tensor_model_parallel_attributes(sharded, True, 0 if self.column else 1, 1)
        # The replicated factor sees a slice of the sequence per TP rank under SP: its gradient
        # is partial and finalize_model_grads sums it over TP.
        setattr(replicated, "sequence_parallel", self.sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from megatron.core import tensor_parallel as tp
        u = F.linear(self._dropout(x), self.A)
        if self.column:
            if self.sequence_parallel:
                u = tp.gather_from_sequence_parallel_region(u, group=self.tp_group)
            elif self.tp_size > 1:
                u = tp.copy_to_tensor_model_parallel_region(u, group=self.tp_group)
        elif self.sequence_parallel:
            u = tp.reduce_scatter_to_sequence_parallel_region(u, group=self.tp_group)
        elif self.tp_size > 1:
            u = tp.reduce_from_tensor_model_parallel_region(u, group=self.tp_group)
        return F.linear(u, self.B) * self.scale

    def _dropout(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or isinstance(self.dropout, torch.nn.Identity):
            return x
        if self.tp_size > 1 and (not self.column or self.sequence_parallel):
            # This rank's slice of the features (row) or of the sequence (SP): its own mask,
            # from Megatron's per-TP-rank RNG stream.
            from megatron.core.tensor_parallel import get_cuda_rng_tracker
            with get_cuda_rng_tracker().fork():
                return self.dropout(x)
        # The same input on every TP rank: the same mask (default RNG, seeded alike over TP),
        # so the replicated A gets the same gradient everywhere.
        return self.dropout(x)

    def delta_weight(self) -> torch.Tensor:
        """This TP rank's part of scale * B @ A, laid out like the base's local weight."""
        return (self.B.float() @ self.A.float()) * self.scale

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (),
                           metadata: dict | None = None) -> dict:
        from megatron.core.transformer.mlp import apply_swiglu_sharded_factory
        from megatron.core.transformer.utils import (ensure_metadata_has_dp_cp_group,
                                                     make_sharded_tensors_for_checkpoint)
        metadata = ensure_metadata_has_dp_cp_group(metadata)
        state = {"A": self.A, "B": self.B}
        out = make_sharded_tensors_for_checkpoint(
            state, prefix, {"B": 0} if self.column else {"A": 1}, sharded_offsets,
            tp_group=self.tp_group, dp_cp_group=metadata["dp_cp_group"])
        if self.swiglu:   # this rank's B rows are [gate slice; up slice], as in fc1's weight
            out[f"{prefix}B"] = apply_swiglu_sharded_factory(
                out[f"{prefix}B"], sharded_offsets,
                metadata.get("singleton_local_shards", False))
        return out


def _adapter_hook(adapter: LoRAAdapter):
    def hook(module, args, output):
        out, bias = output
        return out + adapter(args[0]), bias
    return hook


def _layers(module: torch.nn.Module):
    decoder = getattr(module, "decoder", None)
    return list(decoder.layers) if decoder is not None else []


def _generator(seed: int, layer_number: int, target: str) -> torch.Generator:
    index = list(TARGETS).index(target)
    return torch.Generator().manual_seed((seed * 1_000_003 + layer_number * 16 + index) % 2**63)


def apply_lora(modules: list[torch.nn.Module], lora_cfg, seed: int = 0) -> int:
    """Freeze every parameter of ``modules`` (the model chunks) and add trainable adapters on
    ``lora_cfg.targets`` of every transformer layer. Returns the number of adapter parameters on
    this rank; does nothing (returns 0) when ``lora_cfg.rank`` is 0."""
    if not lora_cfg.rank:
        return 0
    for module in modules:
        if has_lora([module]):
            raise RuntimeError("apply_lora: the model already has LoRA adapters")
        for param in module.parameters():
            param.requires_grad_(False)
    count = 0
    for module in modules:
        config = module.config
        for layer in _layers(module):
            for target in lora_cfg.targets:
                parent_name, adapter_name = TARGETS[target]
                parent = getattr(layer, parent_name)
                base = getattr(parent, target, None)
                if base is None:
                    raise NotImplementedError(
                        f"lora.targets: layer {layer.layer_number} has no {parent_name}.{target}"
                        f" (MoE experts are not supported)")
                adapter = LoRAAdapter(
                    base, rank=lora_cfg.rank, alpha=lora_cfg.alpha, dropout=lora_cfg.dropout,
                    generator=_generator(seed, layer.layer_number, target),
                    swiglu=target == "linear_fc1" and config.gated_linear_unit)
                parent.add_module(adapter_name, adapter)
                adapter._hook = base.register_forward_hook(_adapter_hook(adapter))
                count += sum(p.numel() for p in adapter.parameters())
    return count


def adapters(modules: list[torch.nn.Module]):
    """(parent, base linear name, adapter name, adapter) for every adapter in ``modules``."""
    for module in modules:
        for layer in _layers(module):
            for target, (parent_name, adapter_name) in TARGETS.items():
                parent = getattr(layer, parent_name, None)
                adapter = getattr(parent, adapter_name, None)
                if isinstance(adapter, LoRAAdapter):
                    yield parent, target, adapter_name, adapter


def has_lora(modules: list[torch.nn.Module]) -> bool:
    return any(True for _ in adapters(modules))


@torch.no_grad()
def merge_lora(modules: list[torch.nn.Module]) -> int:
    """Fold scale * B @ A into each base weight (this TP rank's shard: the adapter's factors are
    sharded like the weight, so the local product is the local shard of the full update),
    remove the adapters and make every parameter trainable again. Returns how many adapters
    were merged; the model then has exactly the keys and forward of a model without LoRA."""
    merged = list(adapters(modules))
    for parent, target, adapter_name, adapter in merged:
        weight = getattr(parent, target).weight
        weight.add_(adapter.delta_weight().to(weight.dtype))
        adapter._hook.remove()
        delattr(parent, adapter_name)
    if merged:
        for module in modules:
            for param in module.parameters():
                param.requires_grad_(True)
    return len(merged)
