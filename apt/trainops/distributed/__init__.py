"""Parallel plan, process groups, and the engine that wraps a model for its plan.

The names are imported on first use (PEP 562): ``trainops plan`` needs only the plan and its
memory estimate, which are plain arithmetic, and importing the engine and runtime modules here
would load torch and Megatron-core (about 6 s of CPU) for a command that does not train.
"""
from importlib import import_module

_EXPORTS = {"DDPWrapper": ".ddp_wrapper", "LaunchEnv": ".launcher_env",
            "detect_launch_env": ".launcher_env", "Plan": ".plan", "PlanError": ".plan",
            "make_plan": ".plan", "Runtime": ".runtime", "setup_distributed": ".runtime",
            "shutdown_distributed": ".runtime"}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(_EXPORTS[name], __name__), name)
    globals()[name] = value
    return value
