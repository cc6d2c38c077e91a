"""CheckpointManager: atomic commit, verification, fallback, retention (in this process)."""
import dataclasses
import io
import json
import os
import pickle

import pytest
import torch

from apt.model.architectures import APTModel
from apt.trainops.checkpoints import CheckpointError, CheckpointManager
from apt.trainops.checkpoints.manifest import MANIFEST

SMALL = dict(hidden_size=64, num_layers=2, num_attention_heads=4, num_query_groups=2,
             ffn_hidden_size=128, vocab_size=384, max_seq_len=32)


@pytest.fixture()
def saved(tmp_path):
    model = APTModel(**SMALL)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    manager = CheckpointManager(tmp_path / "ckpts", save_interval=10, keep_last_n=3)
    for step in (10, 20, 30):
        with torch.no_grad():
            model.embedding.word_embeddings.weight.add_(1.0)   # distinguishable states
        manager.save(model=model, optimizer=optimizer, step=step)
    return manager, model


def _shard(path):
    return max((p for p in (path / "model").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def test_save_list_load_latest(saved):
    manager, model = saved
    entries = manager.list()
    assert [e["step"] for e in entries] == [30, 20, 10] and all(e["ok"] for e in entries)
    latest = manager.load_latest()
    assert latest.step == 30 and latest.path.name == "checkpoint-30"
    assert not list(manager.save_dir.glob(".tmp-*"))          # nothing half-written left
    from apt.trainops.checkpoints import load_model_weights
    fresh = APTModel(**SMALL)
    load_model_weights([fresh], latest.path / "model")
    assert torch.equal(fresh.embedding.word_embeddings.weight,
                       model.embedding.word_embeddings.weight)


def test_truncated_altered_and_unfinished_checkpoints_never_load(saved, caplog):
    manager, _ = saved
    newest, middle = manager.save_dir / "checkpoint-30", manager.save_dir / "checkpoint-20"
    shard = _shard(newest)
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size // 2)                  # a torn write
    data = bytearray(_shard(middle).read_bytes())
    data[len(data) // 2] ^= 0xFF                               # same size, one bit flipped
    _shard(middle).write_bytes(bytes(data))
    unfinished = manager.save_dir / "checkpoint-40"            # a crash before the manifest
    unfinished.mkdir()
    (unfinished / "state.json").write_text(json.dumps({"step": 40}))
    with pytest.raises(CheckpointError, match="truncated or altered"):
        manager.load("checkpoint-30")
    with pytest.raises(CheckpointError, match="checksum"):
        manager.load("checkpoint-20")
    with pytest.raises(CheckpointError, match="no manifest"):
        manager.load("checkpoint-40")
    with caplog.at_level("WARNING"):
        latest = manager.load_latest()
    assert latest.step == 10                                   # the newest intact one
    assert "checkpoint-40" in caplog.text and "checkpoint-30" in caplog.text


def test_unknown_manifest_version_is_refused(saved):
    manager, _ = saved
    path = manager.save_dir / "checkpoint-30" / MANIFEST
    manifest = json.loads(path.read_text())
    manifest["version"] = 99
    path.write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="manifest version 99"):
        manager.load("checkpoint-30")


def test_retention_keeps_last_n_and_every_kth(tmp_path):
    model = APTModel(**SMALL)
    manager = CheckpointManager(tmp_path, save_interval=5, keep_last_n=2, keep_every=20)
    for step in range(5, 45, 5):
        manager.save(model=model, step=step)
    assert sorted(e["step"] for e in manager.list()) == [20, 35, 40]
    assert not any(name.startswith(".tmp") for name in os.listdir(tmp_path))


def _weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()
            if isinstance(v, torch.Tensor)}


def test_async_save_commits_on_wait_with_the_state_at_save_time(tmp_path):
    """The caller goes on (here: changes every weight) while the shards are written; the
    checkpoint appears only when wait() commits it, holding the weights as they were."""
    from apt.trainops.checkpoints import load_model_weights
    model = APTModel(**SMALL)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    manager = CheckpointManager(tmp_path, save_interval=10, async_save=True)
    before = _weights(model)
    manager.save(model=model, optimizer=optimizer, step=10)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)                                      # training goes on meanwhile
    assert manager.list() == []                              # not visible before the commit
    assert len(list(tmp_path.glob(".tmp-checkpoint-10-*"))) == 1
    assert manager.wait() == tmp_path / "checkpoint-10"
    assert [e["ok"] for e in manager.list()] == [True]
    assert manager.last_save["stall_s"] > 0 and manager.last_save["bytes"] > 0
    fresh = APTModel(**SMALL)
    load_model_weights([fresh], manager.load_latest().path / "model")
    assert all(torch.equal(before[k], v) for k, v in _weights(fresh).items())
    assert manager.wait() is None                            # nothing pending any more


