"""CPU compatibility layer: run Megatron-core's real (CUDA-oriented) code on CPU with gloo.

Megatron-core assumes CUDA everywhere: it asks for ``torch.cuda.current_device()``, creates
tensors with ``device="cuda"``, forks the CUDA RNG, records CUDA streams/events and checks
``param.type() == "torch.cuda.FloatTensor"``. On a CPU-only torch build each of these raises.
``activate()`` installs the smallest set of shims we measured to be sufficient (see
shared/FEASIBILITY.md, "Megatron-core 0.16.1 on CPU with gloo"). It is a no-op when CUDA
is available, so the same training code picks the real CUDA paths on a GPU machine.

Every shim is a small named function below with the Megatron call site it serves. The layer
touches torch/megatron internals; it is pinned to ``TESTED_VERSIONS`` (other versions only
warn, loudly: they may work) and guarded by tests/test_megatron_canary.py, which must fail on a
version change that breaks it. ``activate()`` is process-global and cannot be undone.
"""
from __future__ import annotations

import contextlib
import logging
import threading
import warnings

import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode, _get_current_function_mode_stack

TESTED_VERSIONS = {"torch": "2.13", "megatron.core": "0.16"}

_lock = threading.Lock()
_active = False


def check_versions() -> list[str]:
    """Return one message per package whose major.minor differs from TESTED_VERSIONS.

    Policy: a mismatch WARNS (RuntimeWarning + log error) instead of raising, because a new
    version often still works; the canary test is what fails loudly if it does not.
    """
    import megatron.core

    found = {"torch": torch.__version__, "megatron.core": megatron.core.__version__}
    return [
        f"{name} {found[name]} is not the tested {want}.x: the CPU compat layer may break"
        for name, want in TESTED_VERSIONS.items()
        if not (found[name] == want or found[name].startswith(want + "."))
    ]


# -- 1. device queries ---------------------------------------------------------------------
def _patch_device_queries() -> None:
    # WHY: ~175 call sites do `torch.empty(..., device=torch.cuda.current_device())` (e.g.
    # tensor_parallel/layers.py, pipeline_parallel/p2p_communication.py); "cpu" is a valid device
    # there. ~32 sites call torch.cuda.synchronize() (timers, p2p, optimizer); set_device is
    # called by some init helpers.
    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.synchronize = lambda device=None: None
    torch.cuda.set_device = lambda device: None


# -- 2. RNG ---------------------------------------------------------------------------------
def _patch_rng() -> None:
    # WHY: tensor_parallel/random.py (model_parallel_cuda_manual_seed, CudaRNGStatesTracker.add/
    # fork, CheckpointFunction) reads/writes the CUDA generator; rerun_state_machine.py too. We
    # point the "CUDA" generator at the CPU default generator, so tracker forks really switch the
    # stream that CPU ops (init, dropout) draw from. _set_cuda_rng_state goes through
    # torch.cuda._lazy_call, which on CPU queues the callback forever: replace it outright.
    import megatron.core.tensor_parallel.random as mrandom

    def get_state(device="cuda", *args, **kwargs):
        return torch.get_rng_state()

    def set_state(new_state, device=-1, *args, **kwargs):
        torch.set_rng_state(new_state)

    def seed(s):  # not torch.manual_seed: that one calls torch.cuda.manual_seed_all (recursion)
        torch.default_generator.manual_seed(int(s))

    for mod in (torch.cuda, torch.cuda.random):
        mod.get_rng_state, mod.set_rng_state = get_state, set_state
        mod.manual_seed = mod.manual_seed_all = seed
    mrandom._get_cuda_rng_state, mrandom._set_cuda_rng_state = get_state, set_state

    # CudaRNGStatesTracker.fork warns when the CPU RNG moved inside a fork: with one shared
    # generator that is expected, so drop exactly that message.
    logging.getLogger(mrandom.__name__).addFilter(
        lambda rec: "CPU RNG state changed within GPU RNG context" not in rec.getMessage()
    )


