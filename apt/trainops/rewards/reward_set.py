"""The rewards of a run, weighted and summed: what the GRPO objective calls each step."""
from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass

from apt.core.config.errors import ConfigError

from .spec import DEFAULT_KEY, RewardSpec, build_builtin, check_reward_specs
from .user_functions import Unresolvable, resolve

log = logging.getLogger("apt.rewards")


@dataclass(frozen=True)
class Reward:
    label: str            # the name in metrics: the spec's name, "#2" etc. added when repeated
    weight: float
    fn: object            # fn(prompt, completion, record) -> float
    fields: tuple         # record fields it reads


@dataclass(frozen=True)
class RewardScores:
    total: list[float]                     # per sample: sum of weight x reward
    per_reward: dict[str, list[float]]     # label -> per-sample reward (unweighted; 0 = failed)
    failures: dict[str, int]               # label -> samples whose reward raised or was not finite

    def metrics(self, prefix: str = "reward") -> dict[str, float]:
        """Means per reward and failure counts, for the step's metrics line."""
        out = {f"{prefix}/{label}": sum(values) / len(values) if values else 0.0
               for label, values in self.per_reward.items()}
        out.update({f"{prefix}_failures/{label}": float(n) for label, n in self.failures.items()})
        return out


class RewardSet:
    def __init__(self, rewards: list[Reward]):
        self.rewards = rewards
        self.all_zero_calls: dict[str, int] = {}   # label -> scoring calls it scored 0 throughout

    @classmethod
    def from_specs(cls, specs, where: str | None = None, key: str = DEFAULT_KEY) -> "RewardSet":
        """Plain dicts or RewardSpecs -> a RewardSet, or one ConfigError line naming ``where``
        and the reward's key, e.g. ``profiles/x.yaml: training.grpo.rewards[1].name: 'mymod:fn'
        does not resolve (No module named 'mymod')``."""
        if not specs or not all(isinstance(s, RewardSpec) for s in specs):
            specs = check_reward_specs(specs, where, key)
        rewards, seen = [], {}
        for index, spec in enumerate(specs):
            at = f"{key}[{index}]"
            if spec.is_builtin:
                fn = build_builtin(spec, where, at)
                fields = fn.fields
            else:
                try:
                    fn = resolve(spec.name, spec.options)
                except Unresolvable as exc:
                    raise ConfigError(f"{spec.name!r} does not resolve ({exc})", source=where,
                                      key=f"{at}.name") from None
                fields = tuple(getattr(fn, "fields", ()))  # a user function may declare them
                fn = functools.partial(fn, **spec.options) if spec.options else fn
            seen[spec.name] = seen.get(spec.name, 0) + 1
            label = spec.name if seen[spec.name] == 1 else f"{spec.name}#{seen[spec.name]}"
            rewards.append(Reward(label, spec.weight, fn, tuple(fields)))
        return cls(rewards)

    @property
    def required_fields(self) -> set[str]:
        return {f for reward in self.rewards for f in reward.fields}

    def check_records(self, records, source_name: str) -> None:
        """One ConfigError line for the first record that lacks a field a reward reads, e.g.
        ``data/prompts.jsonl: record 3 of 10: no 'answer' field (reward exact_match reads it)``
        (records counted from 1, as lines are)."""
        for number, record in enumerate(records, 1):
            where = f"record {number} of {len(records)}"
            if not isinstance(record, dict):
                raise ConfigError(f"expected a mapping, got {type(record).__name__}",
                                  source=source_name, key=where)
            for reward in self.rewards:
                for name in reward.fields:
                    if name not in record:
                        raise ConfigError(f"no {name!r} field (reward {reward.label} reads it)",
                                          source=source_name, key=where)

    def score(self, prompts, completions, records) -> RewardScores:
        """Every reward on every sample. A reward that raises, or returns something that is
        not a finite number, scores that sample 0, is counted in ``failures`` and logged once
        per call (naming the reward, the function and the first exception)."""
        n = len(completions)
        if not (len(prompts) == n == len(records)):
            raise ValueError(f"{len(prompts)} prompts, {n} completions and {len(records)} records")
        total = [0.0] * n
        per_reward, failures = {}, {}
        for reward in self.rewards:
            values, failed, first = _score_one(reward.fn, prompts, completions, records)
            per_reward[reward.label] = values
            failures[reward.label] = failed
            if failed:
                log.warning("reward %s (%s) failed on %d of %d samples, scored 0: %s",
                            reward.label, _describe(reward.fn), failed, n, first)
            if n and not any(values):
                self._say_all_zero(reward, n, completions[0], records[0])
            for i, value in enumerate(values):
                total[i] += reward.weight * value
        return RewardScores(total, per_reward, failures)

    def _say_all_zero(self, reward: Reward, n: int, completion: str, record: dict) -> None:
        """A reward that scores 0 on every sample of a call (a step's rollouts, an evaluation)
        gives no signal and often means a mismatch of format, not a bad policy: said on the
        first such call with an example, then with the count at the 10th, 100th, ... call."""
        count = self.all_zero_calls[reward.label] = self.all_zero_calls.get(reward.label, 0) + 1
        if count == 1:
            fields = {name: record.get(name) for name in reward.fields}
            log.warning("reward %s (%s) scored 0 on all %d samples of a step (or evaluation), "
                        "e.g. completion %.60r for %s (said again at 10, 100, ... such rounds)",
                        reward.label, _describe(reward.fn), n, completion, _short(fields))
        elif str(count).rstrip("0") == "1":   # 10, 100, 1000, ...
            log.warning("reward %s scored 0 on every sample in %d rounds so far (steps and "
                        "evaluations)", reward.label, count)


def _score_one(fn, prompts, completions, records):
    many = getattr(fn, "score_many", None)
    if many is not None:
        raw = many(prompts, completions, records)
    else:
        raw = []
        for sample in zip(prompts, completions, records):
            try:
                raw.append(fn(*sample))
            except Exception as exc:  # noqa: BLE001 - a reward's failure scores 0, never stops
                raw.append(exc)
    values, failed, first = [], 0, None
    for value in raw:
        value, problem = _as_reward(value)
        if problem:
            failed += 1
            first = first or problem
        values.append(value)
    return values, failed, first


def _as_reward(value) -> tuple[float, str | None]:
    """(the float, None), or (0.0, what is wrong). Anything float() takes counts (bool, numpy
    and one-element torch scalars included); strings do not."""
    if isinstance(value, BaseException):
        return 0.0, f"{type(value).__name__}: {value}"
    try:
        if isinstance(value, (str, bytes)):
            raise TypeError
        number = float(value)
    except (TypeError, ValueError, RuntimeError):
        return 0.0, f"returned {type(value).__name__} {value!r:.80}, not a number"
    if not math.isfinite(number):
        return 0.0, f"returned {number!r}"
    return number, None


def _short(fields: dict) -> str:
    return ", ".join(f"{name}={value!r:.40}" for name, value in fields.items()) or "its record"


def _describe(fn) -> str:
    target = fn.func if isinstance(fn, functools.partial) else fn
    if hasattr(target, "__qualname__"):  # a function
        return f"{target.__module__}:{target.__qualname__}"
    return type(target).__name__  # a built-in reward's instance
