"""Tokenizer wrapper over the `tokenizers` library, chat templates, and streaming detokenization.

Encoding and decoding delegate to the Rust `tokenizers` implementation loaded from the model's
`tokenizer.json`, so ids match the Hugging Face tokenizer built from the same file. Chat templates
are rendered exactly like `transformers.utils.chat_template_utils.render_jinja_template`
(transformers 5.x): a jinja2 ImmutableSandboxedEnvironment with trim_blocks/lstrip_blocks,
loopcontrols, `raise_exception`, `strftime_now`, an HTML-unescaped `tojson`.

A template is code from the model file, so rendering is bounded (`_render_bounded`): in time (a
trace function checks a deadline while the template's Python code runs), in output, and in what
one step may build (string/list repetition and concatenation, `**`, format widths, padding and
replacement are checked before they allocate). `include`/`import`/`extends` are refused: a
template cannot read files.
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
import sys
import time
from collections.abc import Mapping
from datetime import datetime
from functools import cached_property, lru_cache, wraps

from .errors import EdgerunError


class ChatTemplateError(EdgerunError):
    """The model has no chat template, or the template rejected the messages."""


class TemplateLimitError(ChatTemplateError):
    """The chat template ran too long or built too much (see TEMPLATE_SECONDS and friends)."""


# What rendering a chat template may take. Real templates render in milliseconds and their output
# is the prompt, which the context bounds far below these.
TEMPLATE_SECONDS = 2.0
TEMPLATE_MAX_CHARS = 4 * 2**20        # the rendered text, and any one string built while rendering
TEMPLATE_MAX_ITEMS = 2**20            # any one list or tuple built while rendering
TEMPLATE_MAX_POWER_BITS = 2**16       # `a ** b` on integers


class TokenizerError(EdgerunError):
    """The tokenizer.json could not be loaded."""


class Tokenizer:
    """Hugging Face compatible tokenizer: `encode`, `decode`, streaming decode, chat templates."""

    def __init__(self, tokenizer_json: str, *, bos_token_id: int | None, eos_token_ids: list[int],
                 add_bos_token: bool, chat_template: str | dict | list | None,
                 special_tokens: dict | None = None):
        """`tokenizer_json`: the text of a tokenizer.json (starts with '{') or a path to one.
        `add_bos_token=True` makes `encode` start with BOS (prepended unless the tokenizer.json
        post_processor adds it already, so never twice from the two); False leaves it to the
        post_processor, as HF does when add_bos_token is unset. Chat encoding never adds one.
        `special_tokens`: an HF special_tokens_map ({'bos_token': '<s>', ...}); values may also be
        serialized AddedTokens ({'content': ...}). Missing bos/eos strings are derived from the ids."""
        from tokenizers import Tokenizer as _RustTokenizer

        try:
            if tokenizer_json.lstrip().startswith("{"):
                self._tk = _RustTokenizer.from_str(tokenizer_json)
            else:
                self._tk = _RustTokenizer.from_file(tokenizer_json)
        except Exception as exc:  # the Rust library raises plain Exception subclasses
            raise TokenizerError(f"cannot load tokenizer.json: {exc}") from exc
        self.vocab_size: int = self._tk.get_vocab_size(with_added_tokens=True)
        self.bos_token_id = bos_token_id
        self.eos_token_ids: list[int] = [int(i) for i in (eos_token_ids or [])]
        self.add_bos_token = bool(add_bos_token)
        self.chat_template = chat_template
        # HF with add_bos_token=True rebuilds the post_processor as "<bos> $A": add the BOS
        # ourselves only when the tokenizer.json post_processor does not already add one.
        pp_ids = self._tk.encode("", add_special_tokens=True).ids
        self._prepend_bos = (self.add_bos_token and bos_token_id is not None
                             and bos_token_id not in pp_ids[:1])
        self.special_tokens: dict[str, str] = {}
        for key, value in (special_tokens or {}).items():
            if isinstance(value, Mapping):
                value = value.get("content")
            if isinstance(value, str):
                self.special_tokens[key] = value
        if "bos_token" not in self.special_tokens and bos_token_id is not None:
            tok = self._tk.id_to_token(bos_token_id)
            if tok is not None:
                self.special_tokens["bos_token"] = tok
        if "eos_token" not in self.special_tokens and self.eos_token_ids:
            tok = self._tk.id_to_token(self.eos_token_ids[0])
            if tok is not None:
                self.special_tokens["eos_token"] = tok

    # ---- encode / decode -------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids for `text`; special-token strings in the text become their ids (like HF)."""
        ids = self._tk.encode(text, add_special_tokens=add_special_tokens).ids
        if add_special_tokens and self._prepend_bos:
            ids = [self.bos_token_id] + ids
        return ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        """Text for `ids`, identical to HF `tok.decode` (no clean_up_tokenization_spaces)."""
        return self._tk.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        """Id of a token string (e.g. a template's end-of-turn marker), or None."""
        return self._tk.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tk.id_to_token(int(token_id))

    @cached_property
    def max_token_bytes(self) -> int:
        """An upper bound of the UTF-8 bytes of text one token stands for, so a text of n bytes
        needs at least n / max_token_bytes tokens (no need to tokenize it to know it is too long).
        The longest decoded token, +1 for the space SentencePiece decoding drops, doubled when a
        normalizer might shrink the text first. Computed once (a decode per vocabulary entry)."""
        longest = max((len(self._tk.decode([i]).encode("utf-8", "surrogatepass"))
                       for i in range(self.vocab_size)), default=1)
        return (longest + 1) * (2 if self._tk.normalizer is not None else 1)

    def stream_decoder(self, skip_special_tokens: bool = False) -> "StreamDecoder":
        """A fresh incremental detokenizer for one generated sequence."""
        return StreamDecoder(self, skip_special_tokens)

    # ---- chat templates -------------------------------------------------------------------
    def _template_source(self, tools) -> str:
        """Pick the template like HF `get_chat_template` (named templates: tool_use / default)."""
        template = self.chat_template
        if isinstance(template, list):  # tokenizer_config form: [{"name": ..., "template": ...}]
            template = {t["name"]: t["template"] for t in template}
        if isinstance(template, dict):
            if tools is not None and "tool_use" in template:
                template = template["tool_use"]
            elif "default" in template:
                template = template["default"]
            else:
                raise ChatTemplateError("the model has several chat templates and none is named 'default': "
                                        f"{sorted(template)}")
        if not template:
            raise ChatTemplateError("this model has no chat template; use plain-text prompts "
                                    "(completion mode) or supply a template")
        return template

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> str:
        """Render `messages` like transformers' `apply_chat_template(..., tokenize=False)`."""
        import jinja2

        if not messages:
            raise ChatTemplateError("cannot apply a chat template to an empty conversation")
        tools = kwargs.pop("tools", None)
        documents = kwargs.pop("documents", None)
        template = _compile_template(self._template_source(tools))
        # HF drops None-valued keys (OpenAI-style content=None) and rebuilds inputs from plain JSON types.
        chat = []
        for msg in _plain(list(messages)):
            if not isinstance(msg, dict):
                raise ChatTemplateError(f"chat messages must be dicts, got {msg!r}")
            chat.append({k: v for k, v in msg.items() if v is not None})
        chat = _alias_reasoning(chat)
        context = {**self.special_tokens, **_plain(kwargs)}
        try:
            return _render_bounded(template, dict(messages=chat, tools=_plain(tools), documents=_plain(documents),
                                                  add_generation_prompt=add_generation_prompt, **context))
        except ChatTemplateError:
            raise
        except jinja2.TemplateError as exc:
            raise ChatTemplateError(f"chat template error: {exc}") from exc
        except RecursionError:
            raise ChatTemplateError("chat template error: recursion too deep") from None
        except Exception as exc:     # the template's own Python errors: 1/0, 'a' + 1, ...
            raise ChatTemplateError(f"chat template error: {type(exc).__name__}: {exc}") from None

    def encode_chat(self, messages, add_generation_prompt: bool = True, **kwargs) -> list[int]:
        """The rendered template encoded without adding another BOS (HF tokenize=True semantics)."""
        return self.encode(self.apply_chat_template(messages, add_generation_prompt, **kwargs),
                           add_special_tokens=False)