# -- 3. device remap -------------------------------------------------------------------------
def _is_cuda_device(d) -> bool:
    if isinstance(d, torch.device):
        return d.type == "cuda"
    if isinstance(d, str):
        return d.startswith("cuda")
    return isinstance(d, int) and not isinstance(d, bool)  # an int device is a CUDA ordinal


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrites CUDA device requests to CPU for every torch call made while it is on the stack.

    WHY: 59 `device="cuda"` literals in 27 files (e.g. transformer/utils.py
    get_default_causal_mask, pipeline_parallel/schedules.py loss/num_tokens tensors), 19
    `.cuda()` calls (e.g. distributed/finalize_model_grads.py, optimizer/clip_grads.py) and
    `.to("cuda")`. Also: `Tensor.type()` reports "torch.cuda.FloatTensor" etc. because
    optimizer/optimizer.py, distrib_optimizer.py and clip_grads.py branch/assert on those strings;
    pin_memory/record_stream become no-ops (no pinned memory or streams without CUDA).
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        # Fast path: this mode sees EVERY torch call of a CPU run (~2,000 per training step of
        # the tiny model), and almost all of them have no keyword to rewrite and are none of
        # the methods handled below. Measured: +1.9 us per call with the general path below,
        # +~1 us with this early return (bench/peer_hf.py, issue 14).
        if not kwargs and func not in _REWRITTEN_METHODS:
            return func(*args)
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.cuda or func is torch.Tensor.pin_memory:
            return args[0]
        if func is torch.Tensor.record_stream:
            return None
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return name if ".cuda." in name else name.replace("torch.", "torch.cuda.", 1)
        if func is torch.Tensor.to:
            args = tuple("cpu" if _is_cuda_device(a) else a for a in args)
        if _is_cuda_device(kwargs.get("device")):
            kwargs["device"] = "cpu"
        if kwargs.get("pin_memory"):
            kwargs["pin_memory"] = False
        return func(*args, **kwargs)


# The methods __torch_function__ rewrites whatever their keywords (positional devices included).
_REWRITTEN_METHODS = frozenset({torch.Tensor.cuda, torch.Tensor.pin_memory,
                                torch.Tensor.record_stream, torch.Tensor.type, torch.Tensor.to})

_MODE = _CudaToCpuMode()


@contextlib.contextmanager
def device_remap():
    """Ensure the CUDA->CPU remap mode is active in this block (e.g. in a thread you started:
    torch function modes are thread-local; activate() only pushes it on the calling thread)."""
    if not _active or _MODE in _get_current_function_mode_stack():
        yield
        return
    with _MODE:
        yield


@contextlib.contextmanager
def remap_suspended():
    """Run this block without the remap mode (when it is the innermost mode of this thread).

    For hot paths measured to make no CUDA request, e.g. the sampler's KV-cached passes on
    one model-parallel rank (apt/trainops/rl/sampling.py): the mode's Python hook costs about
    a microsecond on every torch call. A CUDA request inside raises (CPU torch has no CUDA),
    it is never silently wrong."""
    from torch.overrides import _pop_mode_temporarily
    stack = _get_current_function_mode_stack()
    if not stack or stack[-1] is not _MODE:
        yield
        return
    with _pop_mode_temporarily():
        yield


def _keep_remap_in_backward() -> None:
    # WHY: the autograd engine runs Python callbacks with an EMPTY torch-function-mode stack
    # (measured on torch 2.13), so code that runs during backward loses the remap: megatron's
    # CheckpointFunction.backward recomputes the forward there (recompute full/selective hits
    # get_default_causal_mask's device="cuda"), custom backward of tensor_parallel mappings, and
    # CheckpointWithoutOutput._recompute (a tensor hook). Re-enter the mode at the two entry
    # points: every custom autograd.Function backward (BackwardCFunction.apply, looked up by the
    # engine at call time) and megatron's recompute hook. Most fragile piece: torch internals.
    from torch.autograd.function import BackwardCFunction
    from megatron.core.tensor_parallel import random as mrandom

    def reenter(fn):
        def wrapper(*args, **kwargs):
            with device_remap():
                return fn(*args, **kwargs)

        wrapper.__wrapped__ = fn
        return wrapper

    BackwardCFunction.apply = reenter(BackwardCFunction.apply)
    BackwardCFunction.apply_boxed = reenter(BackwardCFunction.apply_boxed)
    mrandom.CheckpointWithoutOutput._recompute = reenter(mrandom.CheckpointWithoutOutput._recompute)


# -- 4. streams and events -------------------------------------------------------------------
class _NoopEvent:
    def __init__(self, *args, **kwargs):
        pass

    def record(self, stream=None):
        pass

    def wait(self, stream=None):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True

    def elapsed_time(self, other):
        return 0.0


