"""The one check every pickle a loading path reads passes first: nothing in it may run code.

Pickle is code: a file names callables (``module`` + ``name``) and the unpickler calls them. The
pickles a checkpoint holds, and who unpickles them:
- ``.metadata`` of a dist_checkpointing directory: torch.distributed.checkpoint reads it with a
  bare ``pickle.load`` (Megatron's ``load``/``load_tensors_metadata`` call it themselves);
- byte items inside ``*.distcp`` (Megatron ShardedObjects such as a layer's ``_extra_state``):
  torch's load planner uses ``torch.load(..., weights_only=False)`` on them;
- ``*.pt`` files (``common.pt``, ``trainer/rank-N.pt``, a plain optimizer's state):
  ``torch.load``, weights-only today, but that default is one environment variable away
  (``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD``) and its allow-list grows with what libraries register.

``scan_pickle`` reads the opcodes without executing anything (pickletools) and refuses every
global that is not one of an exact list of (module, name) pairs, measured on the checkpoints
this code writes (Megatron-core 0.16, torch 2.13): no module prefixes, no dotted names (protocol
4 resolves ``STACK_GLOBAL`` names attribute by attribute, so ``os.system`` is reachable from any
allowed module), no globals whose operands it cannot read, no extension codes, no INST/OBJ, and
persistent ids (torch's storages) only in torch files. Nothing on the lists loads a file or runs
anything beyond building checkpoint records, tensors and enums (``format_utils.torch_save_to_dcp``,
anything calling ``torch.load``, ``getattr``... are off them by construction).

``check_dist_checkpoint`` applies it to a dist_checkpointing directory, then reads the checked
``.metadata`` (with an unpickler restricted to the same list) to check what torch will read from
it: the shard files it names are plain files of this directory, every byte item is a torch file
that passes the same scan, and nothing is stored transformed. Callers run it before Megatron or
torch open the directory, once per load, on one rank (see ``checked_on_rank0``).
"""
from __future__ import annotations

import io
import json
import pickle
import pickletools
import re
from pathlib import Path

import torch
import torch.distributed as dist

from .errors import CheckpointError

_DTYPES = ("float32", "float16", "bfloat16", "float64", "int64", "int32", "int16", "int8",
           "uint8", "bool")
_STORAGES = ("FloatStorage", "HalfStorage", "BFloat16Storage", "DoubleStorage", "LongStorage",
             "IntStorage", "ShortStorage", "CharStorage", "ByteStorage", "BoolStorage")
# torch.distributed.checkpoint's .metadata: its records, tensor properties and dtypes.
METADATA_GLOBALS = frozenset({
    *(("torch.distributed.checkpoint.metadata", name) for name in (
        "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
        "BytesStorageMetadata", "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING")),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    *(("torch.distributed.checkpoint.planner", name) for name in (
        "SavePlan", "TensorWriteData", "WriteItem", "WriteItemType")),
    ("torch", "Size"), ("torch.serialization", "_get_layout"),
    *(("torch", dtype) for dtype in _DTYPES)})
# torch.save files (zip format): containers, tensors and their storages.
TENSOR_GLOBALS = frozenset({
    ("collections", "OrderedDict"), ("torch._utils", "_rebuild_tensor_v2"),
    *(("torch", storage) for storage in _STORAGES), *(("torch", dtype) for dtype in _DTYPES)})

_STRINGS = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "SHORT_BINSTRING",
            "BINSTRING", "STRING"}
_PUTS = {"PUT", "BINPUT", "LONG_BINPUT"}
_GETS = {"GET", "BINGET", "LONG_BINGET"}
_NEVER = {"INST", "OBJ", "EXT1", "EXT2", "EXT4", "PERSID"}
# What torch.save writes into its zip (anything else, e.g. TorchScript's code/, is refused).
_TORCH_RECORDS = re.compile(r"^(data\.pkl|version|\.format_version|byteorder|"
                            r"\.storage_alignment|\.data/serialization_id|data/\d+)$")
_SHARD_FILE = re.compile(r"^__\d+_\d+\.distcp$")
# The files a dist_checkpointing directory of this code holds (apt_model.json: ours).
_DIST_FILES = re.compile(r"^(\.metadata|metadata\.json|common\.pt|apt_model\.json|"
                         r"__\d+_\d+\.distcp)$")


