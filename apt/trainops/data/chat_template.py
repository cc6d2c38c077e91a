"""Chat templates: role/content messages rendered to tokens, and which tokens are the assistant's.

A template is Jinja, rendered the way Hugging Face's ``apply_chat_template`` renders it (a
sandboxed environment with ``trim_blocks``/``lstrip_blocks``, ``loopcontrols``, ``tojson``,
``raise_exception``, ``strftime_now``; the variables ``messages``, ``add_generation_prompt`` and
the tokenizer's special tokens such as ``eos_token``), then tokenized without adding specials.
The tokenizer's own template (``chat_template.jinja`` or ``tokenizer_config.json``'s
``chat_template`` next to its ``tokenizer.json``) is used when it has one, ``BUILTIN`` otherwise.

Which tokens are trained is found by rendering prefixes, not by trusting markers in the
template: for the assistant message k, the conversation up to k with the generation prompt and
the conversation including k are rendered; the tokens the longer one adds are the assistant's.
That needs each rendering to be a token prefix of the next one; a template for which it is not
(one that rewrites earlier turns, or whose generation prompt differs from how it renders the
assistant) is refused, naming the record, rather than trained on a guessed mask.
"""
from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import numpy as np

from .errors import DataError

# One message per block: "<|role|>\n" content "\n"; the generation prompt opens the assistant's.
BUILTIN = ("{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}\n"
           "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}")

_SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token",
                       "cls_token", "mask_token")


class ChatTemplate:
    """A compiled template; ``render(messages, add_generation_prompt)`` -> text."""

    def __init__(self, source: str, name: str = "builtin", special_tokens: dict | None = None):
        self.source, self.name = source, name
        self.special_tokens = dict(special_tokens or {})
        try:
            self._template = _environment().from_string(source)
        except Exception as exc:  # jinja2.TemplateSyntaxError and friends
            raise DataError(name, f"chat template does not compile: {exc}") from None

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        return self._template.render(messages=messages, tools=None, documents=None,
                                     add_generation_prompt=add_generation_prompt,
                                     **self.special_tokens)


def tokenizer_chat_template(tokenizer) -> ChatTemplate | None:
    """The template stored with a Hugging Face tokenizer directory, or None."""
    path = getattr(tokenizer, "path", None)
    if path is None:
        return None
    directory = Path(path).parent
    config_path = directory / "tokenizer_config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    jinja_path = directory / "chat_template.jinja"   # where transformers >= 4.43 saves it
    source, where = None, None
    if jinja_path.is_file():
        source, where = jinja_path.read_text(), jinja_path
    elif config.get("chat_template"):
        source, where = config["chat_template"], config_path
        if isinstance(source, list):  # named templates: [{"name": "default", "template": ...}]
            named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
            source = named.get("default")
            if source is None:
                raise DataError(config_path, f"chat_template has no 'default' among the named "
                                             f"templates {sorted(map(str, named))}")
    if source is None:
        return None
    special = {}
    for key in _SPECIAL_TOKEN_KEYS:
        value = config.get(key)
        if isinstance(value, dict):  # a serialised AddedToken
            value = value.get("content")
        if isinstance(value, str):
            special[key] = value
    return ChatTemplate(source, str(where), special)


def resolve_chat_template(tokenizer, choice: str = "auto") -> ChatTemplate:
    """``choice`` is ``data.chat_template``: ``auto`` (the tokenizer's own when it has one,
    else the built-in one) or ``builtin``."""
    if choice == "builtin":
        return ChatTemplate(BUILTIN)
    if choice != "auto":
        raise DataError(None, f"{choice!r}: expected auto or builtin", key="data.chat_template")
    return tokenizer_chat_template(tokenizer) or ChatTemplate(BUILTIN)


