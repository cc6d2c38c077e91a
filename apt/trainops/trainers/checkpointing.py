"""The Trainer's side of checkpoints: what a training checkpoint holds and how a run resumes.

The functions take the parts they save or load (model chunks, engine, objective, plan, config)
and the run's ``TrainState`` (train_state.py), never the Trainer. Saved: model weights (with LoRA only the adapters: the frozen base is rebuilt from
``training.init_from`` or the seeded init) and optimizer state (both resharding), fp16's loss
scale, every rank's RNGs, step, consumed samples, the resolved config and its hash, the layout
and library versions. The learning rate is a pure function of the step (schedule.py): nothing
to save. Resumed: weights before the engine is built, optimizer state after; the data order
continues at ``consumed_samples`` (the global order does not depend on the layout); RNGs are
restored when the layout is the same (on another layout each rank's streams differ anyway).
"""
from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import torch
import torch.distributed as dist

from apt.core.config import config_to_dict
from apt.trainops.checkpoints import (CheckpointError, CheckpointManager, CheckpointState,
                                      load_model_weights)
from apt.trainops.checkpoints.checked_reader import load_checked_torch_file
from apt.trainops.checkpoints.directory import checkpoint_save_dir
from apt.trainops.checkpoints.model_weights import _sharded_state, zero3_gathered
from apt.trainops.checkpoints.optimizer_state import (load_optimizer_state,
                                                      optimizer_sharded_state)
from apt.trainops.checkpoints.rng import capture_rng, restore_rng
from apt.trainops.artifacts import ArtifactManager
from apt.trainops.artifacts.environment import package_versions
from apt.trainops.reliability.anomaly import check_weights_finite
from .train_state import TrainState

log = logging.getLogger("apt.checkpoints")


def checkpoint_manager(cfg, directory: str | None = None) -> CheckpointManager:
    c = cfg.training.checkpoints
    manager = CheckpointManager(checkpoint_save_dir(cfg, directory),
                                save_interval=c.save_interval, keep_last_n=c.keep_last_n,
                                keep_every=c.keep_every, async_save=c.async_save)
    manager.last_step = cfg.training.max_steps   # begin() refuses others' at steps it saves
    return manager


def resolve_resume(manager: CheckpointManager, resume, auto_resume: bool):
    """The checkpoint to resume from, verified once: rank 0 verifies it (manifest, state,
    pickles), settles the run's lineage, checks that the directory is writable and reports
    other runs' checkpoints in it; every rank gets the same answer, or the same error."""
    if isinstance(resume, CheckpointState):   # verified by whoever loaded it
        answer = [("ok", resume)]
        if dist.get_rank() == 0:
            answer = [_begin_run(manager, lambda: resume, rewind=True)]
    else:
        answer = [None]
        if dist.get_rank() == 0:
            # A checkpoint named explicitly may be a rewind: its lineage's later checkpoints
            # move to superseded/ (auto-resume takes the newest that verifies).
            answer = [_begin_run(manager, lambda: manager.load(resume) if resume is not None
                                 else manager.load_latest() if auto_resume else None,
                                 rewind=resume is not None)]
    dist.broadcast_object_list(answer, src=0)
    kind, value = answer[0]
    if kind == "error":
        raise CheckpointError(value)
    if value is not None:
        manager.continue_lineage(value)
    return value


def _begin_run(manager: CheckpointManager, choose, rewind: bool = False) -> tuple[str, object]:
    try:
        state = choose()
        manager.begin(state, rewind=rewind)
        return "ok", state
    except CheckpointError as exc:
        return "error", str(exc)


def load_init_weights(modules, path: str) -> None:
    """Collective: load the weights ``training.init_from`` names into ``modules``.

    ``path``: a dist_checkpointing directory, a directory holding one as ``model/dist/`` (a run
    or a saved fine-tune), a training checkpoint (its ``model/``) or a checkpoints directory
    (its newest verified checkpoint). This is how one profile starts from another's result
    (e.g. dpo-tiny from arith-sft-tiny). Rank 0 resolves the path and verifies what it picks
    once; every rank gets the same answer (or the same error)."""
    answer = [None]
    if dist.get_rank() == 0:
        try:
            answer[0] = ("ok", *_init_weights_directory(path))
        except CheckpointError as exc:
            answer[0] = ("error", str(exc), None)
    dist.broadcast_object_list(answer, src=0)
    kind, value, verified = answer[0]
    if kind == "error":
        raise CheckpointError(value)
    load_model_weights(modules, value, verified=verified)


