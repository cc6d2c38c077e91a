"""Tokenizers: byte-level (no files), Hugging Face ``tokenizers`` (``tokenizer.json``, or a BPE
trained here on a corpus), SentencePiece (``.model``).

Every tokenizer has ``encode(text) -> int64 array``, ``decode(ids) -> str``, ``eod_id``,
``pad_id``, ``vocab_size`` and ``save(directory)``; ``load_tokenizer(directory)`` restores what
``save`` wrote, so a run's tokenizer travels with its artifacts."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np

from apt.core.config.schema import BYTE_VOCAB
from ..errors import DataError
from .special_tokens import EOD_TOKEN, PAD_TOKEN
from .tokenizer_files import (MAX_CONFIG_BYTES, MAX_TOKENIZER_BYTES, file_inside, read_bounded,
                              read_json_object, read_tokenizer_config)

# End-of-document tokens of common tokenizer.json files, tried in this order.
_EOD_CANDIDATES = (EOD_TOKEN, "<|end_of_text|>", "</s>", "<eos>", "<|im_end|>", "[SEP]")
_CONFIG = "apt_tokenizer.json"
# Files of a Hugging Face tokenizer directory that chat_template.py reads.
_HF_COMPANIONS = ("tokenizer_config.json", "chat_template.jinja")


class _Tokenizer:
    def save_pretrained(self, directory) -> Path:
        """Files ``transformers.AutoTokenizer.from_pretrained(directory)`` loads, with this
        tokenizer's ids (hf_tokenizer.py); ``trainops export-hf`` writes them next to the weights."""
        from .hf_tokenizer import save_for_transformers
        return save_for_transformers(self, directory)


class ByteTokenizer(_Tokenizer):
    """Token i < 256 is byte i; specials follow. ``vocab_size`` counts only real tokens: the
    model's embedding may be padded larger (for tensor-parallel divisibility)."""

    name = "byte"
    eod_id = eos_id = 256
    pad_id = 257
    vocab_size = BYTE_VOCAB
    special_ids = frozenset({256, 257})   # never produced by encode: text is bytes only

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64)

    def decode(self, ids) -> str:
        data = bytes(int(i) for i in ids if 0 <= int(i) < 256)
        return data.decode("utf-8", errors="replace")

    def save(self, directory) -> Path:
        return _write_config(directory, {"type": "byte"}, self)


class HFTokenizer(_Tokenizer):
    """A Hugging Face ``tokenizers`` tokenizer loaded from ``tokenizer.json``."""

    name = "hf"

    def __init__(self, path: str | os.PathLike):
        from tokenizers import Tokenizer
        self.path = Path(path)
        if self.path.is_dir():   # a Hugging Face model or tokenizer directory
            self.path = self.path / "tokenizer.json"
        if not self.path.is_file():
            raise DataError(self.path, "tokenizer file not found", key="data.tokenizer_path")
        self.config = read_tokenizer_config(self.path.parent)
        try:
            self._tok = Tokenizer.from_str(
                read_bounded(self.path, MAX_TOKENIZER_BYTES).decode("utf-8"))
        except DataError:
            raise
        except Exception as exc:  # tokenizers raises its own exception type
            raise DataError(self.path, f"not a valid tokenizer.json: {str(exc).splitlines()[0]}",
                            key="data.tokenizer_path") from None
        self._register_special_tokens()
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        ids = [self._tok.token_to_id(t) for t in _EOD_CANDIDATES]
        ids = [i for i in ids if i is not None]
        if not ids:
            raise DataError(self.path, f"no end-of-document token (looked for "
                                       f"{', '.join(_EOD_CANDIDATES)})", key="data.tokenizer_path")
        self.eod_id = ids[0]
        named = self.config.special_tokens
        pad = self._tok.token_to_id(named.get("pad_token") or PAD_TOKEN)
        self.pad_id = self.eod_id if pad is None else pad
        # The config's eos_token ends a chat model's answers (<|im_end|>, <|eot_id|>): a stop
        # token for generation besides the end-of-document token.
        eos = named.get("eos_token")
        self.eos_id = self.eod_id if eos is None else self._tok.token_to_id(eos)
        self.special_ids = frozenset(i for i, t in self._tok.get_added_tokens_decoder().items()
                                     if t.special)

    def _register_special_tokens(self) -> None:
        """Every token tokenizer_config.json declares is one added token of tokenizer.json, so
        text holding it encodes to its single id (never split). ``added_tokens_decoder``
        entries missing from tokenizer.json are added (as transformers adds them) when that
        gives them their declared id; any other disagreement is refused."""
        from tokenizers import AddedToken
        config, source = self.config, self.config.path
        for token_id, text, special in sorted(self.config.added_tokens):
            have = self._tok.token_to_id(text)
            if have is None and token_id == self._tok.get_vocab_size(with_added_tokens=True):
                add = self._tok.add_special_tokens if special else self._tok.add_tokens
                add([AddedToken(text, special=special, normalized=not special)])
                have = self._tok.token_to_id(text)
            if have != token_id:
                raise DataError(source, f"declares {text!r} as id {token_id} but "
                                        f"{self.path.name} has it as "
                                        f"{'no token' if have is None else f'id {have}'}",
                                key=f"added_tokens_decoder.{token_id}")
        named = [(k, t) for k, t in config.special_tokens.items()]
        named += [("additional_special_tokens", t) for t in config.additional_special_tokens]
        registered = {t.content for t in self._tok.get_added_tokens_decoder().values()}
        for key, text in named:
            token_id = self._tok.token_to_id(text)
            if token_id is None:
                raise DataError(source, f"{text!r} is not in {self.path.name}'s vocabulary",
                                key=key)
            if text not in registered:   # a plain vocabulary entry: keep its id, never split it
                self._tok.add_special_tokens([AddedToken(text, special=True, normalized=False)])
                assert self._tok.token_to_id(text) == token_id

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, dtype=np.int64)

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        return [np.asarray(e.ids, dtype=np.int64)
                for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def save(self, directory) -> Path:
        Path(directory).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(self.path, Path(directory) / "tokenizer.json")
        for name in _HF_COMPANIONS:  # the chat template and special tokens travel along
            if (self.path.parent / name).is_file():
                shutil.copyfile(self.path.parent / name, Path(directory) / name)
        return _write_config(directory, {"type": "hf", "file": "tokenizer.json"}, self)


class SentencePieceTokenizer(_Tokenizer):
    """A SentencePiece ``.model`` (its ``</s>`` is the end-of-document token)."""

    name = "sentencepiece"

    def __init__(self, path: str | os.PathLike):
        import sentencepiece
        self.path = Path(path)
        if not self.path.is_file():
            raise DataError(self.path, "tokenizer model not found", key="data.tokenizer_path")
        try:
            self._sp = sentencepiece.SentencePieceProcessor(model_file=str(self.path))
        except Exception as exc:
            raise DataError(self.path, f"not a valid SentencePiece model: "
                                       f"{str(exc).splitlines()[0]}",
                            key="data.tokenizer_path") from None
        self.vocab_size = self._sp.get_piece_size()
        self.eod_id = self._sp.eos_id()
        if self.eod_id < 0:
            raise DataError(self.path, "the model has no end-of-sentence (</s>) piece",
                            key="data.tokenizer_path")
        self.pad_id = self._sp.pad_id() if self._sp.pad_id() >= 0 else self.eod_id
        self.eos_id = self.eod_id
        self.special_ids = frozenset(i for i in range(self.vocab_size)
                                     if self._sp.is_control(i))

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._sp.encode(text), dtype=np.int64)

    def decode(self, ids) -> str:
        return self._sp.decode([int(i) for i in ids if int(i) != self.eod_id])

    def save(self, directory) -> Path:
        Path(directory).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(self.path, Path(directory) / "tokenizer.model")
        return _write_config(directory, {"type": "sentencepiece", "file": "tokenizer.model"},
                             self)


