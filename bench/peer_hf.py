"""APT's Trainer against the Hugging Face Trainer and a plain PyTorch loop, same Llama shapes.

What a user would compare: APT (benchmark mode: the normal Trainer loop, DeepSpeed engine,
evaluation and sampling off) trains its Megatron Llama; the HF Trainer trains transformers'
``LlamaForCausalLM`` of the same shape with its defaults (SDPA attention, its default AdamW,
no evaluation, no checkpoint within the run); the plain loop trains the same
``LlamaForCausalLM`` with torch AdamW by hand. All three see the same token batches (APT's data
loader over the stdlib corpus), the same AdamW settings, warm-up + cosine LR to the same minimum
and gradient clipping at 1.0, in fp32 on one process with a fixed thread count.

Tokens/s is counted over wall-clock time between step ends after the warm-up steps. Rounds
interleave the three (A, B, C, A, B, C, ...) so that the machine's drift hits each alike; the
table shows each round's APT/HF and APT/plain ratio and their medians.

    python bench/peer_hf.py [--shapes tiny,feasibility,large] [--rounds 3] [--threads 2]
                            [--apt-override model.kernels=auto] [--model-kernels auto]
                            [--unfixed] [--quick]

``--unfixed`` adds APT without issue 14's step fixes (Megatron's DotProductAttention, torch
AdamW's single-tensor loop) to every round: before and after under the same machine load.

Needs the ``bench`` extra (transformers, accelerate: ``pip install -e .[bench]``).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from apt.core.logging import configure_logging  # noqa: E402

configure_logging()

import torch  # noqa: E402
from torch.overrides import _get_current_function_mode_stack  # noqa: E402

from apt.core import cpu_compat  # noqa: E402

from apt.core.config import load_profile  # noqa: E402
from apt.trainops.data import create_dataloader  # noqa: E402
from apt.trainops.data.build import build_datasets  # noqa: E402
from apt.trainops.runtime.process_groups import shutdown_distributed  # noqa: E402
from apt.trainops.trainers import Trainer  # noqa: E402
from apt.trainops.trainers.benchmark import benchmark_config  # noqa: E402
from bench._plain_optimizer import plain_adamw  # noqa: E402

# name: (hidden, layers, heads, kv groups, ffn, vocab, seq, batch, steps, warm-up)
SHAPES = {
    "tiny": (128, 4, 4, 2, 352, 384, 128, 32, 20, 4),           # profiles/tiny.yaml
    "feasibility": (256, 4, 4, 4, 640, 8192, 256, 8, 12, 3),    # FEASIBILITY.md's comparison
    "large": (512, 8, 8, 8, 1408, 32000, 512, 4, 6, 2),
}
QUICK = {"tiny": (10, 3), "feasibility": (7, 2), "large": (4, 1)}   # --quick: steps, warm-up


WARMUP = [0]   # the shape being run's warm-up steps (not timed)


def apt_config(shape: str, out: str):
    hidden, layers, heads, groups, ffn, vocab, seq, batch, steps, warmup = SHAPES[shape]
    steps, warmup = QUICK[shape] if ARGS.quick else (steps, warmup)
    overrides = [f"model.hidden_size={hidden}", f"model.num_layers={layers}",
                 f"model.num_attention_heads={heads}", f"model.num_query_groups={groups}",
                 f"model.ffn_hidden_size={ffn}", f"model.vocab_size={vocab}",
                 f"model.max_seq_len={seq}", f"data.seq_length={seq}",
                 f"training.batch_size={batch}", f"training.warmup_steps={warmup}",
                 f"output.dir={out}", "training.checkpoints.save_interval=0",
                 *ARGS.apt_override]
    if ARGS.model_kernels is not None:
        overrides.append(f"model.kernels={ARGS.model_kernels}")
    # benchmark mode: what `trainops benchmark` runs (evaluation, sampling, logging minimal)
    return benchmark_config(load_profile("tiny", overrides), steps, warmup)


def hf_llama(cfg):
    """LlamaForCausalLM with APT's architecture choices (norm eps, RoPE base, init std,
    untied output, no biases); attention left at HF's default implementation (SDPA)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    m = cfg.model
    config = LlamaConfig(
        vocab_size=m.vocab_size, hidden_size=m.hidden_size, intermediate_size=m.ffn_size,
        num_hidden_layers=m.num_layers, num_attention_heads=m.num_attention_heads,
        num_key_value_heads=m.kv_heads, max_position_embeddings=m.max_seq_len,
        rms_norm_eps=m.norm_eps, rope_parameters={"rope_type": "default",
                                                   "rope_theta": m.rope_base},
        initializer_range=m.init_std, tie_word_embeddings=m.tie_embeddings,
        attention_bias=False, mlp_bias=False, hidden_act="silu")
    torch.manual_seed(cfg.training.seed)
    return LlamaForCausalLM(config)


