"""The files of a Hugging Face directory: config.json read as data, and the weights, only ever
safetensors (pickled ``*.bin`` are never read), one file or shards with an index."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from apt.core.config import ConfigError

HF_WEIGHTS = "model.safetensors"
HF_INDEX = "model.safetensors.index.json"


def read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise ConfigError(f"{path}: not readable JSON ({err})") from None


def safetensors_files(hf_dir: Path) -> list[str]:
    """The weight files an HF directory names, checked (names only, nothing read yet)."""
    index = hf_dir / HF_INDEX
    if index.is_file():
        data = read_json(index)
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise ConfigError(f"{index}: no weight_map (a mapping of tensor names to files)")
        files = sorted(set(weight_map.values()))
        for name in files:
            # The index names files of this directory (hub snapshots link them: links are fine).
            if not isinstance(name, str) or "/" in name or "\\" in name or name in (".", ".."):
                raise ConfigError(f"{index}: {name!r} is not a file of {hf_dir}")
            if not (hf_dir / name).is_file():
                raise ConfigError(f"{index}: names {name}, which is not in {hf_dir}")
        return files
    if (hf_dir / HF_WEIGHTS).is_file():
        return [HF_WEIGHTS]
    others = sorted(p.name for p in hf_dir.glob("*.bin")) + sorted(
        p.name for p in hf_dir.glob("*.pt"))
    found = f" (found {', '.join(others[:3])}: pickled weights are never read; convert them " \
            f"to safetensors first)" if others else ""
    raise ConfigError(f"{hf_dir}: no {HF_WEIGHTS} or {HF_INDEX}: only safetensors weights are "
                      f"read{found}")


def read_safetensors(hf_dir: Path, files: list[str]) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    tensors = {}
    for name in files:
        try:
            tensors.update(load_file(str(hf_dir / name)))
        except (SafetensorError, OSError) as err:
            raise ConfigError(f"{hf_dir / name}: not a readable safetensors file ({err})") \
                from None
    return tensors


def write_safetensors(tensors: dict, out: Path, max_shard_bytes: int) -> None:
    from safetensors.torch import save_file
    shards, current, size = [], {}, 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = tensor
        size += nbytes
    shards.append(current)
    for stale in [*out.glob("model*.safetensors"), out / HF_INDEX]:
        stale.unlink(missing_ok=True)
    if len(shards) == 1:
        save_file(shards[0], str(out / HF_WEIGHTS), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (out / HF_INDEX).write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
