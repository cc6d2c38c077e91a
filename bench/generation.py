"""Generation throughput: APT's sampler against transformers' ``generate``, the same weights.

The O1Trainer samples completions with ``apt.trainops.rl.sampling.sample`` (end-aligned
prompts, one prefill pass, then one KV-cached pass per new token). Here the same weights run
in transformers' ``LlamaForCausalLM`` too (exported in memory with ``apt.trainops.interop``'s
mapping), whose ``generate`` gets the same left-padded prompts with their attention mask.
Both decode greedily, so their tokens are compared (a mismatch would mean they do not compute
the same model); every row runs ``--new`` tokens (no end-of-document token). Rounds interleave
the two (APT, HF, APT, HF, ...) so that the machine's drift hits each alike; the table gives
new tokens per second per round, the APT/HF ratio, and the medians. ``--no-cache`` adds APT's
sampler without its KV cache (the whole prefix recomputed per token) to every round.

    python bench/generation.py [--batch 64] [--prompt 32] [--new 16] [--rounds 5]
                               [--threads 1] [--no-cache]

Needs the ``bench`` extra (transformers).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

# bench/ itself off the path: its kernels.py would shadow the ``kernels`` package that
# transformers imports.
HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
sys.path.insert(0, str(HERE.parent))

from apt.core.logging import configure_logging  # noqa: E402

configure_logging()

import torch  # noqa: E402

from apt.core.config import load_profile  # noqa: E402
from apt.model.architectures import APTModel  # noqa: E402
from apt.trainops.interop import hf_config, megatron_to_hf  # noqa: E402
from apt.trainops.runtime.process_groups import seed_everything, setup_distributed  # noqa: E402
from apt.trainops.rl.sampling import SamplingParams, sample  # noqa: E402


def hf_twin(model: APTModel):
    """transformers' Llama holding ``model``'s weights (SDPA attention, its default)."""
    import transformers
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    twin = transformers.LlamaForCausalLM(hf_config(model.arch))
    twin.load_state_dict(megatron_to_hf(state, model.arch), strict=True)
    return twin.eval()


def apt_generate(model, prompts, params):
    out = sample([model], prompts, params, list(range(len(prompts))))
    return out.tokens, out.forward_passes


@torch.no_grad()
def hf_generate(twin, prompts, new_tokens, valid_vocab):
    """Left-padded prompts and their mask, greedy, exactly ``new_tokens`` each."""
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):], mask[i, width - len(p):] = p, 1
    # The padded embedding rows (beyond the tokenizer's vocabulary) are never chosen, as in
    # APT's sampler.
    suppress = list(range(valid_vocab, twin.config.vocab_size)) or None
    out = twin.generate(input_ids=ids, attention_mask=mask, do_sample=False,
                        max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                        pad_token_id=0, eos_token_id=None, suppress_tokens=suppress)
    return out[:, width:].tolist()


def timed(fn, *args):
    """(result, wall-clock seconds, this process's CPU seconds): on a shared machine the CPU
    time moves less with the other processes' load than the wall clock does."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn(*args)
    return result, time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="tiny")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--prompt", type=int, default=32, help="longest prompt (tokens)")
    parser.add_argument("--new", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-cache", action="store_true",
                        help="also time APT's sampler without its KV cache")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)   # a fixed thread count: comparable numbers on CPU
    length = args.prompt + args.new
    cfg = load_profile(args.profile, [f"model.max_seq_len={length}", f"data.seq_length={length}"])
    setup_distributed(plan=None)   # one process: the model-parallel groups Megatron asks for
    seed_everything(0)
    model = APTModel(cfg.model).eval()
    twin = hf_twin(model)
    valid_vocab = min(256, cfg.model.vocab_size)
    generator = torch.Generator().manual_seed(0)
    # Prompts of different lengths (up to 7 tokens shorter): the padding is part of the work.
    prompts = [torch.randint(0, valid_vocab, (args.prompt - (i % 8),), generator=generator)
               for i in range(args.batch)]
    base = dict(max_new_tokens=args.new, eod_id=-1, valid_vocab=valid_vocab, greedy=True,
                max_length=length)
    cached, uncached = SamplingParams(**base), SamplingParams(**base, kv_cache=False)
    print(f"model {cfg.name}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M "
          f"parameters, {cfg.model.num_layers} layers, hidden {cfg.model.hidden_size}; batch "
          f"{args.batch}, prompts {args.prompt - 7}-{args.prompt} tokens, {args.new} new "
          f"tokens, {args.threads} thread(s), torch {torch.__version__}")
    # Warm-up at the measured shapes: the first big batch allocates (both libraries).
    apt_generate(model, prompts, cached)
    hf_generate(twin, prompts, args.new, valid_vocab)
    tokens = args.batch * args.new
    wall = {"apt": [], "hf": [], "apt_nocache": []}
    cpu = {"apt": [], "hf": []}
    for r in range(args.rounds):
        (apt_tokens, passes), wall_s, cpu_s = timed(apt_generate, model, prompts, cached)
        wall["apt"].append(wall_s), cpu["apt"].append(cpu_s)
        hf_tokens, wall_s, cpu_s = timed(hf_generate, twin, prompts, args.new, valid_vocab)
        wall["hf"].append(wall_s), cpu["hf"].append(cpu_s)
        same = sum(a == b for a, b in zip(apt_tokens, hf_tokens))
        line = (f"round {r + 1}: APT {tokens / wall['apt'][-1]:8.1f} tok/s ({passes} passes) | "
                f"HF generate {tokens / wall['hf'][-1]:8.1f} tok/s | APT/HF "
                f"x{wall['hf'][-1] / wall['apt'][-1]:.2f} (CPU time "
                f"x{cpu['hf'][-1] / cpu['apt'][-1]:.2f}) | identical rows {same}/{args.batch}")
        if args.no_cache:
            _, wall_s, _ = timed(apt_generate, model, prompts, uncached)
            wall["apt_nocache"].append(wall_s)
            line += f" | APT without KV cache {tokens / wall_s:8.1f} tok/s"
        print(line, flush=True)
    ratios = [h / a for a, h in zip(wall["apt"], wall["hf"])]
    cpu_ratios = [h / a for a, h in zip(cpu["apt"], cpu["hf"])]
    print(f"median: APT {tokens / statistics.median(wall['apt']):.1f} tok/s, HF generate "
          f"{tokens / statistics.median(wall['hf']):.1f} tok/s; APT/HF wall-clock "
          f"x{statistics.median(ratios):.2f} (rounds {' '.join(f'{x:.2f}' for x in ratios)}), "
          f"CPU time x{statistics.median(cpu_ratios):.2f}")

if __name__ == "__main__":
    main()