class _Samples(torch.utils.data.Dataset):
    """The APT loader's samples as HF input dicts (HF shifts the labels itself)."""

    def __init__(self, tokens: torch.Tensor):
        self.tokens = tokens

    def __len__(self):
        return len(self.tokens)

    def __getitem__(self, i):
        return {"input_ids": self.tokens[i], "labels": self.tokens[i]}


@contextlib.contextmanager
def issue14_fixes_off():
    """APT as it was before issue 14's step fixes, for the --unfixed column: Megatron's
    DotProductAttention in the local spec, torch AdamW's single-tensor loop."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    import apt.model.megatron_gpt as gpt
    import apt.trainops.distributed.engines.deepspeed_engine as ds
    saved = gpt.SDPAttention, ds._fused_adamw
    gpt.SDPAttention, ds._fused_adamw = DotProductAttention, (lambda plan: {})
    try:
        yield
    finally:
        gpt.SDPAttention, ds._fused_adamw = saved


def apt_round(cfg, train_set, unfixed: bool = False) -> tuple[float, float]:
    loader = create_dataloader(train_set, cfg.training.batch_size, seed=cfg.training.seed)
    with issue14_fixes_off() if unfixed else contextlib.nullcontext():
        trainer = Trainer.from_config(cfg, train_dataloader=loader)
        trainer.train()
    return _rate([r["time"] for r in trainer.history], cfg), trainer.history[-1]["loss"]


@contextlib.contextmanager
def as_a_user_runs_hf():
    """The HF sides run as they would in a process of their own: no process group (the HF
    Trainer wraps the model in DDP when one exists) and without APT's CPU device-remap mode
    (a torch-function mode that sees every torch call; APT keeps it for its own rounds)."""
    shutdown_distributed()
    # APT exported torch.distributed's rendezvous variables; with LOCAL_RANK set the HF
    # Trainer would start a process group of its own and wrap the model in DDP. They are not
    # put back: APT's next round then starts a one-process group on a fresh free port (the
    # old port may be taken by then: EADDRINUSE).
    for name in _RENDEZVOUS:
        os.environ.pop(name, None)
    remap = cpu_compat._MODE in _get_current_function_mode_stack()
    if remap:
        cpu_compat._MODE.__exit__(None, None, None)
    try:
        yield
    finally:
        if remap:
            cpu_compat._MODE.__enter__()


_RENDEZVOUS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
               "MASTER_PORT")


def hf_round(cfg, tokens, out) -> tuple[float, float]:
    from transformers import Trainer as HFTrainer, TrainerCallback, TrainingArguments
    t = cfg.training
    ends, losses = [], []

    class StepEnds(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            ends.append(time.time())

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                losses.append(logs["loss"])

    args = TrainingArguments(
        output_dir=out, use_cpu=True, per_device_train_batch_size=t.batch_size,
        max_steps=t.max_steps, learning_rate=t.learning_rate, weight_decay=t.weight_decay,
        adam_beta1=t.adam_beta1, adam_beta2=t.adam_beta2, adam_epsilon=t.adam_eps,
        max_grad_norm=t.grad_clip, warmup_steps=t.warmup_steps,
        lr_scheduler_type="cosine_with_min_lr",
        lr_scheduler_kwargs={"min_lr": t.min_learning_rate},
        # no checkpoint inside the run (APT saves none in benchmark mode either); logging
        # once, at the last step (APT's benchmark mode logs once too)
        save_strategy="no", logging_steps=t.max_steps, report_to="none", seed=t.seed,
        disable_tqdm=True)
    trainer = HFTrainer(model=hf_llama(cfg), args=args, train_dataset=_Samples(tokens),
                        callbacks=[StepEnds()])
    if trainer.accelerator.distributed_type != "NO":
        raise SystemExit(f"the HF Trainer runs {trainer.accelerator.distributed_type}, not one "
                         f"plain process: the comparison would not be what a user gets")
    trainer.train()
    return _rate(ends, cfg), losses[-1] if losses else float("nan")


def plain_round(cfg, tokens) -> tuple[float, float]:
    """LlamaForCausalLM with torch AdamW, by hand: the floor of framework overhead."""
    t = cfg.training
    model = hf_llama(cfg)
    optimizer, schedule = plain_adamw(model, t)
    ends, batch = [], t.batch_size
    for step in range(t.max_steps):
        ids = tokens[step * batch:(step + 1) * batch]
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        schedule.step()
        last = loss.item()
        ends.append(time.time())
    return _rate(ends, cfg), last


def _rate(ends, cfg) -> float:
    warm = WARMUP[0]
    tokens_per_step = cfg.training.batch_size * cfg.data.seq_length
    return (len(ends) - warm) * tokens_per_step / (ends[-1] - ends[warm - 1])


def param_counts(cfg) -> tuple[int, int]:
    from apt.model.architectures import APTModel
    apt = sum(p.numel() for p in APTModel(cfg.model).parameters())
    hf = sum(p.numel() for p in hf_llama(cfg).parameters())
    return apt, hf


def run_shape(shape: str) -> dict:
    out = tempfile.mkdtemp(prefix=f"apt-peer-{shape}-")
    cfg = apt_config(shape, out)
    WARMUP[0] = QUICK[shape][1] if ARGS.quick else SHAPES[shape][9]
    t = cfg.training
    train_set, _, _ = build_datasets(cfg.data, model_vocab_size=cfg.model.vocab_size,
                                     seed=t.seed)
    # The exact samples APT's loader yields, in its order, for the HF sides.
    loader = iter(create_dataloader(train_set, t.batch_size, seed=t.seed))
    tokens = torch.cat([next(loader).tokens for _ in range(t.max_steps)])
    apt_params, hf_params = param_counts(cfg)
    m = cfg.model
    print(f"\n== {shape}: hidden {m.hidden_size}, {m.num_layers} layers, {m.num_attention_heads} "
          f"heads / {m.kv_heads} kv groups, ffn {m.ffn_size}, vocab {m.vocab_size}, seq "
          f"{cfg.data.seq_length}, batch {t.batch_size} | params APT {apt_params:,} HF "
          f"{hf_params:,} | init std {m.init_std}, rope base {m.rope_base}, eps {m.norm_eps}, "
          f"untied {not m.tie_embeddings} | {t.max_steps} steps, {WARMUP[0]} warm-up, "
          f"threads {torch.get_num_threads()}", flush=True)
    if apt_params != hf_params:
        raise SystemExit(f"{shape}: the models differ ({apt_params:,} vs {hf_params:,} params)")
    rows = []
    for r in range(ARGS.rounds):
        unfixed = apt_round(cfg, train_set, unfixed=True)[0] if ARGS.unfixed else None
        apt, apt_loss = apt_round(cfg, train_set)
        with as_a_user_runs_hf():
            hf, hf_loss = hf_round(cfg, tokens, out)
            plain, plain_loss = plain_round(cfg, tokens)
        rows.append((apt, hf, plain, unfixed))
        before = (f"APT unfixed {unfixed:9,.0f} (/HF {unfixed / hf:.3f}) | " if unfixed else "")
        print(f"{shape:12s} round {r + 1} | {before}APT {apt:9,.0f} | HF Trainer {hf:9,.0f} | "
              f"plain {plain:9,.0f} tok/s | APT/HF {apt / hf:.3f} | APT/plain {apt / plain:.3f} | "
              f"loss: last step APT {apt_loss:.3f} plain {plain_loss:.3f}, HF's mean over the "
              f"run {hf_loss:.3f} | "
              f"threads {torch.get_num_threads()}", flush=True)
    return {"shape": shape, "rows": rows}


def main() -> None:
    torch.set_num_threads(ARGS.threads)
    results = [run_shape(s) for s in ARGS.shapes.split(",")]
    print("\npeer_hf summary (tokens/s medians; ratios = median of per-round ratios)")
    print(f"{'shape':12s} | {'APT':>9s} | {'HF Trainer':>10s} | {'plain':>9s} | APT/HF per round"
          f"{'':10s} | APT/HF median | APT/plain median")
    for res in results:
        rows = res["rows"]
        per_round = [a / h for a, h, _, _ in rows]
        print(f"{res['shape']:12s} | {statistics.median(a for a, _, _, _ in rows):9,.0f} | "
              f"{statistics.median(h for _, h, _, _ in rows):10,.0f} | "
              f"{statistics.median(p for _, _, p, _ in rows):9,.0f} | "
              f"{' '.join(f'{x:.3f}' for x in per_round):26s} | "
              f"{statistics.median(per_round):13.3f} | "
              f"{statistics.median(a / p for a, _, p, _ in rows):.3f}")
        if ARGS.unfixed:
            before = [u / h for _, h, _, u in rows]
            print(f"{'':12s}   APT unfixed/HF per round {' '.join(f'{x:.3f}' for x in before)} "
                  f"| median {statistics.median(before):.3f} | APT/APT unfixed median "
                  f"{statistics.median(a / u for a, _, _, u in rows):.3f}")
    print(f"(fp32, one process, {ARGS.threads} threads, {ARGS.rounds} interleaved rounds; "
          f"overrides {ARGS.apt_override or 'none'})")
    shutdown_distributed()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="tiny,feasibility,large",
                        help=f"comma-separated, of {', '.join(SHAPES)}")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="fewer steps per round")
    parser.add_argument("--unfixed", action="store_true",
                        help="add a column: APT without issue 14's step fixes (before/after)")
    parser.add_argument("--apt-override", action="append", default=[], metavar="KEY=VALUE",
                        help="a profile override for APT's side only (repeatable), e.g. "
                             "training.distributed.zero_stage=0")
    parser.add_argument("--model-kernels", default=None,
                        help="APT's model.kernels (auto | none | [list]); same as "
                             "--apt-override model.kernels=...")
    ARGS = parser.parse_args()
    unknown = [s for s in ARGS.shapes.split(",") if s not in SHAPES]
    if unknown:
        parser.error(f"unknown shape(s) {', '.join(unknown)}; known: {', '.join(SHAPES)}")
    os.environ.setdefault("OMP_NUM_THREADS", str(ARGS.threads))
    main()
