"""The typed schema of an APT profile.

Every section is a frozen dataclass. Field metadata carries the value rules (``gt``, ``ge``,
``le``, ``choices``) so that one generic validator (``validate.py``) checks every profile the
same way and names the key that is wrong. Rules that relate several keys live in
``cross_checks`` below; rules that need the world size live in the parallel plan.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Optional


def rule(default, **constraints):
    """A dataclass field with value constraints the validator enforces."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=constraints)
    return field(default=default, metadata=constraints)


@dataclass(frozen=True)
class ModelConfig:
    """A Llama-style decoder: RMSNorm, RoPE, SwiGLU, grouped-query attention, optional MoE."""
    hidden_size: int = rule(128, gt=0)
    num_layers: int = rule(4, gt=0)
    num_attention_heads: int = rule(4, gt=0)
    # Key/value heads for grouped-query attention; equal to num_attention_heads means plain MHA.
    num_query_groups: Optional[int] = rule(None, gt=0)
    ffn_hidden_size: Optional[int] = rule(None, gt=0)
    vocab_size: int = rule(512, gt=0)
    max_seq_len: int = rule(128, gt=0)
    rope_base: float = rule(10000.0, gt=0)
    norm_eps: float = rule(1e-5, gt=0)
    tie_embeddings: bool = False
    init_std: float = rule(0.02, gt=0)
    num_experts: Optional[int] = rule(None, gt=1)
    moe_top_k: int = rule(2, gt=0)
    # MoE router (read only when num_experts is set; apt/model/moe_routing.py maps them to
    # Megatron's TransformerConfig). Load balancing: aux_loss (Switch/GShard, per
    # micro-batch), seq_aux_loss (DeepSeek, per sequence), global_aux_loss (counts over the
    # global batch), sinkhorn (S-BASE, no loss), none. Megatron's own default is no loss at all.
    moe_load_balancing: Literal["aux_loss", "seq_aux_loss", "global_aux_loss", "sinkhorn",
                                "none"] = "aux_loss"
    moe_aux_loss_coeff: float = rule(1e-2, ge=0)
    moe_z_loss_coeff: float = rule(0.0, ge=0)       # ST-MoE router z-loss; 1e-3 is typical
    moe_score_function: Literal["softmax", "sigmoid"] = "softmax"
    # Aux-loss-free balancing (DeepSeek-V3): a per-expert bias added to the sigmoid scores for
    # the top-k choice only, moved by +-rate after each step towards the mean load.
    moe_expert_bias: bool = False
    moe_bias_update_rate: float = rule(1e-3, gt=0)
    # Expert capacity = factor x tokens x top_k / experts; tokens over it are dropped (their
    # residual passes through). None: no dropping.
    moe_capacity_factor: Optional[float] = rule(None, gt=0)
    moe_drop_policy: Literal["probs", "position"] = "probs"
    # Model-family features (Llama 3.x, Qwen2/2.5, Qwen3, Qwen3-MoE, Mistral, Gemma), each on
    # Megatron-core's own option where it has one (apt/model/megatron_gpt.py maps them).
    # Per-head dimension; None = hidden_size / num_attention_heads (Qwen3 and Gemma set it).
    head_dim: Optional[int] = rule(None, gt=0)
    qkv_bias: bool = False            # a bias on the q/k/v projections (Qwen2/2.5)
    qk_norm: bool = False             # RMSNorm over each head's q and k (Qwen3, Qwen3-MoE)
    # RoPE frequency scaling for long context: "linear" divides positions by the factor;
    # "llama3" rescales the low frequencies (Llama 3.1-3.3; factor, low/high frequency factors
    # and the original context length as in its config.json's rope_scaling).
    rope_scaling: Literal["none", "linear", "llama3"] = "none"
    rope_scaling_factor: float = rule(1.0, gt=0)
    rope_low_freq_factor: float = rule(1.0, gt=0)
    rope_high_freq_factor: float = rule(4.0, gt=0)
    rope_original_max_seq_len: int = rule(8192, gt=0)
    # Sliding-window attention (Mistral): each token attends to itself and the window - 1 before
    # it. None = the whole (causal) sequence.
    sliding_window: Optional[int] = rule(None, gt=0)
    # The MLP: "swiglu" (silu(gate) * up; Llama, Qwen, Mistral) or "geglu" (tanh-GELU gate: Gemma).
    activation: Literal["swiglu", "geglu"] = "swiglu"
    # Gemma's RMSNorm multiplies by (1 + w), with w stored zero-centred.
    norm_zero_centered: bool = False
    # Gemma scales the embeddings by sqrt(hidden_size) before the first layer.
    scale_embeddings: bool = False
    # MoE experts' width; None = ffn_hidden_size (Qwen3-MoE's moe_intermediate_size).
    moe_ffn_hidden_size: Optional[int] = rule(None, gt=0)
    # Router weights: True = softmax over the chosen top-k (renormalised: Mixtral, Qwen3-MoE with
    # norm_topk_prob); False = softmax over all experts, top-k kept as they are.
    moe_norm_topk_prob: bool = True
    # Fused kernels (apt/kernels, sources in kernels/): "auto" = every kernel that builds on this
    # machine (the others run eager, with a warning), "none", or a list of rmsnorm, rope,
    # linear_cross_entropy (each must build). Same losses on or off; built on first use.
    kernels: Any = "auto"

    @property
    def kv_heads(self) -> int:
        return self.num_query_groups or self.num_attention_heads

    @property
    def head_size(self) -> int:
        """Per-head dimension: head_dim, or hidden_size / num_attention_heads."""
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def ffn_size(self) -> int:
        """SwiGLU width: Llama's 8/3 * hidden rounded up to a multiple of 64 unless given."""
        if self.ffn_hidden_size:
            return self.ffn_hidden_size
        return ((8 * self.hidden_size // 3) + 63) // 64 * 64


@dataclass(frozen=True)
class DataConfig:
    # "stdlib": the Python standard library's own sources, present offline on every machine.
    # "text": every *.txt/*.py file under `path` (a file or a directory).
    # "indexed": Megatron .bin/.idx written by `trainops preprocess` (or Megatron-LM): `path` is the
    #   prefix, or `blend: [[0.7, prefix_a], [0.3, prefix_b]]` mixes several by weight.
    # "sft": chat/instruction JSONL at `path`, loss on the responses only; `path: synthetic:qa`
    #   is a built-in offline set of programmatic question/answer chats (synthetic_chat.py),
    #   `synthetic:arith` one of integer sums (synthetic_arith.py), `synthetic:roman` one of
    #   numbers to write in Roman numerals (synthetic_roman.py).
    # "preference": {prompt, chosen, rejected} JSONL at `path` (or messages + two answers), for
    #   preference alignment; `path: synthetic:arith` gives correct sums against near misses.
    # "prompts": prompts for reinforcement learning (training.objective grpo): JSONL records
    #   with `prompt` (or `messages`) and the fields its rewards check (e.g. `answer`); a chat
    #   whose last message is the assistant's becomes its prompt + `answer`
    #   (`synthetic:arith`: the sums as questions; `synthetic:roman`: the numbers).
    corpus: Literal["stdlib", "text", "indexed", "sft", "preference", "prompts"] = "stdlib"
    path: Optional[str] = None
    # sft, preference, prompts: a held-out JSONL file of one's own, used as the validation
    # split instead of holding out val_fraction of `path`'s records (all of `path` trains).
    val_path: Optional[str] = None
    blend: Optional[list] = None
    # "byte" needs no file; "hf" reads a tokenizer.json or a Hugging Face model directory (its
    # tokenizer_config.json: special tokens, chat template), "sentencepiece" a .model.
    tokenizer: Literal["byte", "hf", "sentencepiece"] = "byte"
    tokenizer_path: Optional[str] = None
    seq_length: int = rule(128, gt=0)
    # Fraction of documents held out for validation (chosen by a stable hash of the document).
    val_fraction: float = rule(0.02, gt=0, lt=1)
    # indexed: train,validation,test shares of each file's documents (contiguous ranges).
    split: str = "98,2,0"
    max_corpus_bytes: int = rule(8_000_000, gt=0)
    num_workers: int = rule(0, ge=0)
    shuffle: bool = True
    # Global sample order: "full" permutation per epoch, "feistel" (O(1) memory and resume at
    # any size), "auto" = full up to 4M samples.
    shuffle_method: Literal["auto", "full", "feistel"] = "auto"
    # Restart position ids / confine attention at each end-of-document token.
    reset_position_ids: bool = False
    reset_attention_mask: bool = False
    # sft: pack several records into one sample.
    packing: bool = False
    # preference: a pair longer than seq_length + 1 keeps at most this many of the prompt's last
    # tokens, then its answers are cut; None: half of seq_length + 1. A pair left with an empty
    # answer (a prompt kept longer than the row allows) is dropped and counted.
    # prompts: a longer prompt keeps its last max_prompt_length tokens (counted); None:
    # seq_length - training.grpo.max_new_tokens.
    max_prompt_length: Optional[int] = rule(None, gt=0)
    # sft: how records become text. auto: the tokenizer's own chat template when it has one
    # (chat_template.jinja or tokenizer_config.json next to tokenizer.json), else builtin
    # ("<|role|>\n{content}\n" per message).
    chat_template: Literal["auto", "builtin"] = "auto"
    # Opt-in augmentations of training samples: doc_shuffle, span_corruption.
    augment: list = rule([])
    span_corruption_rate: float = rule(0.15, gt=0, lt=1)
    # Where index files (blend order, token-range scans) are cached; default <data dir>/.apt_cache.
    cache_dir: Optional[str] = None


@dataclass(frozen=True)
class DistributedConfig:
    enabled: bool = True
    # auto follows the seed README's size table; ddp = DP only, fsdp = ZeRO-3 over DP,
    # hybrid = TP x PP x DP (+EP, SP, CP) with the degrees below.
    strategy: Literal["auto", "ddp", "fsdp", "hybrid"] = "auto"
    # Expected world size; when set, a launch with another size is refused.
    world_size: Optional[int] = rule(None, gt=0)
    tensor_parallel: int = rule(1, gt=0)
    pipeline_parallel: int = rule(1, gt=0)
    virtual_pipeline_stages: int = rule(1, gt=0)
    data_parallel: Optional[int] = rule(None, gt=0)
    expert_parallel: int = rule(1, gt=0)
    context_parallel: int = rule(1, gt=0)
    sequence_parallel: bool = False
    # None lets the plan choose (0 for ddp, 3 for fsdp, 1 where pipelines forbid 2/3).
    zero_stage: Optional[int] = rule(None, ge=0, le=3)
    recompute: Literal["none", "selective", "full"] = "none"
    offload_optimizer: bool = False
    # auto: DeepSpeed ZeRO for data/tensor parallel, Megatron DDP + distributed optimizer for
    # pipeline, sequence and expert parallel (the plan says which and why).
    engine: Literal["auto", "deepspeed", "megatron"] = "auto"
    backend: Literal["auto", "nccl", "gloo"] = "auto"
    # Seconds a rank waits to reach the rendezvous store (MASTER_ADDR:MASTER_PORT) and for every
    # rank to arrive, then fails naming the address (a launcher killed at start-up, a missing
    # node) instead of waiting 30 minutes.
    rendezvous_timeout_s: float = rule(300.0, gt=0)


@dataclass(frozen=True)
class CheckpointConfig:
    save_interval: int = rule(500, ge=0)      # 0: no periodic checkpoints
    keep_last_n: int = rule(5, gt=0)
    # Also keep every checkpoint whose step is a multiple of this, forever (None: none).
    keep_every: Optional[int] = rule(None, gt=0)
    # Write in the background: the loop waits only while the state is copied to host memory.
    async_save: bool = True
    # Host memory per rank for optimizer state while resuming: the state is read this much at a
    # time (each rank keeps its own fragment of it).
    load_batch_mib: float = rule(1024.0, gt=0)
    # Default: <output.dir>/<experiment or profile name>-checkpoints (stable across restarts,
    # unlike the timestamped run directory, so auto-resume finds it).
    dir: Optional[str] = None
    # Resume from the newest verified checkpoint in `dir` when there is one.
    auto_resume: bool = False


@dataclass(frozen=True)
class AnomalyConfig:
    """The anomaly guard (apt/trainops/engine/anomaly.py): what a step whose loss or gradient
    norm is not finite, or whose loss spikes, does. Every rank decides the same."""
    # off: no check; skip: the step's update is dropped (the step counter, learning rate and
    # data cursor move on); rewind: the update is dropped, the run reloads its last committed
    # checkpoint and continues on the data after the anomalous step; stop: the update is
    # dropped and the run exits (code 3).
    policy: Literal["off", "skip", "rewind", "stop"] = "skip"
    # Exit (code 3) at the anomaly after this many (skip and rewind).
    max_anomalies: int = rule(10, gt=0)
    # A loss more than this many standard deviations above the mean of the last `window`
    # normal steps is a spike. None: only non-finite values count.
    spike_zscore: Optional[float] = rule(None, gt=0)
    window: int = rule(50, ge=2)


@dataclass(frozen=True)
class WatchdogConfig:
    """The hang watchdog (apt/trainops/distributed/watchdog.py): a heartbeat thread per rank."""
    # A phase (forward, backward, optimizer, checkpoint, evaluation, ...) lasting longer than
    # this is a hang: every rank that can reports who stopped answering, dumps its stacks and
    # exits (code 4) so the launcher can restart the job. 0: no watchdog.
    timeout_s: float = rule(1800.0, ge=0)
    # The same for the start of train() (building the engine, compiling ops, loading a
    # checkpoint), which may legitimately take longer than a step.
    startup_timeout_s: float = rule(1800.0, gt=0)
    # How often each rank publishes its heartbeat (step, phase) and checks the others.
    heartbeat_s: float = rule(5.0, gt=0)


@dataclass(frozen=True)
class TargetConfig:
    """Train to a quality target (MLPerf's time-to-train rule): the run ends at the first
    evaluation whose ``metric`` reaches ``value``, and writes its checkpoint there as it would
    at ``max_steps`` (which stays the longest it may train, and the schedule's length)."""
    # A key of the evaluation's record in metrics.jsonl, e.g. val_loss, val_exact_match,
    # val_accuracy; None: no target. Checked at every evaluation (training.eval_interval).
    metric: Optional[str] = None
    value: float = 0.0
    # max: reached when metric >= value (accuracies); min: when metric <= value (losses).
    mode: Literal["max", "min"] = "max"

    def reached(self, result: dict) -> bool:
        score = result[self.metric]
        return score >= self.value if self.mode == "max" else score <= self.value


DPO_LOSSES = ("sigmoid", "ipo", "hinge", "robust", "simpo")


@dataclass(frozen=True)
class DPOConfig:
    """Preference alignment (the ClaudeTrainer, apt/trainops/objectives/preference.py)."""
    # sigmoid: DPO; ipo: squared loss on per-token averaged log-ratios; hinge: SLiC; robust:
    # label-noise-robust DPO; simpo: reference-free, length-normalised, with margin `gamma`.
    loss_type: Literal["sigmoid", "ipo", "hinge", "robust", "simpo"] = "sigmoid"
    # Strength of the KL constraint to the reference (IPO: its tau; SimPO: its reward scale).
    beta: float = rule(0.1, gt=0)
    # Probability that a pair's preference label is flipped (sigmoid: cDPO, robust, simpo).
    label_smoothing: float = rule(0.0, ge=0, lt=0.5)
    # SimPO's target reward margin (in reward units).
    gamma: float = rule(0.5, ge=0)
    # RPO: weight of an SFT term, the chosen answer's per-token negative log-likelihood.
    sft_weight: float = rule(0.0, ge=0)
    # How that NLL is averaged. pair: per pair (its chosen answer's token mean), then over the
    # pairs; token: one token mean over all chosen tokens of the global batch (TRL's
    # rpo_alpha and loss_type [sigmoid, sft]): long answers weigh more.
    sft_normalize: Literal["pair", "token"] = "pair"
    # Where the reference log-probs come from: live = the frozen initial weights, held in host
    # memory and swapped into the same model for a forward pass each step; precomputed = that
    # pass once over the whole dataset before training, stored with the data (no weights held
    # while training). SimPO needs neither.
    reference: Literal["live", "precomputed"] = "live"


@dataclass(frozen=True)
class GRPOConfig:
    """Reinforcement learning with verifiable rewards (the O1Trainer,
    apt/trainops/objectives/grpo.py, apt/trainops/rl/)."""
    # Completions sampled per prompt (a group); training.batch_size counts completions, so it
    # must be a multiple of num_generations x data-parallel size.
    num_generations: int = rule(8, gt=1)
    # Optimizer steps on each batch of rollouts (> 1: PPO-style reuse with the old policy's
    # log-probs and the clipped ratio).
    num_iterations: int = rule(1, gt=0)
    # Sampling: temperature, nucleus top_p (1 = off), top_k (0 = off), new-token limit, and
    # stop strings (the tokenizer's end-of-document token always stops).
    temperature: float = rule(1.0, gt=0)
    top_p: float = rule(1.0, gt=0, le=1)
    top_k: int = rule(0, ge=0)
    max_new_tokens: int = rule(32, gt=0)
    stop: list = rule([])
    # Key-value cache while sampling (off: every new token recomputes the whole prefix; for the
    # generation benchmark).
    kv_cache: bool = True
    # Rewards: [{name, weight, ...options}] summed with their weights; names are built-ins
    # (exact_match, numeric, format, code) or module:function (apt/trainops/rewards).
    rewards: list = rule([{"name": "exact_match", "weight": 1.0}])
    # Advantages: reward minus the group mean, divided by the std of the group, of the whole
    # batch, or not at all (none: Dr. GRPO).
    scale_rewards: Literal["group", "batch", "none"] = "group"
    # KL penalty (k3 estimator) to the frozen initial policy; 0 holds no reference.
    beta: float = rule(0.0, ge=0)
    # Clipped surrogate: ratio within [1 - epsilon, 1 + epsilon_high] (epsilon_high None:
    # epsilon; DAPO's clip-higher raises it).
    epsilon: float = rule(0.2, gt=0, lt=1)
    epsilon_high: Optional[float] = rule(None, gt=0)
    # How per-token losses become the step's loss: grpo = mean over each completion's tokens,
    # then over completions; bnpo = over the tokens of each micro-batch; dr_grpo = sum over
    # tokens / (completions x max_new_tokens); dapo = over every token of the global batch.
    loss_type: Literal["grpo", "bnpo", "dr_grpo", "dapo"] = "dapo"
    # Held-out prompts scored (greedy, the rewards) at every evaluation; 0 = all.
    eval_prompts: int = rule(200, ge=0)
    # DAPO's dynamic sampling: a group whose rewards are all equal has zero advantage and
    # teaches nothing, so a round keeps sampling further prompt batches (each batch /
    # num_generations prompts) and fills the batch with groups that differ; after
    # dynamic_sampling_max_draws batches (the first included) the rest of the batch is filled
    # with all-equal groups. Logged per step: sampling/groups_dropped, sampling/draws.
    dynamic_sampling: bool = True
    dynamic_sampling_max_draws: int = rule(4, gt=0)
    # DAPO's overlong filtering: completions cut at max_new_tokens (no end-of-document) are
    # masked out of the loss (their reward still counts in the group's statistics): a cut
    # answer is not a wrong one.
    overlong_filter: bool = False


@dataclass(frozen=True)
class TrainingConfig:
    # Global batch in sequences (all data-parallel ranks, all accumulation steps together).
    batch_size: int = rule(32, gt=0)
    # Largest per-rank micro-batch (what fits in memory); the plan takes the largest divisor
    # of global batch / DP not above it. None: global batch / DP (no accumulation).
    micro_batch_size: Optional[int] = rule(None, gt=0)
    learning_rate: float = rule(3e-4, gt=0, le=1)
    min_learning_rate: float = rule(3e-5, ge=0)
    warmup_steps: int = rule(100, ge=0)
    max_steps: int = rule(1000, gt=0)
    weight_decay: float = rule(0.1, ge=0)
    adam_beta1: float = rule(0.9, ge=0, lt=1)
    adam_beta2: float = rule(0.95, ge=0, lt=1)
    adam_eps: float = rule(1e-8, gt=0)
    grad_clip: float = rule(1.0, ge=0)
    # auto: bf16 on GPUs that have it, fp32 on CPU.
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    seed: int = rule(1234, ge=0)
    log_interval: int = rule(10, gt=0)
    eval_interval: int = rule(200, ge=0)
    eval_batches: int = rule(10, gt=0)
    # Initial weights: a dist_checkpointing directory (e.g. a run's model/dist), any layout.
    init_from: Optional[str] = None
    # A multiple-choice task scored at every evaluation: a JSONL file or a built-in task name
    # (apt/trainops/eval/tasks/, e.g. python_completion). None: token metrics only.
    eval_task: Optional[str] = None
    # What the loss is (apt/trainops/objectives): lm = next-token cross-entropy on the labels
    # the data's loss mask selects (pretraining, SFT). Trainer classes set it.
    # dpo = preference pairs (data.corpus preference), losses and reference in training.dpo.
    # grpo = RL on prompts (data.corpus prompts) with rewards, settings in training.grpo.
    objective: Literal["lm", "dpo", "grpo"] = "lm"
    dpo: DPOConfig = field(default_factory=DPOConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    checkpoints: CheckpointConfig = field(default_factory=CheckpointConfig)
    anomaly: AnomalyConfig = field(default_factory=AnomalyConfig)
    watchdog: WatchdogConfig = field(default_factory=WatchdogConfig)
    target: TargetConfig = field(default_factory=TargetConfig)


@dataclass(frozen=True)
class FinetuneConfig:
    """Supervised fine-tuning (the Finetuner): what differs from pretraining besides the data."""
    # NEFTune: uniform noise of scale alpha / sqrt(seq_len * hidden) added to the embeddings
    # while training (apt/model/neftune.py); 0 = off. The paper uses 5 to 15.
    neftune_alpha: float = rule(0.0, ge=0)
    # Passes over the training set; None: training.max_steps decides.
    num_epochs: Optional[int] = rule(None, gt=0)


@dataclass(frozen=True)
class HardwareConfig:
    """What the plan assumes about each accelerator (used for memory checks, not detection)."""
    gpu_memory_gb: float = rule(80.0, gt=0)
    gpus_per_node: int = rule(8, gt=0)
    # Peak dense TFLOP/s of one device at the run's precision, for MFU. None: the table of known
    # GPUs (apt/trainops/eval/flops.py), else a measured matmul (CPU, unknown GPUs).
    peak_tflops: Optional[float] = rule(None, gt=0)
    # A run is refused before the model is built when the plan's memory estimate exceeds the
    # memory found (GPU memory; host memory on CPU). false: start anyway (the estimate is
    # pessimistic for this setup, or swap is intended).
    memory_check: bool = True


@dataclass(frozen=True)
class OutputConfig:
    dir: str = "runs"
    experiment_name: Optional[str] = None
    sample_tokens: int = rule(200, ge=0)
    sample_prompt: str = "def "


@dataclass(frozen=True)
class MonitoringConfig:
    """Backends besides the always-written metrics.jsonl; only rank 0 writes (monitoring/)."""
    tensorboard: bool = False          # event files in <run dir>/tensorboard
    wandb: bool = False
    wandb_project: str = "apt"
    wandb_entity: Optional[str] = None
    # auto: online when W&B credentials exist (WANDB_API_KEY or a netrc entry), else offline
    # (a run directory under <run dir>/wandb, uploadable later with `wandb sync`).
    wandb_mode: Literal["auto", "offline", "online"] = "auto"
    mlflow: bool = False
    # None: a SQLite store in the run directory (sqlite:///<run dir>/mlflow.db).
    mlflow_tracking_uri: Optional[str] = None
    mlflow_experiment: Optional[str] = None   # None: output.experiment_name or profile name
    plots: bool = True                 # PNG plots of loss, learning rate, throughput at the end


LORA_TARGETS = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")


@dataclass(frozen=True)
class LoRAConfig:
    """Low-rank adapters on the transformer's linears (apt/model/lora.py); the base is frozen."""
    rank: int = rule(0, ge=0)            # 0: LoRA off
    alpha: float = rule(16.0, gt=0)      # the update B @ A is scaled by alpha / rank
    dropout: float = rule(0.0, ge=0, lt=1)   # on the adapter's input, in training only
    targets: list = rule(list(LORA_TARGETS))

    @property
    def enabled(self) -> bool:
        return self.rank > 0

    @property
    def scale(self) -> float:
        return self.alpha / self.rank if self.rank else 0.0


@dataclass(frozen=True)
class APTConfig:
    name: str = "unnamed"
    description: str = ""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    hardware: HardwareConfig = field(default_factory=HardwareConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    monitoring: MonitoringConfig = field(default_factory=MonitoringConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    # Filled by the loader: the files this profile was resolved from, and its content hash.
    sources: tuple = field(default=(), compare=False)
    config_hash: str = field(default="", compare=False)


BYTE_VOCAB = 258  # 256 bytes + end-of-document + padding (apt.trainops.data.tokenizer)

# Short names people type that are not keys: the "did you mean" hint names the real key.
KEY_ALIASES = {
    "lr": "learning_rate",
    "min_lr": "min_learning_rate",
    "steps": "max_steps",
    "train_steps": "max_steps",
    "global_batch_size": "batch_size",
    "micro_batch": "micro_batch_size",
    "clip_grad": "grad_clip",
    "gradient_clipping": "grad_clip",
    "tp": "tensor_parallel",
    "pp": "pipeline_parallel",
    "dp": "data_parallel",
    "ep": "expert_parallel",
    "cp": "context_parallel",
    "layers": "num_layers",
    "heads": "num_attention_heads",
    "n_heads": "num_attention_heads",
    "n_layers": "num_layers",
    "dim": "hidden_size",
    "kv_heads": "num_query_groups",
    "num_kv_heads": "num_query_groups",
    "seq_len": "seq_length",
}


def cross_checks(cfg: APTConfig):
    """Rules between keys. Yields (dotted key, message) for each violation."""
    m, t, d = cfg.model, cfg.training, cfg.training.distributed
    if m.head_dim is None and m.hidden_size % m.num_attention_heads:
        yield "model.hidden_size", (f"{m.hidden_size} is not divisible by "
                                    f"model.num_attention_heads={m.num_attention_heads} "
                                    f"(or set model.head_dim)")
    if m.num_attention_heads % m.kv_heads:
        yield "model.num_query_groups", (f"{m.kv_heads} must divide "
                                         f"model.num_attention_heads={m.num_attention_heads}")
    if m.head_size % 2:
        yield ("model.head_dim" if m.head_dim else "model.hidden_size"), (
            f"head dimension {m.head_size} must be even for RoPE")
    if m.rope_scaling == "llama3" and m.rope_high_freq_factor <= m.rope_low_freq_factor:
        yield "model.rope_high_freq_factor", (
            f"{m.rope_high_freq_factor} must exceed model.rope_low_freq_factor="
            f"{m.rope_low_freq_factor}")
    yield from _moe_checks(m)
    from apt.kernels import check_setting
    if (problem := check_setting(m.kernels)) is not None:
        yield "model.kernels", problem
    if cfg.data.seq_length > m.max_seq_len:
        yield "data.seq_length", (f"{cfg.data.seq_length} exceeds model.max_seq_len="
                                  f"{m.max_seq_len}")
    if cfg.data.tokenizer == "byte" and m.vocab_size < BYTE_VOCAB:
        yield "model.vocab_size", (f"{m.vocab_size} is smaller than the byte tokenizer's "
                                   f"{BYTE_VOCAB} tokens")
    yield from _data_checks(cfg.data)
    yield from _lora_checks(cfg.lora, m)
    yield from _objective_checks(cfg)
    if t.min_learning_rate > t.learning_rate:
        yield "training.min_learning_rate", (f"{t.min_learning_rate} exceeds "
                                             f"training.learning_rate={t.learning_rate}")
    if t.target.metric is not None and not t.eval_interval:
        yield "training.target.metric", (f"{t.target.metric!r} is checked at evaluations: set "
                                         f"training.eval_interval above 0")
    if t.warmup_steps > t.max_steps:
        yield "training.warmup_steps", f"{t.warmup_steps} exceeds training.max_steps={t.max_steps}"
    if t.micro_batch_size and t.micro_batch_size > t.batch_size:
        yield "training.micro_batch_size", (f"{t.micro_batch_size} exceeds the global "
                                            f"training.batch_size={t.batch_size}")
    if m.num_attention_heads % d.tensor_parallel:
        yield "training.distributed.tensor_parallel", (
            f"{d.tensor_parallel} does not divide model.num_attention_heads={m.num_attention_heads}")
    elif m.kv_heads % d.tensor_parallel:
        yield "training.distributed.tensor_parallel", (
            f"{d.tensor_parallel} does not divide the {m.kv_heads} key/value heads "
            f"(model.num_query_groups)")
    stages = d.pipeline_parallel * d.virtual_pipeline_stages
    if m.num_layers % stages:
        yield "training.distributed.pipeline_parallel", (
            f"model.num_layers={m.num_layers} is not divisible by pipeline_parallel x "
            f"virtual_pipeline_stages = {d.pipeline_parallel} x {d.virtual_pipeline_stages}")
    if d.virtual_pipeline_stages > 1 and d.pipeline_parallel == 1:
        yield "training.distributed.virtual_pipeline_stages", "needs pipeline_parallel > 1"
    if d.virtual_pipeline_stages > 1 and t.eval_batches % d.pipeline_parallel:
        yield "training.eval_batches", (f"{t.eval_batches} must be a multiple of "
                                        f"pipeline_parallel={d.pipeline_parallel}: the "
                                        f"interleaved schedule needs >= PP micro-batches")
    if d.sequence_parallel and d.tensor_parallel == 1:
        yield "training.distributed.sequence_parallel", "needs tensor_parallel > 1"
    if m.num_experts and d.tensor_parallel > 1 and not d.sequence_parallel:
        # Megatron-core's MoE layer raises at the first training forward, after start-up.
        yield "training.distributed.sequence_parallel", (
            "an MoE model (model.num_experts) with tensor_parallel > 1 needs "
            "sequence_parallel: true (Megatron-core's MoE layer trains only with it)")
    if d.expert_parallel > 1:
        if m.num_experts is None:
            yield "training.distributed.expert_parallel", "needs an MoE model (model.num_experts)"
        elif m.num_experts % d.expert_parallel:
            yield "training.distributed.expert_parallel", (
                f"{d.expert_parallel} does not divide model.num_experts={m.num_experts}")
    if cfg.data.seq_length % d.context_parallel:
        yield "training.distributed.context_parallel", (
            f"{d.context_parallel} does not divide data.seq_length={cfg.data.seq_length}")
    if d.strategy in ("ddp", "fsdp") and (d.tensor_parallel > 1 or d.pipeline_parallel > 1
                                   or d.expert_parallel > 1 or d.context_parallel > 1):
        yield "training.distributed.strategy", (
            f"'{d.strategy}' takes no model parallelism; set strategy: hybrid to use "
            f"tensor/pipeline/expert/context parallel degrees")
    if d.strategy == "ddp" and d.zero_stage not in (None, 0, 1, 2):
        yield "training.distributed.zero_stage", "ddp shards no parameters: use 0, 1 or 2 (3 is fsdp)"
    if d.offload_optimizer and d.zero_stage == 0:
        yield "training.distributed.offload_optimizer", "needs ZeRO stage >= 1"
    if d.offload_optimizer and d.engine == "megatron":
        yield "training.distributed.offload_optimizer", "is a DeepSpeed ZeRO feature (engine: deepspeed)"


def _moe_checks(m: ModelConfig):
    """Router settings Megatron cannot combine (it would raise deep in model construction)."""
    if m.num_experts is None:
        return
    if m.moe_top_k > m.num_experts:
        yield "model.moe_top_k", f"{m.moe_top_k} exceeds model.num_experts={m.num_experts}"
    elif m.moe_top_k == 1 and m.moe_score_function == "softmax" and \
            m.moe_load_balancing != "sinkhorn":
        yield "model.moe_top_k", ("1 with softmax scores gives the router no gradient (softmax "
                                  "over one expert is 1): use top_k >= 2 or "
                                  "model.moe_score_function sigmoid")
    if m.moe_expert_bias and m.moe_score_function != "sigmoid":
        yield "model.moe_expert_bias", ("needs model.moe_score_function sigmoid (the bias "
                                        f"shifts sigmoid scores), got {m.moe_score_function!r}")
    if m.moe_capacity_factor is not None and m.moe_load_balancing == "sinkhorn":
        yield "model.moe_capacity_factor", ("token dropping does not work with "
                                            "model.moe_load_balancing 'sinkhorn'")


def _objective_checks(cfg: APTConfig):
    objective, corpus = cfg.training.objective, cfg.data.corpus
    if objective == "dpo" and corpus != "preference":
        yield "training.objective", ("'dpo' trains on preference pairs: needs data.corpus "
                                     f"'preference' (got {corpus!r})")
    if corpus == "preference" and objective != "dpo":
        yield "data.corpus", (f"'preference' pairs train with training.objective 'dpo' (got "
                              f"{objective!r})")
    if (objective == "grpo") != (corpus == "prompts"):
        key = "training.objective" if objective == "grpo" else "data.corpus"
        yield key, (f"training.objective 'grpo' and data.corpus 'prompts' go together (got "
                    f"{objective!r} on {corpus!r})")
    if objective == "grpo":
        yield from _grpo_checks(cfg)


def _grpo_checks(cfg: APTConfig):
    g, t, d = cfg.training.grpo, cfg.training, cfg.training.distributed
    groups = g.num_generations * max(1, d.data_parallel or 1)
    if t.batch_size % g.num_generations:
        yield "training.grpo.num_generations", (
            f"{g.num_generations} does not divide training.batch_size={t.batch_size} (the "
            f"batch counts completions: num_generations per prompt)")
    elif d.data_parallel and t.batch_size % groups:
        yield "training.batch_size", (
            f"{t.batch_size} completions cannot be split into whole groups of "
            f"{g.num_generations} over data_parallel={d.data_parallel}")
    prompt = cfg.data.max_prompt_length
    if g.max_new_tokens >= cfg.data.seq_length:
        yield "training.grpo.max_new_tokens", (f"{g.max_new_tokens} leaves no room for a prompt "
                                               f"in data.seq_length={cfg.data.seq_length}")
    elif prompt is not None and prompt + g.max_new_tokens > cfg.data.seq_length:
        yield "data.max_prompt_length", (f"{prompt} + training.grpo.max_new_tokens="
                                         f"{g.max_new_tokens} exceeds data.seq_length="
                                         f"{cfg.data.seq_length}")
    if not isinstance(g.stop, list) or not all(isinstance(s, str) and s for s in g.stop):
        yield "training.grpo.stop", f"{g.stop!r}: expected a list of non-empty strings"
    if not isinstance(g.rewards, list) or not g.rewards:
        yield "training.grpo.rewards", "expected a non-empty list of {name, weight, ...}"
    # Sampling feeds one micro-batch per new token through the pipeline: the interleaved
    # schedule needs PP of them; context parallelism would split a one-token pass.
    if d.virtual_pipeline_stages > 1:
        yield "training.distributed.virtual_pipeline_stages", (
            "GRPO samples through a one-micro-batch pipeline pass: use 1 (no interleaving)")
    if d.context_parallel > 1:
        yield "training.distributed.context_parallel", (
            "GRPO's sampler cannot split a one-token pass over context-parallel ranks: use 1")


def _lora_checks(lora: LoRAConfig, model: ModelConfig):
    targets = lora.targets
    if not isinstance(targets, list) or not targets or not all(isinstance(t, str) for t in targets):
        yield "lora.targets", f"{targets!r}: expected a non-empty list of {', '.join(LORA_TARGETS)}"
        return
    unknown = [t for t in targets if t not in LORA_TARGETS]
    if unknown:
        yield "lora.targets", (f"unknown target(s) {', '.join(unknown)}; known: "
                               f"{', '.join(LORA_TARGETS)}")
    elif len(set(targets)) != len(targets):
        yield "lora.targets", f"{targets!r} names a target twice"
    elif lora.rank and model.num_experts and {"linear_fc1", "linear_fc2"} & set(targets):
        yield "lora.targets", ("adapters on MoE experts are not supported: target "
                               "linear_qkv and linear_proj only")


AUGMENTATIONS = ("doc_shuffle", "span_corruption")


def _data_checks(data: DataConfig):
    if data.corpus in ("text", "sft", "preference", "prompts") and not data.path:
        yield "data.path", f"required when data.corpus is '{data.corpus}'"
    if data.corpus == "indexed":
        if not data.path and not data.blend:
            yield "data.path", "data.corpus 'indexed' needs data.path (a .bin/.idx prefix) or data.blend"
        elif data.path and data.blend:
            yield "data.blend", "give data.path or data.blend, not both"
    if data.blend is not None:
        if data.corpus != "indexed":
            yield "data.blend", "only data.corpus 'indexed' can be blended"
        if not isinstance(data.blend, list) or not data.blend:
            yield "data.blend", "expected a list of [weight, path] pairs"
            return
        for i, entry in enumerate(data.blend):
            if (not isinstance(entry, (list, tuple)) or len(entry) != 2
                    or isinstance(entry[0], bool) or not isinstance(entry[0], (int, float))
                    or not isinstance(entry[1], str)):
                yield "data.blend", f"entry {i} is {entry!r}; expected [weight, path]"
            elif entry[0] < 0:
                yield "data.blend", f"weight {entry[0]} of {entry[1]} is negative"
        if all(isinstance(e, (list, tuple)) and len(e) == 2 and isinstance(e[0], (int, float))
               for e in data.blend) and sum(e[0] for e in data.blend) <= 0:
            yield "data.blend", "weights sum to zero"
    if data.tokenizer != "byte" and not data.tokenizer_path:
        yield "data.tokenizer_path", f"required for data.tokenizer '{data.tokenizer}'"
    parts = data.split.replace("/", ",").split(",")
    try:
        shares = [float(p) for p in parts]
        if len(shares) > 3 or min(shares) < 0 or shares[0] <= 0:
            raise ValueError
    except ValueError:
        yield "data.split", (f"{data.split!r}: expected up to 3 non-negative numbers, train "
                             f"first and positive (e.g. 98,2,0)")
    if not isinstance(data.augment, list) or any(a not in AUGMENTATIONS for a in data.augment):
        yield "data.augment", f"{data.augment!r}: expected a list of {', '.join(AUGMENTATIONS)}"
    if data.path and data.path.startswith("synthetic:") and data.corpus not in ("sft", "prompts",
                                                                                "preference"):
        yield "data.path", (f"{data.path!r} is a built-in set: needs data.corpus 'sft' or "
                            f"'preference'")
    if data.packing and data.corpus != "sft":
        yield "data.packing", ("packs SFT records: needs data.corpus 'sft' (preference pairs "
                               "are never packed: a row is one prompt and one answer)"
                               if data.corpus == "preference" else
                               "packs SFT records: needs data.corpus 'sft'")
    if data.val_path is not None:
        if data.corpus not in ("sft", "preference", "prompts"):
            yield "data.val_path", (f"names held-out JSONL records: needs data.corpus 'sft', "
                                    f"'preference' or 'prompts' (got {data.corpus!r})")
        elif data.path and data.path.startswith("synthetic:"):
            yield "data.val_path", (f"{data.path!r} brings its own held-out set: give "
                                    f"data.val_path with a file of your own in data.path")
    if data.max_prompt_length is not None and data.corpus not in ("preference", "prompts"):
        yield "data.max_prompt_length", ("truncates preference prompts: needs data.corpus "
                                         "'preference'")
