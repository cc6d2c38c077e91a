"""Sampling completions from the policy itself, on the layout it trains on (DP, TP, SP, PP).

``sample(chunks, prompts, params, seeds)`` continues every prompt with at most
``params.max_new_tokens`` tokens and records the log-probability of each sampled token.

How a step runs on any layout: every new token is one forward pass. With pipeline stages it
goes through Megatron's own forward-only schedule
(apt/trainops/distributed/engines/forward_only.py), so the stages pass activations as in
training; with one stage the model is called directly (the schedule's per-pass set-up is all
overhead there), and then, without expert parallelism or ZeRO-3, without the CPU layer's device
remap, whose Python hook sees every torch call (``cpu_compat.remap_suspended``). The last stage
gathers the
vocabulary-parallel logits (TP), samples, and the tokens go back to every rank of the
model-parallel group (a broadcast over TP, then over PP). Data-parallel ranks sample their own
prompts independently; under ZeRO-3, whose forward passes gather parameters over the
data-parallel group, they agree on the slots and so on the number of passes.

The prompts are aligned at their end (left padding, as transformers' ``generate``): row b
starts with ``shifts[b]`` padding slots, its tokens sit at positions ``slot - shifts[b]`` (so a
prompt gets the positions it gets alone) and an attention mask hides the padding. One pass
prefills every prompt, then each pass feeds the tokens just sampled: N new tokens, N passes.
The KV cache is Megatron-core's static inference context (``StaticInferenceContext``): each
attention layer keeps this rank's heads' keys (rotated once, apt/model/rotated_key_cache.py)
and values, so a new token costs one token's forward pass; the model builds the per-row rotary
table for the cache (apt/model/packed_documents.py). A model that cannot take a mask or
per-row positions (Transformer Engine's attention) gets the prompts start-aligned instead:
the shortest prompt is prefilled, then each pass feeds one slot of every row, the prompt's own
token where a row's prompt has not ended, else the sampled one (more passes, same tokens).
Without the cache (``kv_cache=False``) each pass recomputes the whole prefix: the same tokens,
slower. Sequence parallelism is switched off while sampling (a one-token pass cannot be split
over TP ranks) and restored afterwards, as Megatron's inference does.

Randomness: each prompt has its own generator (``seeds[i]``), so a prompt's completions do not
depend on which rank or batch it landed in: one process, DP, TP and PP sample the same tokens
from the same logits. Temperature, then top-k and nucleus (top-p) truncation; the recorded
log-probability is the token's under the temperature-scaled distribution (what the trainer
computes, apt/trainops/objectives/grpo.py), before truncation. Greedy takes the arg-max.
Vocabulary rows beyond the tokenizer's (``valid_vocab``: embedding padding) are never sampled.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field, replace

import torch
import torch.distributed as dist

from apt.core.cpu_compat import remap_suspended
from apt.trainops.distributed.engines.forward_only import forward_only


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int
    eod_id: int
    valid_vocab: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    greedy: bool = False
    kv_cache: bool = True
    # Token sequences that end a completion (tokenised stop strings), besides eod_id.
    stop_sequences: tuple = ()
    # Tokens that end a completion besides eod_id: the chat template's end-of-turn token
    # (<|im_end|>, <|eot_id|>) and the tokenizer's eos_token (chat_template.stop_ids).
    stop_ids: tuple = ()
    # Capacity of the cache: every row's prompt + completion fits (data.seq_length).
    max_length: int = 0


@dataclass
class Completions:
    """Per row: the sampled token ids, their log-probabilities (float32), and whether the row
    ended by itself (end-of-document or a stop sequence) rather than at max_new_tokens."""
    tokens: list = field(default_factory=list)
    logps: list = field(default_factory=list)
    stopped: list = field(default_factory=list)
    forward_passes: int = 0


class RankRoles:
    """Where this rank sits in its model-parallel group, for sampling and sharing tokens."""

    def __init__(self):
        from megatron.core import parallel_state as ps
        self.ps = ps
        self.tp = ps.get_tensor_model_parallel_world_size()
        self.pp = ps.get_pipeline_model_parallel_world_size()
        self.ep = ps.get_expert_model_parallel_world_size()
        self.last_stage = ps.is_pipeline_last_stage(ignore_virtual=True)
        self.samples = self.last_stage and ps.get_tensor_model_parallel_rank() == 0

    def share(self, tensor: torch.Tensor) -> torch.Tensor:
        """The sampling rank's ``tensor`` on every rank of the model-parallel group."""
        if self.tp > 1:
            dist.broadcast(tensor, self.ps.get_tensor_model_parallel_src_rank(),
                           group=self.ps.get_tensor_model_parallel_group())
        if self.pp > 1:
            dist.broadcast(tensor, self.ps.get_pipeline_model_parallel_last_rank(),
                           group=self.ps.get_pipeline_model_parallel_group())
        return tensor


