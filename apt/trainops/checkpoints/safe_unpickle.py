"""The one check every pickle a loading path reads passes first: nothing in it may run code.

Pickle is code: a file names callables (``module`` + ``name``) and the unpickler calls them. The
pickles a checkpoint holds, and who unpickles them:
- ``.metadata`` of a dist_checkpointing directory: torch.distributed.checkpoint would read it
  with a bare ``pickle.load``; checked_reader.py gives torch the object built here instead;
- byte items inside ``*.distcp`` (Megatron ShardedObjects such as a layer's ``_extra_state``):
  torch's load planner would use ``torch.load(..., weights_only=False)``; checked_reader.py loads
  them from the checked bytes with ``weights_only=True``;
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

``load_metadata`` then builds a scanned ``.metadata`` with an unpickler restricted to the same
list that also never changes anything the file did not create, so its result is plain data;
dist_dir.py checks a dist_checkpointing directory with both and checked_reader.py hands torch
that result, so torch never unpickles a checkpoint file itself.
"""
from __future__ import annotations

import io
import pickle
import pickletools
import re

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


def scan_torch_file(data, where) -> None:
    """The check for what ``torch.load`` reads: the zip format torch.save writes, holding one
    pickle of tensors and containers. ``data``: the bytes, or a seekable binary file (its header
    is checked first, then torch's zip reader reads only the directory and data.pkl)."""
    stream = io.BytesIO(data) if isinstance(data, (bytes, bytearray, memoryview)) else data
    stream.seek(0)
    if stream.read(4) != b"PK\x03\x04":
        raise UnsafeCheckpointError(f"{where}: refusing to load it: not the zip format "
                                    f"torch.save writes")
    stream.seek(0)
    try:   # torch's own zip reader: it sees what torch.load will see
        reader = torch._C.PyTorchFileReader(stream)
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


def load_torch_bytes(data: bytes, where):
    """What a checked torch file holds: scanned, then read by torch's weights-only unpickler
    (passed explicitly, so no environment variable turns it off) from these same bytes."""
    scan_torch_file(data, where)
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


# The record classes of .metadata that BUILD may set state on (never enums, dtypes, functions).
_RECORDS = frozenset(("Metadata", "MetadataIndex", "StorageMeta", "TensorProperties",
                      "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
                      "_StorageInfo", "SavePlan", "TensorWriteData", "WriteItem"))


def _mutating(op: str, kind: type, pick_target):
    """A dispatch entry that refuses ``op`` unless its target is an object this unpickler
    created, of type ``kind`` (a container) or an allowed record class (BUILD)."""
    original = pickle._Unpickler.dispatch[getattr(pickle, op)[0]]

    def load(self):
        target = pick_target(self)
        fresh = id(target) in self.created and self.created[id(target)] is target
        if not fresh or not (type(target) is kind if kind is not None
                             else type(target) in self.record_types):
            raise pickle.UnpicklingError(
                f"{op} on {type(target).__name__} {str(target)[:80]!r}: only objects this "
                f"file creates may be filled in")
        original(self)
    return load


def _creating(op: str):
    """A dispatch entry that remembers what ``op`` created (the fresh objects of this load)."""
    original = pickle._Unpickler.dispatch[getattr(pickle, op)[0]]

    def load(self):
        original(self)
        made = self.stack[-1]
        if type(made) in (dict, list, set) or type(made) in self.record_types:
            self.created[id(made)] = made   # kept alive: its id is never reused in this load
    return load


class _RestrictedUnpickler(pickle._Unpickler):
    """Builds the .metadata that scan_pickle passed, as plain data: the same list guards the
    globals a second time, and nothing that existed before this load is ever changed.

    Pickle's BUILD / SETITEM(S) / APPEND(S) / ADDITEMS set state on whatever is on the stack:
    given a class (``SavePlan``), a dtype or an enum member they would change it in this
    process, for every later user. Here they apply only to containers and record instances
    this file itself created. The pure-Python unpickler, because its opcodes can be guarded."""

    dispatch = dict(pickle._Unpickler.dispatch)
    for _op, _kind, _target in (
            ("BUILD", None, lambda self: self.stack[-2]),
            ("SETITEM", dict, lambda self: self.stack[-3]),
            ("SETITEMS", dict, lambda self: self.metastack[-1][-1]),
            ("APPEND", list, lambda self: self.stack[-2]),
            ("APPENDS", list, lambda self: self.metastack[-1][-1]),
            ("ADDITEMS", set, lambda self: self.metastack[-1][-1])):
        dispatch[getattr(pickle, _op)[0]] = _mutating(_op, _kind, _target)
    for _op in ("EMPTY_DICT", "DICT", "EMPTY_LIST", "LIST", "EMPTY_SET", "REDUCE", "NEWOBJ",
                "NEWOBJ_EX"):
        dispatch[getattr(pickle, _op)[0]] = _creating(_op)
    for _op in ("INST", "OBJ", "EXT1", "EXT2", "EXT4", "PERSID", "BINPERSID"):
        dispatch.pop(getattr(pickle, _op)[0])   # never in a .metadata: unknown opcode
    del _op, _kind, _target

    def __init__(self, file):
        super().__init__(file)
        self.created: dict = {}
        self.record_types = set()

    def find_class(self, module: str, name: str):
        if "." in name or (module, name) not in METADATA_GLOBALS:
            raise pickle.UnpicklingError(f"{module}.{name} is not a checkpoint type")
        found = super().find_class(module, name)
        if name in _RECORDS:
            self.record_types.add(found)
        return found


def load_metadata(data: bytes, where):
    """The torch Metadata that ``data`` (a scanned .metadata) holds, built as plain data."""
    try:
        return _RestrictedUnpickler(io.BytesIO(data)).load()
    except (Exception, RecursionError) as exc:   # anything a malformed record raises
        raise UnsafeCheckpointError(f"{where}: refusing it: {type(exc).__name__}: "
                                    f"{str(exc)[:300]}") from None


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
