"""Chat templates: render a model's own Jinja template the way HF transformers does, in a sandbox.

Templates ship inside model files (GGUF `tokenizer.chat_template`, tokenizer_config.json), so they are
untrusted code: they run in jinja2's ImmutableSandboxedEnvironment, which refuses access to Python
internals (dunder attributes, mutating methods). The environment mirrors HF's `apply_chat_template`
(trim_blocks, lstrip_blocks, loopcontrols, `raise_exception`, `strftime_now`, a non-escaping `tojson`)
so the same template renders the same text.
"""
from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ..errors import ChatTemplateError

__all__ = ["render_chat", "ChatTemplateError"]


class _TemplateRaised(jinja2.exceptions.TemplateError):
    """The template called raise_exception(): its message is meant for the user as it is."""


def _raise_exception(message):
    raise _TemplateRaised(str(message))


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # Jinja's own tojson HTML-escapes (<, >, &, '), which would change the prompt; HF's does not.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


class _Namespace(jinja2.utils.Namespace):
    """`namespace()` that refuses underscore-prefixed names, so it cannot be used to reach internals."""

    def __init__(*args, **kwargs):  # same signature trick as jinja's Namespace
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"namespace attribute {name!r} may not start with '_'")


class _Dict:
    """`dict(...)` for templates without exposing the dict type itself (and its classmethods)."""

    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


def _plain(value):
    """A copy made of plain JSON-like types: rich objects (arrays, enums, ...) carry methods the sandbox
    does not know to block, so the template sees only their type name."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    for base in (bool, str, int, float):  # subclasses (str enums, numpy scalars via .item()) -> the base
        if isinstance(value, base):
            return base(value)
    if isinstance(value, dict):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        items = [_plain(v) for v in value]
        return tuple(items) if isinstance(value, tuple) else items
    if hasattr(value, "item") and getattr(value, "shape", None) == ():  # numpy / jax scalars
        return _plain(value.item())
    return f"<{type(value).__name__}>"


_REASONING = ("reasoning_content", "thinking", "reasoning")


@lru_cache(maxsize=1)
def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["namespace"] = _Namespace
    env.globals["dict"] = _Dict()
    return env


@lru_cache(maxsize=32)
def _compile(template: str) -> jinja2.Template:
    try:
        return _environment().from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise ChatTemplateError(f"the chat template is not valid Jinja (line {e.lineno}): {e.message}") from e


def _check_messages(messages) -> list[dict]:
    if not isinstance(messages, (list, tuple)):
        raise ChatTemplateError(f"messages must be a list of dicts with 'role' and 'content', "
                                f"got {type(messages).__name__}")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ChatTemplateError(f"message {i} must be a dict with 'role' and 'content', got {type(m).__name__}")
        if not isinstance(m.get("role"), str) or not m["role"]:
            raise ChatTemplateError(f"message {i} needs a non-empty string 'role', got {m.get('role')!r}")
        content = m.get("content")
        # Content is text; a list of typed parts (multimodal) and None on tool-call turns are also valid.
        ok = (isinstance(content, str)
              or (isinstance(content, list) and all(isinstance(p, dict) for p in content))
              or (content is None and m.get("tool_calls")))
        if not ok:
            raise ChatTemplateError(f"message {i} ({m['role']}) needs a string 'content', got {content!r}")
        m = _plain(m)  # a copy: templates never see (or touch) the caller's objects
        # As HF does: reasoning given under any common name reaches templates under the names they read.
        reasoning = next((m[k] for k in _REASONING if m.get(k) is not None), None)
        if reasoning is not None:
            m = {"thinking": reasoning, **m, "reasoning_content": reasoning}
        out.append(m)
    return out


def render_chat(template: str | None, messages: list[dict], *, add_generation_prompt: bool = True,
                bos_token: str = "", eos_token: str = "", **extra) -> str:
    """Render `messages` with a model's chat template; the same text as HF's apply_chat_template(tokenize=False).

    `extra` reaches the template as further variables (e.g. tools=..., enable_thinking=False).
    Raises ChatTemplateError when there is no template, the messages are malformed, or rendering fails.
    """
    if template is None or not isinstance(template, str) or not template.strip():
        raise ChatTemplateError("this model has no chat template (no tokenizer.chat_template in the GGUF, "
                                "no chat_template in tokenizer_config.json); pass a template or use plain "
                                "generate() with your own prompt")
    msgs = _check_messages(messages)
    compiled = _compile(template)
    # HF always defines these two (as None when absent); some templates test `tools is none`.
    extra = {"tools": None, "documents": None, **extra}
    try:
        return compiled.render(messages=msgs, add_generation_prompt=add_generation_prompt,
                               bos_token=bos_token, eos_token=eos_token, **_plain(extra))
    except _TemplateRaised as e:
        raise ChatTemplateError(f"the chat template refused these messages: {e.message}") from e
    except jinja2.exceptions.SecurityError as e:
        raise ChatTemplateError(f"the chat template tried something the sandbox forbids: {e}") from e
    except Exception as e:  # a template is code: any failure inside it is the template's error
        raise ChatTemplateError(f"the chat template failed to render: {type(e).__name__}: {e}") from e