def build_tokenizer(name: str, path: str | None = None):
    """``name`` is ``data.tokenizer``; ``path`` is ``data.tokenizer_path`` (files only)."""
    if name == "byte":
        return ByteTokenizer()
    if name in ("hf", "sentencepiece"):
        if not path:
            raise DataError(None, f"tokenizer {name!r} needs data.tokenizer_path",
                            key="data.tokenizer_path")
        return HFTokenizer(path) if name == "hf" else SentencePieceTokenizer(path)
    raise ValueError(f"unknown tokenizer {name!r}")


def load_tokenizer(directory: str | os.PathLike):
    """Restore a tokenizer that ``save(directory)`` wrote (a run directory's ``tokenizer/``).
    Its ``apt_tokenizer.json`` is untrusted: the file it names must lie in ``directory``."""
    directory = Path(directory)
    config_path = directory / _CONFIG
    if not config_path.is_file():
        raise DataError(config_path, "no saved tokenizer here")
    config = read_json_object(config_path, MAX_CONFIG_BYTES)
    kind = config.get("type")
    if kind == "byte":
        return ByteTokenizer()
    if kind not in ("hf", "sentencepiece"):
        raise DataError(config_path, f"{kind!r}: expected byte, hf or sentencepiece", key="type")
    return build_tokenizer(kind, str(file_inside(directory, config.get("file"), config_path,
                                                 "file")))


def tokenizer_identity(tok) -> dict:
    """What decides the token ids: the kind, the vocabulary size and a SHA-256 of the file
    that defines the tokenizer (none for ``byte``). Two data files made with different
    identities hold ids that mean different things."""
    path = getattr(tok, "path", None)
    return {"name": tok.name, "vocab_size": int(tok.vocab_size),
            "sha256": hashlib.sha256(Path(path).read_bytes()).hexdigest() if path else None}


def describe_identity(identity: dict) -> str:
    digest = f", sha256 {identity['sha256'][:12]}" if identity.get("sha256") else ""
    return f"the {identity['name']} tokenizer (vocab {identity['vocab_size']:,}{digest})"


def saved_identity(directory: str | os.PathLike) -> dict | None:
    """The identity of the tokenizer ``save(directory)`` wrote (recorded since identities
    exist; computed from the saved files for older directories), None without one."""
    config_path = Path(directory) / _CONFIG
    if not config_path.is_file():
        return None
    recorded = read_json_object(config_path, MAX_CONFIG_BYTES).get("identity")
    if recorded is not None and not isinstance(recorded, dict):
        raise DataError(config_path, "must be an object", key="identity")
    return recorded or tokenizer_identity(load_tokenizer(directory))


def train_bpe(texts, vocab_size: int, output: str | os.PathLike) -> HFTokenizer:
    """Train a byte-level BPE (``tokenizers``) on an iterable of strings; write ``output``
    (a ``tokenizer.json``) and return it loaded. Byte-level, so every text round-trips."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOD_TOKEN, PAD_TOKEN],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(output))
    return HFTokenizer(output)


def _write_config(directory, config: dict, tok) -> Path:
    Path(directory).mkdir(parents=True, exist_ok=True)
    path = Path(directory) / _CONFIG
    config["identity"] = tokenizer_identity(tok)   # what blends compare (build.py)
    path.write_text(json.dumps(config, indent=2) + "\n")
    return path
