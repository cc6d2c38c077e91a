"""Checkpoint trust: crafted checkpoints are refused on every loading path before anything in
them runs, and retention / auto-resume stay inside the run's lineage.

One real tiny training checkpoint is written once for the module (launch/train.py); every
crafted checkpoint is a copy of it with one thing changed. Each is refused by resume,
auto-resume (which falls back to the intact copy next to it), training.init_from,
``trainops export-hf --weights``, ``trainops checkpoints`` and ``APTModel.from_pretrained``, with no
marker file created by its payload, even with torch's weights-only default switched off.
"""
import io
import json
import os
import pickle
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint.api import CheckpointException

from apt import cli
from apt.core.config import load_profile
from apt.trainops.checkpoints import CheckpointError, CheckpointManager
from apt.trainops.checkpoints.manifest import MANIFEST, write_manifest

REPO = Path(__file__).resolve().parents[1]
TRAIN = REPO / "launch" / "train.py"
SMALL = ["model.hidden_size=64", "model.num_layers=2", "model.num_attention_heads=4",
         "model.num_query_groups=2", "model.ffn_hidden_size=128", "model.max_seq_len=32",
         "data.seq_length=32", "data.max_corpus_bytes=200000", "training.batch_size=8",
         "training.warmup_steps=1", "training.log_interval=1", "training.eval_interval=0",
         "training.eval_batches=1", "output.sample_tokens=0"]
SETS = [arg for item in SMALL for arg in ("--set", item)]


def _env():
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    return env