def _init_weights_directory(path: str) -> tuple[str, bool]:
    """(weights directory, whether it was verified here already)."""
    root = Path(path)
    if (root / "state.json").is_file() and (root / "model" / "metadata.json").is_file():
        # a training checkpoint: verified as a whole (manifest, state, pickles) before its
        # state is read
        return _checkpoint_weights(CheckpointManager(root.parent).load(root), path), True
    for candidate in (root, root / "model", root / "model" / "dist"):
        if (candidate / "metadata.json").is_file():
            return str(candidate), False   # load_model_weights checks it on rank 0
    if root.is_dir():
        latest = CheckpointManager(root).load_latest()
        if latest is not None:
            return _checkpoint_weights(latest, path), True
    raise CheckpointError(f"training.init_from={path}: no weights there (expected a "
                          f"dist_checkpointing directory, a run or checkpoint directory, or a "
                          f"checkpoints directory)")


def _checkpoint_weights(checkpoint: CheckpointState, path: str) -> str:
    if checkpoint.state.get("model_contents") == "trainable":
        raise CheckpointError(f"training.init_from={path}: holds only LoRA adapters, not full "
                              f"weights")
    return str(checkpoint.path / "model")


def layout_of(plan) -> dict:
    return {"world_size": plan.world_size, "tp": plan.tp, "pp": plan.pp, "vp": plan.vp,
            "dp": plan.dp, "ep": plan.ep, "engine": plan.engine, "zero_stage": plan.zero_stage}


def save_training_checkpoint(manager: CheckpointManager, state: TrainState, *, config, plan,
                             modules, engine, objective, run_dir):
    """Collective: a checkpoint of ``state`` with the weights of ``modules``, the optimizer
    state of ``engine`` and every rank's RNGs; returns the CheckpointWrite. With async saves
    this returns once the state is in host memory, and ``manager.wait()`` commits it later.
    ``run_dir``: the run directory a resume continues in."""
    step = state.step
    check_weights_finite(modules, step)   # a checkpoint never keeps a NaN
    meta = {"config_hash": config.config_hash, "layout": layout_of(plan)}
    # LoRA: only the adapters (and their optimizer state) are saved; the frozen base comes back
    # from training.init_from (or the seeded init) on resume.
    adapters_only = config.lora.enabled
    with manager.writing(step, meta) as ckpt:
        with zero3_gathered(modules, plan.zero3_partitioned):
            ckpt.add_sharded("model", _sharded_state(modules, adapters_only))
        with optimizer_sharded_state(engine) as optimizer_state:
            ckpt.add_sharded("optimizer", optimizer_state, assembled=True)
        tmp = ckpt.directory
        (tmp / "trainer").mkdir(exist_ok=True)
        torch.save(capture_rng(), tmp / "trainer" / f"rank-{dist.get_rank():05d}.pt")
        if state.rank_state is not None:   # a trainer variant's own (e.g. buffered rollouts)
            torch.save(state.rank_state, tmp / "trainer" / f"state-rank-{dist.get_rank():05d}.pt")
        if dist.get_rank() == 0:
            (tmp / "state.json").write_text(json.dumps({
                "step": step, "consumed_samples": state.consumed_samples,
                "global_batch": plan.global_batch, "config_hash": config.config_hash,
                "run_dir": str(run_dir),   # a resume continues there
                "model_contents": "trainable" if adapters_only else "all",
                "config": config_to_dict(config), "layout": layout_of(plan),
                "loss_scalers": engine.loss_scaler_states(),
                "objective": objective.state_dict(),
                # the training.target this step reached (the run ended here), else None
                "target_reached": (dataclasses.asdict(config.training.target)
                                   if state.target_reached else None),
                "versions": package_versions()}, indent=1, default=str))
    return ckpt


