"""Chat templates: same text as HF transformers' apply_chat_template, sandboxed, clear errors."""
from __future__ import annotations

from datetime import datetime

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from realizar_jax.text.chat import ChatTemplateError, render_chat
from realizar_jax.errors import RealizarError

# ---- templates in the style of real models (written for these tests) ----

CHATML = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools><|im_end|>\\n" }}
{%- elif messages[0]['role'] == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
{%- else %}
    {{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if message.role == "system" and loop.first %}
        {%- continue %}
    {%- elif message.role == "assistant" and message.tool_calls %}
        {{- '<|im_start|>assistant' }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {{- '\\n<tool_call>\\n{"name": "' + tool_call.function.name + '", "arguments": ' }}
            {{- tool_call.function.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {{- '<|im_start|>user\\n<tool_response>\\n' + message.content + '\\n</tool_response><|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

LLAMA3 = """{{- bos_token }}
{%- if not date_string is defined %}
    {%- set date_string = strftime_now("%d %b %Y") %}
{%- endif %}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{{- "Today Date: " + date_string + "\\n\\n" }}
{{- system_message }}
{{- "<|eot_id|>" }}
{%- for message in messages %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""

MISTRAL = """{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}
{{- bos_token }}
{%- for message in loop_messages %}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
    {%- endif %}
    {%- if message['role'] == 'user' %}
        {%- if loop.first and system_message is defined %}
            {{- ' [INST] ' + system_message + '\\n\\n' + message['content'] + ' [/INST]' }}
        {%- else %}
            {{- ' [INST] ' + message['content'] + ' [/INST]' }}
        {%- endif %}
    {%- elif message['role'] == 'assistant' %}
        {{- ' ' + message['content'] + eos_token }}
    {%- else %}
        {{- raise_exception('Only user and assistant roles are supported, with the exception of an initial optional system message!') }}
    {%- endif %}
{%- endfor %}
"""

# Not stripped with {%- -%}: exercises trim_blocks / lstrip_blocks exactly as HF configures them.
BLOCKY = """{% if tools is none and documents is none %}
tools: none
{% endif %}
{% for message in messages %}
  {% if loop.index > 6 %}{% break %}{% endif %}
  <{{ message.role }}>
  {{ message.content }}
  {% set ns = namespace(n=0) %}
  {% for c in message.content %}{% if c == ' ' %}{% set ns.n = ns.n + 1 %}{% endif %}{% endfor %}
  spaces={{ ns.n }} json={{ message | tojson(sort_keys=True) }} d={{ dict(a=1, b=message.role) | tojson }}
{% endfor %}
{% if add_generation_prompt %}<assistant>{% endif %}
"""

TEMPLATES = {"chatml": CHATML, "llama3": LLAMA3, "mistral": MISTRAL, "blocky": BLOCKY}


def _hf_tokenizer(template: str) -> PreTrainedTokenizerFast:
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "hello": 3, "world": 4}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    hf.chat_template = template
    return hf


HF = {name: _hf_tokenizer(t) for name, t in TEMPLATES.items()}


def _ours(name, messages, **kw):
    return render_chat(TEMPLATES[name], messages, bos_token="<s>", eos_token="</s>", unk_token="<unk>", **kw)


def _hf(name, messages, **kw):
    return HF[name].apply_chat_template(messages, tokenize=False, **kw)


# Text that stresses escaping and whitespace: HTML characters, quotes, braces, unicode, newlines.
text = st.text(alphabet=st.sampled_from(list("ab <>&'\"{}%#\n\t\\é漢🙂")) | st.characters(codec="utf-8"),
               min_size=1, max_size=30)


def _alternating(contents, system):
    msgs = [{"role": "system", "content": system}] if system is not None else []
    return msgs + [{"role": ("user", "assistant")[i % 2], "content": c} for i, c in enumerate(contents)]


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(name=st.sampled_from(sorted(TEMPLATES)), contents=st.lists(text, min_size=1, max_size=5),
       system=st.none() | text, gen=st.booleans())
def test_render_equals_hf_apply_chat_template(name, contents, system, gen):
    msgs = _alternating(contents, system)
    kw = dict(add_generation_prompt=gen, date_string="26 Jul 2024")
    got = _ours(name, msgs, **kw)
    assert got == _hf(name, msgs, **kw)
    assert contents[-1].strip() in got or name == "llama3"


def test_chatml_tools_and_tool_calls_equal_hf():
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Wetter <heute> & morgen",
                                               "parameters": {"type": "object", "properties": {
                                                   "city": {"type": "string", "description": "城市"}}}}}]
    msgs = [
        {"role": "user", "content": "Weather in Zürich?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Zürich"}}}]},
        {"role": "tool", "content": '{"temp": 21, "sky": "<sunny>"}'},
    ]
    got = _ours("chatml", msgs, tools=tools)
    assert got == _hf("chatml", msgs, tools=tools, add_generation_prompt=True)
    assert '"description": "Wetter <heute> & morgen"' in got  # tojson does not HTML-escape, like HF
    assert '"城市"' in got  # nor ASCII-escape


def test_llama3_strftime_now_is_today():
    msgs = [{"role": "user", "content": "hello"}]
    before = datetime.now()
    got = _ours("llama3", msgs)
    after = datetime.now()
    assert any(f"Today Date: {d.strftime('%d %b %Y')}\n" in got for d in (before, after))
    assert got.startswith("<s><|start_header_id|>system")
    assert got.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_mistral_bad_role_order_raises_the_templates_message():
    bad = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(Exception, match="alternate"):
        _hf("mistral", bad)
    with pytest.raises(ChatTemplateError, match="Conversation roles must alternate"):
        _ours("mistral", bad)
    with pytest.raises(ChatTemplateError, match="Only user and assistant roles"):
        _ours("mistral", [{"role": "user", "content": "a"}, {"role": "tool", "content": "b"}])


@pytest.mark.parametrize("template", [None, "", "   \n"])
def test_no_template_is_a_clear_error(template):
    with pytest.raises(ChatTemplateError, match="no chat template"):
        render_chat(template, [{"role": "user", "content": "hi"}])


@pytest.mark.parametrize("messages, needle", [
    ("hello", "list of dicts"),
    ({"role": "user", "content": "hi"}, "list of dicts"),
    (["hi"], "message 0 must be a dict"),
    ([{"content": "hi"}], "message 0 needs a non-empty string 'role'"),
    ([{"role": "user", "content": "hi"}, {"role": 3, "content": "x"}], "message 1 needs"),
    ([{"role": "user"}], "message 0 \\(user\\) needs a string 'content'"),
    ([{"role": "user", "content": 42}], "needs a string 'content'"),
])
def test_malformed_messages(messages, needle):
    with pytest.raises(ChatTemplateError, match=needle):
        render_chat(CHATML, messages)


def test_template_errors_carry_the_templates_own_error():
    with pytest.raises(ChatTemplateError, match="not valid Jinja \\(line 2\\)"):
        render_chat("ok\n{% for m in messages %}{{ m }", [{"role": "user", "content": "x"}])
    with pytest.raises(ChatTemplateError, match="UndefinedError.*'nope' is undefined"):
        render_chat("{{ nope.attr }}", [{"role": "user", "content": "x"}])
    with pytest.raises(ChatTemplateError, match="ZeroDivisionError"):
        render_chat("{{ 1 / 0 }}", [{"role": "user", "content": "x"}])
    assert issubclass(ChatTemplateError, RealizarError) and issubclass(ChatTemplateError, ValueError)


@pytest.mark.parametrize("template", [
    "{{ ''.__class__ }}",
    "{{ ''.__class__.__mro__ }}",
    "{{ messages.__class__.__base__.__subclasses__() }}",
    "{{ raise_exception.__globals__ }}",
    "{{ strftime_now.__globals__['os'] }}",
    "{{ cycler.__init__.__globals__ }}",
    "{{ namespace.__init__.__globals__ }}",
    "{{ dict.__call__.__globals__ }}",
    "{{ messages[0].__class__ }}",
    "{% set ns = namespace(_secret=1) %}{{ ns._secret }}",
    "{{ messages.append({'role': 'x'}) }}",
    "{{ messages[0].update({'role': 'x'}) }}",
    "{{ self.__init__.__globals__ }}",
])
def test_sandbox_never_exposes_python_internals(template):
    msgs = [{"role": "user", "content": "hi"}]
    try:
        out = render_chat(template, msgs)
    except ChatTemplateError as e:
        assert "sandbox" in str(e) or "unsafe" in str(e) or "Undefined" in str(e)
    else:
        assert out == "", out  # undefined: renders empty, never a repr of an internal
    assert msgs == [{"role": "user", "content": "hi"}]  # the caller's messages are never modified


def test_rich_objects_reach_the_template_as_plain_data():
    np = pytest.importorskip("numpy")
    msgs = [{"role": "user", "content": "x", "meta": {"n": np.int64(3), "f": np.float32(0.5), "arr": np.ones(2)}}]
    out = render_chat("{{ messages[0].meta | tojson(sort_keys=True) }}", msgs)
    assert out == '{"arr": "<ndarray>", "f": 0.5, "n": 3}'
