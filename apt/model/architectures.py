"""APTModel / APTLargeModel: the Llama-style decoder as a real Megatron-core ``GPTModel``.

Construction needs Megatron's parallel groups: inside a launched run they come from
``setup_distributed(plan=...)``; in a notebook or a plain script a one-process group is
started on first use, so ``APTLargeModel(hidden_size=2048, num_layers=32)`` just works.
"""
from __future__ import annotations

import torch
from megatron.core import parallel_state

from apt.core.config import ConfigError, ModelConfig
from apt.kernels import KernelUnavailable
from apt.core.config.model_resolution import resolve_model_config
from .moe_routing import router_settings
from .megatron_gpt import (
    RopeScaling, check_tensor_parallel_marks, gpt_model_kwargs, make_transformer_config,
    scale_rope, transformer_engine_spec,
)
from .packed_documents import PackedDocumentsGPTModel


def rope_scaling(arch: ModelConfig) -> RopeScaling | None:
    if arch.rope_scaling == "none":
        return None
    return RopeScaling(arch.rope_scaling, arch.rope_scaling_factor, arch.rope_low_freq_factor,
                       arch.rope_high_freq_factor, arch.rope_original_max_seq_len)


def model_kernels(arch: ModelConfig) -> tuple[str, ...]:
    """The fused kernels this process's model uses for ``model.kernels``. Under Transformer
    Engine its own fused norms and RoPE fill the layer spec, so ``auto`` keeps only ours that TE
    lacks; a kernel named explicitly is used as asked (``swiglu`` under TE: TE's activation
    module, as Megatron's TE spec builds it)."""
    from apt.kernels import KERNELS, resolve
    device = "cuda" if torch.cuda.is_available() else "cpu"
    setting = arch.kernels
    if setting == "auto" and transformer_engine_spec():
        setting = [k for k in KERNELS if k not in ("rmsnorm", "rope", "swiglu")]
    if arch.activation == "geglu":   # the swiglu kernel is silu(gate) * up only
        if not isinstance(setting, str) and "swiglu" in setting:
            raise ConfigError("'swiglu' computes silu(gate) * up; model.activation is 'geglu'",
                              key="model.kernels")
        if setting == "auto":
            setting = [k for k in KERNELS if k != "swiglu"]
    try:
        return resolve(setting, device)
    except (ValueError, KernelUnavailable) as err:
        raise ConfigError(str(err), key="model.kernels") from err


def _scaled_by_sqrt_hidden(module, args, output):
    """Gemma's embeddings times sqrt(hidden), the factor rounded to the activations' dtype as
    Hugging Face's Gemma rounds it (Megatron's embedding has no such option). Elementwise, so
    it holds on a sequence-parallel slice too."""
    return output * torch.tensor(module.config.hidden_size ** 0.5, dtype=output.dtype)