def load_weights(ckpt: CheckpointState, *, config, plan, modules, objective) -> TrainState:
    """Before the engine exists: weights (resharded to this layout) into ``modules``; returns
    the checkpoint's step, data position and reached target."""
    _report_config_changes(ckpt.state.get("config", {}), config_to_dict(config))
    consumed = ckpt.state.get("consumed_samples")
    if consumed is None:
        # Saved by CheckpointManager.save() outside a Trainer: the data position is unknown, so
        # the data continues where this Trainer's own batches would be after that many steps.
        consumed = ckpt.step * plan.global_batch
        log.warning("%s holds no data position (not saved by a Trainer): resuming at step %d "
                    "as if %d samples (%d steps x global batch %d) were consumed", ckpt.path,
                    ckpt.step, consumed, ckpt.step, plan.global_batch)
    if consumed % plan.global_batch:
        raise CheckpointError(f"{ckpt.path}: {consumed} consumed samples is not a whole number "
                              f"of global batches of {plan.global_batch}: keep "
                              f"training.batch_size at {ckpt.state['global_batch']} to resume")
    adapters_only = ckpt.state.get("model_contents") == "trainable"
    if adapters_only != config.lora.enabled:
        raise CheckpointError(
            f"{ckpt.path}: holds {'only LoRA adapters' if adapters_only else 'full weights'}"
            f" but lora.rank is {config.lora.rank}: resume with the lora settings the "
            f"checkpoint was trained with")
    saved_pp = ckpt.state.get("layout", {}).get("pp")
    if adapters_only and not config.training.init_from and saved_pp != plan.pp:
        # The seeded init differs between pipeline layouts (each stage has its own seed).
        raise CheckpointError(
            f"{ckpt.path}: LoRA adapters over the seeded initial weights of pipeline_parallel="
            f"{saved_pp}; resume with that pipeline_parallel or give the base weights in "
            f"training.init_from")
    # e.g. the preference reference: rebuilt from the initial weights, checked against the
    # checkpoint's record of it before any trained weight is loaded
    objective.check_resumed(ckpt.state.get("objective", {}), str(ckpt.path),
                            same_layout=ckpt.state.get("layout") == layout_of(plan))
    load_model_weights(modules, ckpt.path / "model", trainable_only=adapters_only,
                       verified=True, manifest=ckpt.manifest)   # resolve_resume verified it
    # A run resumed from the step that reached its target has nothing left to train, unless
    # the target changed since (then it trains on toward the new one).
    reached = ckpt.state.get("target_reached")
    return TrainState(step=ckpt.step, consumed_samples=consumed,
                      target_reached=bool(reached) and reached == dataclasses.asdict(
                          config.training.target))


def resumed_run_dir(ckpt: CheckpointState | None, cfg) -> Path | None:
    """The run directory the checkpoint's run wrote to, if it is still there and is one of
    this run's own places: directly under the profile's ``output.dir``, or beside the
    checkpoint's own checkpoints directory (``<dir>/<name>-checkpoints/checkpoint-N`` ->
    ``<dir>/<name>-<time>``), named for this experiment. A resumed run continues in it (one
    metrics.jsonl, one set of plots for the whole run). The path recorded in state.json only
    says which of those it was: a checkpoint never decides where a run writes (anything else:
    one warning, and a new run directory)."""
    recorded = ckpt.state.get("run_dir") if ckpt is not None else None
    if not isinstance(recorded, str) or not recorded:
        return None
    name = Path(recorded).name
    places = {Path(cfg.output.dir).resolve(), Path(ckpt.path).resolve().parent.parent}
    if not name.startswith(f"{cfg.output.experiment_name or cfg.name}-") or \
            Path(recorded).resolve().parent not in places:
        log.warning("%s records run directory %s, which is not beside its checkpoints nor "
                    "under output.dir %s: this run writes to a new run directory", ckpt.path,
                    recorded, cfg.output.dir)
        return None
    candidate = Path(recorded).resolve()
    if not candidate.is_dir():
        log.warning("%s was trained in %s, which is gone: this run writes to a new run "
                    "directory", ckpt.path, recorded)
        return None
    return candidate