@pytest.mark.parametrize("failure", ["writer process", "shard write"])
def test_failed_background_write_never_commits_and_the_next_save_works(tmp_path, monkeypatch,
                                                                       failure):
    """A writer that dies, or a shard write that fails inside Megatron's writer (disk full),
    raises CheckpointError from wait(), leaves no loadable checkpoint, and does not poison the
    next save (Megatron's shared results queue is drained)."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async
    from apt.trainops.checkpoints import background
    model = APTModel(**SMALL)
    manager = CheckpointManager(tmp_path, save_interval=10, async_save=True)
    manager.save(model=model, step=10)
    manager.wait()

    def broken(*args, **kwargs):
        raise OSError("No space left on device")
    target = (background, "file_entry") if failure == "writer process" else \
        (filesystem_async, "_write_item")
    with monkeypatch.context() as patch:
        patch.setattr(*target, broken)     # the forked writer inherits the patch
        manager.save(model=model, step=20)
        with pytest.raises(CheckpointError, match="checkpoint-20 was not saved"):
            manager.wait()
    assert [e["step"] for e in manager.list()] == [10]
    assert manager.load_latest().step == 10
    manager.save(model=model, step=30)
    assert manager.wait() == tmp_path / "checkpoint-30"
    assert [(e["step"], e["ok"]) for e in manager.list()] == [(30, True), (10, True)]
    assert not list(tmp_path.glob(".tmp-*"))                 # the failed one was cleaned up


class _RunsCode:
    """What a crafted pickle holds: unpickling it runs a shell command."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _craft_metadata(model_dir, marker):
    (model_dir / ".metadata").write_bytes(pickle.dumps(_RunsCode(marker)))


