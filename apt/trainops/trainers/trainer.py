"""The training loop: plan -> runtime -> model -> engine -> steps, evaluation, artifacts.

Reads top to bottom: ``Trainer.__init__`` resolves the config and plan (a bad config fails
here, before any process group exists), ``train()`` runs the loop. Numbers the plan decided
(micro-batch, accumulation, ZeRO stage, precision) are read from ``self.plan``. What the loop
carries between steps is ``self.train_state`` (train_state.py, what checkpoints save); after
each step the run control (reliability/run_control.py) returns one decision; the records are
logged by step_log.py and the run ends in finish.py.
"""
from __future__ import annotations

import time

import torch

from apt.core.config import APTConfig, ConfigError, config_to_dict, with_overrides
from apt.model.lora import apply_lora
from apt.trainops.data import APTDataLoader, build_tokenizer, create_dataloader
from apt.trainops.data.build import build_datasets
from apt.trainops.distributed.ddp_wrapper import unwrap_strategy_request
from apt.trainops.distributed.engines import build_engine
from apt.trainops.distributed.engines.forward_only import lockstep_group
from apt.trainops.runtime.launcher_env import detect_launch_env
from apt.trainops.distributed.plan import make_plan
from apt.trainops.runtime.process_groups import setup_distributed
from apt.trainops.objectives import build_objective
from apt.trainops.callbacks import Callback
from apt.trainops.reliability.lifetime import die_with_launcher
from apt.trainops.reliability.preflight import refuse_unless_ready
from apt.trainops.reliability.anomaly import AnomalyGuard, AnomalyStop
from apt.trainops.reliability.run_control import Decision, RunControl
from apt.trainops.reliability.watchdog import set_phase
from .arguments import keyword_overrides, model_chunks
from .batch_source import TimedBatches
from .checkpointing import (announce_resume, checkpoint_manager, checkpoint_save_dir,
                            load_engine_state, load_init_weights, load_weights,
                            open_run_artifacts, resolve_resume, save_training_checkpoint)
from .finish import finish_run
from .progress import Progress
from .schedule import warmup_cosine
from .run_log import RunLog, StepRecord
from .train_state import TrainState


def _state_field(name: str) -> property:
    return property(lambda self: getattr(self.train_state, name),
                    lambda self, value: setattr(self.train_state, name, value))


