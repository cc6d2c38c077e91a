"""End to end on a real-size model on the CPU (issue 26, point 5): a Qwen2.5-0.5B-shaped model.

1. transformers' ``Qwen2ForCausalLM(Qwen2Config(...))`` with random weights, the architecture of
   ``profiles/qwen2.5-0.5b.yaml`` (494M parameters, q/k/v bias, tied embeddings), saved as a
   Hugging Face directory (``save_pretrained``);
2. ``import_hf_to_weights`` turns it into APT weights; APT's sampler on them gives the same
   greedy tokens as transformers on the saved directory for 5 prompts (``import+greedy``:
   random weights answer with varied tokens);
3. from them: 3 SFT steps (synthetic:qa chats) and 2 GRPO steps (synthetic:arith sums), each
   with all weights trained and with LoRA adapters (rank 16): four runs;
4. the full-SFT run's weights are exported (``export_hf``), transformers loads them and
   generates greedily for 5 prompts; APT's own sampler (``O1Trainer.greedy_answers``, the
   GRPO sampler with ``greedy``) must give the same tokens.
Every phase runs in its own process (the trainers own the process group; the peak RSS is then
each phase's own) and prints one JSON line; the table at the end gives peak RSS and s/step.

    python bench/real_size_e2e.py [--work DIR] [--steps-sft 3] [--steps-grpo 2] [--threads 2]
                                  [--smoke]

``--smoke`` checks the script itself in a few minutes: a 2-layer Llama-shaped model (hidden
128, no q/k/v bias, ``LlamaForCausalLM``) through the same phases.

Settings of the training runs: byte tokenizer, 128-token rows (``data.seq_length``, unpacked),
fp32, one process; SFT 4 rows per step (2 micro-batches of 2); GRPO 2 prompts x 4 completions
of at most 16 new tokens per step (8 rows, 2 micro-batches of 4), beta 0.04 (a reference model).
The runs do not evaluate (see ``phase_train``). The measured figures are in docs/models.md.

Needs the ``hf`` extra (transformers, safetensors) and about 10 GiB of free memory (0.5B fp32
weights + Adam state + 151936-wide logits).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Not bench/ itself (python puts the script's directory first): its kernels.py would shadow the
# `kernels` package that transformers imports.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != REPO / "bench"]
sys.path.insert(0, str(REPO))

PROFILE = "qwen2.5-0.5b"
PROMPTS = ["What comes after 41?", "Repeat: hello world", "Add 12 and 30.",
           "Upper-case: real size", "Reverse: abcdef"]
NEW_TOKENS = 16
# --smoke: a small Llama-shaped model (no Qwen2 features), through the same phases.
SMOKE_MODEL = ["model.hidden_size=128", "model.num_layers=2", "model.num_attention_heads=4",
               "model.num_query_groups=2", "model.ffn_hidden_size=256", "model.vocab_size=512",
               "model.qkv_bias=false"]


def _peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20   # KiB on Linux


def _emit(**record) -> None:
    print("RESULT " + json.dumps({**record, "peak_rss_gib": round(_peak_rss_gib(), 2)}),
          flush=True)


def _model_overrides(args) -> list[str]:
    return SMOKE_MODEL if args.smoke else []


def _model_config(args):
    from apt.core.config import load_profile
    return load_profile(PROFILE, _model_overrides(args)).model


def phase_make_hf(work: Path, args) -> None:
    """Random weights in transformers' own Qwen2 model of the profile's shape (--smoke: Llama)."""
    import torch
    import transformers
    m = _model_config(args)
    family = "Qwen2" if m.qkv_bias else "Llama"
    torch.manual_seed(0)
    config = getattr(transformers, f"{family}Config")(
        hidden_size=m.hidden_size, num_hidden_layers=m.num_layers,
        num_attention_heads=m.num_attention_heads, num_key_value_heads=m.kv_heads,
        intermediate_size=m.ffn_hidden_size, vocab_size=m.vocab_size,
        max_position_embeddings=m.max_seq_len, rope_theta=m.rope_base, rms_norm_eps=m.norm_eps,
        tie_word_embeddings=m.tie_embeddings, use_sliding_window=False,
        bos_token_id=256, eos_token_id=256, pad_token_id=257)   # the byte tokenizer's ids
    model = getattr(transformers, f"{family}ForCausalLM")(config)
    started = time.perf_counter()
    model.save_pretrained(work / "hf")
    _emit(phase="make_hf", parameters=sum(p.numel() for p in model.parameters()),
          seconds=round(time.perf_counter() - started, 1))


def phase_import(work: Path) -> None:
    from apt.model.architectures import APTModel
    from apt.trainops.interop import import_hf_to_weights
    started = time.perf_counter()
    model = import_hf_to_weights(work / "hf", work / "weights", APTModel)
    _emit(phase="import", seconds=round(time.perf_counter() - started, 1),
          qkv_bias=model.qkv_bias, vocab_size=model.vocab_size)


def _overrides(work: Path, name: str, objective: str, lora: bool, steps: int,
               args) -> list[str]:
    """The profile, shrunk to CPU-sized batches; the byte tokenizer (no download) and the
    built-in synthetic data sets, so the script runs offline."""
    common = [f"training.init_from={work / 'weights'}", "data.tokenizer=byte",
              "data.tokenizer_path=null", "data.seq_length=128", "data.packing=false",
              "training.precision=fp32", "training.distributed.strategy=ddp",
              f"training.max_steps={steps}", "training.warmup_steps=0",
              "training.eval_interval=0", "training.log_interval=1",
              "training.checkpoints.save_interval=0", f"output.dir={work / 'runs'}",
              f"output.experiment_name={name}", "monitoring.plots=false",
              "model.max_seq_len=4096", *_model_overrides(args)]
    if lora:
        common += ["lora.rank=16", "training.learning_rate=2e-4"]
    if objective == "sft":
        return common + ["data.corpus=sft", "data.path=synthetic:qa", "training.batch_size=4",
                         "training.micro_batch_size=2"]
    return common + ["training.objective=grpo", "data.corpus=prompts",
                     "data.path=synthetic:arith", "training.batch_size=8",
                     "training.micro_batch_size=4", "training.grpo.num_generations=4",
                     "training.grpo.max_new_tokens=16", "training.grpo.beta=0.04",
                     "training.grpo.eval_prompts=5"]


def phase_train(work: Path, objective: str, lora: bool, steps: int, args) -> None:
    from apt.core.config import load_profile
    from apt.trainops.trainers import trainer_for
    name = f"{objective}-{'lora' if lora else 'full'}"
    cfg = load_profile(PROFILE, _overrides(work, name, objective, lora, steps, args))
    trainer = trainer_for(cfg).from_config(cfg)
    # No evaluation: the fine-tuning trainers evaluate before the first step and after the
    # last whatever eval_interval says, and SFT's held-out exact match decodes 500 chats
    # greedily without a KV cache, which on a 0.5B model on 2 CPU cores takes longer than
    # every step of the run (seen: 17 min into the "before" evaluation, no step yet). The
    # greedy comparison of the export+greedy phase is this bench's check of the answers.
    trainer.eval_before_training, trainer.eval_dataloader = False, None
    trainer.train()
    records = [json.loads(line) for line in
               (trainer.artifacts.run_dir / "metrics.jsonl").read_text().splitlines()]
    times = [r["step_time"] for r in records if "step_time" in r]
    # The first step pays for start-up (kernel selection, allocator warm-up): reported apart.
    _emit(phase=name, steps=len(times), first_step_s=round(times[0], 2),
          s_per_step=round(sum(times[1:]) / max(1, len(times) - 1), 2),
          loss=[round(r["loss"], 4) for r in records if "loss" in r],
          run_dir=str(trainer.artifacts.run_dir))
    if name == "sft-full":
        (work / "sft-full-run").write_text(str(trainer.artifacts.run_dir))


def phase_export_and_compare(work: Path, args) -> None:
    """Export the full-SFT weights; transformers' greedy tokens against APT's sampler's."""
    from apt.core.config import load_profile
    from apt.model.architectures import APTModel
    from apt.trainops.interop import export_hf
    from apt.trainops.data.tokenizers.tokenizer import build_tokenizer
    run_dir = Path((work / "sft-full-run").read_text())
    cfg = load_profile(PROFILE, _overrides(work, "greedy", "grpo", False, 1, args)
                       + [f"training.init_from={run_dir / 'model' / 'dist'}"])
    started = time.perf_counter()
    export_hf(run_dir / "model" / "dist", cfg.model, work / "hf-out",
              tokenizer=build_tokenizer("byte"), model_class=APTModel)
    export_s = time.perf_counter() - started
    _emit(phase="export+greedy", export_s=round(export_s, 1),
          **_compare_greedy(cfg, run_dir, work / "hf-out"))