class _NoopStream(_NoopEvent):
    def wait_stream(self, stream):
        pass

    def wait_event(self, event):
        pass

    def record_event(self, event=None):
        return event or _NoopEvent()


def _patch_streams() -> None:
    # WHY: CPU ops are synchronous, so ordering primitives can be no-ops. Used by the MoE token
    # dispatchers (transformer/moe/token_dispatcher.py, fused a2a), DDP overlap_grad_reduce /
    # overlap_param_gather (distributed/param_and_grad_buffer.py), p2p overlap and timers.
    # torch.cuda.stream(s) is used as a context manager; nvtx ranges wrap profiling regions.
    torch.cuda.Stream = torch.cuda.ExternalStream = _NoopStream
    torch.cuda.Event = _NoopEvent
    torch.cuda.current_stream = torch.cuda.default_stream = lambda device=None: _NoopStream()
    torch.cuda.stream = lambda stream=None: contextlib.nullcontext()
    torch.cuda.set_stream = lambda stream: None
    torch.cuda.nvtx.range_push = lambda msg: None
    torch.cuda.nvtx.range_pop = lambda: None


# -- 5. gloo collectives --------------------------------------------------------------------
class _DoneWork:
    """Handle for a collective that already completed (returned when async_op=True)."""

    def wait(self, timeout=None):
        return True

    def is_completed(self):
        return True


def _patch_gloo_collectives() -> None:
    # WHY: gloo's all_gather requires every rank's tensor to have the same shape ("invalid tensor
    # size at index 1"), but megatron gathers uneven chunks: tensor_parallel/mappings.py
    # _gather_along_first_dim with output_split_sizes (MoE allgather dispatcher, TP/EP+SP).
    # Pad each rank's flattened tensor to the largest size, gather, slice. all_to_all_single:
    # the MoE alltoall dispatcher passes split sizes as tensors; gloo's binding wants lists.
    orig_all_gather, orig_a2a = dist.all_gather, dist.all_to_all_single

    def all_gather(tensor_list, tensor, group=None, async_op=False):
        if len({tuple(t.shape) for t in tensor_list}) <= 1 or dist.get_backend(group) != "gloo":
            return orig_all_gather(tensor_list, tensor, group=group, async_op=async_op)
        width = max(t.numel() for t in tensor_list)
        padded = tensor.new_zeros(width)
        padded[: tensor.numel()] = tensor.reshape(-1)
        bufs = [padded.new_empty(width) for _ in tensor_list]
        orig_all_gather(bufs, padded, group=group)
        for out, buf in zip(tensor_list, bufs):
            out.copy_(buf[: out.numel()].view(out.shape))
        return _DoneWork() if async_op else None

    def all_to_all_single(output, input, output_split_sizes=None, input_split_sizes=None,
                          group=None, async_op=False):
        def as_list(s):
            return s.tolist() if isinstance(s, torch.Tensor) else (list(s) if s is not None else s)

        return orig_a2a(output, input, as_list(output_split_sizes), as_list(input_split_sizes),
                        group=group, async_op=async_op)

    dist.all_gather, dist.all_to_all_single = all_gather, all_to_all_single


# -- 6. missing Transformer Engine symbol ------------------------------------------------------
def _patch_missing_te_symbols() -> None:
    # WHY: transformer/moe/moe_utils.py imports te_general_gemm inside a try that fails without
    # TE, leaving the name undefined; router_gating_linear then raises NameError. None selects
    # its plain-torch fallback.
    import megatron.core.transformer.moe.moe_utils as moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


def activate() -> bool:
    """Install the CPU layer (idempotent). Returns True if it is active, False when CUDA exists.

    The device-remap mode is pushed on the calling thread's torch-function-mode stack and
    stays there for the life of the process; use ``device_remap()`` in other threads.
    """
    global _active
    if torch.cuda.is_available():
        return False
    with _lock:
        if _active:
            return True
        for problem in check_versions():
            warnings.warn(problem, RuntimeWarning, stacklevel=2)
            logging.getLogger(__name__).error(problem)
        _patch_device_queries()
        _patch_rng()
        _patch_streams()
        _patch_gloo_collectives()
        _patch_missing_te_symbols()
        _keep_remap_in_backward()
        _active = True
        _MODE.__enter__()  # global remap for this thread, never popped
    return True


def is_active() -> bool:
    return _active