class Trainer:
    """The one training loop. Built from a profile (``Trainer(config=cfg)``,
    ``Trainer.from_config(cfg, train_dataset=..., eval_dataset=...)``) or the seed's way
    (``Trainer(model=model, train_dataloader=..., max_steps=...)``); ``train()`` runs it.
    Built from a profile without ``tokenizer=``, the trainer holds the profile's
    (``data.tokenizer``), whoever built the data.

    Writing a trainer variant (PreTrainer, Finetuner, ClaudeTrainer, GPT5Trainer and O1Trainer
    are the examples): subclass, and change what the loop trains on through these public hooks
    only; never copy or override ``train`` or a private method.

    - the objective: pass ``objective=`` (an apt/trainops/objectives Objective) to
      ``super().__init__``, e.g. ``kwargs.setdefault("objective", MyObjective(...))``. It is
      the loss, the logged step metrics and the evaluation (``Objective.evaluate``: the
      Evaluator calls it; forward-pass statistics by default);
    - ``dataset_options(cfg) -> dict``: extra ``build_datasets`` arguments the variant's data
      needs when the trainer builds the profile's data;
    - ``make_loader(dataset, train) -> loader``: how a dataset becomes the training loader
      (endless, continuing at ``self.consumed_samples``) or the held-out one;
    - ``training_batches() -> batch source``: the iterator each step's micro-batches are drawn
      from (trainers/batch_source.py: ``TimedBatches`` over the training loader by default;
      O1Trainer returns a ``RolloutSource`` that samples them);
    - ``start_lines()``: lines to say at the start of training;
    - ``rank_state()`` / ``load_rank_state(...)``: per-rank state a checkpoint must hold;
    - ``eval_before_training`` and ``chat_scorer`` (``profile_chat_scorer(own_data)`` builds
      the one for the profile's held-out chats); callbacks
      (callbacks.py) for per-step side effects (Finetuner's NEFTune noise);
    - defaults and refusals in ``__init__`` before ``super().__init__`` (GPT5Trainer).
    """

    # Evaluate once before the first step too (fine-tuning reports before and after).
    eval_before_training = False
    initial_eval: dict = {}
    # Exact-match of greedy answers on held-out chats (eval/generation.py's ChatScorer), added
    # to every evaluation when a trainer variant sets one.
    chat_scorer = None

    def __init__(self, model=None, train_dataloader=None, eval_dataloader=None, *,
                 config: APTConfig | None = None, max_steps: int | None = None,
                 learning_rate: float | None = None, train_dataset=None, eval_dataset=None,
                 distributed_config: dict | None = None, distributed: bool | None = None,
                 monitoring: dict | None = None, tokenizer=None, output_dir: str | None = None,
                 experiment_name: str | None = None, callbacks: list[Callback] | None = None,
                 resume_from_checkpoint=None, auto_resume: bool | None = None,
                 checkpoint_dir: str | None = None, objective=None):
        model, requested = unwrap_strategy_request(model)   # DDPWrapper(model)
        if requested and "strategy" not in (distributed_config or {}):
            distributed_config = {**(distributed_config or {}), "strategy": requested}
        cfg = config or APTConfig(model=getattr(model, "arch", APTConfig().model))
        cfg = with_overrides(cfg, keyword_overrides(
            cfg, max_steps, learning_rate, distributed_config, distributed, monitoring,
            output_dir, experiment_name, train_dataloader))
        self.config = cfg
        # ``objective``: an Objective instance (a trainer class's), else training.objective.
        self.objective = build_objective(objective or cfg.training.objective, cfg)
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
        launch = detect_launch_env()
        self.plan = make_plan(cfg, launch.world_size, launch.local_world_size,
                              device_type=device_type)
        if cfg.training.anomaly.policy == "rewind" and self.plan.zero3_partitioned:
            raise ConfigError("rewind reloads weights into a running engine, which ZeRO-3's "
                              "partitioned parameters do not allow: use skip or stop",
                              key="training.anomaly.policy")
        # Memory and the checkpoint disk, before any process group or model exists.
        refuse_unless_ready(cfg, self.plan, launch.local_world_size,
                            checkpoint_save_dir(cfg, checkpoint_dir))
        die_with_launcher()   # a worker whose launcher died exits (launch/train.py: earlier)
        self.runtime = setup_distributed(
            plan=self.plan, seed=cfg.training.seed,
            rendezvous_timeout_s=cfg.training.distributed.rendezvous_timeout_s)
        self.modules = model_chunks(model, cfg, self.plan, self.runtime.device)
        if cfg.training.init_from:
            load_init_weights(self.modules, cfg.training.init_from)
        apply_lora(self.modules, cfg.lora, seed=cfg.training.seed)   # no-op when lora.rank is 0
        # The initial weights, before a resume replaces them (a preference reference keeps them).
        self.objective.bind(self.modules)
        self.train_state = TrainState()
        self.checkpoints = checkpoint_manager(cfg, checkpoint_dir)
        self.resumed_from = resolve_resume(
            self.checkpoints, resume_from_checkpoint,
            cfg.training.checkpoints.auto_resume if auto_resume is None else auto_resume)
        if self.resumed_from is not None:   # weights; step, data position, target reached
            self.train_state = load_weights(self.resumed_from, config=cfg, plan=self.plan,
                                            modules=self.modules, objective=self.objective)
        self.model = self.modules[0]
        self.tokenizer = tokenizer
        if train_dataloader is None or eval_dataloader is None:
            if train_dataset is None:
                train_dataset, built_eval, self.tokenizer = build_datasets(
                    cfg.data, model_vocab_size=cfg.model.vocab_size, seed=cfg.training.seed,
                    **self.dataset_options(cfg))
                eval_dataset = eval_dataset or built_eval
            train_dataloader = train_dataloader or self.make_loader(train_dataset, train=True)
            if eval_dataset is not None:
                eval_dataloader = eval_dataloader or self.make_loader(eval_dataset, train=False)
        if self.tokenizer is None and cfg.sources:
            # data the caller built for a profile: the profile names its tokenizer (without a
            # profile the data's tokenizer is unknown: the default config's would be a guess)
            self.tokenizer = build_tokenizer(cfg.data.tokenizer, cfg.data.tokenizer_path)
        self.train_dataloader, self.eval_dataloader = train_dataloader, eval_dataloader
        from apt.trainops.monitoring import build_callbacks
        self.callbacks = build_callbacks(cfg, extra=callbacks or [])
        self.engine = None
        self.history: list[dict] = []
        self.eval_coverage = None   # what the last evaluation scored (evaluate sets it)
        self.anomalies = AnomalyGuard(cfg.training.anomaly, fp16=self.plan.precision == "fp16")
        self.control = RunControl(cfg, self.plan, self.objective, self.checkpoints,
                                  self.anomalies, world_size=self.runtime.world_size,
                                  rank=self.runtime.rank, is_main=self.runtime.is_main,
                                  save=self.save_checkpoint, restore=self._restore)

    # The train state, under the names the seed API and callbacks read.
    step, consumed_samples = _state_field("step"), _state_field("consumed_samples")
    # The run ended at an evaluation that reached training.target, before max_steps.
    stopped_at_target = property(lambda self: self.train_state.target_reached)

    # ------------------------------------------------------------------ hooks (class docstring)
    def dataset_options(self, cfg) -> dict:
        """Hook: extra ``build_datasets`` arguments a trainer variant's data needs (called
        before ``super().__init__`` returns, when the trainer builds the profile's data)."""
        return {}

    def start_lines(self) -> list[str]:
        """Lines a trainer variant says at the start of training, after the plan (rank 0)."""
        return []

    def training_batches(self):
        """Hook: the batch source (trainers/batch_source.py) the engine draws each step's
        micro-batches from, built once when training starts (after a resume loaded its
        state): the training loader's batches, typed by the objective."""
        return TimedBatches(self.train_dataloader, self.objective.coerce, self.runtime.device)

    def rank_state(self) -> dict | None:
        """Tensors this rank's training checkpoint must hold besides weights, optimizer and
        RNGs (a trainer variant's; saved as trainer/state-rank-N.pt)."""
        return None

    def load_rank_state(self, state: dict | None, where: str, same_layout: bool) -> None:
        """``rank_state()`` as the checkpoint saved it (None: none saved)."""

    @classmethod
    def from_config(cls, config: APTConfig, **kwargs) -> "Trainer":
        return cls(config=config, **kwargs)

    def make_loader(self, dataset, train: bool) -> APTDataLoader:
        """Hook: the loader over ``dataset``: for training endless and continuing at
        ``self.consumed_samples`` (a resume), else one pass over the held-out data; both in
        global batches split over the data-parallel ranks."""
        return create_dataloader(
            dataset, self.plan.micro_batch, self.config.data.num_workers,
            shuffle=self.config.data.shuffle and train, seed=self.config.training.seed,
            global_batch_size=self.plan.global_batch, data_parallel_rank=self.runtime.dp_rank,
            data_parallel_size=self.runtime.dp_size, infinite=train,
            consumed_samples=self.consumed_samples if train else 0,
            permutation=self.config.data.shuffle_method)

    # ------------------------------------------------------------------ the loop
    def train(self) -> dict:
        """Train to ``training.max_steps`` under the hang watchdog (reliability/watchdog.py)."""
        with self.control.watching():
            return self._train()

    def _train(self) -> dict:
        t, plan = self.config.training, self.plan
        progress, batches, log = self._start_run()
        started, eval_result = time.perf_counter(), None
        # Preemption signals caught, a failing run abandons its background checkpoint write;
        # the last save is committed on leaving.
        with self.control.running(self.artifacts, progress) as control:
            while self.step < t.max_steps and not self.stopped_at_target:
                began = time.perf_counter()
                control.begin_step(self.step + 1, self.consumed_samples // plan.global_batch + 1)
                self._emit("on_step_start", self.step)
                lr = self.learning_rate(self.step)
                result = self.engine.train_step(batches, lr, before_update=control.vote)
                anomaly = control.settle(result)   # the step's votes, alike on every rank
                self.train_state.advance(plan.global_batch)
                log.add(StepRecord.of(self.step, result, lr, began, batches, anomaly))
                decision = control.decide(self.train_state, flush=log.flush)
                if decision is Decision.EXIT:
                    raise AnomalyStop(control.reason)
                if decision is Decision.REWIND:
                    continue   # back at the last committed checkpoint
                last = self.step == t.max_steps
                log.flush_if_due(self.step, force=last or decision is Decision.STOP)
                evaluation = self._evaluate_on_interval(last or decision is Decision.STOP)
                # After the evaluation: a checkpoint at the step that reached the target
                # records it, so that resuming from it does not train on.
                control.save_if_due(self.step, end=last or self.stopped_at_target)
                if decision is Decision.STOP:
                    return control.stop(self.step)
                if self.stopped_at_target:
                    eval_result = evaluation
                    break
        if eval_result is None:
            eval_result = self._log_eval()
        summary = finish_run(self, eval_result, time.perf_counter() - started,
                             log.tokens_per_step, progress)
        progress.close()
        return summary

    def _start_run(self):
        """The run directory, the engine (with a resumed run's optimizer state), the start
        lines; returns the progress reporter, the training batches and the run's log."""
        cfg, plan, main, t = self.config, self.plan, self.runtime.is_main, self.config.training
        self.artifacts = self._artifacts()
        self.artifacts.save_config(config_to_dict(cfg), cfg.config_hash)
        self.artifacts.save_text("plan.txt", plan.describe())
        self.engine = build_engine(self.modules, cfg, plan, self.objective)
        if self.resumed_from is not None:   # optimizer state, RNGs (weights are loaded)
            self._restore(self.resumed_from, weights=False)
        progress = Progress(t.max_steps, self.step, enabled=main, sink=self.artifacts.save_logs)
        self.run_log = RunLog(self.objective, emit=self._emit, history=self.history,
                              artifacts=self.artifacts, is_main=main, progress=progress,
                              max_steps=t.max_steps, log_interval=t.log_interval,
                              tokens_per_step=plan.global_batch * cfg.data.seq_length)
        self.run_log.start(cfg, plan, self.artifacts.run_dir, self.start_lines())
        announce_resume(self.resumed_from, self.train_state, self.artifacts, progress, main)
        self._emit("on_train_start")
        if self.eval_before_training and self.step == 0:
            self.initial_eval = self._log_eval()   # the "before" of a fine-tuning run
        if self.stopped_at_target:   # resumed from the checkpoint that reached it
            progress.line(f"target | reached at step {self.step} by the run this one resumes "
                          f"(training.target unchanged): nothing left to train")
        return progress, self.training_batches(), self.run_log

    def _evaluate_on_interval(self, skip: bool) -> dict | None:
        """The evaluation every ``training.eval_interval`` steps (none at the last step, which
        the end of the run evaluates, nor when preempted), checked against the target."""
        interval = self.config.training.eval_interval
        if not interval or self.step % interval or skip:
            return None
        evaluation = self._log_eval()
        if self.run_log.reached(self.config.training.target, evaluation, self.step):
            self.train_state.target_reached = True
        return evaluation

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self):
        """Collective: a training checkpoint of this step (the CheckpointWrite; an async one
        is committed by ``self.checkpoints.wait()``)."""
        self.train_state.rank_state = self.rank_state()
        return save_training_checkpoint(
            self.checkpoints, self.train_state, config=self.config, plan=self.plan,
            modules=self.modules, engine=self.engine, objective=self.objective,
            run_dir=self.artifacts.run_dir)

    def _restore(self, ckpt, weights: bool = True) -> TrainState:
        """``ckpt``'s weights (``weights``; a resume loaded them before the engine existed),
        optimizer state, RNGs, train state and rank state (the run control's rewind too);
        the history of the steps after it is forgotten."""
        if weights:
            self.train_state = load_weights(ckpt, config=self.config, plan=self.plan,
                                            modules=self.modules, objective=self.objective)
        same_layout = load_engine_state(
            ckpt, self.engine, self.train_state, plan=self.plan,
            load_batch_mib=self.config.training.checkpoints.load_batch_mib)
        self.load_rank_state(self.train_state.rank_state, str(ckpt.path),
                             same_layout=same_layout)
        self.history[:] = [r for r in self.history if r["step"] <= ckpt.step]
        return self.train_state

    def learning_rate(self, step: int) -> float:
        t = self.config.training
        return warmup_cosine(step, max_steps=t.max_steps, warmup_steps=t.warmup_steps,
                             lr=t.learning_rate, min_lr=t.min_learning_rate)

    # ------------------------------------------------------------------ evaluation
    def profile_chat_scorer(self, own_data: bool):
        """Exact-match of greedy answers on the profile's held-out chats (SFT's, or preference
        pairs answered by the chosen answer), where the data is the profile's own and this
        process holds the whole model (greedy decoding here is one-process)."""
        if not own_data or self.config.data.corpus not in ("sft", "preference") or \
                self.tokenizer is None or not self.plan.whole_model_per_rank:
            return None
        from apt.trainops.eval.generation import ChatScorer
        return ChatScorer.from_data(self.config.data, self.tokenizer)

    def evaluate(self, max_batches: int | None = None) -> dict:
        """Validation metrics, prefixed ``val_``, the same numbers on every layout: what the
        objective's evaluation measures (apt.trainops.eval.Evaluator calls
        ``Objective.evaluate``: forward-pass statistics over ``max_batches`` micro-batches per
        data-parallel rank, or e.g. GRPO's greedy answers scored by its rewards). With a
        ``chat_scorer``: ``val_exact_match`` (overall and per task) too."""
        from apt.trainops.eval import Evaluator
        if self.eval_dataloader is None:
            return {}
        t = self.config.training
        evaluator = Evaluator(self.modules, objective=self.objective,
                              dataloader=self.eval_dataloader, tokenizer=self.tokenizer,
                              metrics=["loss", "perplexity", "bits_per_token", "accuracy"],
                              micro_batch_size=self.plan.micro_batch,
                              tasks=[t.eval_task] if t.eval_task else (),
                              lockstep_group=lockstep_group(self.plan))
        result = {f"val_{k}": v
                  for k, v in evaluator.evaluate(max_batches or t.eval_batches).items()}
        self.eval_coverage = evaluator.coverage   # None: the evaluation reads no batches
        if self.eval_coverage is not None:
            result["val_samples"] = self.eval_coverage.scored
        if self.chat_scorer is not None:
            scores = self.chat_scorer.exact_match(self.model)
            result.update({f"val_{k}": v for k, v in scores.items()
                           if k.startswith("exact_match")})
        return result

    def _log_eval(self) -> dict:
        set_phase("evaluation")
        return self.run_log.evaluation(self.evaluate(), self.step, self.eval_coverage)

    def _emit(self, hook: str, *args) -> None:
        for callback in self.callbacks:
            getattr(callback, hook)(self, *args)

    def _artifacts(self):
        return open_run_artifacts(self.config, self.resumed_from, self.runtime.is_main)
