"""fp16's dynamic loss scale in a checkpoint, as plain numbers (state.json).

A resumed fp16 run that restarted its scale at the initial value would skip steps on overflow
until the scale came back down, and its losses would differ from the uninterrupted run. The
scale and the counters that decide its next change are the same on every rank (overflow is
agreed over all of them), so rank 0 saves them once. Each engine has its own scaler:
DeepSpeed's ``DynamicLossScaler`` (one per optimizer) and Megatron's ``DynamicGradScaler``
(one per optimizer of a chain). Resuming on the other engine carries over the scale itself.
"""
from __future__ import annotations

import torch

# The DeepSpeed DynamicLossScaler fields that decide the next scale change.
_DEEPSPEED_FIELDS = ("cur_scale", "cur_iter", "last_overflow_iter", "cur_hysteresis")


def deepspeed_scaler_state(scaler) -> dict | None:
    if scaler is None or not getattr(scaler, "dynamic", False):   # bf16/fp32: a fixed scale
        return None
    return {"kind": "deepspeed", **{k: getattr(scaler, k) for k in _DEEPSPEED_FIELDS}}


def load_deepspeed_scaler_state(scaler, state: dict) -> None:
    if state["kind"] == "deepspeed":
        for k in _DEEPSPEED_FIELDS:
            setattr(scaler, k, type(getattr(scaler, k))(state[k]))
    else:
        scaler.cur_scale = float(state["scale"])


def megatron_scaler_state(scaler) -> dict | None:
    if scaler is None or not hasattr(scaler, "_growth_tracker"):   # bf16: none or constant
        return None
    state = scaler.state_dict()
    return {"kind": "megatron", "scale": float(state["scale"]),
            "growth_tracker": int(state["growth_tracker"]),
            "hysteresis_tracker": int(state["hysteresis_tracker"])}


def load_megatron_scaler_state(scaler, state: dict) -> None:
    scale = state["scale"] if state["kind"] == "megatron" else state["cur_scale"]
    if state["kind"] == "megatron":
        trackers = state["growth_tracker"], state["hysteresis_tracker"]
    else:   # another engine's counters mean something else: start them afresh
        trackers = 0, scaler.hysteresis
    scaler.load_state_dict({"scale": torch.tensor([float(scale)], dtype=torch.float),
                            "growth_tracker": trackers[0], "hysteresis_tracker": trackers[1]})
