"""A tokenizer directory's JSON files (``tokenizer_config.json``, ``apt_tokenizer.json``) read as
untrusted data: bounded in size, parsed once, every field checked for its type, and every file
they name kept inside the directory. Whatever is wrong is one ``DataError`` naming the file and
the key, never a raw ``KeyError``/``TypeError``/``RecursionError``.

``read_tokenizer_config(directory)`` gives what SFT, DPO and GRPO take from a Hugging Face
model directory: the named special tokens (``eos_token``, ``bos_token``, ``pad_token``...),
the added tokens (``added_tokens_decoder``, ``additional_special_tokens``) and the chat template
(``chat_template.jinja``, else ``tokenizer_config.json``'s ``chat_template``)."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import DataError

# Real files are far smaller (Qwen's tokenizer_config.json: 7 KB, Llama 3's: 55 KB, a large
# tokenizer.json: 35 MB); the bounds only stop a crafted file from exhausting memory.
MAX_CONFIG_BYTES = 16 << 20
MAX_TOKENIZER_BYTES = 512 << 20
MAX_TEMPLATE_BYTES = 1 << 20

SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token",
                      "cls_token", "mask_token")


@dataclass
class TokenizerConfig:
    """What a tokenizer directory's ``tokenizer_config.json`` (and ``chat_template.jinja``)
    declare. ``path`` is None when the directory has no ``tokenizer_config.json``."""
    path: Path | None = None
    special_tokens: dict = field(default_factory=dict)        # key -> token text
    additional_special_tokens: list = field(default_factory=list)
    added_tokens: list = field(default_factory=list)          # (id, text, special)
    chat_template: str | None = None
    chat_template_source: str | None = None                   # the file it came from


def read_bounded(path: Path, limit: int, key: str | None = None) -> bytes:
    """A regular file's bytes, refused when it is larger than ``limit`` (checked before
    reading, so a huge or endless file, such as a link to /dev/zero, is never read)."""
    if not path.is_file():
        raise DataError(path, "not a regular file", key=key)
    size = path.stat().st_size
    if size > limit:
        raise DataError(path, f"{size:,} bytes, more than the {limit:,} a tokenizer file may "
                              f"hold", key=key)
    with open(path, "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise DataError(path, f"more than the {limit:,} bytes a tokenizer file may hold",
                        key=key)
    return data


def read_json_object(path: Path, limit: int = MAX_CONFIG_BYTES) -> dict:
    """A JSON file holding one object; anything else is one DataError naming the file."""
    data = read_bounded(path, limit)
    try:
        value = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise DataError(path, "not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise DataError(path, f"invalid JSON ({exc.msg} at line {exc.lineno})") from None
    except RecursionError:
        raise DataError(path, "invalid JSON (nested too deeply)") from None
    if not isinstance(value, dict):
        raise DataError(path, f"must hold a JSON object, not {type(value).__name__}")
    return value


def file_inside(directory: Path, name, source: Path, key: str) -> Path:
    """``directory / name`` for a file name read from ``source``'s ``key``: a relative path that
    stays inside ``directory`` (no absolute path, no ``..``), else a DataError."""
    if not isinstance(name, str) or not name:
        raise DataError(source, "must be a file name (a non-empty string)", key=key)
    relative = Path(name)
    if relative.is_absolute() or ".." in relative.parts or "\\" in name:
        raise DataError(source, f"{name!r} points outside the tokenizer's directory "
                                f"{directory}", key=key)
    return directory / relative


def read_tokenizer_config(directory: Path) -> TokenizerConfig:
    """The directory's ``tokenizer_config.json`` and ``chat_template.jinja``, checked (see the
    module docstring); an empty ``TokenizerConfig`` when it has neither."""
    directory = Path(directory)
    path = directory / "tokenizer_config.json"
    config = TokenizerConfig()
    raw = {}
    if path.exists():
        raw, config.path = read_json_object(path), path
    for key in SPECIAL_TOKEN_KEYS:
        text = _token_text(raw.get(key), path, key)
        if text is not None:
            config.special_tokens[key] = text
    extra = raw.get("additional_special_tokens") or []
    if not isinstance(extra, list):
        raise DataError(path, "must be a list of tokens", key="additional_special_tokens")
    config.additional_special_tokens = [_token_text(t, path, "additional_special_tokens")
                                        for t in extra]
    config.added_tokens = _added_tokens(raw.get("added_tokens_decoder") or {}, path)
    jinja = directory / "chat_template.jinja"   # where transformers >= 4.43 saves it
    if jinja.exists():
        try:
            config.chat_template = read_bounded(jinja, MAX_TEMPLATE_BYTES).decode("utf-8")
        except UnicodeDecodeError:
            raise DataError(jinja, "not UTF-8 text") from None
        config.chat_template_source = str(jinja)
    elif raw.get("chat_template"):
        config.chat_template = _chat_template(raw["chat_template"], path)
        config.chat_template_source = str(path)
    return config


def _token_text(value, path, key) -> str | None:
    """A special token as the config writes it: a string, null, or a serialised AddedToken
    (``{"content": ...}``)."""
    if isinstance(value, dict):
        value = value.get("content")
        if not isinstance(value, str):
            raise DataError(path, "an AddedToken object needs a string 'content'", key=key)
    if value is not None and not isinstance(value, str):
        raise DataError(path, f"must be a token (a string or {{\"content\": ...}}), not "
                              f"{type(value).__name__}", key=key)
    return value


def _added_tokens(decoder, path) -> list:
    if not isinstance(decoder, dict):
        raise DataError(path, "must map token ids to AddedToken objects",
                        key="added_tokens_decoder")
    out = []
    for token_id, entry in decoder.items():
        key = f"added_tokens_decoder.{token_id}"
        if not str(token_id).isdigit():
            raise DataError(path, "a token id must be a non-negative integer", key=key)
        if not isinstance(entry, dict) or not isinstance(entry.get("content"), str):
            raise DataError(path, "must be an AddedToken object with a string 'content'",
                            key=key)
        out.append((int(token_id), entry["content"], bool(entry.get("special", False))))
    return out


def _chat_template(source, path) -> str:
    """``chat_template``: one template, or named ones (``[{"name": "default", "template":
    ...}]``, as tool-use models ship) of which the ``default`` one is used."""
    if isinstance(source, str):
        if len(source) > MAX_TEMPLATE_BYTES:
            raise DataError(path, f"longer than {MAX_TEMPLATE_BYTES:,} characters",
                            key="chat_template")
        return source
    if isinstance(source, list):
        named = {}
        for entry in source:
            if not (isinstance(entry, dict) and isinstance(entry.get("name"), str)
                    and isinstance(entry.get("template"), str)):
                raise DataError(path, "named templates must be {\"name\": str, \"template\": "
                                      "str}", key="chat_template")
            named[entry["name"]] = entry["template"]
        if "default" not in named:
            raise DataError(path, f"has no 'default' among the named templates "
                                  f"{sorted(named)}", key="chat_template")
        return _chat_template(named["default"], path)
    raise DataError(path, f"must be a template string or a list of named templates, not "
                          f"{type(source).__name__}", key="chat_template")