class StreamDecoder:
    """Incremental detokenizer: `push(id)` returns the text that token completes.

    Uses the prefix/read-offset scheme of HF text-generation-inference: decode a short window that
    starts one emitted chunk back (so SentencePiece's leading-space stripping and byte-level merges
    see their left context), emit only the growth, and hold back text ending in U+FFFD (an
    incomplete UTF-8 sequence from byte-fallback / byte-level pieces). The window is trimmed after
    every emission, so each push costs two decodes of a few tokens.

    Known limit: `tokenizers`' ByteFallback decoder turns a *whole* run of <0xXX> tokens into
    U+FFFD when the run is invalid UTF-8, so a valid prefix already streamed (e.g. <0x48> = "H")
    cannot be retracted if a stray byte follows. Only garbage byte sequences are affected; valid
    text (and every sequence for byte-level BPE) streams to exactly `decode(ids)`."""

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False):
        self._tk = tokenizer._tk
        self._skip = skip_special_tokens
        self._ids: list[int] = []   # the window: ids from prefix_offset on
        self._read = 0              # window index where the not-yet-emitted ids start
        self._prefix_text = ""      # decode(self._ids[:self._read]), cached

    def _decode(self, ids) -> str:
        return self._tk.decode(ids, skip_special_tokens=self._skip)

    def push(self, token_id: int) -> str:
        self._ids.append(int(token_id))
        text = self._decode(self._ids)
        if len(text) > len(self._prefix_text) and not text.endswith("\ufffd"):
            return self._emit(text)
        return ""

    def flush(self) -> str:
        """Whatever is still held back (e.g. an unfinished UTF-8 sequence at the end)."""
        text = self._decode(self._ids)
        return self._emit(text) if len(text) > len(self._prefix_text) else ""

    def _emit(self, text: str) -> str:
        out = text[len(self._prefix_text):]
        # The tokens just emitted become the next window's left context; older ones are dropped.
        self._ids = self._ids[self._read:]
        self._read = len(self._ids)
        self._prefix_text = self._decode(self._ids)
        return out


