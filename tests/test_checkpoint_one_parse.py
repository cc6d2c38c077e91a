"""One parse (issue 27, point 1): the check's restricted unpickler changes nothing it did not
create, no shard byte escapes the check, and what is loaded is what was checked.

Each attack comes with its control: the same bytes through what loading did before (a
find_class-only unpickler, torch's own reader by path, ``torch.load(weights_only=False)`` of
the bytes) do the damage, so none of these passes vacuously.
"""
import dataclasses
import io
import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from apt.trainops.checkpoints import CheckpointError, CheckpointManager
from apt.trainops.checkpoints.manifest import MANIFEST, write_manifest
from tests.test_checkpoint_trust import _RunsCode, _s   # the payload builders, one home


def _model():
    from apt.model.architectures import APTModel
    return APTModel(hidden_size=32, num_layers=1, num_attention_heads=2, num_query_groups=1,
                    ffn_hidden_size=64, vocab_size=384, max_seq_len=16)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    from apt.trainops.runtime.process_groups import ensure_runtime
    ensure_runtime()
    directory = tmp_path_factory.mktemp("saved")
    CheckpointManager(directory).save(model=_model(), step=3)
    return directory / "checkpoint-3"


def _copy(saved, tmp_path) -> Path:
    shutil.copytree(saved, tmp_path / "ckpts" / "checkpoint-3")
    return tmp_path / "ckpts" / "checkpoint-3"


def _rewrite_manifest(ckpt: Path):
    manifest = json.loads((ckpt / MANIFEST).read_text())
    (ckpt / MANIFEST).unlink()
    write_manifest(ckpt, {k: v for k, v in manifest.items() if k not in ("version", "files")})


_ABSENT = object()


def _fast_dumps(obj) -> bytes:
    """Protocol 2 without memo (no PUT/GET): pieces that can be joined into one stream."""
    buffer = io.BytesIO()
    pickler = pickle.Pickler(buffer, protocol=2)
    pickler.fast = True
    pickler.dump(obj)
    return buffer.getvalue()


def _class_mutation(model: Path, marker: Path) -> dict:
    """The issue's route: a .metadata that names only allowed globals. Built, it is the intact
    Metadata; then BUILD sets state on the Metadata *class*: ``__setstate__`` = MetadataIndex
    (a harmless callable: instances built later keep no state) and class-level storage_data in
    which the byte items point at a torch.save blob appended to a shard. A check that runs this
    BUILD and then lets torch unpickle the file again hands torch that storage_data, and torch's
    load_bytes runs the blob. Returns the class attributes it replaces (to restore them)."""
    from torch.distributed.checkpoint.metadata import (BytesStorageMetadata, Metadata,
                                                       MetadataIndex)
    with open(model / ".metadata", "rb") as f:
        metadata = pickle.load(f)   # the intact one, written by the fixture's save
    blob = io.BytesIO()
    torch.save(_RunsCode(marker), blob)
    shard = sorted(model.glob("*.distcp"))[0]
    offset = shard.stat().st_size
    shard.write_bytes(shard.read_bytes() + blob.getvalue())
    byte_keys = {k for k, v in metadata.state_dict_metadata.items()
                 if isinstance(v, BytesStorageMetadata)}
    assert byte_keys
    crafted = {index: dataclasses.replace(info, relative_path=shard.name, offset=offset,
                                          length=len(blob.getvalue()))
               if index.fqn in byte_keys else info
               for index, info in metadata.storage_data.items()}
    state = {"__setstate__": MetadataIndex, "storage_data": crafted,
             "state_dict_metadata": metadata.state_dict_metadata}
    (model / ".metadata").write_bytes(
        _fast_dumps(metadata)[:-1] + _fast_dumps(Metadata)[2:-1]
        + _fast_dumps((None, state))[2:-1] + b"b0.")       # BUILD on the class, POP, STOP
    return {name: vars(Metadata).get(name, _ABSENT) for name in state}


def test_build_on_an_allowed_class_is_refused_and_changes_nothing(saved, tmp_path):
    from megatron.core import dist_checkpointing
    from torch.distributed.checkpoint.metadata import Metadata
    from apt.trainops.checkpoints import load_model_weights
    from apt.trainops.checkpoints.model_weights import _sharded_state
    from apt.trainops.checkpoints.safe_unpickle import METADATA_GLOBALS, _RestrictedUnpickler
    ckpt = _copy(saved, tmp_path)
    marker = tmp_path / "MARKER"
    replaced = _class_mutation(ckpt / "model", marker)
    _rewrite_manifest(ckpt)
    with pytest.raises(CheckpointError, match=r"model/\.metadata: refusing it: .*BUILD on type"):
        CheckpointManager(ckpt.parent).load(ckpt, model=_model())
    with pytest.raises(CheckpointError, match="BUILD on type"):          # init_from's path
        load_model_weights([_model()], ckpt / "model")
    entries = CheckpointManager(ckpt.parent).list()
    assert not entries[0]["ok"] and "BUILD on type" in entries[0]["reason"]
    assert {name: vars(Metadata).get(name, _ABSENT) for name in replaced} == replaced   # unchanged
    assert not marker.exists()
    with pytest.raises(pickle.UnpicklingError, match="SETITEM on type"):   # on a class
        _RestrictedUnpickler(io.BytesIO(
            b"\x80\x04" + _s("torch.distributed.checkpoint.metadata") + _s("Metadata") + b"\x93"
            + b"NNs.")).load()

    class FindClassOnly(pickle.Unpickler):   # the check before: globals restricted, no more
        def find_class(self, module, name):
            assert (module, name) in METADATA_GLOBALS
            return super().find_class(module, name)
    try:   # the control: that check, then Megatron's own load, run the blob
        FindClassOnly(io.BytesIO((ckpt / "model" / ".metadata").read_bytes())).load()
        try:
            dist_checkpointing.load(_sharded_state([_model()]), str(ckpt / "model"))
        except Exception:
            pass
        assert marker.exists()
    finally:
        for name, value in replaced.items():
            if value is _ABSENT:
                delattr(Metadata, name)
            else:
                setattr(Metadata, name, value)