class UnsafeCheckpointError(CheckpointError):
    pass


def scan_pickle(data: bytes, allowed: frozenset, where, persistent_ids: bool = False) -> None:
    """Raise UnsafeCheckpointError unless every global ``data`` names is in ``allowed``."""
    def refuse(why):
        raise UnsafeCheckpointError(f"{where}: refusing to unpickle it: {why}")
    recent: list = []   # what the last opcodes pushed, where known (a string or None)
    memo: dict = {}
    try:
        for op, arg, pos in pickletools.genops(data):
            name = op.name
            if name in _STRINGS:
                value = arg.decode("latin-1") if isinstance(arg, bytes) else arg
                recent.append(value)
                continue
            if name in ("FRAME", "PROTO"):
                continue   # framing: the stack is unchanged
            if name == "MEMOIZE" or name in _PUTS:
                memo[len(memo) if name == "MEMOIZE" else arg] = recent[-1] if recent else None
                continue   # the stack is unchanged
            if name in _GETS:
                recent.append(memo.get(arg))
                continue
            if name == "GLOBAL":
                module, _, attr = arg.partition(" ")
                _allow(module, attr, allowed, refuse)
            elif name == "STACK_GLOBAL":
                if len(recent) < 2 or not all(isinstance(s, str) for s in recent[-2:]):
                    refuse(f"a global at byte {pos} whose name is computed")
                _allow(recent[-2], recent[-1], allowed, refuse)
            elif name in _NEVER or (name == "BINPERSID" and not persistent_ids):
                refuse(f"opcode {name} at byte {pos} is not used by checkpoints")
            recent = []
    except ValueError as exc:   # pickletools: truncated or not a pickle
        refuse(f"not a well-formed pickle ({exc})")


def _allow(module: str, name: str, allowed: frozenset, refuse) -> None:
    if "." in name:
        refuse(f"{module}.{name}: a dotted name reaches any attribute")
    if (module, name) not in allowed:
        refuse(f"{module}.{name} is not a checkpoint type")


def scan_torch_file(data: bytes, where) -> None:
    """The check for what ``torch.load`` reads: the zip format torch.save writes, holding one
    pickle of tensors and containers."""
    if not data.startswith(b"PK\x03\x04"):
        raise UnsafeCheckpointError(f"{where}: refusing to load it: not the zip format "
                                    f"torch.save writes")
    try:   # torch's own zip reader: it sees what torch.load will see
        reader = torch._C.PyTorchFileReader(io.BytesIO(data))
        records = reader.get_all_records()
        pickled = reader.get_record("data.pkl")
    except RuntimeError as exc:
        raise UnsafeCheckpointError(f"{where}: refusing to load it: unreadable torch file "
                                    f"({str(exc).splitlines()[0]})") from None
    odd = [r for r in records if not _TORCH_RECORDS.match(r)]
    if odd:
        raise UnsafeCheckpointError(f"{where}: refusing to load it: holds {odd[0]}, which "
                                    f"torch.save does not write")
    scan_pickle(pickled, TENSOR_GLOBALS, where, persistent_ids=True)


class _RestrictedUnpickler(pickle.Unpickler):
    """Builds the .metadata that scan_pickle passed; the same list guards it a second time."""

    def find_class(self, module: str, name: str):
        if "." in name or (module, name) not in METADATA_GLOBALS:
            raise pickle.UnpicklingError(f"{module}.{name} is not a checkpoint type")
        return super().find_class(module, name)

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("persistent ids are not used by .metadata")


