"""Chat templates: role/content messages rendered to tokens, and which tokens are the assistant's.

A template is Jinja, rendered the way Hugging Face's ``apply_chat_template`` renders it (a
sandboxed environment with ``trim_blocks``/``lstrip_blocks``, ``loopcontrols``, ``tojson``,
``raise_exception``, ``strftime_now``; the variables ``messages``, ``add_generation_prompt`` and
the tokenizer's special tokens such as ``eos_token``), then tokenized without adding specials.
The tokenizer's own template (``chat_template.jinja`` or ``tokenizer_config.json``'s
``chat_template`` next to its ``tokenizer.json``) is used when it has one, ``BUILTIN`` otherwise.

Which tokens are trained is found by rendering prefixes, not by trusting markers in the
template: for the assistant message k, the conversation up to k with the generation prompt and
the conversation including k are rendered; the tokens the longer one adds are the assistant's,
up to and including the turn's end-of-turn token (its last special token: ``<|im_end|>``,
``<|eot_id|>``, ``</s>``), which the model must learn to stop with; what the template writes
after it (ChatML's newline) is never generated, so never trained. A template without one (the
built-in) trains the whole turn and, after a final turn, the end-of-document token.

What is trained is the whole conversation's rendering, so the mask marks it there: a turn the
whole conversation renders differently (Qwen3 drops the reasoning of turns before the last user
message) is trained as rendered there, from the prompt up to its end-of-turn token. When the
prompt side is not monotone (Mistral v0.3 puts the system prompt into the last user message
only), a turn is found where its content is rendered (see ``_span_by_content``), said in one
warning line. A template for which neither holds (no end-of-turn token, a generation prompt
unlike how it renders the assistant) is refused, naming the record, rather than trained on a
guessed mask.

Templates are untrusted: rendered in jinja2's sandbox (as transformers does), every value they
build and their output bounded by ``MAX_RENDERED_CHARS`` (``_environment``).
"""
from __future__ import annotations

import json
import logging
import os
import re
from datetime import datetime
from pathlib import Path

import numpy as np

from ..errors import DataError
from .tokenizer_files import read_tokenizer_config

log = logging.getLogger(__name__)

# One message per block: "<|role|>\n" content "\n"; the generation prompt opens the assistant's.
BUILTIN = ("{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}\n"
           "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}")

# What one rendering may produce: far beyond any real conversation (a 128k-token context is
# about 0.5M characters), small enough that a hostile template cannot exhaust memory.
MAX_RENDERED_CHARS = 8 << 20


class ChatTemplate:
    """A compiled template; ``render(messages, add_generation_prompt)`` -> text, at most
    ``max_chars`` characters (a template that would render more is refused, see
    ``_environment``)."""

    def __init__(self, source: str, name: str = "builtin", special_tokens: dict | None = None,
                 max_chars: int = MAX_RENDERED_CHARS):
        self.source, self.name, self.max_chars = source, name, max_chars
        self.special_tokens = dict(special_tokens or {})
        try:
            self._template = _environment(max_chars).from_string(source)
        except Exception as exc:  # jinja2.TemplateSyntaxError and friends
            raise DataError(name, f"chat template does not compile: {exc}") from None

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        # Streamed, so a template that loops out text is stopped at the bound, not at the
        # end of memory.
        pieces, size = [], 0
        for piece in self._template.generate(messages=messages, tools=None, documents=None,
                                             add_generation_prompt=add_generation_prompt,
                                             **self.special_tokens):
            size += len(piece)
            if size > self.max_chars:
                raise RenderTooLarge(self.max_chars)
            pieces.append(piece)
        return "".join(pieces)


class RenderTooLarge(Exception):
    def __init__(self, limit: int):
        super().__init__(f"renders more than {limit:,} characters")