@contextlib.contextmanager
def inference_mode(chunks):
    """Eval mode and no sequence parallelism for the duration of sampling."""
    from megatron.core.transformer.utils import set_model_to_sequence_parallel
    was_training = [c.training for c in chunks]
    sequence_parallel = [c.config.sequence_parallel for c in chunks]
    for chunk in chunks:
        chunk.eval()
        if chunk.config.sequence_parallel:
            set_model_to_sequence_parallel(chunk, False)
    try:
        yield
    finally:
        for chunk, training, sp in zip(chunks, was_training, sequence_parallel):
            chunk.train(training)
            if sp:
                set_model_to_sequence_parallel(chunk, True)


def _temperature_logps(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """log-softmax of logits / temperature over the tokenizer's vocabulary (float32)."""
    logits = logits.float()
    if params.valid_vocab < logits.shape[-1]:
        logits[:, params.valid_vocab:] = float("-inf")
    return torch.log_softmax(logits / params.temperature, dim=-1)


def _truncated(logps: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Probabilities after top-k and top-p truncation (renormalised)."""
    probs = logps.exp()
    if params.top_k and params.top_k < probs.shape[-1]:
        kth = torch.topk(probs, params.top_k, dim=-1).values[:, -1:]
        probs = probs.masked_fill(probs < kth, 0.0)
    if params.top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        before = sorted_probs.cumsum(-1) - sorted_probs     # mass of the tokens ranked above
        sorted_probs = sorted_probs.masked_fill(before >= params.top_p, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return probs / probs.sum(-1, keepdim=True)


def choose(logits: torch.Tensor, params: SamplingParams, generators) -> tuple:
    """(next token per row, its log-probability) from last-position logits [b, V]."""
    logps = _temperature_logps(logits, params)
    if params.greedy:
        tokens = logps.argmax(-1)
    else:
        probs = _truncated(logps, params)
        # One uniform per row from the row's own generator, then the inverse CDF: a row's
        # draw does not depend on the other rows of the batch.
        uniform = torch.stack([torch.rand((), generator=g, dtype=torch.float64)
                               for g in generators]).to(probs.device)
        cdf = probs.double().cumsum(-1)
        tokens = torch.searchsorted(cdf, (uniform * cdf[:, -1])[:, None]).squeeze(-1)
        tokens = tokens.clamp(max=params.valid_vocab - 1)
    return tokens, logps.gather(-1, tokens[:, None]).squeeze(-1)


class _Step:
    """One forward pass over cache slots [start, end) of every row (all slots without the
    cache): logits [b, V] at slot end - 1 on the last stage, None elsewhere.

    ``shifts[b]``: how many padding slots row b starts with (end-aligned prompts). Row b's
    slot t is at position t - shifts[b], and no slot sees a padding slot but itself (a padded
    query must see something: a fully masked row would give NaN keys and values that the
    mask's zero weights cannot cancel)."""

    def __init__(self, chunks, params: SamplingParams, rows: int, device, shifts,
                 roles: "RankRoles", synchronised: bool):
        from megatron.core.inference.contexts import StaticInferenceContext
        self.chunks, self.params, self.device = chunks, params, device
        self.shifts = shifts.to(device)
        self.shifts_max = int(shifts.max()) if len(shifts) else 0
        self.padded = self.shifts_max > 0
        self.context = (StaticInferenceContext(rows, params.max_length) if params.kv_cache
                        else None)
        # One pipeline stage: call the model as the schedule's step would, without the
        # schedule's per-pass set-up (the same modules and collectives; TP > 1 included).
        self.direct = len(chunks) == 1 and roles.pp == 1
        # One stage, no expert dispatch and no ZeRO-3 gathers: the passes (TP's all-reduces
        # and the logits' all-gather included) make no CUDA request, so the sampler runs
        # without the CPU layer's device remap (cpu_compat; a CUDA request there raises).
        self.bare = self.direct and roles.ep == 1 and not synchronised
        # Built once per generation, sliced per pass: every slot's position per row, and
        # which key slots are padding (a decoding pass's whole mask, [b, 1, 1, keys]).
        slots = torch.arange(params.max_length, device=device)
        self.positions = (slots[None, :] - self.shifts[:, None]).clamp(min=0)
        self.padding = (slots[None, :] < self.shifts[:, None])[:, None, None, :]
        self.kwargs = dict(runtime_gather_output=True)
        if self.context is not None:
            self.kwargs["inference_context"] = self.context

    def __call__(self, tokens: torch.Tensor, start: int, end: int):
        first = start if self.context is not None else 0
        batch = _Slots(tokens[:, first:end], self.positions[:, first:end],
                       self._mask(first, end) if self.padded else None)
        kwargs = self.kwargs
        if self.direct:
            logits = self.chunks[0](batch.tokens, batch.positions, batch.mask, **kwargs)
            logits = logits[:, -1].float()
        else:
            def step_fn(model, b):
                out = model(b.tokens, b.positions, b.mask, **kwargs)
                return out, lambda logits: {"logits": logits[:, -1].float()}

            outputs = forward_only(self.chunks, [batch], step_fn)
            logits = outputs[0]["logits"] if outputs else None
        if self.context is not None:
            self.context.sequence_len_offset += end - start
            self.context.enable_decode_mode()
        return logits

    def _mask(self, first: int, end: int) -> torch.Tensor:
        """[b, 1, queries first..end-1, keys 0..end-1], True = masked: the padding slots, but a
        slot's own. A query past every row's padding (each decoding pass: the prompts end at
        the same slot) has just the padding masked: a view of the table."""
        padding = self.padding[..., :end]
        if first >= self.shifts_max:
            return padding.expand(-1, -1, end - first, -1)
        own = (torch.arange(end, device=self.device)[None, :] ==
               torch.arange(first, end, device=self.device)[:, None])           # [q, keys]
        return padding & ~own


@dataclass
class _Slots:
    tokens: torch.Tensor
    positions: torch.Tensor
    mask: torch.Tensor | None

    @property
    def model_shape(self) -> tuple[int, int]:
        return tuple(self.tokens.shape)


def _ends_with(row: list[int], sequences) -> bool:
    return any(len(s) and row[-len(s):] == list(s) for s in sequences)


def end_aligned(chunks) -> bool:
    """Whether the model can take end-aligned (left-padded) rows: it honours per-row position
    ids and an attention mask (APT's local spec; Transformer Engine's attention does not)."""
    from apt.trainops.objectives.base import unwrap
    return all({"position_ids", "attention_mask"} <=
               set(getattr(unwrap(c), "supported_batch_fields", ())) for c in chunks)


@torch.no_grad()
def sample(chunks, prompts: list, params: SamplingParams, seeds: list[int],
           sync_group=None) -> Completions:
    """Completions of ``prompts`` (1-D token id tensors); ``seeds[i]`` seeds row i's draws.
    Collective over the model-parallel group (and ``sync_group``, e.g. the data-parallel group
    under ZeRO-3, whose ranks then run the same number of passes)."""
    chunks = list(chunks)
    device = next(chunks[0].parameters()).device
    roles = RankRoles()
    rows = len(prompts)
    lengths = torch.tensor([len(p) for p in prompts], dtype=torch.long)
    if rows and int(lengths.min()) == 0:
        raise ValueError(f"prompt {int(lengths.argmin())} is empty: a completion continues at "
                         "least one token")
    # Synchronised ranks agree on the slots (so they run the same passes).
    longest = _agreed(int(lengths.max()) if rows else 0, sync_group, device, dist.ReduceOp.MAX)
    capacity = params.max_length or longest + params.max_new_tokens
    if longest + params.max_new_tokens > capacity:
        raise ValueError(f"a prompt of {longest} tokens + {params.max_new_tokens} new "
                         f"tokens exceeds the sampler's capacity of {capacity} tokens")
    params = replace(params, max_length=capacity)
    # End-aligned rows: every prompt ends at slot ``longest``; one prefill pass, then one pass
    # per new token. A model that cannot mask padding gets the prompts start-aligned and fed
    # in step from the shortest one (see the module docstring).
    aligned = end_aligned(chunks)
    if aligned:
        width, shifts = longest, longest - lengths
    else:
        width = _agreed(int(lengths.min()) if rows else capacity, sync_group, device,
                        dist.ReduceOp.MIN)
        shifts = torch.zeros_like(lengths)
    tokens = torch.zeros(rows, capacity, dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        tokens[i, int(shifts[i]):int(shifts[i]) + len(p)] = p.to(device)
    ends = (shifts + lengths).tolist()     # the slot after each prompt
    # Greedy draws nothing: no generators to seed.
    generators = None if params.greedy else [torch.Generator().manual_seed(int(s))
                                             for s in seeds]
    out = Completions(tokens=[[] for _ in range(rows)], logps=[[] for _ in range(rows)],
                      stopped=[False] * rows)
    active = [True] * rows
    stops = {params.eod_id, *params.stop_ids}
    step = _Step(chunks, params, rows, device, shifts, roles, sync_group is not None)
    position, start = width, 0
    with inference_mode(chunks), remap_suspended() if step.bare else contextlib.nullcontext():
        while _any_active(active, sync_group, device):
            if position >= capacity:
                break
            logits = step(tokens, start, position)
            out.forward_passes += 1
            start = position
            chosen = torch.zeros(2, rows, dtype=torch.float64, device=device)
            if roles.samples and rows:
                next_tokens, logps = choose(logits, params, generators)
                chosen[0], chosen[1] = next_tokens.double(), logps.double()
            chosen = roles.share(chosen)
            if aligned:   # every prompt has ended: every row feeds its chosen token
                tokens[:, position] = chosen[0].long()
            else:         # rows past their prompt feed the chosen token, the others their own
                fed = torch.tensor([position >= end for end in ends], device=device)
                tokens[:, position] = torch.where(fed, chosen[0].long(), tokens[:, position])
            picked, picked_logps = chosen.tolist()
            for i in range(rows):
                if not active[i] or position < ends[i]:
                    continue    # a finished row, or a prompt token that is fed as it is
                token = int(picked[i])
                out.tokens[i].append(token)
                out.logps[i].append(picked_logps[i])
                if token in stops or _ends_with(out.tokens[i], params.stop_sequences):
                    active[i], out.stopped[i] = False, True
                elif len(out.tokens[i]) >= params.max_new_tokens:
                    active[i] = False
            position += 1
    return out


def _any_active(active: list, sync_group, device) -> bool:
    mine = any(active)
    if sync_group is None:
        return mine
    flag = torch.tensor([float(mine)], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=sync_group)
    return bool(flag.item())


def _agreed(value: int, sync_group, device, op) -> int:
    if sync_group is None:
        return value
    tensor = torch.tensor([float(value)], device=device)
    dist.all_reduce(tensor, op=op, group=sync_group)
    return int(tensor.item())
