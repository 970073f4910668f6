"""edgerun.tokenizer vs Hugging Face transformers on the same tokenizer.json: SmolLM2's byte-level
BPE (from the default GGUF) and a tiny Llama-2 style SentencePiece/byte-fallback BPE trained here."""
import json
import random
from pathlib import Path

import pytest

from edgerun.default_model import default_gguf
from edgerun.errors import EdgerunError
from edgerun.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")

TEXTS = [
    "Hello world",
    "Hello, world! How are you?",
    "  leading spaces\n\n\ttabs and trailing  ",
    "emoji 😀👍🏽 family 👨‍👩‍👧 flag 🇫🇷 end",
    "中文字符测试，日本語のテキスト、한국어",
    "def f(x):\n    return {'k': x ** 2}  # code\n",
    "naïve café résumé ß € 𝄞",
    "<|im_start|>user\nspecial tokens inline<|im_end|>",
    "<s>[INST] sp specials </s>",
    "",
    " ",
]

MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hi there 😀"},
    {"role": "assistant", "content": "Hello! How can I help?"},
    {"role": "user", "content": "What is 2+2?"},
]
NO_SYSTEM = MESSAGES[1:]

LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
QWEN2 = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Exercises tools + tojson, namespace, loop controls, eos_token, and a {% generation %} block.
TOOLS_TEMPLATE = """{%- set ns = namespace(sys='') -%}
{%- for m in messages %}{% if m.role == 'system' %}{% set ns.sys = m.content %}{% break %}{% endif %}{% endfor -%}
<|im_start|>system
{{ ns.sys }}{% if tools %}

# Tools
{% for t in tools %}{{ t | tojson }}
{% endfor %}{% endif %}<|im_end|>
{% for m in messages %}{% if m.role == 'system' %}{% continue %}{% endif %}
<|im_start|>{{ m.role }}
{% if m.role == 'assistant' %}{% generation %}{{ m.content }}{{ eos_token }}{% endgeneration %}{% else %}{{ m.content }}<|im_end|>{% endif %}

{% endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""
LLAMA2 = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}"
    "{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
    "{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
)
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather <now> & 'here'",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]


def ours_like(hf, chat_template="__own__", add_bos_token=False):
    """An edgerun Tokenizer built only from what the .ebin stores: tokenizer.json + ids + strings."""
    return Tokenizer(hf.backend_tokenizer.to_str(), bos_token_id=hf.bos_token_id,
                     eos_token_ids=[hf.eos_token_id], add_bos_token=add_bos_token,
                     chat_template=hf.chat_template if chat_template == "__own__" else chat_template,
                     special_tokens=hf.special_tokens_map)


@pytest.fixture(scope="module")
def smol():
    gguf = Path(default_gguf())
    hf = transformers.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    return hf, ours_like(hf)


def _train_llama2_style():
    """Tiny BPE with Llama-2's pipeline: '▁' normalizer, byte fallback <0xXX>, Strip decoder, '<s> $A'."""
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers import decoders, models, normalizers, processors, trainers

    corpus = ["The quick brown fox jumps over the lazy dog.", "Hello world, hello there! How are you?",
              "def main():\n    print('hi')\n    return 0", "中文字符测试 日本語のテキスト",
              "Streaming tokenizers must hold back incomplete bytes.", "naïve café résumé"] * 20
    tk = RustTokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tk.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tk.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
                                                       show_progress=False))
    spec = json.loads(tk.to_str())
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    for piece, _ in sorted(spec["model"]["vocab"].items(), key=lambda kv: kv[1]):
        vocab.setdefault(piece, len(vocab))
    spec["model"]["vocab"] = vocab
    for added in spec["added_tokens"]:
        added["id"] = vocab[added["content"]]
    spec["decoder"] = json.loads(decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                                    decoders.Fuse(), decoders.Strip(" ", 1, 0)]).__getstate__())
    tk = RustTokenizer.from_str(json.dumps(spec))
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                      special_tokens=[("<s>", 1)])
    return tk


@pytest.fixture(scope="module")
def sp():
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=_train_llama2_style(), bos_token="<s>",
                                              eos_token="</s>", unk_token="<unk>", chat_template=LLAMA2)
    return hf, ours_like(hf)


