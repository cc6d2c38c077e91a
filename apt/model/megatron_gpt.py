"""Llama-style decoder built as a Megatron-core ``GPTModel``.

Llama = pre-norm RMSNorm, SwiGLU MLP (gated linear unit + SiLU), no biases, rotary position
embeddings, grouped-query attention, no dropout, untied output layer (by default).
On a CUDA machine with Transformer Engine installed we use Megatron's TE layer spec; otherwise
the local (pure torch) spec with our ``RMSNorm`` (see its docstring for why).
"""
from __future__ import annotations

import copy
import dataclasses
import os
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_layer_local_spec,
    get_gpt_layer_with_transformer_engine_spec,
)
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.mlp import MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import (
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)

from apt.kernels.swiglu import SwiGLU
from .packed_documents import PackedDocumentsGPTModel
from .rotated_key_cache import RotatedKeyCacheSelfAttention
from .sdpa_attention import SDPAttention


def make_transformer_config(
    *,
    num_layers: int,
    hidden_size: int,
    num_attention_heads: int,
    num_query_groups: int,
    ffn_hidden_size: int,
    norm_eps: float = 1e-5,
    params_dtype: torch.dtype = torch.float32,
    bf16: bool = False,
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    virtual_pipeline_model_parallel_size: Optional[int] = None,
    sequence_parallel: bool = False,
    expert_model_parallel_size: int = 1,
    num_moe_experts: Optional[int] = None,
    moe_router_topk: int = 2,
    moe_token_dispatcher_type: str = "alltoall",
    moe_router: Optional[dict] = None,
    kv_channels: Optional[int] = None,
    add_qkv_bias: bool = False,
    sliding_window: Optional[int] = None,
    activation: Literal["swiglu", "geglu"] = "swiglu",
    norm_zero_centered: bool = False,
    recompute: Optional[Literal["full", "selective"]] = None,
    init_method_std: float = 0.02,
    deterministic: bool = True,
    kernels: tuple[str, ...] = (),
) -> TransformerConfig:
    """A ``TransformerConfig`` with the Llama architecture choices. ``moe_router``: the
    router's load-balancing settings (``apt.model.moe_routing.router_settings``). ``kernels``:
    APT's fused kernels in use (``apt.kernels.resolve``); ``rope`` goes through Megatron's
    fused-RoPE switch, ``swiglu`` through its activation-module switch (``layer_spec``).

    Family features on Megatron's own options: ``kv_channels`` (a head dimension other than
    hidden / heads), ``add_qkv_bias`` (a bias on linear_qkv only, never on linear_proj or the
    MLP), ``sliding_window`` W as Megatron's ``window_size`` (W - 1, 0): each token attends to
    itself and the W - 1 before it, as Hugging Face's Mistral/Qwen2 mask does (Transformer
    Engine's attention reads it on CUDA, ``SDPAttention`` on CPU); Gemma's ``geglu`` (the gated
    unit with tanh-GELU) and ``norm_zero_centered`` (norm weights stored as w, applied as 1 + w:
    Megatron's ``layernorm_zero_centered_gamma``, which TE's norms and our ``RMSNorm`` read)."""
    if activation == "geglu" and "swiglu" in kernels:
        raise ValueError("the swiglu kernel computes silu(gate) * up: not for a geglu MLP")
    on_cpu = not torch.cuda.is_available()
    if "rope" in kernels:
        install_rope_kernel()
    recompute_kwargs = {}
    if recompute == "full":
        # Recompute every layer's forward in backward ("uniform", 1 layer per checkpoint).
        recompute_kwargs = dict(
            recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1
        )
    elif recompute == "selective":
        # Megatron's default selective set: core attention only.
        recompute_kwargs = dict(recompute_granularity="selective")
    elif recompute is not None:
        raise ValueError(f"recompute must be 'full', 'selective' or None, got {recompute!r}")

    moe_kwargs = {}
    if num_moe_experts:
        moe_kwargs = {**dict(
            num_moe_experts=num_moe_experts,
            moe_router_topk=moe_router_topk,
            moe_token_dispatcher_type=moe_token_dispatcher_type,
            moe_router_dtype="fp32",  # stable routing decisions in bf16 runs
        ), **(moe_router or {})}

    return TransformerConfig(
        num_layers=num_layers,
        hidden_size=hidden_size,
        num_attention_heads=num_attention_heads,
        num_query_groups=num_query_groups,  # < heads: grouped-query attention
        ffn_hidden_size=ffn_hidden_size,
        # Llama: RMSNorm, SwiGLU (gated unit whose gate uses SiLU), no bias in any linear.
        normalization="RMSNorm",
        layernorm_epsilon=norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu if activation == "swiglu" else gelu_tanh,
        layernorm_zero_centered_gamma=norm_zero_centered,
        add_bias_linear=False,
        add_qkv_bias=add_qkv_bias,
        kv_channels=kv_channels,
        window_size=None if sliding_window is None else (sliding_window - 1, 0),
        # Llama pretraining uses no dropout; it also keeps runs reproducible across layouts.
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=init_method_std,
        params_dtype=params_dtype,
        bf16=bf16,
        # p2p sends between pipeline stages need the activation dtype up front.
        pipeline_dtype=params_dtype if not bf16 else torch.bfloat16,
        # Initialise the full weight on CPU then slice it per TP rank: the CUDA init path needs
        # a GPU, and the CPU path gives identical weights for any TP size (same seed).
        use_cpu_initialization=on_cpu,
        tensor_model_parallel_size=tensor_model_parallel_size,
        pipeline_model_parallel_size=pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=virtual_pipeline_model_parallel_size,
        # On gloo, batched p2p with interleaved (virtual) pipelining silently gives WRONG
        # losses (FEASIBILITY.md); unbatched isend/irecv is correct.
        batch_p2p_comm=not (on_cpu and virtual_pipeline_model_parallel_size),
        sequence_parallel=sequence_parallel,
        expert_model_parallel_size=expert_model_parallel_size,
        # Deterministic embedding backward. NOTE: with Transformer Engine attention this also
        # requires NVTE_ALLOW_NONDETERMINISTIC_ALGO=0 in the environment (Megatron checks it).
        # Not on CPU: there Megatron's deterministic lookup (``weight[ids]``) is the one that is
        # not: its backward, index_put_(accumulate=True), adds rows from several threads in a
        # run-dependent order (two fresh runs differed by ~1e-5 after 10 steps), while
        # F.embedding's CPU backward splits the rows between threads (bit-identical).
        deterministic_mode=deterministic and not on_cpu,
        apply_rope_fusion="rope" in kernels,
        # The MLP then calls the spec's activation module on its whole [gate | up] fc1 output
        # (named for Transformer Engine's, which the TE spec then uses: layer_spec).
        use_te_activation_func="swiglu" in kernels,
        **recompute_kwargs,
        **moe_kwargs,
    )


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GELU with the tanh approximation (Gemma's ``gelu_pytorch_tanh``)."""
    return F.gelu(x, approximate="tanh")


class RMSNorm(torch.nn.Module):
    """RMSNorm whose weight is marked ``sequence_parallel`` when the config says so.

    Megatron's local spec uses ``WrappedTorchNorm``, which asserts ``not sequence_parallel``
    (FusedLayerNorm would need Apex). With sequence parallelism each TP rank normalises a
    different slice of the sequence, so the norm weight's gradient is partial per rank and must
    be all-reduced over TP: ``finalize_model_grads`` does that for params carrying
    ``sequence_parallel=True``.

    ``config.layernorm_zero_centered_gamma`` (Gemma): the weight is stored as w (initialised to
    0) and the norm multiplies by 1 + w, in fp32 as Hugging Face's Gemma does.
    """

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **_):
        super().__init__()
        self.eps = eps
        self.zero_centered = config.layernorm_zero_centered_gamma
        init = torch.zeros if self.zero_centered else torch.ones
        self.weight = torch.nn.Parameter(
            init(hidden_size, dtype=config.params_dtype, device=_init_device(config))
        )
        setattr(self.weight, "sequence_parallel", config.sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._normalise(x, self.weight)

    def _normalise(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        if self.zero_centered:
            return self._norm(x.float(), weight.float() + 1.0).type_as(x)
        return self._norm(x, weight)

    def _norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), weight, self.eps)