def _train(overrides, *extra, expect=0):
    cmd = [sys.executable, str(TRAIN), "--profile", "tiny", *SETS,
           *[arg for item in overrides for arg in ("--set", item)], *extra]
    proc = subprocess.run(cmd, env=_env(), cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == expect, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A real checkpoint-2 of the tiny profile, plus model/apt_model.json (listed) so that
    from_pretrained reads its model/ as it is."""
    out = tmp_path_factory.mktemp("base")
    _train([f"output.dir={out}", "training.max_steps=2", "training.checkpoints.save_interval=2"])
    ckpt = out / "tiny-checkpoints" / "checkpoint-2"
    state = json.loads((ckpt / "state.json").read_text())
    (ckpt / "model" / "apt_model.json").write_text(json.dumps(state["config"]["model"]))
    _rewrite_manifest(ckpt)
    return ckpt


def _rewrite_manifest(ckpt: Path):
    """What an attacker who can write the checkpoint does: a manifest that matches."""
    manifest = json.loads((ckpt / MANIFEST).read_text())
    (ckpt / MANIFEST).unlink()
    write_manifest(ckpt, {k: v for k, v in manifest.items() if k not in ("version", "files")})


def _restep(ckpt: Path, step: int):
    """The checkpoint as if saved at ``step`` (state.json and manifest)."""
    state = json.loads((ckpt / "state.json").read_text())
    (ckpt / "state.json").write_text(json.dumps({**state, "step": step}))
    manifest = json.loads((ckpt / MANIFEST).read_text())
    (ckpt / MANIFEST).write_text(json.dumps({**manifest, "step": step}))
    _rewrite_manifest(ckpt)


# ------------------------------------------------------------------ payloads
class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _s(text: str) -> bytes:    # SHORT_BINUNICODE
    data = text.encode()
    return b"\x8c" + bytes([len(data)]) + data


def _call(module, name, *args) -> bytes:
    """Protocol 4: STACK_GLOBAL module name, call it with string args, POP the result."""
    tuple_op = {1: b"\x85", 2: b"\x86"}[len(args)]
    return b"\x80\x04" + _s(module) + _s(name) + b"\x93" + b"".join(map(_s, args)) + \
        tuple_op + b"R0"


def _torch_file(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _prefix(path: Path, payload: bytes):
    path.write_bytes(payload + path.read_bytes())


def _read_metadata(directory: Path):
    with open(directory / ".metadata", "rb") as f:
        return pickle.load(f)   # the intact one, written by the fixture's run


# Each case: (ckpt, marker, outside) -> whether the attacker rewrote the manifest to match.
def dotted_os_system(c, m, o):           # the route: an allowed module, a dotted name
    _prefix(c / "model" / ".metadata",
            _call("torch.distributed.checkpoint.filesystem", "os.system", f"touch {m}"))
    return True


def plain_os_system(c, m, o):
    _prefix(c / "model" / ".metadata", pickle.dumps(_RunsCode(m))[:-1] + b"0")
    return True


def builtins_open(c, m, o):
    _prefix(c / "model" / ".metadata", _call("builtins", "open", str(m), "w"))
    return True


def protocol0_global(c, m, o):
    _prefix(c / "model" / ".metadata", f"cos\nsystem\n(S'touch {m}'\ntR0".encode())
    return True


def memo_route(c, m, o):                 # the global's operands fetched from the memo
    _prefix(c / "model" / ".metadata", b"\x80\x04" + _s("posix") + b"q\x00" + b"0" +
            _s("system") + b"q\x01" + b"0" + b"h\x00h\x01\x93" + _s(f"touch {m}") + b"\x85R0")
    return True


def torch_save_to_dcp(c, m, o):          # an allowed function of the old list loads a file
    (o / "evil.pt").write_bytes(_torch_file(_RunsCode(m)))
    _prefix(c / "model" / ".metadata", _call("torch.distributed.checkpoint.format_utils",
                                             "torch_save_to_dcp", str(o / "evil.pt"),
                                             str(o / "dcp")))
    return True


def nested_pickle(c, m, o):              # pickle.loads reached through an allowed module
    inner = pickle.dumps(_RunsCode(m)).decode("latin-1")
    payload = (b"\x80\x04" + _s("torch.distributed.checkpoint.filesystem") + _s("pickle.loads")
               + b"\x93" + b"C" + bytes([len(inner)]) + inner.encode("latin-1") + b"\x85R0")
    _prefix(c / "model" / ".metadata", payload)
    return True


def torch_load(c, m, o):
    (o / "evil.pt").write_bytes(_torch_file(_RunsCode(m)))
    _prefix(c / "model" / ".metadata", _call("torch", "load", str(o / "evil.pt")))
    return True


def optimizer_metadata(c, m, o):
    _prefix(c / "optimizer" / ".metadata",
            _call("torch.distributed.checkpoint.planner", "torch.serialization.os.system",
                  f"touch {m}"))
    return True


def byte_item(c, m, o):                  # a layer's _extra_state: torch.load(weights_only=False)
    import dataclasses
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata
    model = c / "model"
    metadata = _read_metadata(model)
    key = next(k for k, v in metadata.state_dict_metadata.items()
               if isinstance(v, BytesStorageMetadata))
    payload = _torch_file(_RunsCode(m))
    (model / "__9_0.distcp").write_bytes(payload)
    index = next(i for i in metadata.storage_data if i.fqn == key)
    metadata.storage_data[index] = dataclasses.replace(
        metadata.storage_data[index], relative_path="__9_0.distcp", offset=0,
        length=len(payload))
    (model / ".metadata").write_bytes(pickle.dumps(metadata))
    return True


def common_pt(c, m, o):
    (c / "model" / "common.pt").write_bytes(_torch_file({"x": _RunsCode(m)}))
    return True


def rng_file(c, m, o):
    (c / "trainer" / "rank-00000.pt").write_bytes(_torch_file({"torch": _RunsCode(m)}))
    return True


def storage_outside(c, m, o):            # the metadata points torch at a file elsewhere
    import dataclasses
    metadata = _read_metadata(c / "model")
    index = next(iter(metadata.storage_data))
    metadata.storage_data[index] = dataclasses.replace(
        metadata.storage_data[index], relative_path="../optimizer/__0_0.distcp")
    (c / "model" / ".metadata").write_bytes(pickle.dumps(metadata))
    return True


def backend_swap(c, m, o):
    (c / "model" / "metadata.json").write_text(json.dumps(
        {"sharded_backend": "zarr", "sharded_backend_version": 1, "common_backend": "torch",
         "common_backend_version": 1}))
    return True


def manifest_traversal(c, m, o):         # a size oracle for any file on the machine
    manifest = json.loads((c / MANIFEST).read_text())
    manifest["files"]["../../../../../../etc/hostname"] = {"bytes": 1, "sha256": "0" * 64}
    (c / MANIFEST).write_text(json.dumps(manifest))
    return False


def dropped_entry(c, m, o):              # an altered file whose entry was removed
    manifest = json.loads((c / MANIFEST).read_text())
    del manifest["files"]["optimizer/__0_0.distcp"]
    (c / MANIFEST).write_text(json.dumps(manifest))
    shard = c / "optimizer" / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    return False


def unlisted_file(c, m, o):
    (c / "trainer" / "rank-00001.pt").write_bytes(_torch_file(_RunsCode(m)))
    return False


def listed_extra_file(c, m, o):          # listed, in a dist_checkpointing directory
    (c / "model" / "extra.pt").write_bytes(_torch_file(_RunsCode(m)))
    return True


def oversized_file(c, m, o):             # 8 GiB (sparse): refused without reading it
    with open(c / "model" / "__0_0.distcp", "r+b") as f:
        f.truncate(8 << 30)
    return False


def symlinked_file(c, m, o):
    shard = c / "model" / "__0_1.distcp"
    shutil.copy(shard, o / "shard")
    shard.unlink()
    shard.symlink_to(o / "shard")
    return False


def manifest_shape(c, m, o):
    manifest = json.loads((c / MANIFEST).read_text())
    manifest["files"] = list(manifest["files"])
    (c / MANIFEST).write_text(json.dumps(manifest))
    return False


def deep_state(c, m, o):                 # deeper than json itself can parse
    text = (c / "state.json").read_text().rstrip()
    (c / "state.json").write_text(text[:-1] + ', "deep": ' + "[" * 100_000 + "]" * 100_000
                                  + "}")
    return True


def nested_state(c, m, o):               # parses, but nests deeper than any state APT writes
    state = json.loads((c / "state.json").read_text())
    deep = {}
    for _ in range(40):
        deep = {"a": deep}
    state["config"]["training"] = deep
    (c / "state.json").write_text(json.dumps(state))
    return True


def wrong_state_type(c, m, o):
    state = json.loads((c / "state.json").read_text())
    state["consumed_samples"] = "16"
    (c / "state.json").write_text(json.dumps(state))
    return True


CASES = [dotted_os_system, plain_os_system, builtins_open, protocol0_global, memo_route,
         torch_save_to_dcp, nested_pickle, torch_load, optimizer_metadata, byte_item,
         common_pt, rng_file, storage_outside, backend_swap, manifest_traversal,
         dropped_entry, unlisted_file, listed_extra_file, oversized_file, symlinked_file,
         manifest_shape, deep_state, nested_state, wrong_state_type]
# The payloads that would run, and where: unpickling this file as torch/Megatron do.
LIVE = {dotted_os_system: "model/.metadata", builtins_open: "model/.metadata",
        memo_route: "model/.metadata", torch_save_to_dcp: "model/.metadata",
        nested_pickle: "model/.metadata", optimizer_metadata: "optimizer/.metadata"}


def _crafted(base, tmp_path, craft):
    """<dir>/checkpoint-2: the intact copy; <dir>/checkpoint-4: crafted (same lineage)."""
    directory, outside = tmp_path / "ckpts", tmp_path / "outside"
    outside.mkdir()
    shutil.copytree(base, directory / "checkpoint-2")
    shutil.copytree(base, directory / "checkpoint-4")
    _restep(directory / "checkpoint-4", 4)   # a directory counts only if it holds its step
    marker = tmp_path / "MARKER"
    if craft(directory / "checkpoint-4", marker, outside):
        _rewrite_manifest(directory / "checkpoint-4")
    return directory, marker


@pytest.fixture(scope="module")
def runtime():
    from apt.trainops.runtime.process_groups import ensure_runtime
    return ensure_runtime()


@pytest.mark.parametrize("craft", CASES, ids=[c.__name__ for c in CASES])
def test_crafted_checkpoint_is_refused_on_every_loading_path(base, runtime, tmp_path, craft,
                                                             capsys, monkeypatch, caplog):
    from apt.model.architectures import APTModel
    from apt.trainops.checkpoints import load_model_weights
    from apt.trainops.trainers.checkpointing import resolve_resume
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")   # torch's own guard off
    directory, marker = _crafted(base, tmp_path, craft)
    crafted, intact = directory / "checkpoint-4", directory / "checkpoint-2"
    started = time.perf_counter()

    with pytest.raises(CheckpointError):                                  # resume
        resolve_resume(CheckpointManager(directory), str(crafted), auto_resume=False)
    with caplog.at_level("WARNING"):                                      # auto-resume
        resumed = resolve_resume(CheckpointManager(directory), None, auto_resume=True)
    assert resumed.path == intact and f"skipping {crafted}" in caplog.text
    cfg = load_profile("tiny", SMALL)
    with pytest.raises(CheckpointError):                                  # training.init_from
        load_model_weights([APTModel(cfg.model)], crafted / "model")
    with pytest.raises(CheckpointError):                                  # from_pretrained
        APTModel.from_pretrained(crafted / "model")
    capsys.readouterr()
    assert cli.main(["export-hf", "--profile", "tiny", *SETS, "--weights",   # export-hf
                     str(crafted / "model"), "--out", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("apt: error:") and err.count("\n") == 1, err
    assert cli.main(["checkpoints", "--dir", str(directory)]) == 2       # trainops checkpoints
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and "NOT LOADABLE: " in lines[0] and lines[1].endswith(" ok"), lines
    assert not marker.exists()
    assert time.perf_counter() - started < 20          # nothing read 8 GiB, nothing hung
    if craft in LIVE:          # the control: unpickled as torch's reader does, it runs
        with open(crafted / LIVE[craft], "rb") as f:
            try:
                pickle.load(f)
            except (Exception, CheckpointException):   # what follows the payload may not
                pass                                     # load: it ran already
        assert marker.exists()


def test_the_intact_copy_loads_on_every_path(base, runtime, tmp_path, capsys):
    """The control for the refusals above: the unmodified checkpoint passes every path."""
    from apt.model.architectures import APTModel
    from apt.trainops.checkpoints import load_model_weights
    from apt.trainops.trainers.checkpointing import resolve_resume
    directory = tmp_path / "ckpts"
    shutil.copytree(base, directory / "checkpoint-2")
    ckpt = directory / "checkpoint-2"
    assert resolve_resume(CheckpointManager(directory), str(ckpt), False).step == 2
    cfg = load_profile("tiny", SMALL)
    load_model_weights([APTModel(cfg.model)], ckpt / "model")
    APTModel.from_pretrained(ckpt / "model")
    assert cli.main(["export-hf", "--profile", "tiny", *SETS, "--weights", str(ckpt),
                     "--out", str(tmp_path / "hf")]) == 0
    assert cli.main(["checkpoints", "--dir", str(directory)]) == 0
    assert capsys.readouterr().out.splitlines()[-1].endswith(" ok")


def test_resume_refusal_is_one_line_exit_2(base, tmp_path):
    """Through launch/train.py: the issue's payload, refused before anything runs."""
    directory, marker = _crafted(base, tmp_path, dotted_os_system)
    proc = _train([f"output.dir={tmp_path / 'out'}", "training.max_steps=4"],
                  "--resume", str(directory / "checkpoint-4"), expect=2)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("apt: error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "torch.distributed.checkpoint.filesystem.os.system" in errors[0]
    assert not marker.exists()


def test_hf_import_reads_only_files_of_its_directory(tmp_path):
    from apt.core.config import ConfigError
    from apt.model.architectures import APTModel
    from apt.trainops.interop import HF_INDEX, hf_config
    cfg = load_profile("tiny", SMALL).model
    hf_config(cfg).save_pretrained(str(tmp_path))
    (tmp_path / "model-00001-of-00001.safetensors").write_bytes(b"")
    (tmp_path / HF_INDEX).write_text(json.dumps(
        {"weight_map": {"model.embed_tokens.weight": "../outside.safetensors"}}))
    with pytest.raises(ConfigError, match="is not a file of"):
        APTModel.from_pretrained(tmp_path)


# ------------------------------------------------------------------ lineage and retention
def test_retention_and_auto_resume_stay_in_the_runs_lineage(base, runtime, tmp_path):
    """The issue's cases with real runs: a fresh run into a directory holding an older run's
    checkpoint-6 and a symlink checkpoint-100 to a third run, keep_last_n=1."""
    out, directory = tmp_path / "out", tmp_path / "out" / "tiny-checkpoints"
    shutil.copytree(base, directory / "checkpoint-6")            # an older run's
    shutil.copytree(base, tmp_path / "elsewhere" / "checkpoint-100")
    (directory / "checkpoint-100").symlink_to(tmp_path / "elsewhere" / "checkpoint-100")
    common = [f"output.dir={out}", "training.checkpoints.save_interval=2",
              "training.checkpoints.keep_last_n=1"]
    first = _train(common + ["training.max_steps=4"])
    reported = [line for line in (first.stdout + first.stderr).splitlines()
                if "not of this run" in line]
    assert len(reported) == 1 and "checkpoint-6" in reported[0] and \
        "checkpoint-100 (a symlink)" in reported[0]
    names = sorted(p.name for p in directory.iterdir() if not p.name.startswith("."))
    assert names == ["checkpoint-100", "checkpoint-4", "checkpoint-6"], names
    lineage = json.loads((directory / "checkpoint-4" / MANIFEST).read_text())["lineage"]
    assert lineage != json.loads((base / MANIFEST).read_text())["lineage"]

    # Auto-resume (the Trainer's own resolve_resume) takes the run's checkpoint-4: not the
    # symlink's step 100, nor the older run's 6; the next save continues the lineage.
    from apt.trainops.trainers.checkpointing import resolve_resume
    manager = CheckpointManager(directory, keep_last_n=1)
    assert resolve_resume(manager, None, auto_resume=True).path == directory / "checkpoint-4"
    manager.save(model=_small_model(), step=5)
    names = sorted(p.name for p in directory.iterdir() if not p.name.startswith("."))
    assert names == ["checkpoint-100", "checkpoint-5", "checkpoint-6"], names
    assert json.loads((directory / "checkpoint-5" / MANIFEST).read_text())["lineage"] == \
        lineage                                                    # carried through resume
    assert (tmp_path / "elsewhere" / "checkpoint-100" / MANIFEST).is_file()


def _small_model():
    from apt.model.architectures import APTModel
    return APTModel(hidden_size=32, num_layers=1, num_attention_heads=2, num_query_groups=1,
                    ffn_hidden_size=64, vocab_size=384, max_seq_len=16)


def test_a_save_never_replaces_another_runs_checkpoint(tmp_path, runtime):
    model = _small_model()
    old = CheckpointManager(tmp_path, keep_last_n=1)
    old.save(model=model, step=6)
    new = CheckpointManager(tmp_path, keep_last_n=1)
    new.begin()
    new.save(model=model, step=2)
    with pytest.raises(CheckpointError, match="checkpoint-6 was not saved.*another run"):
        new.save(model=model, step=6)
    assert sorted(e["name"] for e in new.list()) == ["checkpoint-2", "checkpoint-6"]
    assert all(e["ok"] for e in new.list())
    assert new.list()[0]["lineage"] == old.lineage != new.lineage


def test_checkpoints_written_before_lineage_ids_still_load(tmp_path, runtime):
    model = _small_model()
    manager = CheckpointManager(tmp_path)
    manager.save(model=model, step=3)
    ckpt = tmp_path / "checkpoint-3"
    manifest = json.loads((ckpt / MANIFEST).read_text())
    for key in ("lineage", "committed_at"):      # as the previous version wrote them
        manifest.pop(key)
    (ckpt / MANIFEST).write_text(json.dumps(manifest))
    later = CheckpointManager(tmp_path, keep_last_n=1)
    assert later.load_latest().step == 3 and later.lineage is None
    later.save(model=model, step=4)              # a new lineage: the old one is kept
    assert sorted(e["name"] for e in later.list()) == ["checkpoint-3", "checkpoint-4"]


def test_an_unwritable_checkpoint_directory_is_refused_before_training(tmp_path, runtime):
    from apt.trainops.trainers.checkpointing import resolve_resume
    (tmp_path / "a-file").write_text("")
    with pytest.raises(CheckpointError, match="cannot be written"):
        resolve_resume(CheckpointManager(tmp_path / "a-file" / "ckpts"), None, False)
    readonly = tmp_path / "readonly"
    readonly.mkdir()
    readonly.chmod(0o500)
    try:
        if os.access(readonly, os.W_OK):
            pytest.skip("running as root: chmod does not stop writes here (the not-a-directory "
                        "case above is checked)")
        with pytest.raises(CheckpointError, match="cannot be written"):
            resolve_resume(CheckpointManager(readonly / "ckpts"), None, False)
    finally:
        readonly.chmod(0o700)