# ---- jinja environment, as transformers builds it --------------------------------------------
@lru_cache(maxsize=16)
def _compile_template(source: str):
    """Compile once per template string (transformers caches the same way)."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class _Generation(jinja2.ext.Extension):
        # `{% generation %}...{% endgeneration %}` marks assistant text for masks; render it as-is.
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

        def _render(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # jinja's own tojson HTML-escapes <, >, & and ' which would corrupt prompts.
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt):
        return datetime.now().strftime(fmt)

    class TemplateDict:
        # `dict(...)` without exposing the dict type to the sandbox
        def __call__(self, *args, **kwargs):
            return dict(*args, **kwargs)

        def fromkeys(self, *args, **kwargs):
            return dict.fromkeys(*args, **kwargs)

    class TemplateNamespace(jinja2.utils.Namespace):
        # Reject dunder/underscore attributes, as transformers does.
        def __init__(*args, **kwargs):
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                TemplateNamespace._check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            TemplateNamespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(
                    f"chat templates cannot store underscore-prefixed attributes on a namespace: {name!r}")

    class NoFiles(jinja2.BaseLoader):
        def get_source(self, environment, name):
            # SecurityError, not TemplateNotFound: `ignore missing` must not turn it into a no-op
            raise jinja2.exceptions.SecurityError(
                f"chat templates cannot include, import or extend other templates (asked for {name!r})")

    class BoundedSandbox(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset({"*", "+", "**", "%"})

        def call_binop(self, context, operator, left, right):
            _check_binop(operator, left, right)
            return _check_built(super().call_binop(context, operator, left, right))

        def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (jinja's own convention)
            _check_call(__obj, args, kwargs)
            return _check_built(super().call(__context, __obj, *args, **kwargs))

    env = BoundedSandbox(trim_blocks=True, lstrip_blocks=True, loader=NoFiles(), finalize=_check_text,
                         extensions=[_Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    for name, f in list(env.filters.items()):
        env.filters[name] = _bounded_filter(name, f)
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    env.globals["dict"] = TemplateDict()
    env.globals["namespace"] = TemplateNamespace
    try:
        template = env.from_string(source)
    except jinja2.TemplateSyntaxError as exc:
        raise ChatTemplateError(f"the model's chat template does not parse: {exc}") from exc
    except RecursionError:
        raise ChatTemplateError("the model's chat template is nested too deeply to compile") from None
    # `a ~ b` compiles to calls of these two, looked up in the compiled module's globals
    names = template.root_render_func.__globals__
    for name in ("str_join", "markup_join"):
        if name in names:
            names[name] = _bounded_join(names[name])
    return template


# ---- bounds on what a template may do (module doc) -------------------------------------------
def _render_bounded(template, context: dict) -> str:
    """template.render(**context) within TEMPLATE_SECONDS and TEMPLATE_MAX_CHARS of output.

    Time: a trace function runs on every line of Python executed while rendering (the compiled
    template, its macros, the filters) and raises once the deadline has passed, so even a loop
    that outputs nothing stops, in the thread that ran it. Tracing costs a few times the render
    time, which is milliseconds; a debugger's or coverage's tracer is restored afterwards."""
    deadline = time.monotonic() + TEMPLATE_SECONDS
    ticks = 0

    def tracer(frame, event, arg):
        nonlocal ticks
        ticks += 1
        if not ticks & 255 and time.monotonic() > deadline:
            raise TemplateLimitError(f"the chat template ran for more than {TEMPLATE_SECONDS:g} s "
                                     "(a loop that does not end?)")
        return tracer

    previous = sys.gettrace()
    sys.settrace(tracer)
    try:
        pieces, size = [], 0
        for piece in template.generate(**context):
            size += len(piece)
            if size > TEMPLATE_MAX_CHARS:
                raise TemplateLimitError(f"the chat template's output passed {TEMPLATE_MAX_CHARS} characters")
            pieces.append(piece)
        return "".join(pieces)
    finally:
        sys.settrace(previous)


def _refuse(what: str, size: int, limit: int):
    raise TemplateLimitError(f"the chat template builds {what} of {size} (the limit is {limit})")


def _check_size(value, size: int) -> None:
    """A string or sequence of `size` characters/items may be built; else TemplateLimitError."""
    if isinstance(value, str) and size > TEMPLATE_MAX_CHARS:
        _refuse("a string", size, TEMPLATE_MAX_CHARS)
    if isinstance(value, (list, tuple)) and size > TEMPLATE_MAX_ITEMS:
        _refuse("a list", size, TEMPLATE_MAX_ITEMS)


def _text_size(value, limit: int = TEMPLATE_MAX_CHARS, depth: int = 0) -> int:
    """About how many characters str(value) has, counted only up to just past `limit` (a list
    holding one long string many times is small but prints huge)."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, (list, tuple, dict)):
        if depth > 32:
            return limit + 1
        items = value.items() if isinstance(value, dict) else value
        total = 2
        for item in items:
            total += 2 + (_text_size(item[0], limit, depth + 1) + _text_size(item[1], limit, depth + 1)
                          if isinstance(value, dict) else _text_size(item, limit, depth + 1))
            if total > limit:
                break
        return total
    if _is_int(value):
        return 24 if abs(value) < 2**64 else int(value.bit_length() * 0.302) + 2   # 0.302 = log10(2)
    return 24