@pytest.fixture(params=["smol", "sp"])
def pair(request):
    return request.getfixturevalue(request.param)


def stream(tok, ids, **kw):
    dec = tok.stream_decoder(**kw)
    pieces = [dec.push(i) for i in ids]
    return pieces, "".join(pieces) + dec.flush()


# ---- encode / decode -------------------------------------------------------------------------
@pytest.mark.parametrize("text", TEXTS)
def test_encode_decode_match_hf(pair, text):
    hf, ours = pair
    ids = ours.encode(text)
    assert ids == hf(text)["input_ids"] == hf.encode(text)
    assert ours.encode(text, add_special_tokens=False) == hf.encode(text, add_special_tokens=False)
    for skip in (False, True):
        assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)


def test_sizes_and_special_ids(smol, sp):
    hf, ours = smol
    assert ours.vocab_size == len(hf) == 49152
    assert ours.encode("<|im_start|>")[-1] == hf.convert_tokens_to_ids("<|im_start|>")
    hf, ours = sp
    assert ours.vocab_size == len(hf)
    assert ours.encode("Hi")[0] == 1 and ours.encode("Hi", add_special_tokens=False)[0] != 1


def test_add_bos_token_without_post_processor(sp):
    """HF with add_bos_token=True rebuilds the post_processor; ours prepends BOS the same way."""
    from tokenizers import Tokenizer as RustTokenizer

    hf_sp, _ = sp
    raw = RustTokenizer.from_str(hf_sp.backend_tokenizer.to_str())
    raw.post_processor = None
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>",
                                              unk_token="<unk>", add_bos_token=True)
    for add_bos, first in ((True, 1), (False, None)):
        ours = Tokenizer(raw.to_str(), bos_token_id=1, eos_token_ids=[2], add_bos_token=add_bos,
                         chat_template=None)
        ids = ours.encode("Hello world")
        assert (ids[0] == 1) == (first == 1)
        if add_bos:
            assert ids == hf("Hello world")["input_ids"]
            assert ours.encode("Hello", add_special_tokens=False)[0] != 1
    # tokenizer.json already adds BOS: add_bos_token=True must not add a second one
    hf, ours = sp
    ours2 = Tokenizer(hf.backend_tokenizer.to_str(), bos_token_id=1, eos_token_ids=[2], add_bos_token=True,
                      chat_template=None)
    assert ours2.encode("Hello") == hf("Hello")["input_ids"] == ours.encode("Hello")
    assert ours2.encode("Hello")[:2] != [1, 1]


def test_tokenizer_json_from_path(tmp_path, smol):
    hf, ours = smol
    path = tmp_path / "tokenizer.json"
    path.write_text(hf.backend_tokenizer.to_str())
    tok = Tokenizer(str(path), bos_token_id=None, eos_token_ids=[2], add_bos_token=False, chat_template=None)
    assert tok.encode("Hello world") == ours.encode("Hello world")
    with pytest.raises(EdgerunError):
        Tokenizer("{not json", bos_token_id=None, eos_token_ids=[], add_bos_token=False, chat_template=None)


# ---- streaming -------------------------------------------------------------------------------
@pytest.mark.parametrize("text", TEXTS)
def test_stream_concatenation_equals_decode(pair, text):
    hf, ours = pair
    ids = ours.encode(text)
    for skip in (False, True):
        pieces, joined = stream(ours, ids, skip_special_tokens=skip)
        assert joined == hf.decode(ids, skip_special_tokens=skip)
        assert not any("\ufffd" in p for p in pieces)  # incomplete UTF-8 is held back, never shown


def test_stream_holds_back_split_emoji(pair):
    hf, ours = pair
    ids = ours.encode("a 😀 b", add_special_tokens=False)
    assert len(ids) >= 4  # the emoji arrives over several tokens in both tokenizers
    pieces, joined = stream(ours, ids)
    assert joined == "a 😀 b"
    emoji_piece = next(i for i, p in enumerate(pieces) if "😀" in p)
    assert pieces[emoji_piece - 1] == ""  # the partial bytes before it produced nothing


def test_stream_sentencepiece_leading_spaces(sp):
    hf, ours = sp
    ids = ours.encode("Hello world hello", add_special_tokens=False)
    pieces, joined = stream(ours, ids)
    assert joined == hf.decode(ids) == "Hello world hello"
    assert pieces[0] == "Hello" and any(p.startswith(" ") for p in pieces[1:])


