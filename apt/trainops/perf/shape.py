"""What the performance model needs to know about a model and a layout, as plain numbers.

A ModelShape comes from a profile's ModelConfig (``shape_from_config``) or from a published
run's row (published.py): GPT-3/MPT blocks (GELU MLP, 4h) and Llama/Qwen/GPT-OSS blocks (gated
MLP, GQA, MoE, sliding windows) are all described by these fields. A Layout is the plan's
parallel decision (``layout_from_plan``) or a row's.
"""
from __future__ import annotations

from dataclasses import dataclass

from apt.core.config import ConfigError


@dataclass(frozen=True)
class ModelShape:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int                      # dense MLP width (or each expert's, see expert_ffn)
    vocab: int
    seq: int
    gated: bool = True            # SwiGLU/GeGLU (3 matrices) or GELU (2)
    experts: int = 0
    top_k: int = 0
    expert_ffn: int = 0           # 0: ffn
    sliding_window: int = 0       # 0: every layer attends to the whole (causal) sequence
    sliding_fraction: float = 1.0  # share of layers using the window (GPT-OSS alternates: 0.5)
    dropout: bool = False         # attention + hidden dropout (Megatron-core's default 0.1)
    glu_clamp: bool = False       # GPT-OSS: GLU halves clamped (activation_func_clamp_value)
    linear_bias: bool = False     # add_bias_linear: experts add their output bias in eager ops
    rope: bool = True             # rotary position embedding on q and k (False: learned/ALiBi)

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def moe(self) -> bool:
        return self.experts > 0

    @property
    def mlp_matrices(self) -> int:
        return 3 if self.gated else 2

    @property
    def attention_params(self) -> int:
        return self.hidden * (self.q_dim + 2 * self.kv_dim) + self.q_dim * self.hidden

    @property
    def expert_params(self) -> int:
        """One layer's MLP weights: every expert's for MoE (what EP splits)."""
        width = self.expert_ffn or self.ffn
        return self.mlp_matrices * self.hidden * width * max(1, self.experts)

    @property
    def active_mlp_params(self) -> int:
        width = self.expert_ffn or self.ffn
        return self.mlp_matrices * self.hidden * width * (self.top_k if self.moe else 1)

    @property
    def total_params(self) -> int:
        per_layer = self.attention_params + self.expert_params + 2 * self.hidden \
            + self.hidden * self.experts
        return self.layers * per_layer + 2 * self.vocab * self.hidden + self.hidden

    def mean_keys(self) -> float:
        """Keys a query attends to on average (causal: half the sequence; windows cap it)."""
        full = self.seq / 2
        if not self.sliding_window:
            return full
        window = min(self.sliding_window, full)
        return self.sliding_fraction * window + (1 - self.sliding_fraction) * full

    def model_flops_per_token(self) -> float:
        """6 x matmul weights a token meets (top-k experts, router, logits) + causal attention
        6 x layers x keys x q_dim x 2 (QK^T and AV), the convention of eval/flops.py."""
        router = self.hidden * self.experts
        per_layer = self.attention_params + self.active_mlp_params + router
        weights = self.layers * per_layer + self.vocab * self.hidden
        return 6.0 * weights + 12.0 * self.layers * self.mean_keys() * self.q_dim


# Megatron-core recompute_modules the performance model prices (compute.LayerCompute)
RECOMPUTE_MODULES = ("core_attn", "layernorm", "moe_act")
# The software a layout can name, each priced where it runs:
# - attention (compute.py): fused FlashAttention-2/3 ("flash"), the FlashAttention-1 generation
#   ("flash1": FA1 and its Triton port, e.g. llm-foundry's attn_impl: triton of 2023), or none
#   ("unfused": batched GEMMs + softmax passes);
# - loss (compute.py): Megatron-core's default unfused cross-entropy, TE's fused kernel, or
#   flash-attention's xentropy;
# - optimizer (predict.py): Megatron's mixed-precision fused Adam, or Composer's DecoupledAdamW.
ATTENTION_KERNELS = ("flash", "flash1", "unfused")
LOSSES = ("unfused", "te", "xentropy")
OPTIMIZERS = ("fused_adam", "decoupled_adamw")


