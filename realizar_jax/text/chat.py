"""Chat templates: render a model's own Jinja template the way HF transformers does, in a sandbox.

Templates ship inside model files (GGUF `tokenizer.chat_template`, tokenizer_config.json), so they are
untrusted code: they run in jinja2's ImmutableSandboxedEnvironment, which refuses access to Python
internals (dunder attributes, mutating methods). The environment mirrors HF's `apply_chat_template`
(trim_blocks, lstrip_blocks, loopcontrols, `raise_exception`, `strftime_now`, a non-escaping `tojson`)
so the same template renders the same text.

The sandbox also bounds what a template may cost. Loops, operators and calls check a wall-clock budget;
`range`, `**`, `*`, `+`, `%`, integer arguments, every string or list an operator, call or filter returns,
the rendered output, `tojson` indent and `lipsum` are capped. Operators with a cap are intercepted, which
also keeps jinja from folding them at compile time (it would otherwise evaluate `10 ** 10 ** 9` while
compiling). Each overrun is a ChatTemplateError naming the limit.
"""
from __future__ import annotations

import functools
import json
import math
import re
import threading
import time
from datetime import datetime
from functools import lru_cache

import jinja2
import jinja2.ext
from jinja2 import nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment, SandboxedEnvironment
from jinja2.utils import generate_lorem_ipsum
from jinja2.visitor import NodeTransformer

from ..errors import ChatTemplateError

__all__ = ["render_chat", "ChatTemplateError"]


# A prompt is at most a context window of text (a few MB even at a million tokens): these caps sit far above
# what real templates produce and far below what hurts the process.
MAX_TEXT_LEN = 16 * 2**20       # chars of any string (items of any list) a template builds, and of the output
MAX_INT_BITS = 4096             # size of integers from `*` and `**` (real templates count messages)
MAX_RANGE_LEN = 100_000         # items of one range() (jinja's own sandbox cap)
MAX_JSON_INDENT = 64            # tojson indent (real templates use 2 or 4)
MAX_LIPSUM_WORDS = 10_000       # lipsum() paragraphs times words per paragraph
RENDER_SECONDS = 10.0           # wall clock for compiling plus rendering one prompt


class _Overrun(Exception):
    """The template went past one of the sandbox's limits."""

    def __init__(self, limit: str, value):
        super().__init__(f"the chat template exceeded the sandbox's {limit} limit ({value})")


_budget = threading.local()  # .deadline: monotonic time the current render must finish by


def _check_time():
    deadline = getattr(_budget, "deadline", None)
    if deadline is not None and time.monotonic() > deadline:
        raise _Overrun("render time", f"{RENDER_SECONDS} s")


def _check_size(value):
    if isinstance(value, (str, bytes, list, tuple, dict)) and len(value) > MAX_TEXT_LEN:
        raise _Overrun("string or list length", MAX_TEXT_LEN)
    return value


def _check_int_args(args, kwargs=None):
    """Refuse integers that size a result (widths, counts: 'x'.ljust(n), center(n), '%*s' % (n, x))."""
    for a in (*args, *(kwargs or {}).values()):
        if type(a) is int and abs(a) > MAX_TEXT_LEN:
            raise _Overrun("integer argument", MAX_TEXT_LEN)


# A width written into a format string ('{:>999999999}', '%0999999999d'): 8 digits or more.
_HUGE_WIDTH = re.compile(r"[%:]\D{0,3}\d{8}")


def _check_text_op(name, s, args):
    """Estimate, before running it, what a string method or filter named `name` would build from `s`."""
    if not isinstance(s, str):
        return
    if name in ("format", "format_map") and _HUGE_WIDTH.search(s):
        raise _Overrun("format width", "7 digits")
    if name == "replace" and len(args) >= 2 and isinstance(args[0], str) and isinstance(args[1], str):
        count = s.count(args[0]) if args[0] else len(s) + 1
        if len(s) + count * len(args[1]) > MAX_TEXT_LEN:
            raise _Overrun("string or list length", MAX_TEXT_LEN)
    if name == "join" and args and isinstance(args[0], (list, tuple)):
        total = sum(len(x) for x in args[0] if isinstance(x, str)) + len(s) * len(args[0])
        if total > MAX_TEXT_LEN:
            raise _Overrun("string or list length", MAX_TEXT_LEN)


def _check_binop(op, left, right):
    ints = type(left) is int and type(right) is int
    if op == "**" and ints and right > 0 and abs(left) > 1 and right * math.log2(abs(left)) > MAX_INT_BITS:
        raise _Overrun("integer size", f"{MAX_INT_BITS} bits")
    if op == "*":
        if ints and left.bit_length() + right.bit_length() > MAX_INT_BITS:
            raise _Overrun("integer size", f"{MAX_INT_BITS} bits")
        for seq, n in ((left, right), (right, left)):
            if isinstance(seq, (str, list, tuple)) and type(n) is int and len(seq) * n > MAX_TEXT_LEN:
                raise _Overrun("string or list length", MAX_TEXT_LEN)
    if op == "+" and hasattr(left, "__len__") and hasattr(right, "__len__") and len(left) + len(right) > MAX_TEXT_LEN:
        raise _Overrun("string or list length", MAX_TEXT_LEN)
    if op == "%" and isinstance(left, str):  # printf-style
        _check_int_args(right if isinstance(right, tuple) else (right,))
        _check_text_op("format", left, ())