def test_stream_random_ids_byte_level(smol):
    """Byte-level BPE: any id sequence (even invalid UTF-8) streams to exactly decode()."""
    hf, ours = smol
    rnd = random.Random(0)
    for _ in range(200):
        ids = [rnd.randrange(ours.vocab_size) for _ in range(rnd.randrange(1, 25))]
        for skip in (False, True):
            assert stream(ours, ids, skip_special_tokens=skip)[1] == hf.decode(ids, skip_special_tokens=skip)


def test_stream_window_stays_small(smol):
    hf, ours = smol
    ids = ours.encode("word " * 2000)
    dec = ours.stream_decoder()
    out = []
    for i in ids:
        out.append(dec.push(i))
        assert len(dec._ids) <= 8  # a tail window, not the whole history
    assert "".join(out) + dec.flush() == hf.decode(ids)


# ---- chat templates --------------------------------------------------------------------------
@pytest.mark.parametrize("template", ["own", LLAMA3, QWEN2, TOOLS_TEMPLATE])
@pytest.mark.parametrize("messages", [MESSAGES, NO_SYSTEM, MESSAGES[:2]])
@pytest.mark.parametrize("gen", [True, False])
def test_chat_template_matches_hf(smol, template, messages, gen):
    hf, _ = smol
    chat_template = hf.chat_template if template == "own" else template
    ours = ours_like(hf, chat_template)
    kw = {"tools": TOOLS} if template is TOOLS_TEMPLATE else {}
    want = hf.apply_chat_template(messages, chat_template=chat_template, tokenize=False,
                                  add_generation_prompt=gen, **kw)
    assert ours.apply_chat_template(messages, add_generation_prompt=gen, **kw) == want
    want_ids = hf.apply_chat_template(messages, chat_template=chat_template, tokenize=True,
                                      add_generation_prompt=gen, return_dict=False, **kw)
    assert ours.encode_chat(messages, add_generation_prompt=gen, **kw) == want_ids


def test_chat_template_extra_kwargs_and_none_content(smol):
    hf, _ = smol
    template = "{% for m in messages %}[{{ m.role }}|{{ m.content | default('none') }}]{% endfor %}{{ custom }}"
    ours = ours_like(hf, template)
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None}]
    want = hf.apply_chat_template(msgs, chat_template=template, tokenize=False, custom="X")
    assert ours.apply_chat_template(msgs, add_generation_prompt=False, custom="X") == want == "[user|hi][assistant|none]X"


def test_llama2_template_bos_and_errors(sp):
    hf, ours = sp
    for gen in (True, False):
        want = hf.apply_chat_template(MESSAGES, tokenize=True, add_generation_prompt=gen, return_dict=False)
        got = ours.encode_chat(MESSAGES, add_generation_prompt=gen)
        assert got == want and got[0] == 1 and got[1] != 1  # one BOS, from the template only
    bad = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(EdgerunError, match="alternate"):
        ours.apply_chat_template(bad)


def test_no_chat_template_is_a_clear_error(smol):
    hf, _ = smol
    ours = ours_like(hf, None)
    with pytest.raises(EdgerunError, match="no chat template"):
        ours.apply_chat_template(NO_SYSTEM)


def test_named_templates_pick_default_or_tool_use(smol):
    hf, _ = smol
    ours = ours_like(hf, {"default": QWEN2, "tool_use": TOOLS_TEMPLATE})
    assert ours.apply_chat_template(NO_SYSTEM) == ours_like(hf, QWEN2).apply_chat_template(NO_SYSTEM)
    assert "get_weather" in ours.apply_chat_template(NO_SYSTEM, tools=TOOLS)