@dataclass(frozen=True)
class Layout:
    tp: int = 1
    pp: int = 1
    vp: int = 1
    dp: int = 1
    cp: int = 1
    ep: int = 1
    sp: bool = False
    zero: int = 1                 # 0 DDP all-reduce, 1/2 sharded optimizer, 3 FSDP / ZeRO-3
    micro_batch: int = 1
    grad_accum: int = 1
    # none | full | selective (Megatron's default module, core_attn) | modules joined by "+"
    # from Megatron-core's recompute_modules the model prices: core_attn, layernorm, moe_act
    recompute: str = "none"
    dtype: str = "bf16"
    gpus_per_node: int = 8
    tp_overlap: bool = False      # TP collectives hidden behind GEMMs (TE userbuffers)
    dp_overlap: bool = True       # gradient reduce / parameter gather overlapped with compute
    grad_bytes: int = 2           # bytes per gradient element on the wire
    grad_accum_fusion: bool = True  # micro-batch gradients summed inside the weight-gradient
    #                                 GEMM (Megatron-core gradient_accumulation_fusion);
    #                                 False: a separate add per micro-batch (autograd)
    attention: str = "flash"      # flash (FA2/3) | flash1 (FA1 era) | unfused (GEMMs + softmax)
    p2p_split: bool = False       # Megatron-LM 2021 scatter/gather: 1/TP of a p2p each rank
    optimizer: str = "fused_adam"  # fused_adam (Megatron's) | decoupled_adamw (predict.py)
    loss: str = "unfused"         # unfused (Megatron-core's default) | te | xentropy (compute.py)
    fsdp1: bool = False           # ZeRO-3 as torch FSDP1's FlatParameter (predict.py)

    def __post_init__(self):
        """The names this model prices, checked once where a layout is made (a row, a plan,
        a search candidate), not where each is used."""
        if self.recompute not in ("none", "full", "selective") and (
                set(self.recompute.split("+")) - set(RECOMPUTE_MODULES)):
            raise ConfigError(f"recompute {self.recompute!r}: none, full, selective or "
                              f"'+'-joined modules of {', '.join(RECOMPUTE_MODULES)}")
        for name, known in (("attention", ATTENTION_KERNELS), ("loss", LOSSES),
                            ("optimizer", OPTIMIZERS)):
            if getattr(self, name) not in known:
                raise ConfigError(f"layout {name} '{getattr(self, name)}' is not one of "
                                  f"{', '.join(known)}")

    @property
    def world(self) -> int:
        return self.tp * self.pp * self.cp * self.dp

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.grad_accum * self.dp

    def describe(self) -> str:
        parts = [f"TP={self.tp}", f"PP={self.pp}"] + [
            f"{k}={v}" for k, v in (("VP", self.vp), ("CP", self.cp), ("EP", self.ep)) if v > 1]
        parts += [f"DP={self.dp}", "SP" if self.sp else "", f"ZeRO-{self.zero}",
                  f"mb={self.micro_batch}", f"recompute={self.recompute}"]
        return " ".join(p for p in parts if p)


def shape_from_config(m, seq: int) -> ModelShape:
    """A profile's model (apt.core.config.ModelConfig) as a ModelShape."""
    return ModelShape(hidden=m.hidden_size, layers=m.num_layers, heads=m.num_attention_heads,
                      kv_heads=m.kv_heads, head_dim=m.head_size, ffn=m.ffn_size,
                      vocab=m.vocab_size, seq=seq, gated=True, experts=m.num_experts or 0,
                      top_k=m.moe_top_k if m.num_experts else 0,
                      expert_ffn=getattr(m, "moe_ffn_hidden_size", None) or 0,
                      sliding_window=getattr(m, "sliding_window", None) or 0)


def layout_from_plan(plan) -> Layout:
    """The plan's layout (apt/trainops/distributed/plan.py) as the model's Layout."""
    dtype = plan.precision if plan.precision in ("bf16", "fp16") else "tf32"
    return Layout(tp=plan.tp, pp=plan.pp, vp=plan.vp, dp=plan.dp, cp=plan.cp, ep=plan.ep,
                  sp=plan.sequence_parallel, zero=plan.zero_stage, micro_batch=plan.micro_batch,
                  grad_accum=plan.grad_accum, recompute=plan.recompute, dtype=dtype,
                  gpus_per_node=plan.gpus_per_node,
                  # Megatron DDP reduces bf16 gradients; DeepSpeed ZeRO reduces fp32 ones here
                  grad_bytes=2 if plan.engine == "megatron" and dtype != "tf32" else 4)
