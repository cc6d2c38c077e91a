"""The training loop: plan -> runtime -> model -> engine -> steps, evaluation, artifacts.

Reads top to bottom: ``Trainer.__init__`` resolves the config and plan (a bad config fails
here, before any process group exists), ``train()`` runs the loop. Numbers the plan decided
(micro-batch, accumulation, ZeRO stage, precision) are read from ``self.plan``.
"""
from __future__ import annotations

import contextlib
import time

import torch
import torch.distributed as dist

from apt.core.config import APTConfig, ConfigError, config_to_dict, with_overrides
from apt.model.lora import apply_lora, merge_lora
from apt.trainops.artifacts import ArtifactManager
from apt.trainops.checkpoints import save_model_weights
from apt.trainops.checkpoints.model_weights import zero3_gathered
from apt.trainops.data import APTDataLoader, build_tokenizer, create_dataloader, nats_to_bits
from apt.trainops.data.build import build_datasets
from apt.trainops.distributed.ddp_wrapper import unwrap_strategy_request
from apt.trainops.distributed.engines import build_engine
from apt.trainops.distributed.engines.forward_only import lockstep_group
from apt.trainops.distributed.launcher_env import detect_launch_env
from apt.trainops.distributed.plan import make_plan
from apt.trainops.distributed.runtime import (collective_device, seed_everything,
                                              setup_distributed)
from apt.trainops.distributed.watchdog import Watchdog, set_phase
from apt.trainops.objectives import build_objective
from apt.trainops.reliability.lifetime import die_with_launcher
from apt.trainops.reliability.preflight import refuse_unless_ready
from .anomaly import AnomalyGuard, AnomalyStop
from apt.trainops.callbacks import Callback
from .batch_source import TimedBatches
from .checkpointing import (PreemptionGuard, announce_resume, checkpoint_manager,
                            checkpoint_save_dir, load_engine_state, load_init_weights, load_weights,
                            resolve_resume, resumed_run_dir,
                            save_training_checkpoint)
from .progress import Progress, format_duration
from .schedule import warmup_cosine


def _eval_summary(result: dict) -> str:
    """The evaluation line: the token metrics when the objective has them, then every other
    float metric (e.g. exact-match, preference accuracy)."""
    parts = [f"val loss {result['val_loss']:.4f} nats"] if "val_loss" in result else []
    if "val_bits_per_token" in result:
        parts[0] += f" ({result['val_bits_per_token']:.3f} bits/token)"
        parts += [f"perplexity {result['val_perplexity']:.2f}",
                  f"next-token accuracy {result['val_accuracy']:.3f}"]
    shown = {"step", "val_loss", "val_bits_per_token", "val_perplexity", "val_tokens"}
    if "val_bits_per_token" in result:
        shown.add("val_accuracy")   # next-token accuracy, shown above
    parts += [f"{k[4:]} {v:.3f}" for k, v in result.items()
              if k not in shown and isinstance(v, float)]
    return " | ".join(parts)