def phase_import_and_compare(work: Path, args) -> None:
    """The imported (untrained, random) weights against the directory transformers saved:
    greedy tokens of a random model vary, where a barely trained one repeats one token."""
    from apt.core.config import load_profile
    cfg = load_profile(PROFILE, _overrides(work, "greedy-import", "grpo", False, 1, args))
    _emit(phase="import+greedy", **_compare_greedy(cfg, work / "weights", work / "hf"))


def _compare_greedy(cfg, apt_weights: Path, hf_dir: Path) -> dict:
    """APT's sampler (``O1Trainer.greedy_answers``, the GRPO sampler with ``greedy``, on the
    weights ``cfg`` starts from) against ``transformers.generate`` on ``hf_dir``, for PROMPTS;
    and the teacher-forced logits of APT's one-process model at ``apt_weights``."""
    import torch
    from transformers import AutoModelForCausalLM
    from apt.model.architectures import APTModel
    from apt.trainops.data.tokenizers.tokenizer import build_tokenizer
    from apt.trainops.trainers import trainer_for
    tokenizer = build_tokenizer("byte")
    prompts = [[int(t) for t in tokenizer.encode(f"<|user|>\n{p}\n<|assistant|>\n")]
               for p in PROMPTS]
    trainer = trainer_for(cfg).from_config(cfg)
    assert cfg.training.grpo.max_new_tokens == NEW_TOKENS
    apt_tokens = trainer.greedy_answers([torch.tensor(p) for p in prompts])
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    hf_tokens = []
    for p in prompts:
        # APT's sampler never picks an embedding row past the tokenizer's vocabulary
        # (valid_vocab): the same mask on transformers' side.
        out = hf.generate(torch.tensor([p]), max_new_tokens=NEW_TOKENS, do_sample=False,
                          eos_token_id=tokenizer.eod_id, pad_token_id=tokenizer.pad_id,
                          logits_processor=[_MaskVocabulary(tokenizer.vocab_size)])
        hf_tokens.append(out[0, len(p):].tolist())
    same = [a == h for a, h in zip(apt_tokens, hf_tokens)]   # both keep the end token
    # Greedy tokens of a barely trained model can be one repeated token: the logits themselves
    # (teacher-forced on prompt + APT's answer), APT's one-process model against transformers'.
    apt_model = APTModel.from_pretrained(apt_weights).eval()
    difference = 0.0
    with torch.no_grad():
        for p, answer in zip(prompts, apt_tokens):
            ids = torch.tensor([p + answer])
            ours = apt_model(ids, torch.arange(ids.shape[1])[None], None).float()
            difference = max(difference, (ours - hf(ids).logits.float()).abs().max().item())
    return dict(same=same, max_logit_difference=difference,
                distinct_tokens=len({t for a in apt_tokens for t in a}),
                apt=apt_tokens, transformers=hf_tokens)


