"""Parallel plan, process groups, and the engine that wraps a model for its plan.

The names are imported on first use (PEP 562): ``trainops plan`` needs only the plan and its
memory estimate, which are plain arithmetic, and importing the engine and runtime modules here
would load torch and Megatron-core (about 6 s of CPU) for a command that does not train.
"""
from importlib import import_module

# The runtime (launcher environment, process groups) lives below the model in
# apt.trainops.runtime; these names are re-exported from there (an arrow down) for the seed API
# `from apt.trainops.distributed import setup_distributed`.
_RUNTIME = "apt.trainops.runtime.process_groups"
_EXPORTS = {"DDPWrapper": ".ddp_wrapper", "LaunchEnv": "apt.trainops.runtime.launcher_env",
            "detect_launch_env": "apt.trainops.runtime.launcher_env", "Plan": ".plan",
            "PlanError": ".plan", "make_plan": ".plan", "Runtime": _RUNTIME,
            "setup_distributed": _RUNTIME, "shutdown_distributed": _RUNTIME}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(_EXPORTS[name], __name__), name)
    globals()[name] = value
    return value
