"""Parallel plan, process groups, and the engine that wraps a model for its plan."""
from .ddp_wrapper import DDPWrapper
from .launcher_env import LaunchEnv, detect_launch_env
from .plan import Plan, PlanError, make_plan
from .runtime import Runtime, setup_distributed, shutdown_distributed

__all__ = ["DDPWrapper", "LaunchEnv", "Plan", "PlanError", "Runtime", "detect_launch_env", "make_plan",
           "setup_distributed", "shutdown_distributed"]