def test_shard_bytes_no_item_covers_are_refused(saved, tmp_path):
    """A torch.save blob appended to a shard (manifest rewritten to match)."""
    ckpt = _copy(saved, tmp_path)
    marker = tmp_path / "MARKER"
    blob = io.BytesIO()
    torch.save(_RunsCode(marker), blob)
    shard = sorted((ckpt / "model").glob("*.distcp"))[0]
    size = shard.stat().st_size
    shard.write_bytes(shard.read_bytes() + blob.getvalue())
    _rewrite_manifest(ckpt)
    with pytest.raises(CheckpointError, match=rf"{shard.name}: refusing it: bytes {size}\.\."
                                              rf"\d+ are not an item of its \.metadata"):
        CheckpointManager(ckpt.parent).load(ckpt, model=_model())
    from apt.trainops.checkpoints import load_model_weights
    with pytest.raises(CheckpointError, match="are not an item"):     # init_from's path
        load_model_weights([_model()], ckpt / "model")
    assert not marker.exists()
    # The control: those bytes are what torch's load_bytes runs once an item points there.
    with open(shard, "rb") as f:
        f.seek(size)
        torch.load(io.BytesIO(f.read()), weights_only=False)
    assert marker.exists()


def test_a_file_swapped_after_verification_is_never_loaded(saved, tmp_path):
    """Resume's order: verify the checkpoint, then load weights and rank files from it. The
    .metadata and an RNG file are replaced in between (manifest too): the load refuses them."""
    from apt.trainops.checkpoints import load_model_weights
    from apt.trainops.trainers.checkpointing import _checked_pt
    from torch.distributed.checkpoint import FileSystemReader
    ckpt = _copy(saved, tmp_path)
    marker = tmp_path / "MARKER"
    (ckpt / "trainer").mkdir()
    torch.save({"seed": torch.tensor([1])}, ckpt / "trainer" / "rank-00000.pt")
    _rewrite_manifest(ckpt)
    state = CheckpointManager(ckpt.parent).load(ckpt)            # verified
    metadata = ckpt / "model" / ".metadata"
    swapped = ckpt / "swap"
    swapped.write_bytes(pickle.dumps(_RunsCode(marker)))
    os.replace(swapped, metadata)                                 # the swap
    blob = io.BytesIO()
    torch.save({"seed": _RunsCode(marker)}, blob)
    (ckpt / "trainer" / "rank-00000.pt").write_bytes(blob.getvalue())
    _rewrite_manifest(ckpt)                                       # the disk is consistent again
    with pytest.raises(CheckpointError, match=r"model/\.metadata: differs from its manifest "
                                              r"entry \(altered since it was verified\)"):
        load_model_weights([_model()], ckpt / "model", verified=True, manifest=state.manifest)
    with pytest.raises(CheckpointError, match="rank-00000.pt: differs from its manifest"):
        _checked_pt(state, ckpt / "trainer" / "rank-00000.pt")
    assert not marker.exists()
    try:   # the control: torch's own reader reads the swapped file by path, and runs it
        FileSystemReader(ckpt / "model").read_metadata()
    except Exception:
        pass
    assert marker.exists()


def test_the_checked_load_reads_what_torch_wrote(saved, tmp_path):
    """The control for the refusals: weights loaded through the checked reader equal the saved
    ones (the byte items, a layer's _extra_state, included)."""
    from apt.trainops.checkpoints import load_model_weights
    from megatron.core import dist_checkpointing
    from apt.trainops.checkpoints.model_weights import _sharded_state
    ckpt = _copy(saved, tmp_path)
    model = _model()
    load_model_weights([model], ckpt / "model")
    reference = dist_checkpointing.load(_sharded_state([_model()]), str(ckpt / "model"))
    loaded = model.state_dict()
    for key, value in reference["chunk0"].items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(loaded[key], value), key
    assert dataclasses.is_dataclass(CheckpointManager(ckpt.parent).load(ckpt))
