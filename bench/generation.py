"""Generation throughput: APT's sampler against transformers' ``generate``, the same weights.

The O1Trainer samples completions with ``apt.trainops.rl.sampling.sample`` (end-aligned
prompts, one prefill pass, then one KV-cached pass per new token). Here the same weights run
in transformers' ``LlamaForCausalLM`` too (exported in memory with ``apt.trainops.interop``'s
mapping), whose ``generate`` gets the same left-padded prompts with their attention mask.
Both decode greedily, so their tokens are compared (a mismatch would mean they do not compute
the same model); every row runs ``--new`` tokens (no end-of-document token). Rounds interleave
the two and the thread counts (``--threads 1,2``: torch's intra-op threads, set between runs in
this one process) so that the machine's drift hits each alike: every round runs each thread
count once, APT and HF back to back (which goes first alternates). Each line gives new tokens
per second, the APT/HF ratio of wall-clock and of this process's CPU time, and what the rest
of the machine used meanwhile (``others``: the busy CPU time of all other processes, in cores,
from /proc/stat); the summary gives the medians per thread count and the load average before
and after. ``--no-cache`` adds APT's sampler without its KV cache (the whole prefix recomputed
per token) to every round.

    python bench/generation.py [--batch 64] [--prompt 32] [--new 16] [--rounds 7]
                               [--threads 1,2] [--no-cache]

Needs the ``bench`` extra (transformers).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from dataclasses import replace
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


def busy_jiffies() -> tuple[int, int]:
    """(busy CPU time of the whole machine, clock ticks per second) from /proc/stat: the
    ``others`` column subtracts this process's own CPU time from its change over a run."""
    with open("/proc/stat") as stat:
        fields = [int(x) for x in stat.readline().split()[1:]]
    idle = fields[3] + fields[4]           # idle + iowait
    return sum(fields[:8]) - idle, os.sysconf("SC_CLK_TCK")


def timed(fn, *args):
    """(result, wall-clock seconds, this process's CPU seconds, the other processes' busy
    cores meanwhile): on a shared machine the CPU time moves less with the other processes'
    load than the wall clock does, and the third says how loaded it was."""
    busy, hz = busy_jiffies()
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn(*args)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    others = max(0.0, (busy_jiffies()[0] - busy) / hz - cpu) / wall
    return result, wall, cpu, others


# Where a decoding token's time goes: the profiler's self time of each op, grouped.
CATEGORIES = (("GEMMs", ("linear_pointwise", "aten::mm", "aten::addmm", "aten::bmm")),
              ("attention (SDPA)", ("scaled_dot_product",)))