def encode_chat(messages: list[dict], template: ChatTemplate, tokenizer,
                where: str) -> tuple[np.ndarray, np.ndarray]:
    """Tokens of the whole conversation followed by the end-of-document token, and a loss
    mask that is 1 on every assistant message's tokens (what rendering it adds to the
    generation prompt before it) and on the end-of-document token when the conversation ends
    with the assistant."""
    assistant_turns = [k for k, m in enumerate(messages) if m["role"] == "assistant"]
    if not assistant_turns:
        raise DataError(where, "the conversation has no assistant message: nothing to train")
    full = _encode(template, messages, False, tokenizer, where)
    mask = np.zeros(len(full) + 1, dtype=np.float32)
    for k in assistant_turns:
        prompt, turn = _assistant_turn(messages, k, template, tokenizer, where)
        if full[:len(turn)].tolist() != turn.tolist():
            raise _not_a_prefix(where, template, f"messages up to {k}", "the whole conversation")
        mask[len(prompt):len(turn)] = 1
    mask[-1] = float(messages[-1]["role"] == "assistant")
    tokens = np.concatenate([full, [tokenizer.eod_id]]).astype(np.int64)
    return tokens, mask


def last_turn(messages: list[dict], template: ChatTemplate, tokenizer,
              where: str) -> tuple[np.ndarray, np.ndarray]:
    """(prompt, answer) token ids for the conversation's last assistant message: the prompt is
    everything before it with the generation prompt; the answer is what the assistant has to
    produce, ending with the end-of-document token (a model that does not stop is wrong)."""
    k = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    if k is None:
        raise DataError(where, "the conversation has no assistant message to score")
    prompt, turn = _assistant_turn(messages, k, template, tokenizer, where)
    return prompt, np.concatenate([turn[len(prompt):], [tokenizer.eod_id]]).astype(np.int64)


def _assistant_turn(messages, k, template, tokenizer, where):
    """Tokens of messages[:k] with the generation prompt, and of messages[:k+1]; the first
    must be a prefix of the second."""
    prompt = _encode(template, messages[:k], True, tokenizer, where)
    turn = _encode(template, messages[:k + 1], False, tokenizer, where)
    if turn[:len(prompt)].tolist() != prompt.tolist():
        raise _not_a_prefix(where, template, f"messages before {k} with the generation prompt",
                            f"messages up to {k}")
    return prompt, turn


def checked_messages(messages, where: str) -> list[dict]:
    """A record's ``messages``: a non-empty list of {role, content} with string values, else a
    DataError naming ``where``."""
    if (not isinstance(messages, list) or not messages
            or not all(isinstance(m, dict) and isinstance(m.get("role"), str)
                       and isinstance(m.get("content"), str) for m in messages)):
        raise DataError(where, "'messages' must be a non-empty list of {role, content} with "
                               "string values")
    return messages


def render_or_fail(template, messages, add_generation_prompt, where) -> str:
    """The template's text; its failure is a DataError naming the record."""
    try:
        return template.render(messages, add_generation_prompt)
    except Exception as exc:  # the template's raise_exception, an undefined variable, ...
        raise DataError(where, f"chat template {template.name} failed: {exc}") from None


def tokens_of(tokenizer, text: str) -> np.ndarray:
    return np.asarray(tokenizer.encode(text), dtype=np.int64) if text else np.zeros(0, np.int64)


def _encode(template, messages, add_generation_prompt, tokenizer, where) -> np.ndarray:
    return tokens_of(tokenizer, render_or_fail(template, messages, add_generation_prompt, where))


def _not_a_prefix(where, template, shorter, longer) -> DataError:
    return DataError(where, f"chat template {template.name}: rendering {shorter} is not a token "
                            f"prefix of rendering {longer}, so the assistant's tokens cannot be "
                            f"found by rendering prefixes (use data.chat_template=builtin or fix "
                            f"the template)")


def _environment():
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTag(jinja2.ext.Extension):
        """``{% generation %}...{% endgeneration %}`` renders its body: templates written for
        transformers' assistant masks parse here, but the mask still comes from prefixes."""
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(
                lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env
