"""Resolve a profile: find the YAML, follow ``extends:``, apply ``--set`` overrides, validate, hash."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

import yaml

from .errors import ConfigError
from .schema import APTConfig
from .validate import build_config

# Repository checkout (editable install): <repo>/apt/core/config/loader.py -> <repo>/profiles
_REPO_PROFILES = Path(__file__).resolve().parents[3] / "profiles"


def profile_dirs() -> list[Path]:
    extra = [Path(p) for p in os.environ.get("APT_PROFILE_PATH", "").split(os.pathsep) if p]
    return extra + [_REPO_PROFILES]


def find_profile(name_or_path: str | os.PathLike, relative_to: Path | None = None) -> Path:
    candidate = Path(name_or_path)
    searched = []
    if candidate.suffix in (".yaml", ".yml") or candidate.is_file():
        for base in ([relative_to] if relative_to else []) + [Path.cwd()]:
            path = candidate if candidate.is_absolute() else base / candidate
            if path.is_file():
                return path
            searched.append(str(path))
    else:
        for base in ([relative_to] if relative_to else []) + profile_dirs():
            path = base / f"{candidate}.yaml"
            if path.is_file():
                return path
            searched.append(str(path))
    known = sorted(p.stem for d in profile_dirs() if d.is_dir() for p in d.glob("*.yaml"))
    raise ConfigError(f"profile not found (looked in {', '.join(searched)}); "
                      f"known profiles: {', '.join(known)}", key=str(name_or_path))


def load_profile(name_or_path: str | os.PathLike,
                 overrides: list[str] | dict | None = None) -> APTConfig:
    """Return the frozen, validated config for a profile name or YAML path.

    ``overrides`` are ``"dotted.key=value"`` strings (values parsed as YAML) or a dict of
    dotted keys; they win over every file.
    """
    path = find_profile(name_or_path)
    provenance: dict[str, str] = {}
    data, sources = _resolve(path, provenance, chain=())
    for key, value in _parse_overrides(overrides):
        _set_dotted(data, key, value)
        provenance[key] = "--set"
    data.setdefault("name", path.stem)
    cfg = build_config(data, provenance)
    return dataclasses.replace(cfg, sources=tuple(sources), config_hash=config_hash(cfg))


def with_overrides(cfg: APTConfig, overrides: dict) -> APTConfig:
    """A new config with dotted-key overrides applied and every rule checked again."""
    if not overrides:
        return cfg
    data = config_to_dict(cfg)
    provenance = {"": f"profile {cfg.name}"}
    for key, value in overrides.items():
        _set_dotted(data, key, value)
        provenance[key] = "argument"
    new = build_config(data, provenance)
    return dataclasses.replace(new, sources=cfg.sources, config_hash=config_hash(new))


def config_to_dict(cfg: APTConfig) -> dict:
    data = dataclasses.asdict(cfg)
    data.pop("sources"), data.pop("config_hash")
    return data


def config_hash(cfg: APTConfig) -> str:
    """Stable across machines and key order: sha256 of the canonical JSON of every value."""
    canonical = json.dumps(config_to_dict(cfg), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def _resolve(path: Path, provenance: dict, chain: tuple) -> tuple[dict, list[str]]:
    if path in chain:
        cycle = " -> ".join(str(p.name) for p in chain + (path,))
        raise ConfigError(f"extends forms a cycle: {cycle}", source=str(path), key="extends")
    try:
        data = yaml.load(_profile_text(path), Loader=_StrictLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"invalid YAML{where}: {problem}", source=str(path)) from None
    if data is None or data == {}:
        # Otherwise an empty file (a failed copy, a wrong path to a placeholder) would start a
        # run with every default, silently.
        raise ConfigError("the profile is empty (no keys); write at least `extends: tiny` or "
                          "one section", source=str(path))
    if not isinstance(data, dict):
        raise ConfigError(f"a profile must be a mapping, got {type(data).__name__}",
                          source=str(path))
    parents = data.pop("extends", None) or []
    if isinstance(parents, str):
        parents = [parents]
    merged: dict = {}
    sources: list[str] = []
    for parent in parents:
        parent_data, parent_sources = _resolve(find_profile(parent, path.parent), provenance,
                                               chain + (path,))
        _deep_merge(merged, parent_data)
        sources += [s for s in parent_sources if s not in sources]
    _deep_merge(merged, data)
    for key in _dotted_keys(data):
        provenance[key] = str(path)
    provenance.setdefault("", str(path))
    return merged, sources + [str(path)]


def _profile_text(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"not a UTF-8 text file (byte 0x{exc.object[exc.start]:02x} at offset "
                          f"{exc.start}): a profile is YAML text", source=str(path)) from None
    except OSError as exc:
        raise ConfigError(f"cannot be read ({exc.strerror or exc})", source=str(path)) from None


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key written twice in one mapping (PyYAML keeps the last one
    silently, so the first value a user wrote would be ignored without a word)."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key '{key}' (first at line {seen[key]})",
                        key_node.start_mark)
                seen[key] = key_node.start_mark.line + 1
            except TypeError:   # an unhashable key: SafeLoader's own message says so
                break
        return super().construct_mapping(node, deep=deep)


def _deep_merge(into: dict, new: dict) -> None:
    for key, value in new.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _deep_merge(into[key], value)
        else:
            into[key] = value


def _dotted_keys(data: dict, prefix: str = ""):
    for key, value in data.items():
        yield f"{prefix}{key}"
        if isinstance(value, dict):
            yield from _dotted_keys(value, f"{prefix}{key}.")


def _parse_overrides(overrides) -> list[tuple[str, object]]:
    if not overrides:
        return []
    if isinstance(overrides, dict):
        return list(overrides.items())
    parsed = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"expected KEY=VALUE, got {item!r}", source="--set")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        parsed.append((key.strip(), value))
    return parsed


def _set_dotted(data: dict, key: str, value) -> None:
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"'{part}' is a value, not a section", source=f"--set {key}")
        node = child
    node[parts[-1]] = value
