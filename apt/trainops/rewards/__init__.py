"""Rewards for reinforcement learning on checkable tasks (GRPO, issue 12).

``RewardSet.from_specs(specs, where)`` builds a run's rewards from the profile's
``training.grpo.rewards`` (or refuses with one config line); ``check_records`` refuses a prompt
file without the fields they read; ``score(prompts, completions, records)`` returns the
weighted total per sample, each reward on its own and the failure counts. Code is run by
``sandbox.run_python``. Standard library only: no torch here.
"""
from .answers import final_answer, normalize, parse_number
from .builtin import BUILTIN_REWARDS, Code, ExactMatch, Format, Numeric
from .reward_set import Reward, RewardScores, RewardSet
from .sandbox import SandboxLimits, SandboxResult, run_python
from .spec import RewardSpec, check_reward_specs

__all__ = ["BUILTIN_REWARDS", "Code", "ExactMatch", "Format", "Numeric", "Reward", "RewardScores",
           "RewardSet", "RewardSpec", "SandboxLimits", "SandboxResult", "check_reward_specs",
           "final_answer", "normalize", "parse_number", "run_python"]
