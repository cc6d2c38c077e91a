"""APT's tokenizers as files ``transformers.AutoTokenizer.from_pretrained`` loads
(``tokenizer.json`` + ``tokenizer_config.json``), with the same ids as ``encode`` and the same
text as ``decode`` (special tokens skipped): what ``trainops export-hf`` puts next to the weights.

- ``byte``: a ``tokenizers`` BPE without merges over the 256 byte symbols of GPT-2's byte-level
  alphabet, so token i is byte i; ``<|endoftext|>`` (256) and ``<|pad|>`` (257) are special.
- ``hf``: its own ``tokenizer.json``, with its config's eos/bos/pad tokens and chat template.
- ``sentencepiece``: converted to a ``tokenizer.json`` by transformers' SentencePiece converter
  (it follows the model's normalizer spec, so it encodes like ``SentencePieceProcessor``).

APT adds no beginning-of-sequence token; a document starts after an end-of-document token,
so that token is also the bos token (as in GPT-2)."""
from __future__ import annotations

from pathlib import Path

from .special_tokens import EOD_TOKEN, PAD_TOKEN


def save_for_transformers(tok, directory: str | Path) -> Path:
    """Write ``tokenizer.json`` and ``tokenizer_config.json`` into ``directory``."""
    from transformers import PreTrainedTokenizerFast
    from .chat_template import tokenizer_chat_template
    backend = _backend(tok)
    # A chat model's eos_token (its end of turn, <|im_end|>) stays what its config says.
    eos = backend.id_to_token(getattr(tok, "eos_id", tok.eod_id))
    named = getattr(getattr(tok, "config", None), "special_tokens", {})
    bos = named.get("bos_token") or backend.id_to_token(tok.eod_id)
    fast = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=eos, bos_token=bos,
                                   pad_token=backend.id_to_token(tok.pad_id))
    template = tokenizer_chat_template(tok)
    if template is not None:
        fast.chat_template = template.source
    fast.save_pretrained(str(directory))
    return Path(directory)


def _backend(tok):
    """A ``tokenizers.Tokenizer`` with ``tok``'s ids."""
    from tokenizers import Tokenizer
    if tok.name == "byte":
        return _byte_tokenizer(tok)
    if tok.name == "hf":   # as loaded: tokenizer_config.json's added tokens registered
        return Tokenizer.from_str(tok._tok.to_str())
    if tok.name == "sentencepiece":
        return _sentencepiece_tokenizer(tok)
    raise ValueError(f"no Hugging Face form for the {tok.name!r} tokenizer")


def _byte_tokenizer(tok):
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    # GPT-2's byte -> printable character table; the ByteLevel pre-tokenizer maps each byte of
    # the text to its character, and the vocabulary maps that character back to the byte.
    symbols = pre_tokenizers.ByteLevel.alphabet()
    table = _bytes_to_unicode()
    assert set(table.values()) == set(symbols)
    backend = Tokenizer(models.BPE(vocab={table[b]: b for b in range(256)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    specials = {tok.eod_id: EOD_TOKEN, tok.pad_id: PAD_TOKEN}
    backend.add_special_tokens([AddedToken(specials[i], special=True) for i in sorted(specials)])
    assert [backend.token_to_id(specials[i]) for i in sorted(specials)] == sorted(specials)
    return backend


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's table (``tokenizers``' ByteLevel uses the same one)."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    codes, extra = list(printable), 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, codes)}


def _sentencepiece_tokenizer(tok):
    from tokenizers import AddedToken
    from transformers.convert_slow_tokenizer import SentencePieceExtractor, SpmConverter
    extractor = SentencePieceExtractor(str(tok.path))
    parts = extractor.extract(None)
    backend = SpmConverter.build_tokenizer_from_spm_proto(extractor.proto, parts["vocab"],
                                                          parts.get("merges"))
    # Control pieces (<s>, </s>, ...) decode to nothing, as in SentencePiece. (An unknown
    # piece decodes to "<unk>" here, to " ⁇ " in SentencePiece.)
    control = [p.piece for p in extractor.proto.pieces if p.type == 3]
    backend.add_special_tokens([AddedToken(p, special=True, normalized=False) for p in control])
    return backend