class _MaskVocabulary:
    """A transformers logits processor: -inf on the ids from ``valid`` on."""

    def __init__(self, valid: int):
        self.valid = valid

    def __call__(self, input_ids, scores):
        scores[:, self.valid:] = float("-inf")
        return scores


PHASES = {
    "make_hf": lambda w, a: phase_make_hf(w, a),
    "import": lambda w, a: phase_import(w),
    "import+greedy": lambda w, a: phase_import_and_compare(w, a),
    "sft-full": lambda w, a: phase_train(w, "sft", False, a.steps_sft, a),
    "sft-lora": lambda w, a: phase_train(w, "sft", True, a.steps_sft, a),
    "grpo-full": lambda w, a: phase_train(w, "grpo", False, a.steps_grpo, a),
    "grpo-lora": lambda w, a: phase_train(w, "grpo", True, a.steps_grpo, a),
    "export+greedy": lambda w, a: phase_export_and_compare(w, a),
}


def run_phase(name: str, work: Path, args) -> dict | None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(args.threads)}
    command = [sys.executable, __file__, "--phase", name, "--work", str(work),
               "--steps-sft", str(args.steps_sft), "--steps-grpo", str(args.steps_grpo),
               *(["--smoke"] if args.smoke else [])]
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    results = [json.loads(line[len("RESULT "):]) for line in done.stdout.splitlines()
               if line.startswith("RESULT ")]
    if done.returncode or not results:
        tail = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        print(f"{name}: FAILED (exit {done.returncode}): {tail}")
        return None
    print(f"{name}: {json.dumps(results[-1])}", flush=True)
    return results[-1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default=None, help="working directory (default: a temp dir)")
    parser.add_argument("--steps-sft", type=int, default=3)
    parser.add_argument("--steps-grpo", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--smoke", action="store_true",
                        help="a 2-layer Llama-shaped model: checks the script on today's APT")
    parser.add_argument("--phase", choices=list(PHASES), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase:   # a child: one phase
        PHASES[args.phase](Path(args.work), args)
        return 0
    work = Path(args.work or tempfile.mkdtemp(prefix="apt-real-size-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"work directory {work}")
    results = {}
    for name in PHASES:
        results[name] = run_phase(name, work, args)
        if results[name] is None and name in ("make_hf", "import", "sft-full"):
            print("later phases need this one: stopping")
            break
    print(f"\n{'phase':14s} {'peak RSS GiB':>12s} {'s/step':>7s}  notes")
    for name, r in results.items():
        if r is None:
            print(f"{name:14s} {'-':>12s} {'-':>7s}  failed")
            continue
        step = f"{r['s_per_step']:7.2f}" if "s_per_step" in r else f"{'-':>7s}"
        notes = (f"first step {r['first_step_s']} s, losses {r['loss']}" if "loss" in r else
                 f"same greedy tokens: {r['same']}, logits within "
                 f"{r['max_logit_difference']:.1e}" if "same" in r else
                 f"{r.get('seconds', '')} s")
        print(f"{name:14s} {r['peak_rss_gib']:12.2f} {step}  {notes}")
    compared = [results.get(name) for name in ("import+greedy", "export+greedy")]
    return 0 if all(r and all(r["same"]) for r in compared) else 1


if __name__ == "__main__":
    sys.exit(main())