def _bounded_filter(name, f):
    """Filter `f` checked before (its parameters, not the value it filters) and after (its result's size).
    functools.wraps keeps jinja's pass_context / pass_eval_context marks."""
    skip = 2 if getattr(f, "jinja_pass_arg", None) else 1  # jinja passes [context,] value, parameters

    @functools.wraps(f)
    def bounded(*args, **kwargs):
        _check_time()
        _check_int_args(args[skip:], kwargs)
        if len(args) >= skip:
            value, params = args[skip - 1], args[skip:]
            # the join filter joins `value` with the separator; the others act on `value` itself
            if name == "join" and isinstance(value, (list, tuple)):
                _check_text_op("join", params[0] if params and isinstance(params[0], str) else "", (value,))
            else:
                _check_text_op(name, value, params)
        return _check_size(f(*args, **kwargs))
    return bounded


def _timed_iter(iterable):
    """What every for-loop iterates: the items, checking the time budget at each."""
    for item in iterable:
        _check_time()
        yield item


def _text(value):
    """What every `~` concatenation yields: its string, size-checked."""
    return _check_size(value)


def _range(*args):
    r = range(*args)
    if len(r) > MAX_RANGE_LEN:
        raise _Overrun("range length", MAX_RANGE_LEN)
    return r


def _lipsum(n=5, html=True, min=20, max=100):
    if n * max > MAX_LIPSUM_WORDS:
        raise _Overrun("lipsum size", f"{MAX_LIPSUM_WORDS} words")
    return generate_lorem_ipsum(n, html, min, max)


class _Bound(NodeTransformer):
    """Routes every for-loop's iterable and every `~` through the checks above (jinja has no hook for them)."""

    def visit_For(self, node):
        self.generic_visit(node)
        node.iter = nodes.Filter(node.iter, "_sandbox_iter", [], [], None, None, lineno=node.lineno)
        return node

    def visit_Concat(self, node):
        self.generic_visit(node)
        return nodes.Filter(node, "_sandbox_text", [], [], None, None, lineno=node.lineno)


def _concat(pieces):
    """How jinja joins captured output ({% set %} blocks, macros, call blocks): size-checked first."""
    pieces = list(pieces)
    if sum(map(len, pieces)) > MAX_TEXT_LEN:
        raise _Overrun("string or list length", MAX_TEXT_LEN)
    return "".join(pieces)


class _BoundedEnvironment(ImmutableSandboxedEnvironment):
    intercepted_binops = frozenset({"+", "*", "**", "%"})
    concat = staticmethod(_concat)

    def _parse(self, source, name, filename):
        return _Bound().visit(super()._parse(source, name, filename))

    def call_binop(self, context, operator, left, right):
        _check_time()
        _check_binop(operator, left, right)
        return _check_size(super().call_binop(context, operator, left, right))

    def call(self, context, obj, /, *args, **kwargs):
        _check_time()
        owner = getattr(getattr(obj, "__wrapped__", obj), "__self__", None)  # the sandbox wraps str.format
        if isinstance(owner, str):  # a string method: 'x'.ljust(n), '{:>{}}'.format(x, n), s.replace(a, b)
            _check_int_args(args, kwargs)
            _check_text_op(obj.__name__, owner, args)
        return _check_size(SandboxedEnvironment.call(self, context, obj, *args, **kwargs))


class _TemplateRaised(jinja2.exceptions.TemplateError):
    """The template called raise_exception(): its message is meant for the user as it is."""


def _raise_exception(message):
    raise _TemplateRaised(str(message))


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    if indent is not None and (len(indent) if isinstance(indent, str) else indent) > MAX_JSON_INDENT:
        raise _Overrun("tojson indent", MAX_JSON_INDENT)
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
    env = _BoundedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.filters = {name: _bounded_filter(name, f) for name, f in env.filters.items()}
    env.filters["_sandbox_iter"] = _timed_iter
    env.filters["_sandbox_text"] = _text
    env.globals["range"] = _range
    env.globals["lipsum"] = _lipsum
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
    except _Overrun as e:
        raise ChatTemplateError(str(e)) from e
    except Exception as e:  # e.g. RecursionError on absurd nesting
        raise ChatTemplateError(f"the chat template failed to compile: {type(e).__name__}: {e}") from e


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
    # HF always defines these two (as None when absent); some templates test `tools is none`.
    extra = {"tools": None, "documents": None, **extra}
    _budget.deadline = time.monotonic() + RENDER_SECONDS
    try:
        compiled = _compile(template)
        pieces, length = [], 0
        for piece in compiled.generate(messages=msgs, add_generation_prompt=add_generation_prompt,
                                       bos_token=bos_token, eos_token=eos_token, **_plain(extra)):
            length += len(piece)
            if length > MAX_TEXT_LEN:
                raise _Overrun("output length", f"{MAX_TEXT_LEN} chars")
            _check_time()
            pieces.append(piece)
        return "".join(pieces)
    except _Overrun as e:
        raise ChatTemplateError(str(e)) from e
    except _TemplateRaised as e:
        raise ChatTemplateError(f"the chat template refused these messages: {e.message}") from e
    except jinja2.exceptions.SecurityError as e:
        raise ChatTemplateError(f"the chat template tried something the sandbox forbids: {e}") from e
    except ChatTemplateError:
        raise
    except Exception as e:  # a template is code: any failure inside it is the template's error
        raise ChatTemplateError(f"the chat template failed to render: {type(e).__name__}: {e}") from e
    finally:
        _budget.deadline = None