def tokenizer_chat_template(tokenizer) -> ChatTemplate | None:
    """The template stored with a Hugging Face tokenizer directory (tokenizer_files.py reads
    it), or None."""
    config = getattr(tokenizer, "config", None)
    if config is None:
        path = getattr(tokenizer, "path", None)
        if path is None:
            return None
        config = read_tokenizer_config(Path(path).parent)
    if config.chat_template is None:
        return None
    return ChatTemplate(config.chat_template, config.chat_template_source,
                        config.special_tokens)


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
    """Tokens of the whole conversation followed by the end-of-document token (unless it
    already ends with it), and a loss mask that is 1 on every assistant message's tokens as
    the whole conversation renders them (see the module docstring: what rendering it adds to
    the generation prompt before it, up to and including its end-of-turn token) and on the
    end-of-document token when the conversation ends with an assistant turn that has no
    end-of-turn token of its own."""
    assistant_turns = [k for k, m in enumerate(messages) if m["role"] == "assistant"]
    if not assistant_turns:
        raise DataError(where, "the conversation has no assistant message: nothing to train")
    full = _encode(template, messages, False, tokenizer, where)
    mask = np.zeros(len(full), dtype=np.float32)
    end, stop = 0, None
    for k in assistant_turns:
        try:
            begin, n, stop = _span_by_prefixes(messages, k, template, tokenizer, full, where)
        except DataError as refusal:
            # Rendering prefixes is not monotone on the prompt side (Mistral moves the system
            # prompt into the last user message): find the turn by where its content is.
            begin, n, stop = _span_by_content(messages, k, template, tokenizer, full, where,
                                              refusal)
        if begin < end:
            raise _not_a_prefix(where, template, f"messages before {k} with the generation "
                                                 f"prompt", "the whole conversation",
                                "; its turn starts inside the previous one")
        mask[begin:begin + n] = 1
        end = begin + n
    ends_with_answer = messages[-1]["role"] == "assistant"
    if len(full) and full[-1] == tokenizer.eod_id:
        mask[-1] = float(ends_with_answer and stop is None) or mask[-1]
        return full.astype(np.int64), mask
    tokens = np.concatenate([full, [tokenizer.eod_id]]).astype(np.int64)
    return tokens, np.append(mask, np.float32(ends_with_answer and stop is None))


def _span_by_prefixes(messages, k, template, tokenizer, full, where):
    """(start, length, end-of-turn index or None) of assistant turn ``k`` in ``full``: what
    rendering messages[:k+1] adds to messages[:k] with the generation prompt, up to its
    end-of-turn token; where the whole conversation renders the turn differently (Qwen3 drops
    an earlier turn's reasoning), as rendered there, up to its end-of-turn token."""
    prompt, answer = _assistant_turn(messages, k, template, tokenizer, where)
    if full[:len(prompt)].tolist() != prompt.tolist():
        raise _not_a_prefix(where, template, f"messages before {k} with the generation "
                                             f"prompt", "the whole conversation")
    stop = _end_of_turn(answer, tokenizer)
    if full[len(prompt):len(prompt) + len(answer)].tolist() == answer.tolist():
        return len(prompt), len(answer) if stop is None else stop + 1, stop
    if stop is None:
        raise _not_a_prefix(where, template, f"messages up to {k}", "the whole conversation",
                            "; the turn has no end-of-turn token to find its end by")
    hits = np.flatnonzero(full[len(prompt):] == answer[stop])
    if not len(hits):
        raise _not_a_prefix(where, template, f"messages up to {k}", "the whole conversation",
                            f"; its end-of-turn token {int(answer[stop])} is missing there")
    return len(prompt), int(hits[0]) + 1, stop


def _span_by_content(messages, k, template, tokenizer, full, where, refusal):
    """(start, length, end-of-turn index) of assistant turn ``k`` in ``full``, found from where
    the whole conversation renders that message's content: rendering it again with a marker
    before the content shows where the content starts. Trained from there (and the template's
    spacing before it, unless the generation prompt ends right there), up to the first
    end-of-turn token after the content; a token holding both prompt and answer text is
    trained. ``refusal`` is raised when that does not find one clear span."""
    turn = _encode(template, messages[:k + 1], False, tokenizer, where)
    stop = _end_of_turn(turn, tokenizer)
    content = messages[k]["content"]
    marker = "\u00a7" if not content.startswith("\u00a7") else "\u00b6"   # § or ¶
    marked = [dict(m) for m in messages]
    marked[k]["content"] = marker + content
    text = render_or_fail(template, messages, False, where)
    other = render_or_fail(template, marked, False, where)
    if stop is None or len(other) != len(text) + len(marker):   # the content, once, as given
        raise refusal
    at = len(os.path.commonprefix([text, other]))
    prompt = render_or_fail(template, messages[:k], True, where)
    plain = render_or_fail(template, messages[:k], False, where)
    header = prompt[len(plain):] if prompt.startswith(plain) else ""
    begin_char = at if header and text[:at].endswith(header) else len(text[:at].rstrip())
    begin = _common_prefix(tokens_of(tokenizer, text[:begin_char]), full)
    content_end = _common_prefix(tokens_of(tokenizer, text[:at + len(content)]), full)
    hits = np.flatnonzero(full[content_end:] == turn[stop])
    if not len(hits):
        raise refusal
    if not getattr(template, "_warned_content_spans", False):
        template._warned_content_spans = True
        log.warning("chat template %s: rendering prefixes is not monotone (%s); assistant "
                    "turns are found by where their content is rendered in the whole "
                    "conversation", template.name, refusal.reason.split(", so ")[0])
    return begin, content_end + int(hits[0]) + 1 - begin, stop