class APTModel(PackedDocumentsGPTModel):
    """The decoder for one pipeline stage (the whole model when PP = 1).

    ``model(tokens, position_ids, attention_mask)`` honours per-document position ids and a
    block-diagonal attention mask (``supported_batch_fields``; see ``packed_documents``).

    ``plan`` (from ``make_plan``) supplies the parallel layout, precision and recompute policy;
    without one the model is built for a single process in fp32."""

    default_config = ModelConfig()

    def __init__(self, config: ModelConfig | None = None, *, plan=None, vp_stage=None,
                 **overrides):
        from apt.trainops.runtime.process_groups import ensure_runtime
        ensure_runtime()
        arch = resolve_model_config(config or self.default_config, overrides)
        bf16 = plan is not None and plan.precision == "bf16"
        kernels = model_kernels(arch)
        transformer_config = make_transformer_config(
            num_layers=arch.num_layers, hidden_size=arch.hidden_size,
            num_attention_heads=arch.num_attention_heads, num_query_groups=arch.kv_heads,
            ffn_hidden_size=arch.ffn_size, norm_eps=arch.norm_eps,
            init_method_std=arch.init_std, bf16=bf16,
            params_dtype=torch.bfloat16 if bf16 else torch.float32,
            tensor_model_parallel_size=plan.tp if plan else 1,
            pipeline_model_parallel_size=plan.pp if plan else 1,
            virtual_pipeline_model_parallel_size=plan.vp if plan and plan.vp > 1 else None,
            sequence_parallel=plan.sequence_parallel if plan else False,
            expert_model_parallel_size=plan.ep if plan else 1,
            num_moe_experts=arch.num_experts, moe_router_topk=arch.moe_top_k,
            moe_router=router_settings(arch),
            kv_channels=arch.head_size, add_qkv_bias=arch.qkv_bias,
            sliding_window=arch.sliding_window, activation=arch.activation,
            norm_zero_centered=arch.norm_zero_centered,
            recompute=None if not plan or plan.recompute == "none" else plan.recompute,
            kernels=kernels)
        super().__init__(kernels=kernels, **gpt_model_kwargs(
            transformer_config, vocab_size=arch.vocab_size, max_sequence_length=arch.max_seq_len,
            tie_embeddings=arch.tie_embeddings, rotary_base=arch.rope_base,
            pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
            post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
            vp_stage=vp_stage, kernels=kernels, qk_norm=arch.qk_norm,
            rope_scaling=rope_scaling(arch)))
        scale_rope(self, rope_scaling(arch))
        if arch.scale_embeddings and self.pre_process:
            self.embedding.register_forward_hook(_scaled_by_sqrt_hidden)
        check_tensor_parallel_marks(self)
        self.arch = arch

    @classmethod
    def from_pretrained(cls, path) -> "APTModel":
        """A one-process fp32 model holding the weights at ``path``: a training run directory,
        a dist_checkpointing weights directory, or a Hugging Face Llama / Mistral / Mixtral /
        Qwen2 / Qwen3 / Qwen3-MoE directory (apt/trainops/interop/pretrained.py says how each is
        recognised). Interop and checkpoint I/O sit below the model: the class passes itself."""
        from apt.trainops.interop.pretrained import load_pretrained
        return load_pretrained(cls, path)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @torch.no_grad()
    def generate(self, prompt: torch.Tensor, max_new_tokens: int, *, temperature: float = 0.8,
                 top_k: int = 20, valid_vocab: int | None = None,
                 generator: torch.Generator | None = None,
                 eod_id: int | None = None) -> torch.Tensor:
        """Sample a continuation of ``prompt`` (1-D token ids), one process, no KV cache.

        ``valid_vocab`` masks the padded embedding rows the tokenizer never produces. Sampling
        ``eod_id`` (the end-of-document token) ends the continuation, which excludes it: what
        follows a document's end is another document, not its continuation."""
        if parallel_state.get_tensor_model_parallel_world_size() > 1 or \
                parallel_state.get_pipeline_model_parallel_world_size() > 1:
            raise NotImplementedError("generate() runs on an unsharded model (TP = PP = 1)")
        was_training = self.training
        self.eval()
        tokens = prompt.to(torch.long).unsqueeze(0)
        for _ in range(max_new_tokens):
            context = tokens[:, -self.arch.max_seq_len:]
            positions = torch.arange(context.shape[1]).unsqueeze(0)
            logits = self(context, positions, None)[:, -1, :].float()
            if valid_vocab:
                logits[:, valid_vocab:] = float("-inf")
            logits = logits / max(temperature, 1e-5)
            if top_k:
                kth = torch.topk(logits, top_k).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            next_token = torch.multinomial(torch.softmax(logits, -1), 1, generator=generator)
            if eod_id is not None and int(next_token) == eod_id:
                break
            tokens = torch.cat([tokens, next_token], dim=1)
        self.train(was_training)
        return tokens[0, prompt.numel():]


class APTLargeModel(APTModel):
    """The same decoder with 1B-class defaults (Llama-3.2-1B shape); override any field."""

    default_config = ModelConfig(hidden_size=2048, num_layers=16, num_attention_heads=32,
                                 num_query_groups=8, ffn_hidden_size=8192, vocab_size=128256,
                                 max_seq_len=4096, rope_base=500000.0, tie_embeddings=True)