def _check_text(value):
    """What a template is about to turn into text (output, `~`, format arguments)."""
    size = _text_size(value)
    if size > TEMPLATE_MAX_CHARS:
        _refuse("a text", size, TEMPLATE_MAX_CHARS)
    return value


def _bounded_join(join):
    """jinja's `~` (str_join / markup_join), refusing a result over TEMPLATE_MAX_CHARS."""
    @wraps(join)
    def bounded(seq):
        seq = tuple(seq)
        size = 0
        for item in seq:
            size += _text_size(item)
            if size > TEMPLATE_MAX_CHARS:
                _refuse("a string", size, TEMPLATE_MAX_CHARS)
        return join(seq)

    return bounded


def _check_built(value):
    if isinstance(value, (str, list, tuple)):
        _check_size(value, len(value))
    return value


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


# a width or precision of 7+ digits, or one taken from the arguments (`*`, nested `{}`)
_BIG_FORMAT = re.compile(r"%[-+ #0]*(?:\*|\d{7,}|\d*\.(?:\*|\d{7,}))|\{[^{}]*:[^{}]*(?:\d{7,}|\{)")


def _check_format(fmt: str, args=()) -> None:
    if _BIG_FORMAT.search(fmt) or any(_is_int(a) and abs(a) > TEMPLATE_MAX_CHARS for a in args):
        raise TemplateLimitError("the chat template formats with a width or precision over the limit "
                                 f"({TEMPLATE_MAX_CHARS})")
    _check_size(fmt, len(fmt) + sum(_text_size(a) for a in args))