def _common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    n = min(len(a), len(b))
    differ = np.flatnonzero(a[:n] != b[:n])
    return int(differ[0]) if len(differ) else n


def last_turn(messages: list[dict], template: ChatTemplate, tokenizer,
              where: str) -> tuple[np.ndarray, np.ndarray]:
    """(prompt, answer) token ids for the conversation's last assistant message: the prompt is
    everything before it with the generation prompt; the answer is what the assistant has to
    produce, ending with its end-of-turn token, or the end-of-document token when the
    template has none (a model that does not stop is wrong)."""
    k = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    if k is None:
        raise DataError(where, "the conversation has no assistant message to score")
    prompt, answer = _assistant_turn(messages, k, template, tokenizer, where)
    return prompt, answer_tokens(answer, tokenizer)


def answer_tokens(answer: np.ndarray, tokenizer) -> np.ndarray:
    """What an assistant produces of ``answer`` (the tokens its turn adds after the generation
    prompt): up to and including the end-of-turn token (``<|im_end|>``, ``<|eot_id|>``,
    ``</s>``...; what follows it, such as ChatML's newline, is the template's and never
    generated); with no end-of-turn token, all of it and the end-of-document token."""
    stop = _end_of_turn(answer, tokenizer)
    if stop is None:
        return np.concatenate([answer, [tokenizer.eod_id]]).astype(np.int64)
    return answer[:stop + 1].astype(np.int64)


def stop_ids(tokenizer, template: ChatTemplate | None = None) -> tuple:
    """Token ids that end an answer when generating: the end-of-document token, the
    tokenizer config's ``eos_token`` and the end-of-turn token of ``template`` (by default the
    tokenizer's own), found by rendering a one-turn conversation."""
    ids = {int(tokenizer.eod_id), int(getattr(tokenizer, "eos_id", tokenizer.eod_id))}
    template = template or tokenizer_chat_template(tokenizer)
    if template is not None:
        probe = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
        try:
            _, answer = _assistant_turn(probe, 1, template, tokenizer, "probe")
        except DataError:   # a template that needs more (a system turn...): no probe
            answer = np.zeros(0, np.int64)
        stop = _end_of_turn(answer, tokenizer)
        if stop is not None:
            ids.add(int(answer[stop]))
    return tuple(sorted(ids))


def _end_of_turn(answer: np.ndarray, tokenizer) -> int | None:
    """Index in ``answer`` of its last special token (the end-of-turn marker), or None."""
    specials = getattr(tokenizer, "special_ids", frozenset())
    hits = [i for i, t in enumerate(answer.tolist()) if t in specials]
    return hits[-1] if hits else None


def _assistant_turn(messages, k, template, tokenizer, where):
    """Tokens of messages[:k] with the generation prompt, and what rendering messages[:k+1]
    adds to them; the first must be a prefix of the second."""
    prompt = _encode(template, messages[:k], True, tokenizer, where)
    turn = _encode(template, messages[:k + 1], False, tokenizer, where)
    if turn[:len(prompt)].tolist() != prompt.tolist():
        raise _not_a_prefix(where, template, f"messages before {k} with the generation prompt",
                            f"messages up to {k}")
    return prompt, turn[len(prompt):]


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
    except RecursionError:
        raise DataError(where, f"chat template {template.name} failed: it recurses too "
                               f"deeply") from None
    except Exception as exc:  # the template's raise_exception, an undefined variable, ...
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(where, f"chat template {template.name} failed: {message}") from None


def tokens_of(tokenizer, text: str) -> np.ndarray:
    return np.asarray(tokenizer.encode(text), dtype=np.int64) if text else np.zeros(0, np.int64)