def check_dist_checkpoint(directory: str | Path):
    """Raise UnsafeCheckpointError unless nothing Megatron or torch would unpickle in this
    dist_checkpointing directory can run code; returns its (checked) torch Metadata."""
    directory = Path(directory)
    if not directory.is_dir():
        raise UnsafeCheckpointError(f"{directory}: not a directory")
    for path in directory.iterdir():
        if path.is_symlink() or not path.is_file() or not _DIST_FILES.match(path.name):
            raise UnsafeCheckpointError(f"{path}: refusing to load {directory}: "
                                        f"dist_checkpointing does not write this")
    _check_backends(directory / "metadata.json")
    data = _read(directory / ".metadata")
    scan_pickle(data, METADATA_GLOBALS, directory / ".metadata")
    try:
        metadata = _RestrictedUnpickler(io.BytesIO(data)).load()
    except Exception as exc:   # anything a malformed record raises while being built
        raise UnsafeCheckpointError(f"{directory / '.metadata'}: refusing it: "
                                    f"{type(exc).__name__}: {exc}") from None
    _check_storage(directory, metadata)
    if (directory / "common.pt").exists():
        scan_torch_file(_read(directory / "common.pt"), directory / "common.pt")
    return metadata


def _check_backends(path: Path) -> None:
    """Megatron picks its load strategy from metadata.json: only the one checked here."""
    try:
        backends = json.loads(_read(path))
    except (ValueError, RecursionError) as exc:
        raise UnsafeCheckpointError(f"{path}: unreadable ({exc})") from None
    if not isinstance(backends, dict) or backends.get("sharded_backend") != "torch_dist" or \
            backends.get("common_backend") != "torch":
        raise UnsafeCheckpointError(f"{path}: refusing it: only the torch_dist sharded and "
                                    f"torch common backends are read")


def _check_storage(directory: Path, metadata) -> None:
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata
    if not isinstance(metadata, Metadata) or not isinstance(metadata.storage_data, dict) or \
            not isinstance(metadata.state_dict_metadata, dict):
        raise UnsafeCheckpointError(f"{directory / '.metadata'}: refusing it: not "
                                    f"torch.distributed.checkpoint Metadata")
    byte_keys = {key for key, value in metadata.state_dict_metadata.items()
                 if isinstance(value, BytesStorageMetadata)}
    sizes: dict[str, int] = {}
    for index, info in metadata.storage_data.items():
        name = getattr(info, "relative_path", None)
        if not isinstance(name, str) or not _SHARD_FILE.match(name):
            raise UnsafeCheckpointError(f"{directory / '.metadata'}: refusing it: item "
                                        f"{getattr(index, 'fqn', index)!r} is stored in "
                                        f"{name!r}, not a shard file of this directory")
        if getattr(info, "transform_descriptors", None):
            raise UnsafeCheckpointError(f"{directory / name}: item {index.fqn} is stored "
                                        f"transformed, so it cannot be checked")
        if name not in sizes:
            shard = directory / name
            if shard.is_symlink() or not shard.is_file():
                raise UnsafeCheckpointError(f"{shard}: missing (or not a plain file)")
            sizes[name] = shard.stat().st_size
        offset, length = info.offset, info.length
        if not (isinstance(offset, int) and isinstance(length, int) and 0 <= offset
                and 0 <= length and offset + length <= sizes[name]):
            raise UnsafeCheckpointError(f"{directory / name}: item {index.fqn} lies outside "
                                        f"the file")
        if index.fqn in byte_keys:
            with open(directory / name, "rb") as f:
                f.seek(offset)
                scan_torch_file(f.read(length), f"{directory / name} (item {index.fqn})")


def _read(path: Path) -> bytes:
    if path.is_symlink() or not path.is_file():
        raise UnsafeCheckpointError(f"{path}: missing (or not a plain file)")
    return path.read_bytes()


def checked_on_rank0(check, *args):
    """Run ``check(*args)`` on rank 0 only and raise its error on every rank.

    dist_checkpointing needs every rank to read the same directory (each reads shards other
    ranks wrote: a shared file system), so rank 0's check covers what the others read, and the
    check's reads are paid once per load instead of once per rank. Returns the check's result
    on rank 0, None elsewhere."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return check(*args)
    verdict, result = [None], None
    if dist.get_rank() == 0:
        try:
            result = check(*args)
        except CheckpointError as exc:
            verdict[0] = (type(exc).__name__, str(exc))
    dist.broadcast_object_list(verdict, src=0)
    if verdict[0] is not None:
        kind, message = verdict[0]
        raise (UnsafeCheckpointError if kind == "UnsafeCheckpointError"
               else CheckpointError)(message)
    return result