def open_run_artifacts(cfg, resumed_from: CheckpointState | None, is_main: bool):
    """Collective: the run's ArtifactManager, in the resumed run's directory where there is one
    (``resumed_run_dir``); every rank agrees on rank 0's directory."""
    out = cfg.output
    manager = ArtifactManager(out.dir, out.experiment_name or cfg.name, enabled=is_main,
                              run_dir=resumed_run_dir(resumed_from, cfg) if is_main else None)
    shared = [str(manager.run_dir)]
    dist.broadcast_object_list(shared, src=0)
    manager.run_dir = type(manager.run_dir)(shared[0])
    return manager


def announce_resume(ckpt: CheckpointState | None, state: TrainState, artifacts, progress,
                   is_main: bool) -> None:
    """Rank 0: say where the run resumed (a log line and a metrics.jsonl record). Records of
    the steps after the checkpoint, which this run trains again, are dropped from
    metrics.jsonl first: it keeps one history, the one that continues."""
    if ckpt is None or not is_main:
        return
    superseded = artifacts.supersede_metrics(ckpt.step)
    artifacts.save_metrics({"step": ckpt.step, "resumed_from": str(ckpt.path),
                            "consumed_samples": state.consumed_samples,
                            "superseded_records": superseded})
    progress.line(f"resumed from {ckpt.path} at step {ckpt.step} (consumed samples "
                  f"{state.consumed_samples})" + (
                      f"; {superseded} records of later steps in metrics.jsonl superseded"
                      if superseded else ""))


def load_engine_state(ckpt: CheckpointState, engine, state: TrainState, *, plan,
                      load_batch_mib: float) -> bool:
    """After the engine exists: optimizer state, fp16's loss scale, this rank's
    ``state.rank_state`` (None: none saved) and, on the same layout, the RNGs. Returns whether
    the checkpoint was saved on this layout."""
    saved = ckpt.state.get("layout")   # None: saved by CheckpointManager.save()
    if (ckpt.path / "optimizer" / "metadata.json").is_file():
        load_optimizer_state(engine, ckpt.path / "optimizer", int(load_batch_mib * 2**20),
                             verified=True, manifest=ckpt.manifest)   # any layout
    else:
        # Nothing, or a plain torch optimizer's own state_dict: not the engine's model-space
        # state (its parameters are indices into an optimizer this run does not have).
        log.warning("%s holds no engine optimizer state: the optimizer starts fresh "
                    "(weights and step are restored)", ckpt.path)
    engine.load_loss_scaler_states(ckpt.state.get("loss_scalers", []))   # fp16 only
    extra = ckpt.path / "trainer" / f"state-rank-{dist.get_rank():05d}.pt"
    state.rank_state = _checked_pt(ckpt, extra) if extra.is_file() else None
    if saved == layout_of(plan):
        restore_rng(_checked_pt(ckpt, ckpt.path / "trainer" / f"rank-{dist.get_rank():05d}.pt"))
    elif saved is not None:   # None: no RNGs were saved, this run's seeding stays
        log.warning("resuming layout %s from %s: RNG streams are reseeded", layout_of(plan),
                    saved)
    return saved == layout_of(plan)


def _checked_pt(ckpt: CheckpointState, path: Path):
    """A torch file of the verified checkpoint, read once and compared with its manifest entry:
    what is loaded is what was verified, whatever changed on disk since."""
    name = path.relative_to(ckpt.path).as_posix()
    entry = ckpt.manifest["files"].get(name)
    if entry is None:
        raise CheckpointError(f"{ckpt.path}: {name} is not listed in its manifest")
    return load_checked_torch_file(path, entry)


def _report_config_changes(old: dict, new: dict) -> None:
    changed = [f"{k}: {a!r} -> {b!r}" for k, (a, b) in _diff(old, new).items()
               if not k.startswith(("training.checkpoints", "output."))]
    if changed and dist.get_rank() == 0:
        log.warning("resuming with a different config: %s", "; ".join(changed))


def _diff(old: dict, new: dict, prefix: str = "") -> dict:
    out = {}
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out.update(_diff(a, b, f"{prefix}{key}."))
        elif a != b:
            out[f"{prefix}{key}"] = (a, b)
    return out