class KernelRMSNorm(RMSNorm):
    """``RMSNorm`` computed by APT's fused kernel (``apt.kernels.rms_norm``): same parameters,
    same state dict, same result."""

    def _norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        from apt.kernels.rmsnorm import rms_norm
        return rms_norm(x, weight, self.eps)


class HeadRMSNorm(RMSNorm):
    """Per-head q/k RMSNorm (Qwen3): a weight of one head's size, replicated over TP.

    Each TP rank normalises only its own heads, so its weight gradient is a partial sum: the
    weight passes through ``copy_to_tensor_model_parallel_region`` (identity forward, all-reduce
    over TP backward), inside autograd, so every engine sees the full gradient. Megatron's own
    reduction (``finalize_model_grads``, keyed on ``config.qk_layernorm``) runs on its engine
    only, while DeepSpeed's ZeRO reduces gradients in backward hooks; hence
    ``config.qk_layernorm`` stays False and the spec carries these modules. q/k come after the
    sequence-parallel all-gather (the whole sequence), so the weight is never
    ``sequence_parallel``."""

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **_):
        super().__init__(config, hidden_size, eps)
        setattr(self.weight, "sequence_parallel", False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from megatron.core import parallel_state
        from megatron.core.tensor_parallel import copy_to_tensor_model_parallel_region
        weight = self.weight
        if parallel_state.get_tensor_model_parallel_world_size() > 1:
            weight = copy_to_tensor_model_parallel_region(weight)
        return self._normalise(x, weight)


class KernelHeadRMSNorm(HeadRMSNorm, KernelRMSNorm):
    """``HeadRMSNorm`` through APT's fused RMSNorm kernel."""


def install_rope_kernel() -> None:
    """Make APT's RoPE kernel the function behind Megatron's ``apply_rope_fusion`` switch.

    Megatron looks its fused RoPE up at call time in a module global (``rope_utils.
    fused_apply_rotary_pos_emb``, Transformer Engine's when TE is installed, else None), with the
    signature of ``apt.kernels.apply_rope``. Only configs with ``apply_rope_fusion`` use it."""
    from megatron.core.models.common.embeddings import rope_utils
    from apt.kernels.rope import apply_rope

    rope_utils.fused_apply_rotary_pos_emb = apply_rope


def _init_device(config: TransformerConfig) -> str:
    return "cpu" if config.use_cpu_initialization else torch.cuda.current_device()


def transformer_engine_installed() -> bool:
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return False
    return True


def _use_te(use_transformer_engine: Optional[bool]) -> bool:
    if use_transformer_engine is not None:
        return use_transformer_engine
    if not torch.cuda.is_available():
        return False
    # APT_TRANSFORMER_ENGINE=0 keeps the local spec where TE is installed (tools/gpu_check.py
    # measures both).
    if os.environ.get("APT_TRANSFORMER_ENGINE") == "0":
        return False
    return transformer_engine_installed()


def norm_class(kernels: tuple[str, ...]) -> type:
    return KernelRMSNorm if "rmsnorm" in kernels else RMSNorm


def head_norm_class(kernels: tuple[str, ...]) -> type:
    return KernelHeadRMSNorm if "rmsnorm" in kernels else HeadRMSNorm


def transformer_engine_spec() -> bool:
    """Whether models built in this process get Megatron's Transformer Engine spec."""
    return _use_te(None)


def layer_spec(config: TransformerConfig, use_transformer_engine: Optional[bool] = None,
               kernels: tuple[str, ...] = (), qk_norm: bool = False) -> ModuleSpec:
    """The transformer-layer spec: TE when CUDA + transformer_engine, else local + our RMSNorm
    (the fused kernel's when ``rmsnorm`` is among ``kernels``) and SDPA core attention.
    ``qk_norm``: per-head q/k RMSNorm (``HeadRMSNorm`` in either spec: it says why)."""
    num_experts = config.num_moe_experts  # None -> dense MLP
    if _use_te(use_transformer_engine):
        # TE's own fused activation when the config asks for an activation module
        spec = copy.deepcopy(get_gpt_layer_with_transformer_engine_spec(
            num_experts=num_experts, use_te_activation_func=config.use_te_activation_func,
            qk_layernorm=qk_norm))
        if qk_norm:
            _set_head_norms(spec, HeadRMSNorm)
        return spec
    spec = get_gpt_layer_local_spec(num_experts=num_experts, normalization="RMSNorm")
    spec = copy.deepcopy(spec)  # specs may be shared objects: do not edit Megatron's
    spec.submodules.input_layernorm = norm_class(kernels)
    spec.submodules.pre_mlp_layernorm = norm_class(kernels)
    if qk_norm:
        _set_head_norms(spec, head_norm_class(kernels))
    if config.use_te_activation_func:
        _set_activation_module(spec.submodules.mlp, SwiGLU)
    if "linear" in kernels:   # oneDNN's GEMMs for every linear layer of the block
        from apt.kernels.linear import REPLACEMENTS
        _replace_classes(spec, REPLACEMENTS)
    # Fused SDPA instead of baddbmm + masked softmax + bmm (sdpa_attention.py says why); a
    # DotProductAttention subclass, so everything that accepts the local one accepts it.
    spec.submodules.self_attention.submodules.core_attention = SDPAttention
    # Keys enter the KV cache rotated, once (rotated_key_cache.py says why).
    if spec.submodules.self_attention.module is SelfAttention:
        spec.submodules.self_attention.module = RotatedKeyCacheSelfAttention
    return spec


def _set_head_norms(spec: ModuleSpec, module: type) -> None:
    attention = spec.submodules.self_attention.submodules
    attention.q_layernorm = attention.k_layernorm = module


def _specs(spec: ModuleSpec):
    """``spec`` and every ModuleSpec under it (a MoE layer's experts and shared experts too)."""
    yield spec
    if spec.submodules is None or isinstance(spec.submodules, (type, dict)):
        return
    for child in vars(spec.submodules).values():
        if isinstance(child, ModuleSpec):
            yield from _specs(child)


def _set_activation_module(spec: ModuleSpec, module: type) -> None:
    """``module`` as the activation of every MLP under ``spec``: the dense MLP, or a MoE
    layer's experts and shared experts. With the config's activation-module switch on, an MLP
    left without one would apply plain SiLU to [gate | up] (no gating)."""
    for s in _specs(spec):
        if isinstance(s.submodules, MLPSubmodules):
            s.submodules.activation_func = module


def _replace_classes(spec: ModuleSpec, replacements: dict) -> None:
    """Every module class in ``spec``'s tree that is a key of ``replacements`` becomes its
    value: the layer's own submodules and those of any spec under it (MoE experts too)."""
    for s in _specs(spec):
        s.module = replacements.get(s.module, s.module)
        if s.submodules is None or isinstance(s.submodules, (type, dict)):
            continue
        for name, child in vars(s.submodules).items():
            if isinstance(child, type) and child in replacements:
                setattr(s.submodules, name, replacements[child])


def gpt_model_kwargs(
    config: TransformerConfig,
    *,
    vocab_size: int,
    max_sequence_length: int,
    tie_embeddings: bool = False,
    rotary_base: float = 10000,
    pre_process: bool = True,
    post_process: bool = True,
    vp_stage: Optional[int] = None,
    use_transformer_engine: Optional[bool] = None,
    kernels: tuple[str, ...] = (),
    qk_norm: bool = False,
    rope_scaling: Optional[RopeScaling] = None,
) -> dict:
    """``GPTModel.__init__`` arguments for this pipeline stage of a Llama-style decoder.

    A dict rather than a model so that ``APTModel`` (a ``GPTModel`` subclass) and
    ``build_gpt_model`` construct from the same description. ``rope_scaling``: linear goes
    to Megatron's ``seq_len_interpolation_factor`` here; llama3 needs ``scale_rope`` on the
    built model too (it says why)."""
    use_te = _use_te(use_transformer_engine)
    spec = layer_spec(config, use_transformer_engine=use_te, kernels=kernels, qk_norm=qk_norm)
    if use_te:
        from megatron.core.extensions.transformer_engine import TENorm

        final_norm = TENorm
    else:
        final_norm = norm_class(kernels)  # it must honour sequence_parallel too
    block = TransformerBlockSubmodules(
        layer_specs=[spec] * get_num_layers_to_build(config, vp_stage=vp_stage),
        layer_norm=final_norm,
    )
    return dict(
        config=config,
        transformer_layer_spec=block,
        vocab_size=vocab_size,
        max_sequence_length=max_sequence_length,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=tie_embeddings,
        position_embedding_type="rope",
        rotary_base=rotary_base,
        seq_len_interpolation_factor=(rope_scaling.factor if rope_scaling is not None
                                      and rope_scaling.kind == "linear" else None),
        vp_stage=vp_stage,
    )


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling: ``linear`` (positions / factor) or ``llama3`` (Llama 3.1-3.3:
    low frequencies / factor, high ones kept, a smooth ramp between)."""
    kind: Literal["linear", "llama3"]
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_seq_len: int = 8192


def scale_rope(model: GPTModel, rope_scaling: Optional[RopeScaling]) -> None:
    """Llama 3 scaling of the model's rotary frequencies by Megatron's own
    ``RotaryEmbedding._apply_scaling``. GPTModel's ``rope_scaling=True`` calls it with the
    factor only, the low/high frequency factors and the original context fixed at 1 / 4 / 8192
    (Llama 3.1's; Llama 3.2 and others' configs may differ): the model is built unscaled and
    the frequencies scaled here with all four values. Before any forward (the tables are
    computed from ``inv_freq`` on each call, cached per length)."""
    if rope_scaling is None or rope_scaling.kind != "llama3":
        return
    rotary = getattr(model, "rotary_pos_emb", None)
    if rotary is None:
        raise ValueError("llama3 RoPE scaling needs rotary position embeddings")
    rotary.inv_freq = rotary._apply_scaling(
        rotary.inv_freq, factor=rope_scaling.factor,
        low_freq_factor=rope_scaling.low_freq_factor,
        high_freq_factor=rope_scaling.high_freq_factor,
        original_max_position_embeddings=rope_scaling.original_max_seq_len)
    model.rotary_scaling = True


def check_tensor_parallel_marks(model: torch.nn.Module) -> None:
    """Megatron marks TP-sharded weights (tensor_model_parallel=True, partition_dim) in
    tensor_parallel.layers; DeepSpeed and grad clipping rely on it (unmarked: clipping is
    wrong, FEASIBILITY.md). Fail loudly if a Megatron change drops the mark."""
    if model.config.tensor_model_parallel_size == 1:
        return
    for name, p in model.named_parameters():
        sharded = "linear_" in name or "word_embeddings" in name or "output_layer" in name
        if sharded and "router" not in name and not getattr(p, "tensor_model_parallel", False):
            raise AssertionError(f"TP-sharded parameter {name} lacks tensor_model_parallel")


def build_gpt_model(config: TransformerConfig, **kwargs) -> GPTModel:
    """Build this pipeline stage's part of the model (needs parallel_state initialised); it
    honours per-document positions and masks (``PackedDocumentsGPTModel``)."""
    model = PackedDocumentsGPTModel(**gpt_model_kwargs(config, **kwargs))
    scale_rope(model, kwargs.get("rope_scaling"))
    check_tensor_parallel_marks(model)
    return model