def _check_binop(op: str, left, right) -> None:
    if op == "*":
        for seq, n in ((left, right), (right, left)):
            if isinstance(seq, (str, list, tuple)) and _is_int(n):
                _check_size(seq, len(seq) * n)
    elif op == "+":
        if isinstance(left, (str, list, tuple)) and isinstance(right, (str, list, tuple)):
            _check_size(left, len(left) + len(right))
    elif op == "**":
        if _is_int(left) and _is_int(right) and abs(left) > 1 and right > 0:
            bits = right * math.log2(abs(left))
            if bits > TEMPLATE_MAX_POWER_BITS:
                _refuse("a number", int(bits), TEMPLATE_MAX_POWER_BITS)
    elif op == "%" and isinstance(left, str):
        _check_format(left, right if isinstance(right, (tuple, list)) else (right,))


def _check_call(func, args, kwargs) -> None:
    """String methods that can build much more than they are given."""
    name = getattr(func, "__name__", "")
    target = getattr(getattr(func, "__wrapped__", func), "__self__", None)
    if not isinstance(target, str):
        return
    if name in ("format", "format_map"):
        _check_format(target, list(args) + list(kwargs.values()))
    elif name in ("center", "ljust", "rjust", "zfill") and args and _is_int(args[0]):
        _check_size(target, args[0])
    elif name == "expandtabs":
        tab = args[0] if args else kwargs.get("tabsize", 8)
        if _is_int(tab):
            _check_size(target, len(target) + target.count("\t") * tab)
    elif name == "replace" and len(args) >= 2 and isinstance(args[0], str) and isinstance(args[1], str):
        _check_replace(target, args[0], args[1])
    elif name == "join" and args and isinstance(args[0], (list, tuple)):
        _check_size(target, sum(len(x) for x in args[0] if isinstance(x, str)) + len(target) * len(args[0]))


def _check_replace(s: str, old: str, new: str) -> None:
    count = s.count(old) if old else len(s) + 1
    _check_size(s, len(s) + count * (len(new) - len(old)))


def _bounded_filter(name: str, f):
    """A filter checked for what it is about to build (padding, replacement, joining, formatting,
    indenting) and for what it built."""
    skip = 0 if getattr(f, "jinja_pass_arg", None) is None else 1     # a context/environment first

    @wraps(f)
    def bounded(*args, **kwargs):
        values = args[skip:]
        value = values[0] if values else None
        if isinstance(value, (list, tuple, dict)):
            _check_text(value)          # most filters print or copy their input
        if name == "center" and len(values) > 1 and _is_int(values[1]):
            _check_size("", values[1])
        elif name == "indent" and isinstance(value, str):
            width = values[1] if len(values) > 1 else kwargs.get("width", 4)
            if _is_int(width):
                _check_size(value, len(value) + (value.count("\n") + 1) * width)
            elif isinstance(width, str):
                _check_size(value, len(value) + (value.count("\n") + 1) * len(width))
        elif name == "format" and isinstance(value, str):
            _check_format(value, list(values[1:]) + list(kwargs.values()))
        elif name == "replace" and isinstance(value, str) and len(values) > 2:
            if isinstance(values[1], str) and isinstance(values[2], str):
                _check_replace(value, values[1], values[2])
        elif name == "join" and isinstance(value, (list, tuple)):
            sep = values[1] if len(values) > 1 and isinstance(values[1], str) else kwargs.get("d", "")
            _check_size("", sum(len(x) for x in value if isinstance(x, str)) + len(str(sep)) * len(value))
        elif name == "tojson":
            indent = values[1] if len(values) > 1 else kwargs.get("indent")
            if _is_int(indent) and indent > 64:
                _refuse("a JSON indent", indent, 64)
        return _check_built(f(*args, **kwargs))

    return bounded


_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def _alias_reasoning(chat: list[dict]) -> list[dict]:
    """Expose a message's reasoning under both names templates read (transformers 5 behaviour)."""
    out = []
    for msg in chat:
        reasoning = next((msg[k] for k in _REASONING_FIELDS if msg.get(k) is not None), None)
        if reasoning is not None:
            msg = {"thinking": reasoning, **msg, "reasoning_content": reasoning}
        out.append(msg)
    return out


def _plain(value):
    """Rebuild template inputs from plain JSON types so the sandbox sees no foreign methods."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if hasattr(value, "item") and type(value).__module__ == "numpy":
        return _plain(value.item())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    return f"<{type(value).__name__}>"