def _encode(template, messages, add_generation_prompt, tokenizer, where) -> np.ndarray:
    return tokens_of(tokenizer, render_or_fail(template, messages, add_generation_prompt, where))


def _not_a_prefix(where, template, shorter, longer, detail: str = "") -> DataError:
    return DataError(where, f"chat template {template.name}: rendering {shorter} is not a token "
                            f"prefix of rendering {longer}{detail}, so the assistant's tokens "
                            f"cannot be found by rendering prefixes (use "
                            f"data.chat_template=builtin or fix the template)")


def _environment(max_chars: int = MAX_RENDERED_CHARS):
    """Hugging Face's template environment (a sandbox: no attribute access to internals, no
    mutation of the data), bounded: no value a template builds (``*``, ``**``, ``+``, ``~``,
    a filter or method call) may exceed ``max_chars`` items, checked before it is built where
    its size is known in advance (a repeat count, a width, a replacement). With the streamed
    output bound of ``ChatTemplate.render`` and the sandbox's bound on ``range``, rendering
    can neither produce nor hold an unbounded string."""
    import jinja2
    import jinja2.compiler
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def too_large(what):
        raise RenderTooLarge(max_chars) from None

    def check_size(value):
        if isinstance(value, (str, list, tuple, dict)) and len(value) > max_chars:
            too_large(value)
        return value

    def check_args(args, kwargs):
        # A width, a repeat or a padding count (center, indent, ljust, zfill, ...).
        for value in (*args, *kwargs.values()):
            if isinstance(value, int) and not isinstance(value, bool) and value > max_chars:
                too_large(value)

    def check_format(text):
        # A width inside a format string ("%400000000s", "{:>400000000}").
        if isinstance(text, str) and any(int(n) > max_chars for n in re.findall(r"\d{7,}",
                                                                                 text)):
            too_large(text)

    class Bounded(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset(["*", "**", "+", "%"])

        def call_binop(self, context, operator, left, right):
            if operator == "%":
                check_format(left)
            sizes = [len(v) if isinstance(v, (str, list, tuple)) else None
                     for v in (left, right)]
            if operator == "*" and any(n is not None for n in sizes):
                count = right if sizes[0] is not None else left
                if isinstance(count, int) and max(sizes[0] or 0, sizes[1] or 0) * count > \
                        max_chars:
                    too_large(count)
            elif operator == "+" and None not in sizes and sum(sizes) > max_chars:
                too_large(operator)
            elif operator == "**" and isinstance(left, int) and isinstance(right, int) and \
                    abs(left) > 1 and right * max(abs(left).bit_length(), 1) > 8 * max_chars:
                too_large(operator)
            return check_size(super().call_binop(context, operator, left, right))

        def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (jinja2's form)
            check_args(args, kwargs)
            if getattr(__obj, "__name__", None) == "replace" and isinstance(
                    getattr(__obj, "__self__", None), str) and len(args) >= 2 and \
                    isinstance(args[0], str) and isinstance(args[1], str):
                text, old, new = __obj.__self__, args[0], args[1]
                grows = (text.count(old) if old else len(text) + 1) * len(new)
                if len(text) + grows > max_chars:
                    too_large(__obj)
            return check_size(super().call(__context, __obj, *args, **kwargs))

        def wrap_str_format(self, value):   # str.format, as the sandbox hands it out
            check_format(getattr(value, "__self__", None))
            return super().wrap_str_format(value)

        def bounded_join(self, pieces):   # the ``~`` operator
            if sum(len(str(p)) for p in pieces) > max_chars:
                too_large(pieces)
            return "".join(map(str, pieces))

    class Generator(jinja2.compiler.CodeGenerator):
        def visit_Concat(self, node, frame):
            self.write("environment.bounded_join((")
            for arg in node.nodes:
                self.visit(arg, frame)
                self.write(", ")
            self.write("))")

    Bounded.code_generator_class = Generator

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

    def bounded(f):
        def call(*args, **kwargs):
            check_args(args[1:], kwargs)
            check_format(args[0] if args else None)
            return check_size(f(*args, **kwargs))
        for attr in ("jinja_pass_arg",):   # keep jinja2's context/environment passing marks
            if hasattr(f, attr):
                setattr(call, attr, getattr(f, attr))
        return call

    env = Bounded(trim_blocks=True, lstrip_blocks=True,
                  extensions=[GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.filters = {name: bounded(f) for name, f in env.filters.items()}
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env