def _craft_byte_item(model_dir, marker):
    """Point one of Megatron's byte items (a layer's _extra_state) at a pickle that runs code;
    the .metadata itself stays made of allowed types."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata
    with open(model_dir / ".metadata", "rb") as f:
        metadata = pickle.load(f)
    key = next(k for k, v in metadata.state_dict_metadata.items()
               if isinstance(v, BytesStorageMetadata))
    buffer = io.BytesIO()
    torch.save(_RunsCode(marker), buffer)                     # a zip, as torch.save writes
    payload = buffer.getvalue()
    (model_dir / "__9_0.distcp").write_bytes(payload)
    index = next(i for i in metadata.storage_data if i.fqn == key)
    metadata.storage_data[index] = dataclasses.replace(
        metadata.storage_data[index], relative_path="__9_0.distcp", offset=0,
        length=len(payload))
    (model_dir / ".metadata").write_bytes(pickle.dumps(metadata))


@pytest.mark.parametrize("craft", [_craft_metadata, _craft_byte_item],
                         ids=["metadata", "byte-item"])
def test_a_checkpoint_whose_pickles_would_run_code_is_refused(saved, tmp_path, craft):
    """Even with a manifest rewritten to match, loading refuses a checkpoint whose pickles name
    anything but checkpoint types, and nothing in them runs (tests/test_checkpoint_trust.py
    has the full adversarial set)."""
    from apt.trainops.checkpoints import load_model_weights
    from apt.trainops.checkpoints.manifest import write_manifest
    manager, _ = saved
    path, marker = manager.save_dir / "checkpoint-30", tmp_path / "code-ran"
    craft(path / "model", marker)
    manifest = json.loads((path / MANIFEST).read_text())
    (path / MANIFEST).unlink()
    write_manifest(path, {k: v for k, v in manifest.items() if k not in ("version", "files")})
    with pytest.raises(CheckpointError, match="refusing to unpickle.*system"):
        manager.load("checkpoint-30")                          # intact as far as sizes go
    with pytest.raises(CheckpointError, match="refusing to unpickle.*system"):
        load_model_weights([APTModel(**SMALL)], path / "model")
    assert not marker.exists()
    with open(path / "model" / ".metadata", "rb") as f:        # the control: it would have run
        if craft is _craft_metadata:
            pickle.load(f)
            assert marker.exists()


# fp16 itself needs a GPU; the loss-scale round trip is checked on the real scaler objects.
OVERFLOWS = [False] * 5 + [True, False, True, True] + [False] * 7


def _deepspeed_scaler():
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler
    from apt.trainops.runtime.process_groups import ensure_runtime
    import deepspeed
    ensure_runtime()   # its overflow messages ask DeepSpeed's comm for the rank
    deepspeed.comm.init_distributed(dist_backend="gloo")
    return DynamicLossScaler(init_scale=2.0 ** 16, scale_window=4, min_scale=1.0,
                             delayed_shift=2, consecutive_hysteresis=False)


def _megatron_scaler():
    from megatron.core.optimizer.grad_scaler import DynamicGradScaler
    from apt.trainops.runtime.process_groups import ensure_runtime
    ensure_runtime()   # its tensors ask for device="cuda": the CPU layer maps them
    return DynamicGradScaler(initial_scale=2.0 ** 16, min_scale=1.0, growth_factor=2.0,
                             backoff_factor=0.5, growth_interval=4, hysteresis=2)


def _deepspeed_run(scaler, overflows):
    scales = []
    for overflow in overflows:
        scaler.update_scale(overflow)
        scales.append(scaler.cur_scale)
    return scales


def _megatron_run(scaler, overflows):
    scales = []
    for overflow in overflows:
        scaler.update(overflow)
        scales.append(float(scaler.scale))
    return scales


@pytest.mark.parametrize("engine", ["deepspeed", "megatron"])
def test_fp16_loss_scale_resumes_where_it_was(engine):
    """Saved mid-run (as JSON, like state.json) and restored into a fresh scaler, the dynamic
    loss scale goes on exactly as the uninterrupted scaler does; a fresh one would not."""
    from apt.trainops.checkpoints import loss_scale
    make, run = {"deepspeed": (_deepspeed_scaler, _deepspeed_run),
                 "megatron": (_megatron_scaler, _megatron_run)}[engine]
    save = getattr(loss_scale, f"{engine}_scaler_state")
    load = getattr(loss_scale, f"load_{engine}_scaler_state")
    uninterrupted = run(make(), OVERFLOWS)
    first = make()
    run(first, OVERFLOWS[:8])
    state = json.loads(json.dumps(save(first)))
    resumed = make()
    load(resumed, state)
    assert run(resumed, OVERFLOWS[8:]) == uninterrupted[8:]
    assert run(make(), OVERFLOWS[8:]) != uninterrupted[8:]     # the state is what made it so


def test_loss_scale_crosses_engines_and_is_absent_without_fp16():
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from apt.trainops.checkpoints import loss_scale
    ds = _deepspeed_scaler()
    _deepspeed_run(ds, [True, True])
    megatron = _megatron_scaler()
    loss_scale.load_megatron_scaler_state(megatron, loss_scale.deepspeed_scaler_state(ds))
    assert float(megatron.scale) == ds.cur_scale == 2.0 ** 15
    assert loss_scale.deepspeed_scaler_state(LossScaler(scale=1.0)) is None   # bf16's fixed one
    assert loss_scale.megatron_scaler_state(None) is None