def op_times(fn, repeats: int) -> dict:
    """{category: (self-time seconds, calls)} per call of ``fn`` under torch's profiler
    (``repeats`` calls), and "profiled wall-clock"; every op outside CATEGORIES counts as
    "other torch ops" (norms, RoPE, activation, cache copies, masks, the logits' softmax and
    arg-max, ...)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        wall = time.perf_counter()
        for _ in range(repeats):
            fn()
        wall = time.perf_counter() - wall
    totals = {name: [0.0, 0] for name, _ in CATEGORIES}
    totals["other torch ops"] = [0.0, 0]
    for event in prof.key_averages():
        name = next((n for n, keys in CATEGORIES if any(k in event.key for k in keys)),
                    "other torch ops")
        totals[name][0] += event.self_cpu_time_total / 1e6 / repeats
        totals[name][1] += event.count / repeats
    totals["profiled wall-clock"] = [wall / repeats, None]
    return totals


def breakdown(runs: dict, new: int, repeats: int = 5) -> None:
    """Per decoding token, APT against HF: (the time of ``new`` tokens minus that of one, the
    prefill) / (new - 1), under the profiler, split into the op categories; the rest of the
    profiled wall-clock is Python and dispatch (module calls, argument checks, the generation
    loop; inflated by the profiler's own cost per op). The last row: the same difference
    without the profiler (medians of ``repeats``)."""
    per_token = {}
    for name, run in runs.items():
        wall = {n: statistics.median(timed(run, n)[1] for _ in range(repeats)) for n in (1, new)}
        ops = {n: op_times(lambda: run(n), repeats) for n in (1, new)}
        row = {cat: ((ops[new][cat][0] - ops[1][cat][0]) / (new - 1),
                     None if ops[new][cat][1] is None
                     else (ops[new][cat][1] - ops[1][cat][1]) / (new - 1)) for cat in ops[new]}
        profiled = row.pop("profiled wall-clock")[0]
        row["Python and dispatch (the rest)"] = (profiled - sum(t for t, _ in row.values()),
                                                 None)
        row["per token, profiled"] = (profiled, None)
        row["per token, without the profiler"] = ((wall[new] - wall[1]) / (new - 1), None)
        per_token[name] = row
    print(f"| per decoding token, {torch.get_num_threads()} thread(s) | APT ms (op calls) | "
          "HF generate ms (op calls) |")
    print("|---|---|---|")
    for cat in per_token["apt"]:
        cells = [f"{per_token[n][cat][0] * 1e3:.2f}" + (
            f" ({per_token[n][cat][1]:.0f})" if per_token[n][cat][1] is not None else "")
            for n in ("apt", "hf")]
        print(f"| {cat} | {cells[0]} | {cells[1]} |")


def thread_counts(text: str) -> list[int]:
    try:
        counts = [int(x) for x in text.split(",")]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of thread "
                                         "counts >= 1 (e.g. 1,2)")
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="tiny")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--prompt", type=int, default=32, help="longest prompt (tokens)")
    parser.add_argument("--new", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=thread_counts, default=[1, 2],
                        help="torch thread counts to compare, comma-separated (default 1,2)")
    parser.add_argument("--no-cache", action="store_true",
                        help="also time APT's sampler without its KV cache")
    parser.add_argument("--breakdown", action="store_true",
                        help="then, per thread count, where a decoding token's time goes")
    args = parser.parse_args()
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
    load_before = os.getloadavg()
    print(f"model {cfg.name}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M "
          f"parameters, {cfg.model.num_layers} layers, hidden {cfg.model.hidden_size}; batch "
          f"{args.batch}, prompts {args.prompt - 7}-{args.prompt} tokens, {args.new} new "
          f"tokens; threads {','.join(map(str, args.threads))}; torch {torch.__version__}; "
          f"{os.cpu_count()} CPUs, load average {load_before[0]:.1f} (1 min) "
          f"{load_before[2]:.1f} (15 min)")
    runs = {"apt": lambda: apt_generate(model, prompts, cached),
            "hf": lambda: (hf_generate(twin, prompts, args.new, valid_vocab), None)}
    # Warm-up at the measured shapes and every thread count: the first big batch allocates
    # (both libraries), and a new thread count starts OpenMP's threads.
    for threads in args.threads:
        torch.set_num_threads(threads)
        runs["apt"](), runs["hf"]()
    tokens = args.batch * args.new
    table = {t: {"apt": [], "hf": [], "cpu_apt": [], "cpu_hf": [], "others": [],
                 "nocache": []} for t in args.threads}
    for r in range(args.rounds):
        # Alternate the order of the thread counts and of the two libraries between rounds.
        order = args.threads if r % 2 == 0 else args.threads[::-1]
        for threads in order:
            torch.set_num_threads(threads)
            row = table[threads]
            outputs = {}
            for name in (("apt", "hf") if r % 2 == 0 else ("hf", "apt")):
                (outputs[name], wall_s, cpu_s, others) = timed(runs[name])
                row[name].append(wall_s), row[f"cpu_{name}"].append(cpu_s)
                row["others"].append(others)
            (apt_tokens, passes), (hf_tokens, _) = outputs["apt"], outputs["hf"]
            same = sum(a == b for a, b in zip(apt_tokens, hf_tokens))
            line = (f"round {r + 1}, {threads} thread(s): APT {tokens / row['apt'][-1]:8.1f} "
                    f"tok/s ({passes} passes) | HF generate {tokens / row['hf'][-1]:8.1f} tok/s "
                    f"| APT/HF x{row['hf'][-1] / row['apt'][-1]:.2f} (CPU time "
                    f"x{row['cpu_hf'][-1] / row['cpu_apt'][-1]:.2f}) | others "
                    f"{statistics.mean(row['others'][-2:]):.1f} cores | identical rows "
                    f"{same}/{args.batch}")
            if args.no_cache:
                _, wall_s, _, _ = timed(apt_generate, model, prompts, uncached)
                row["nocache"].append(wall_s)
                line += f" | APT without KV cache {tokens / wall_s:8.1f} tok/s"
            print(line, flush=True)
    load_after = os.getloadavg()
    print(f"load average {load_before[0]:.1f} before, {load_after[0]:.1f} after (1 min); "
          f"medians of {args.rounds} rounds:")
    print("| threads | APT tok/s | HF generate tok/s | APT/HF wall-clock (rounds) | "
          "APT/HF CPU time | others (cores) |")
    print("|---|---|---|---|---|---|")
    for threads, row in table.items():
        ratios = [h / a for a, h in zip(row["apt"], row["hf"])]
        cpu_ratios = [h / a for a, h in zip(row["cpu_apt"], row["cpu_hf"])]
        print(f"| {threads} | {tokens / statistics.median(row['apt']):.0f} | "
              f"{tokens / statistics.median(row['hf']):.0f} | x{statistics.median(ratios):.2f} "
              f"({' '.join(f'{x:.2f}' for x in ratios)}) | x{statistics.median(cpu_ratios):.2f} "
              f"| {statistics.median(row['others']):.1f} |")
    if args.breakdown:
        runs = {"apt": lambda n: apt_generate(model, prompts, replace(cached, max_new_tokens=n)),
                "hf": lambda n: hf_generate(twin, prompts, n, valid_vocab)}
        for threads in args.threads:
            torch.set_num_threads(threads)
            print(f"load average {os.getloadavg()[0]:.1f} (1 min)")
            breakdown(runs, args.new)


if __name__ == "__main__":
    main()
