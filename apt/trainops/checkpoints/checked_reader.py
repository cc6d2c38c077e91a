"""Megatron's dist_checkpointing load, fed from a CheckedDir (dist_dir.py): one parse, and torch
never unpickles a checkpoint file itself.

Left to themselves, torch.distributed.checkpoint and Megatron open the directory again after
the check: ``FileSystemReader.read_metadata`` is a bare ``pickle.load`` of ``.metadata``, the load
planner's ``load_bytes`` is ``torch.load(weights_only=False)`` on byte items, and Megatron's common
strategy ``torch.load``s ``common.pt`` by path. Here instead:
- ``CheckedReader.read_metadata`` returns the Metadata object the check built;
- ``read_data`` reads every item through the shard files the check opened (and hashed), and
  loads byte items with the safe loader (scan + ``weights_only=True``) from those bytes;
- ``common.pt`` is loaded from the bytes the check read.

``checked_dist_dir`` runs the check once per load on rank 0 (``checked_on_rank0``) and sends
the checked metadata and common bytes to the other ranks, which read their own slices of the
shards (the byte items they read are scanned again there, on the bytes they load).
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch.distributed as dist
from torch.futures import Future
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import StorageMeta
from torch.distributed.checkpoint.planner import LoadItemType

from .dist_dir import CheckedDir, check_dist_checkpoint
from .manifest import MANIFEST, read_manifest
from .safe_unpickle import checked_on_rank0, load_torch_bytes


class CheckedReader(FileSystemReader):
    """A StorageReader over a CheckedDir: nothing is read that the check did not read."""

    def __init__(self, checked: CheckedDir):
        super().__init__(checked.directory)
        self.checked = checked

    def read_metadata(self, *args, **kwargs):
        metadata = self.checked.metadata
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata

    def read_data(self, plan, planner) -> Future:
        from torch.distributed._shard._utils import narrow_tensor_by_index
        from torch.distributed.checkpoint._traverse import set_element
        for req in plan.items:
            info = self.storage_data[req.storage_index]
            data = self.checked.read(info.relative_path, info.offset, info.length)
            where = f"{self.checked.directory / info.relative_path} (item {req.storage_index.fqn})"
            value = load_torch_bytes(data, where)
            if req.type == LoadItemType.BYTE_IO:
                # DefaultLoadPlanner.load_bytes, less its torch.load(weights_only=False)
                if planner.flatten_state_dict:
                    set_element(planner.original_state_dict,
                                planner.mappings[req.dest_index.fqn], value)
                else:
                    planner.state_dict[req.dest_index.fqn] = value
                continue
            tensor = narrow_tensor_by_index(value, req.storage_offsets, req.lengths)
            target = planner.resolve_tensor(req).detach()
            if target.size() != tensor.size():
                raise AssertionError(f"req {req.storage_index} mismatch sizes "
                                     f"{target.size()} vs {tensor.size()}")
            target.copy_(tensor)
            planner.commit_tensor(req, target)
        future: Future = Future()
        future.set_result(None)
        return future


def strategies(checked: CheckedDir):
    """(sharded, common) strategies for ``dist_checkpointing.load`` reading only ``checked``."""
    from megatron.core.dist_checkpointing.strategies import torch as mcore_torch
    from megatron.core.dist_checkpointing.strategies.common import TorchCommonLoadStrategy

    class Sharded(mcore_torch.TorchDistLoadShardedStrategy):
        def load(self, sharded_state_dict, checkpoint_dir):
            # TorchDistLoadShardedStrategy.load (Megatron-core 0.16), with the reader swapped.
            flexible = [sh for sh in mcore_torch.nested_values(sharded_state_dict)
                        if isinstance(sh, mcore_torch.ShardedTensor)
                        and not sh.allow_shape_mismatch]
            mismatch = {sh.key: sh for sh in mcore_torch.nested_values(sharded_state_dict)
                        if isinstance(sh, mcore_torch.ShardedTensor) and sh.allow_shape_mismatch}
            original = sharded_state_dict
            sharded_state_dict, flat_mapping, rename_mapping = \
                mcore_torch._replace_state_dict_keys_with_sharded_keys(sharded_state_dict)
            pyt_state_dict = mcore_torch.mcore_to_pyt_state_dict(sharded_state_dict, True)
            reader = CheckedReader(checked)
            mcore_torch.checkpoint.load_state_dict(
                pyt_state_dict, reader, planner=mcore_torch.MCoreLoadPlanner(
                    shapes_validation_sharded_tensors=flexible,
                    allow_shape_mismatch_sharded_tensors=mismatch))
            self.cached_global_metadata = reader.read_metadata()
            state = {k: mcore_torch._unwrap_pyt_sharded_tensor(v)
                     for k, v in pyt_state_dict.items()}
            state = mcore_torch._replace_sharded_keys_with_state_dict_keys(
                state, flat_mapping, rename_mapping)
            mcore_torch._restore_dict_types(state, original)
            return state

        def load_tensors_metadata(self, checkpoint_dir, metadata=None):
            return super().load_tensors_metadata(checkpoint_dir, checked.metadata)

        def load_sharded_metadata(self, checkpoint_dir):
            raise NotImplementedError("the checked load reads no metadata by path")

    class Common(TorchCommonLoadStrategy):
        def load_common(self, checkpoint_dir):
            if checked.common is None:
                return {}
            return load_torch_bytes(checked.common, checked.directory / "common.pt")

        def load_sharded_objects(self, sharded_objects_state_dict, checkpoint_dir):
            raise NotImplementedError("sharded objects are read by the sharded strategy")

    return Sharded(), Common()


def checked_load(checked: CheckedDir, sharded_state_dict: dict, **kwargs) -> dict:
    """``dist_checkpointing.load`` of the checked directory (collective)."""
    from megatron.core import dist_checkpointing
    sharded, common = strategies(checked)
    return dist_checkpointing.load(sharded_state_dict, str(checked.directory),
                                   sharded_strategy=sharded, common_strategy=common, **kwargs)


@contextlib.contextmanager
def checked_dist_dir(directory: str | Path, files: dict | None = None):
    """Collective: the directory checked once (rank 0) for the loads inside the block.

    ``files``: its entries in the verified manifest (``part_files``); None: read the manifest
    next to it if it is a checkpoint's part (a weights directory of its own has none)."""
    directory = Path(directory).resolve()
    if files is None:
        files = part_files(directory)
    checked = checked_on_rank0(check_dist_checkpoint, directory, files)
    if dist.is_initialized() and dist.get_world_size() > 1:
        sent = [checked]
        dist.broadcast_object_list(sent, src=0)   # the data: plain Metadata and bytes
        if checked is None:
            checked = sent[0]
    try:
        yield checked
    finally:
        checked.close()


def part_files(directory: Path, manifest: dict | None = None) -> dict | None:
    """The manifest's entries for a checkpoint's part (``checkpoint-N/model``), by names
    relative to the part; None when the directory is no checkpoint's part."""
    if manifest is None:
        if not (directory.parent / MANIFEST).is_file():
            return None
        manifest, _ = read_manifest(directory.parent)
        if manifest is None:
            return {}   # nothing listed: every read is refused as unlisted
    prefix = directory.name + "/"
    return {name[len(prefix):]: entry for name, entry in manifest["files"].items()
            if name.startswith(prefix)}


def load_checked_torch_file(path: Path, entry: dict | None):
    """A checkpoint's ``*.pt`` (RNG states, a trainer's rank state): read once, compared with
    its manifest entry, scanned, loaded weights-only from those bytes."""
    from .dist_dir import read_checked
    return load_torch_bytes(read_checked(path.parent, path.name, None if entry is None
                                  else {path.name: entry}), path)


