"""O1Trainer: reinforcement learning with verifiable rewards (the GRPO family) on the one loop.

The seed's name for RL on checkable tasks: the policy samples ``num_generations`` answers per
prompt, programs score them (apt/trainops/rewards), and group-relative advantages push the
policy toward the answers that scored. The pieces live where they belong and this class wires
them: the loss and its metrics in the objective (apt/trainops/objectives/grpo.py); sampling on
every layout and the rollouts in apt/trainops/rl/; the loop is ``Trainer.train``, drawing its
micro-batches from a ``RolloutSource`` instead of the data loader. It extends the Trainer
through its public hooks only (``dataset_options``, ``make_loader``, ``training_batches``, the
objective).

What it adds around them:
- the prompt data (``data.corpus: prompts``), each record checked for the fields the rewards
  read, and a prompt loader that advances one step's prompts (batch / num_generations) per
  generation round;
- evaluation by greedy answers to the held-out prompts on this layout: ``val_reward``,
  ``val_rewards/<name>``, ``val_accuracy`` (the share whose first reward scored 1) and
  ``val_completion_length``, before the first step and after the last (the objective's
  evaluation, apt/trainops/rl/evaluation.py, through the Evaluator as for every objective);
- checkpoints that continue bit-identically: the rollouts of a round that a checkpoint cuts
  in the middle (num_iterations > 1) are saved with it; the prompt position follows the step.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist

from apt.core.config import APTConfig, ConfigError, with_overrides
from apt.trainops.checkpoints import CheckpointError
from apt.trainops.data import create_dataloader
from apt.trainops.distributed.engines.forward_only import lockstep_group
from apt.trainops.objectives.grpo import GRPOObjective
from apt.trainops.rewards import RewardSet
from apt.trainops.rl.evaluation import GreedyAnswerEvaluation, greedy_answers
from apt.trainops.rl.rollouts import RolloutSource
from .batch_source import TimedBatches
from .trainer import Trainer


class O1Trainer(Trainer):
    """``O1Trainer(config=load_profile("grpo-tiny")).train()``, or with ``train_dataset`` /
    ``eval_dataset`` PromptDatasets. Keyword arguments override ``training.grpo``
    (e.g. ``num_generations=8, beta=0.04, loss_type="dapo"``)."""

    eval_before_training = True

    def __init__(self, model=None, train_dataset=None, eval_dataset=None, *,
                 config: APTConfig | None = None, **kwargs):
        cfg = config or APTConfig(model=getattr(model, "arch", APTConfig().model))
        grpo_keys = set(cfg.training.grpo.__dataclass_fields__)
        overrides = {f"training.grpo.{k}": kwargs.pop(k) for k in list(kwargs) if k in grpo_keys}
        overrides.setdefault("training.objective", "grpo")
        if cfg.data.corpus != "prompts" and train_dataset is not None:
            overrides["data.corpus"] = "prompts"
        cfg = with_overrides(cfg, overrides)
        # Rewards resolve before anything is built: a name that does not resolve is one line.
        self.rewards = RewardSet.from_specs(
            cfg.training.grpo.rewards, where=cfg.sources[-1] if cfg.sources else cfg.name)
        kwargs.setdefault("objective", GRPOObjective(
            cfg.training.grpo, [r.label for r in self.rewards.rewards],
            answer_evaluation=GreedyAnswerEvaluation(self.rewards, cfg.training.grpo,
                                                     cfg.data.seq_length)))
        self._rollout_state = None
        self._prompt_draws = None   # the prompt cursor a checkpoint recorded (dynamic sampling)
        super().__init__(model=model, train_dataset=train_dataset, eval_dataset=eval_dataset,
                         config=cfg, **kwargs)
        if self.tokenizer is None:   # the caller's prompts, neither a tokenizer nor a profile
            raise ConfigError("O1Trainer decodes the policy's answers for its rewards: pass "
                              "tokenizer= (the one that tokenized the prompts) or a profile "
                              "(config=load_profile(...)) whose data.tokenizer it is",
                              key="data.tokenizer")
        groups = cfg.training.grpo.num_generations * self.plan.dp
        if self.plan.global_batch % groups:
            raise ConfigError(f"{self.plan.global_batch} completions per step cannot be split "
                              f"into whole groups of num_generations="
                              f"{cfg.training.grpo.num_generations} on each of "
                              f"{self.plan.dp} data-parallel ranks",
                              key="training.batch_size")
        for loader in (self.train_dataloader, self.eval_dataloader):
            dataset = getattr(loader, "dataset", None)
            if dataset is not None and hasattr(dataset, "records"):
                self.rewards.check_records(dataset.records, dataset.name)
        self.objective.valid_vocab = self.tokenizer.vocab_size

    # -- data ------------------------------------------------------------------------------
    def dataset_options(self, cfg) -> dict:
        g = cfg.training.grpo
        return {"max_prompt_length": cfg.data.max_prompt_length
                or cfg.data.seq_length - g.max_new_tokens,
                "required_fields": self.rewards.required_fields}

    def start_lines(self) -> list[str]:
        """How many prompts exceed the prompt limit and what happens to them (issue 30: 945 of
        3,709 prompts lost their leading characters behind one warning among many)."""
        g, data = self.config.training.grpo, self.config.data
        limit = data.max_prompt_length or data.seq_length - g.max_new_tokens
        formula = (f"data.max_prompt_length {limit}" if data.max_prompt_length
                   else f"data.seq_length {data.seq_length} - training.grpo.max_new_tokens "
                        f"{g.max_new_tokens} = {limit}")
        parts = []
        for split, loader in (("training", self.train_dataloader),
                              ("held-out", self.eval_dataloader)):
            dataset = getattr(loader, "dataset", None)
            if hasattr(dataset, "truncation"):   # a PromptDataset
                own = dataset.max_prompt_length
                parts.append(f"{split} {dataset.truncation()}"
                             + (f" (its own limit: {own})" if own != limit else ""))
        if not parts:
            return []
        return [f"prompts | at most {formula} tokens, longer ones keep their end: "
                + "; ".join(parts)]

    @property
    def prompts_per_step(self) -> int:
        return self.plan.global_batch // self.config.training.grpo.num_generations

    def make_loader(self, dataset, train: bool):
        """One batch of this rank's prompts per generation round (train), or the held-out
        prompts one at a time (evaluation reads the dataset directly)."""
        prompts = self.prompts_per_step
        draws = self._prompt_draws
        if draws is None:   # one prompt batch per round (no checkpoint says otherwise)
            draws = math.ceil(self.step / self.config.training.grpo.num_iterations)
        return create_dataloader(
            dataset, prompts // self.runtime.dp_size if train else 1, 0,
            shuffle=self.config.data.shuffle and train, seed=self.config.training.seed,
            global_batch_size=prompts if train else self.runtime.dp_size,
            data_parallel_rank=self.runtime.dp_rank, data_parallel_size=self.runtime.dp_size,
            infinite=train, consumed_samples=draws * prompts if train else 0,
            permutation=self.config.data.shuffle_method)

    def training_batches(self):
        """The rollouts: completions sampled for the prompt loader's batches, scored and cut
        into the step's micro-batches (apt/trainops/rl/rollouts.py)."""
        if self._resumed_draws_differ():
            # dynamic sampling drew extra prompt batches before the checkpoint: the prompt
            # loader (built before the checkpoint's rank state was read) continues from there
            self.train_dataloader = self.make_loader(self.train_dataloader.dataset, train=True)
        prompts = TimedBatches(self.train_dataloader, lambda batch: batch, self.runtime.device)
        source = RolloutSource(prompts, self.modules, self.objective, self.rewards,
                               self.tokenizer, self.config, self.plan, self.runtime.device,
                               start_step=self.step, sync_group=lockstep_group(self.plan),
                               prompt_draws=self._prompt_draws)
        if self._rollout_state is not None:
            source.load_state(self._rollout_state)
        self.rollouts = source
        return source

    # -- checkpoints -----------------------------------------------------------------------
    def rank_state(self):
        source = getattr(self, "rollouts", None)
        return source.state() if source is not None else None

    def _resumed_draws_differ(self) -> bool:
        """Whether a checkpoint's prompt cursor differs from one batch per round. Every rank
        agrees (a rank resumed on a wider layout has no rank state of its own: it takes the
        others' cursor, the same on every rank that saved one)."""
        if self.resumed_from is None:
            return False
        draws = torch.tensor([float(-1 if self._prompt_draws is None else self._prompt_draws)],
                             dtype=torch.float64, device=self.runtime.device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(draws, op=dist.ReduceOp.MAX)
        self._prompt_draws = None if draws.item() < 0 else int(draws.item())
        rounds = math.ceil(self.step / self.config.training.grpo.num_iterations)
        return self._prompt_draws is not None and self._prompt_draws != rounds

    def load_rank_state(self, state, where: str, same_layout: bool) -> None:
        if state is not None and "prompt_draws" in state:
            self._prompt_draws = int(state["prompt_draws"])
        if self.step % self.config.training.grpo.num_iterations == 0:
            return   # a round boundary: the next step samples anew
        if state is None or "micro_batches" not in state or not same_layout:
            raise CheckpointError(
                f"{where}: step {self.step} is inside a round of num_iterations="
                f"{self.config.training.grpo.num_iterations} and its rollouts "
                f"{'were saved on another layout' if same_layout is False and state else 'are not saved'}: "
                f"resume from a checkpoint at a multiple of num_iterations, or on the layout "
                f"it was saved on")
        self._rollout_state = state

    # -- evaluation (the objective's: GreedyAnswerEvaluation, through the Evaluator) ------
    def greedy_answers(self, prompts: list) -> list[list[int]]:
        """Greedy completions (token ids) of ``prompts`` on this layout; collective over the
        model-parallel group (and the data-parallel group under ZeRO-3)."""
        return greedy_answers(self.modules, prompts, self.config.training.grpo, self.tokenizer,
                              self.config.data.seq_length, sync_group=lockstep_group(self.plan))