def _time_split(seconds: float, wait: float, extras: dict) -> dict:
    """A batch source's extras; where it reports time spent on phases of its own
    (``time/generation_s``), the rest of the step is ``time/training_s``."""
    phases = [v for k, v in extras.items() if k.startswith("time/")]
    if not phases:
        return extras
    return {**extras, "time/training_s": max(seconds - wait - sum(phases), 0.0)}


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


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
      from (engine/batch_source.py: ``TimedBatches`` over the training loader by default;
      O1Trainer returns a ``RolloutSource`` that samples them);
    - ``start_lines()``: lines to say at the start of training;
    - ``rank_state()`` / ``load_rank_state(...)``: per-rank state a checkpoint must hold;
    - ``eval_before_training`` and ``chat_scorer`` (``profile_chat_scorer(own_data)`` builds
      the one for the profile's held-out chats); callbacks
      (engine/callbacks.py) for per-step side effects (Finetuner's NEFTune noise);
    - defaults and refusals in ``__init__`` before ``super().__init__`` (GPT5Trainer).
    """

    # Evaluate once before the first step too (fine-tuning reports before and after).
    eval_before_training = False
    initial_eval: dict = {}
    # The run ended at an evaluation that reached training.target, before max_steps.
    stopped_at_target = False
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
        cfg = with_overrides(cfg, self._argument_overrides(
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
        if model is None:
            from apt.model.architectures import APTModel
            seed_everything(cfg.training.seed)  # same config, same initial weights, always
            # One model chunk per virtual pipeline stage (one chunk without interleaving).
            self.modules = [APTModel(cfg.model, plan=self.plan,
                                     vp_stage=i if self.plan.vp > 1 else None)
                            for i in range(self.plan.vp)]
        else:
            self.modules = [model]
        self.modules = [m.to(self.runtime.device) for m in self.modules]
        if cfg.training.init_from:
            load_init_weights(self.modules, cfg.training.init_from)
        apply_lora(self.modules, cfg.lora, seed=cfg.training.seed)   # no-op when lora.rank is 0
        # The initial weights, before a resume replaces them (a preference reference keeps them).
        self.objective.bind(self.modules)
        self.step, self.consumed_samples = 0, 0
        self._coverage_said = False
        self.checkpoints = checkpoint_manager(cfg, checkpoint_dir)
        self.resumed_from = resolve_resume(
            self.checkpoints, resume_from_checkpoint,
            cfg.training.checkpoints.auto_resume if auto_resume is None else auto_resume)
        if self.resumed_from is not None:
            load_weights(self, self.resumed_from)   # weights, step, data position
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
        from apt.trainops.monitoring import build_callbacks  # monitoring imports engine
        self.callbacks = build_callbacks(cfg, extra=callbacks or [])
        self.engine = None
        self.history: list[dict] = []
        self.anomalies = AnomalyGuard(cfg.training.anomaly, fp16=self.plan.precision == "fp16")

    # ------------------------------------------------------------------ hooks (class docstring)
    def dataset_options(self, cfg) -> dict:
        """Hook: extra ``build_datasets`` arguments a trainer variant's data needs (called
        before ``super().__init__`` returns, when the trainer builds the profile's data)."""
        return {}

    def start_lines(self) -> list[str]:
        """Lines a trainer variant says at the start of training, after the plan (rank 0)."""
        return []

    def training_batches(self):
        """Hook: the batch source (engine/batch_source.py) the engine draws each step's
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

    @staticmethod
    def _argument_overrides(cfg, max_steps, learning_rate, distributed_config, distributed,
                            monitoring, output_dir, experiment_name, train_dataloader) -> dict:
        """Keyword arguments of the seed API, as dotted config keys (checked like a profile)."""
        out = {}
        if max_steps is not None:
            out["training.max_steps"] = max_steps
            out["training.warmup_steps"] = min(cfg.training.warmup_steps, max_steps)
        if learning_rate is not None:
            out["training.learning_rate"] = learning_rate
            out["training.min_learning_rate"] = min(cfg.training.min_learning_rate,
                                                    learning_rate / 10)
        for key, value in (distributed_config or {}).items():
            out[f"training.distributed.{key}"] = value
        if distributed is not None:
            out["training.distributed.enabled"] = distributed
        for key, value in (monitoring or {}).items():
            out[f"monitoring.{key}"] = value
        if output_dir is not None:
            out["output.dir"] = output_dir
        if experiment_name is not None:
            out["output.experiment_name"] = experiment_name
        if isinstance(train_dataloader, APTDataLoader):
            # A loader built by the caller fixes the batch; the plan must agree with it.
            out["training.batch_size"] = train_dataloader.global_batch
            out["training.micro_batch_size"] = train_dataloader.batch_sampler.micro_batch
        seq_length = getattr(getattr(train_dataloader, "dataset", None), "seq_length", None)
        if seq_length:
            out["data.seq_length"] = seq_length
        return out

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
        """Train to ``training.max_steps`` under the hang watchdog (distributed/watchdog.py)."""
        t = self.config.training
        watchdog = Watchdog(t.watchdog.timeout_s, t.watchdog.heartbeat_s, self.runtime.rank,
                            self.runtime.world_size, t.watchdog.startup_timeout_s).start()
        try:
            return self._train()
        finally:
            watchdog.stop()

    def _train(self) -> dict:
        cfg, plan, t = self.config, self.plan, self.config.training
        main = self.runtime.is_main
        self.artifacts = self._artifacts()
        self.artifacts.save_config(config_to_dict(cfg), cfg.config_hash)
        self.artifacts.save_text("plan.txt", plan.describe())
        self.engine = build_engine(self.modules, cfg, plan, self.objective)
        if self.resumed_from is not None:
            load_engine_state(self, self.resumed_from)   # optimizer state, RNGs
        progress = Progress(t.max_steps, self.step, enabled=main, sink=self.artifacts.save_logs)
        progress.line(f"APT | profile {cfg.name} ({cfg.config_hash}) | run dir "
                      f"{self.artifacts.run_dir}")
        progress.line("plan | " + plan.describe().replace("\n", "\n     | "))
        for line in self.start_lines():
            progress.line(line)
        announce_resume(self, progress)
        self._emit("on_train_start")
        if self.eval_before_training and self.step == 0:
            self.initial_eval = self._log_eval(progress)   # the "before" of a fine-tuning run
        tokens_per_step = plan.global_batch * cfg.data.seq_length
        batches = self.training_batches()
        # (step, StepResult, lr, seconds, end time, data wait, digest, extras, anomaly)
        pending: list[tuple] = []
        eval_result = None   # the evaluation that reached training.target, if one did
        started = time.perf_counter()
        if self.stopped_at_target:   # resumed from the checkpoint that reached it
            progress.line(f"target | reached at step {self.step} by the run this one resumes "
                          f"(training.target unchanged): nothing left to train")
        with PreemptionGuard() as preemption, self._checkpoint_writes_abort_on_error():
            while self.step < t.max_steps and not self.stopped_at_target:
                step_start = time.perf_counter()
                set_phase("data", step=self.step + 1,
                          batch=self.consumed_samples // plan.global_batch + 1)
                self._emit("on_step_start", self.step)
                lr = self.learning_rate(self.step)
                self._step_check = None
                result = self.engine.train_step(
                    batches, lr, before_update=lambda sums, units, norm: self._before_update(
                        preemption.requested, sums, units, norm))
                set_phase("sync")
                if self._step_check is None:   # an engine that does not call before_update
                    self._before_update(preemption.requested, result.sums, result.units,
                                        result.grad_norm)
                self.step += 1
                self.consumed_samples += plan.global_batch
                # The flags the step's one all-reduce carried (``_before_update``).
                preempted, writing, loss, anomaly = self._step_check
                if anomaly is None and result.grad_norm is not None:
                    # DeepSpeed's ZeRO found non-finite gradients and skipped the update itself
                    anomaly = self.anomalies.grad_norm_anomaly(float(result.grad_norm))
                self.anomalies.record(loss, anomaly)
                pending.append((self.step, result, lr,
                                time.perf_counter() - step_start, time.time(),
                                batches.take_wait(), batches.take_sample_digest(),
                                batches.take_extras(), anomaly))
                last = self.step == t.max_steps
                if anomaly is not None:
                    self._flush(pending, tokens_per_step, progress)
                    pending = []
                    if self._handle_anomaly(anomaly, progress):
                        continue   # rewound to the last committed checkpoint
                if not writing:
                    self._commit_checkpoint(progress)   # every rank's writer is done: commit
                if pending and (self.step % t.log_interval == 0 or last or preempted):
                    self._flush(pending, tokens_per_step, progress)
                    pending = []
                evaluation = None
                if t.eval_interval and self.step % t.eval_interval == 0 and not (
                        last or preempted):
                    evaluation = self._log_eval(progress)
                    self._target_reached(evaluation, progress)
                # After the evaluation: a checkpoint at the step that reached the target
                # records it, so that resuming from it does not train on.
                if preempted or self.checkpoints.should_save(self.step) or (
                        (last or self.stopped_at_target) and t.checkpoints.save_interval):
                    self._save_checkpoint(progress)
                if preempted:
                    self._commit_checkpoint(progress)
                    progress.line(f"preempted | checkpoint at step {self.step} written; exiting "
                                  f"(rerun with auto-resume to continue)")
                    progress.close()
                    return {"steps": self.step, "preempted": True}
                if self.stopped_at_target:
                    eval_result = evaluation
                    break
            set_phase("checkpoint")
            self._commit_checkpoint(progress)   # the last save, before the run reports done
        if eval_result is None:
            eval_result = self._log_eval(progress)
        elapsed = time.perf_counter() - started
        summary = self._finish(eval_result, elapsed, tokens_per_step, progress)
        progress.close()
        return summary

    def _save_checkpoint(self, progress) -> None:
        set_phase("checkpoint")
        write = save_training_checkpoint(self)
        if write.committed:
            self._report_checkpoint(progress, write.committed)
        else:
            progress.line(f"checkpoint | step {self.step} staged in {write.stall_s:.2f} s, "
                          f"writing in the background")

    def _target_reached(self, result: dict, progress) -> bool:
        """Whether this evaluation reached ``training.target`` (every rank holds the same
        reduced result, so every rank stops at the same step)."""
        target = self.config.training.target
        if target.metric is None or not result:
            return False
        if target.metric not in result:
            known = ", ".join(k for k, v in result.items() if isinstance(v, float))
            raise ConfigError(f"{target.metric!r} is not among this run's evaluation results "
                              f"({known})", key="training.target.metric")
        if not target.reached(result):
            return False
        self.stopped_at_target = True
        sign = ">=" if target.mode == "max" else "<="
        progress.line(f"target | {target.metric} {result[target.metric]:.4f} {sign} "
                      f"{target.value:g} at step {self.step}: training ends here")
        return True

    def _before_update(self, preemption_requested: bool, sums, units, grad_norm) -> bool:
        """Collective, called by the engine between the backward passes and the update: the
        step's one all-reduce. It carries the preemption flag, the checkpoint writer's "still
        busy" flag, a "non-finite here" flag and the loss statistics (divided by the
        model-parallel replicas that hold the same ones), so every rank knows the global loss
        and the anomaly guard decides alike everywhere. Returns whether to apply the update."""
        device = collective_device()
        replicas = self.runtime.world_size // self.plan.dp
        sums = sums.detach().to(device=device, dtype=torch.float64)
        flags = [float(preemption_requested), float(self.checkpoints.writing_in_background()),
                 float(not bool(torch.isfinite(sums).all()))]
        vector = torch.cat([torch.tensor(flags, dtype=torch.float64, device=device),
                            sums / replicas])
        dist.all_reduce(vector)
        values = vector.tolist()
        preempted, writing, non_finite = (v > 0 for v in values[:3])
        loss = self.objective.step_metrics(dict(zip(self.objective.stat_names, values[3:])),
                                           float(units))["loss"]
        anomaly = self.anomalies.classify(float("nan") if non_finite else loss,
                                          None if grad_norm is None else float(grad_norm))
        self._step_check = (preempted, writing, loss, anomaly)
        return anomaly is None

    def _handle_anomaly(self, anomaly: str, progress) -> bool:
        """Apply ``training.anomaly.policy`` to a step whose update was dropped (every rank
        alike). Returns whether the run rewound to its last committed checkpoint."""
        guard, cfg = self.anomalies, self.config.training.anomaly
        record = {"anomaly_step": self.step, "anomaly": anomaly, "anomalies": guard.count,
                  "policy": cfg.policy}
        progress.line(f"anomaly | step {self.step}: {anomaly}; its update was dropped "
                      f"(anomaly {guard.count} of at most {cfg.max_anomalies}, policy "
                      f"{cfg.policy})")
        if guard.must_stop():
            self._commit_checkpoint(progress)   # a good checkpoint being written is kept
            if self.runtime.is_main:
                self.artifacts.save_metrics({**record, "action": "stop"})
            why = ("training.anomaly.policy is stop" if cfg.policy == "stop" else
                   f"training.anomaly.max_anomalies={cfg.max_anomalies} reached")
            raise AnomalyStop(f"step {self.step}: {anomaly}; stopping ({why}); no update was "
                              f"applied from it and no checkpoint holds it")
        rewound = cfg.policy == "rewind" and self._rewind(record, progress)
        if not rewound and self.runtime.is_main:
            self.artifacts.save_metrics({**record, "action": "skip"})
        return rewound

    def _rewind(self, record: dict, progress) -> bool:
        """Reload the last committed checkpoint (weights, optimizer, RNGs, step) and keep the
        data cursor: the global batches since that checkpoint, the anomalous one included, are
        skipped. False (the step is just skipped) when no checkpoint was committed yet."""
        self._commit_checkpoint(progress)   # a write in flight becomes the last committed
        answer = [None]
        if self.runtime.is_main:
            answer = [self.checkpoints.load_latest()]   # verified, this run's lineage
        dist.broadcast_object_list(answer, src=0)
        ckpt = answer[0]
        if ckpt is None:
            progress.line("anomaly | no committed checkpoint to rewind to: the step is skipped")
            return False
        cursor, anomalous_step = self.consumed_samples, self.step
        load_weights(self, ckpt)            # weights, step (and the checkpoint's data cursor)
        load_engine_state(self, ckpt)       # optimizer state, loss scale, RNGs
        skipped = [ckpt.state.get("consumed_samples", ckpt.step * self.plan.global_batch),
                   cursor]
        self.consumed_samples = cursor      # the data continues after the anomalous batch
        self.history = [r for r in self.history if r["step"] <= ckpt.step]
        if self.runtime.is_main:
            self.artifacts.supersede_metrics(ckpt.step)
            self.artifacts.save_metrics({**record, "action": "rewind", "rewound_to": ckpt.step,
                                         "skipped_samples": skipped})
        progress.line(f"anomaly | rewound from step {anomalous_step} to {ckpt.path} (step "
                      f"{ckpt.step}); samples {skipped[0]}-{skipped[1] - 1} of the data order "
                      f"are skipped")
        return True

    def _commit_checkpoint(self, progress) -> None:
        """Collective: commit the checkpoint written in the background, if one is pending."""
        path = self.checkpoints.wait()
        if path is not None:
            self._report_checkpoint(progress, path)

    def _report_checkpoint(self, progress, path) -> None:
        info = self.checkpoints.last_save
        if self.runtime.is_main and info:
            self.artifacts.save_metrics({"checkpoint_step": info["step"],
                                         **{f"checkpoint_{k}": v for k, v in info.items()
                                            if k != "step"}})
            progress.line(f"checkpoint | step {info['step']} -> {path} | "
                          f"{info['bytes'] / 2**20:.1f} MiB | loop stalled {info['stall_s']:.2f} "
                          f"s, written in {info['write_s']:.2f} s, committed in "
                          f"{info['commit_s']:.2f} s")

    @contextlib.contextmanager
    def _checkpoint_writes_abort_on_error(self):
        """A failing run does not wait for (or commit) a checkpoint still being written: ranks
        may no longer agree, and committing needs every rank."""
        try:
            yield
        except BaseException:
            self.checkpoints.abort()
            raise

    def learning_rate(self, step: int) -> float:
        t = self.config.training
        return warmup_cosine(step, max_steps=t.max_steps, warmup_steps=t.warmup_steps,
                             lr=t.learning_rate, min_lr=t.min_learning_rate)

    def _flush(self, pending, tokens_per_step, progress) -> None:
        """Sum the buffered per-step statistics over data-parallel ranks (one all-reduce per
        log interval, not per step), turn them into the objective's metrics, record them."""
        from megatron.core import parallel_state
        group = parallel_state.get_data_parallel_group()
        sums = torch.stack([p[1].sums for p in pending])
        units = torch.stack([p[1].units for p in pending]).tolist()   # already global
        digests = torch.stack([p[6] for p in pending]).to(sums.device)
        both = torch.cat([sums, digests], dim=1)
        dist.all_reduce(both, group=group)       # one all-reduce: statistics and sample digests
        names = self.objective.stat_names
        records = [{"step": step,
                    **self.objective.step_metrics(dict(zip(names, row[:len(names)])), n),
                    "lr": lr, "grad_norm": None if result.grad_norm is None
                    else float(result.grad_norm),
                    "step_time": seconds, "tokens_per_s": tokens_per_step / seconds,
                    "time": ended, "data_wait_s": wait,
                    "sample_digest": [int(v) for v in row[len(names):]],
                    **_time_split(seconds, wait, extras),
                    **({"anomaly": anomaly} if anomaly else {})}
                   for (step, result, lr, seconds, ended, wait, _, extras, anomaly), row, n
                   in zip(pending, both.tolist(), units)]
        self._emit("on_log", records)
        for record in records:
            self.history.append(record)
            if self.runtime.is_main:
                self.artifacts.save_metrics(record)
        mean_time = sum(p[3] for p in pending) / len(pending)
        progress.update(self.step, record["loss"], tokens_per_step / mean_time)
        progress.line(f"step {self.step}/{self.config.training.max_steps} | loss "
                      f"{record['loss']:.4f} | lr {record['lr']:.2e} | grad norm "
                      f"{_fmt(record['grad_norm'])} | {tokens_per_step / mean_time:,.0f} tok/s | "
                      f"{mean_time * 1000:.0f} ms/step | eta "
                      f"{format_duration(progress.eta(self.step))}")

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

    def _log_eval(self, progress) -> dict:
        set_phase("evaluation")
        result = self.evaluate()
        if result:
            result = {"step": self.step, **result}
            self._emit("on_evaluate", result)
            if self.runtime.is_main:
                self.artifacts.save_metrics(result)
            progress.line(f"eval @ step {self.step} | " + _eval_summary(result))
            coverage = getattr(self, "eval_coverage", None)
            if coverage is not None and coverage.left_out and not self._coverage_said:
                progress.line("eval | " + coverage.line())   # once: the same at every eval
                self._coverage_said = True
        return result

    # ------------------------------------------------------------------ the end of a run
    def _finish(self, eval_result, elapsed, tokens_per_step, progress) -> dict:
        set_phase("finish")
        summary = {"steps": self.step, "config_hash": self.config.config_hash,
                   "stopped_at_target": self.stopped_at_target,
                   "train_seconds": elapsed,
                   # A run resumed from its final checkpoint trains no step in this process.
                   "final_train_loss": self.history[-1]["loss"] if self.history else None,
                   "tokens_per_s": len(self.history) * tokens_per_step / elapsed,
                   **{k: v for k, v in eval_result.items() if k != "step"},
                   **{f"initial_{k}": v for k, v in self.initial_eval.items() if k != "step"}}
        train_set = getattr(self.train_dataloader, "dataset", None)
        if hasattr(train_set, "unigram_entropy"):
            entropy = train_set.unigram_entropy()
            summary.update(unigram_entropy_nats=entropy,
                           unigram_entropy_bits=nats_to_bits(entropy))
            if "val_loss" in eval_result:
                progress.line(f"result | validation loss {eval_result['val_loss']:.4f} nats "
                              f"({eval_result['val_bits_per_token']:.3f} bits/token) vs unigram "
                              f"entropy {entropy:.4f} nats ({nats_to_bits(entropy):.3f} bits)")
        plan = self.plan
        merge_lora(self.modules)   # the exported model is the base with its adapters folded in
        summary["model_dist_path"] = str(save_model_weights(
            self.modules, self.artifacts.path("model") / "dist",
            zero3=plan.zero3_partitioned))
        state = None if plan.model_parallel else self._full_state_dict()
        if self.runtime.is_main and state is not None:
            summary["model_path"] = str(self.artifacts.save_model(state))
            sample = self._sample()
            if sample is not None:
                self.artifacts.save_text("sample.txt", sample)
                progress.line("sample | " + sample.replace("\n", "\n       | "))
        self._emit("on_train_end", summary)
        if self.runtime.is_main:
            self.artifacts.save_summary(summary)
        dist.barrier()
        return summary

    def _emit(self, hook: str, *args) -> None:
        for callback in self.callbacks:
            getattr(callback, hook)(self, *args)

    def _full_state_dict(self) -> dict:
        """Weights gathered when ZeRO-3 partitioned them (collective: every rank calls it)."""
        partitioned = self.plan.zero3_partitioned
        with zero3_gathered([self.model], partitioned):
            # Gathered tensors are released on leaving the block: keep copies of them.
            return {k: v.clone() if partitioned else v
                    for k, v in self.model.state_dict().items() if isinstance(v, torch.Tensor)}

    def _sample(self) -> str | None:
        out = self.config.output
        if not out.sample_tokens or self.tokenizer is None or not self.plan.whole_model_per_rank:
            return None
        generator = torch.Generator().manual_seed(self.config.training.seed)
        prompt = torch.as_tensor(self.tokenizer.encode(out.sample_prompt))
        new = self.model.generate(prompt.to(self.runtime.device), out.sample_tokens,
                                          valid_vocab=self.tokenizer.vocab_size,
                                          generator=generator, eod_id=self.tokenizer.eod_id)
        return out.sample_prompt + self.tokenizer.decode(new.tolist())

    def _artifacts(self) -> ArtifactManager:
        out = self.config.output
        manager = ArtifactManager(out.dir, out.experiment_name or self.config.name,
                                  enabled=self.runtime.is_main,
                                  run_dir=resumed_run_dir(self.resumed_from, self.config)
                                  if self.runtime.is_main else None)
        shared = [str(manager.run_dir)]
        dist.broadcast_object_list(shared, src=0)  # every rank agrees on rank 0's directory
        manager.run_dir = type(manager.run_dir)(shared[0])
        return manager