# ---- templates from elsewhere: no files, bounded time and size ---------------------------------
HOSTILE = {
    "include": ("{% include '/etc/passwd' %}", "cannot include"),
    "include ignore missing": ("{% include '/etc/passwd' ignore missing %}x", "cannot include"),
    "import": ("{% import 'macros.j2' as m %}", "cannot include"),
    "extends": ("{% extends 'base.j2' %}", "cannot include"),
    "string repetition": ("{{ 'a' * 2200000000 }}", "builds a string of 2200000000"),
    "list repetition": ("{{ [1] * 2200000000 }}", "builds a list"),
    "doubling with +": ("{% set ns = namespace(s='a') %}{% for i in range(40) %}{% set ns.s = ns.s + ns.s %}"
                        "{% endfor %}{{ ns.s }}", "builds a string"),
    "doubling with ~": ("{% set ns = namespace(s='a') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}"
                        "{% endfor %}{{ ns.s }}", "builds a string"),
    "doubling macro": ("{% macro f(s, n) %}{% if n %}{{ f(s ~ s, n - 1) }}{% endif %}{% endmacro %}{{ f('a', 40) }}",
                       "builds a string"),
    "huge power": ("{{ 2 ** 100000000 }}", "builds a number"),
    "padding": ("{{ 'a'|center(2000000000) }}{{ 'a'.ljust(2000000000) }}", "builds a string"),
    "format width": ("{{ '%2000000000s'|format('x') }}", "width or precision"),
    "str.format width": ("{{ '{:>2000000000}'.format('x') }}", "width or precision"),
    "replace": ("{{ ('a' * 1000000)|replace('a', 'aaaaaaaaaaaaaaaaaaaa') }}", "builds a string"),
    "join": ("{{ (['a' * 1000000] * 1000)|join }}", "builds a"),
    "shared references printed": ("{% set L = ['a' * 4000000] * 1000 %}{{ L }}", "builds a text"),
    "output": ("{% for i in range(100000) %}{{ 'x' * 100 }}{% endfor %}", "output passed"),
    "recursion": ("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", "recursion"),
    "division by zero": ("{{ 1 / 0 }}", "ZeroDivisionError"),
    "type error": ("{{ messages[0]['content'] + 1 }}", "TypeError"),
}


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_template_is_a_clear_error(smol, name):
    import resource

    from edgerun.tokenizer import ChatTemplateError
    source, message = HOSTILE[name]
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(ChatTemplateError, match=message):
        ours_like(smol[0], source).apply_chat_template(NO_SYSTEM)
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mib < 200, f"peak RSS grew {grown_mib:.0f} MiB"


def test_endless_template_stops_in_its_own_thread(smol, monkeypatch):
    """A loop that outputs nothing ends at the deadline, in the thread that rendered it: nothing
    keeps spinning after the caller has its error."""
    import threading
    import time

    from edgerun import tokenizer
    monkeypatch.setattr(tokenizer, "TEMPLATE_SECONDS", 0.3)
    ours = ours_like(smol[0], "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}")
    result = {}

    def render():
        try:
            ours.apply_chat_template(NO_SYSTEM)
        except tokenizer.ChatTemplateError as e:
            result["error"] = str(e)

    start = time.monotonic()
    thread = threading.Thread(target=render)
    thread.start()
    thread.join(10)
    assert not thread.is_alive(), "the render thread is still running"
    assert "ran for more than 0.3 s" in result["error"]
    assert time.monotonic() - start < 5


def test_template_limits_leave_tracing_and_real_templates_alone(smol):
    import sys
    hf, ours = smol
    tracer = lambda *a: None  # noqa: E731
    sys.settrace(tracer)
    try:
        got = ours_like(hf, QWEN2).apply_chat_template(MESSAGES)
        assert sys.gettrace() is tracer          # a debugger's or coverage's tracer comes back
    finally:
        sys.settrace(None)
    assert got == hf.apply_chat_template(MESSAGES, chat_template=QWEN2, tokenize=False, add_generation_prompt=True)
    long = [{"role": "user", "content": "word " * 200000}]           # a 1 MB message is fine
    assert len(ours.apply_chat_template(long)) > 1_000_000


def test_max_token_bytes_bounds_tokens(pair):
    """Every token stands for at most max_token_bytes bytes, so a text of n bytes has at least
    n / max_token_bytes tokens (the server refuses prompts that cannot fit before tokenizing)."""
    _, ours = pair
    bound = ours.max_token_bytes
    assert all(len(ours.decode([i]).encode()) < bound for i in range(ours.vocab_size))
    for text in TEXTS + [" " * 5000, "\n" + " " * 80 + "x", "ab" * 3000]:
        assert len(text.encode()) <= max(len(ours.encode(text, add_special_tokens=False)), 1) * bound
