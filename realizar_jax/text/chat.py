"""Chat templates: render a model's own Jinja template the way HF transformers does, in a sandbox.

Templates ship inside model files (GGUF `tokenizer.chat_template`, tokenizer_config.json), so they are
untrusted code: they run in jinja2's ImmutableSandboxedEnvironment, which refuses access to Python
internals (dunder attributes, mutating methods). The environment mirrors HF's `apply_chat_template`
(trim_blocks, lstrip_blocks, loopcontrols, `raise_exception`, `strftime_now`, a non-escaping `tojson`)
so the same text renders.

The sandbox also bounds what a template may cost, in time and in memory:
- time: a wall-clock budget over compiling plus rendering, checked at every token the lexer makes, every
  node the compiler visits, every loop step, operator, call, filter, item lookup and output piece;
- size: every string a template builds is at most MAX_TEXT_LEN characters, and every list, tuple or dict
  at most that "value size" (its text once written out: characters plus a few per item, a shared part
  counted each time it appears, so a list of references cannot stand for an exponential text). Results
  are checked after they are built, and the operations that could build far more than their inputs are
  estimated before (`*`, `+`, `%`, str.format fields, replace, join, expandtabs, translate, indent,
  wordwrap, urlize, str() of a container in `~`, `{{ }}` and string filters);
- all that one render builds, together, is at most MAX_RENDER_SIZE (so many variables cannot each hold
  a large value), and the output at most MAX_TEXT_LEN characters;
- the template source, `range`, integers from `*` and `**`, integer arguments that size a result, format
  widths, `tojson` indent, `lipsum` and `wordwrap` are capped.
Operators with a cap are intercepted, which also keeps jinja from folding them at compile time (it would
otherwise evaluate `10 ** 10 ** 9` while compiling). Each overrun is a ChatTemplateError naming the limit.
"""
from __future__ import annotations

import functools
import itertools
import json
import math
import re
import threading
import time
from collections import abc
from datetime import datetime
from functools import lru_cache

import jinja2
import jinja2.ext
from jinja2 import nodes
from jinja2.compiler import CodeGenerator
from jinja2.filters import make_attrgetter
from jinja2.sandbox import (ImmutableSandboxedEnvironment, SandboxedEnvironment, SandboxedEscapeFormatter,
                            SandboxedFormatter)
from jinja2.utils import Namespace, generate_lorem_ipsum
from jinja2.visitor import NodeTransformer
from markupsafe import Markup

from ..errors import ChatTemplateError

__all__ = ["render_chat", "ChatTemplateError"]


# A prompt is at most a context window of text (a few MB even at a million tokens): these caps sit far above
# what real templates produce and far below what hurts the process.
MAX_TEMPLATE_LEN = 256 * 1024   # chars of template source (real ones are < 30 k; compiling costs ~15 µs a char)
MAX_TEXT_LEN = 16 * 2**20       # chars of any string a template builds, size of any value, chars of the output
MAX_RENDER_SIZE = 8 * MAX_TEXT_LEN  # chars and items of everything one render builds, together
MAX_INT_BITS = 4096             # size of integers from `*` and `**` (real templates count messages)
MAX_RANGE_LEN = 100_000         # items of one range() (jinja's own sandbox cap), batch() rows, slice() columns
MAX_JSON_INDENT = 64            # tojson indent (real templates use 2 or 4)
MAX_LIPSUM_WORDS = 10_000       # lipsum() paragraphs times words per paragraph
MAX_WRAP_LEN = 2**20            # chars wordwrap takes, and (below) lines it makes: textwrap is
MAX_WRAP_LINES = 50_000         # pure Python and slows down on long words
RENDER_SECONDS = 10.0           # wall clock for compiling plus rendering one prompt


class _Overrun(Exception):
    """The template went past one of the sandbox's limits."""

    def __init__(self, limit: str, value):
        super().__init__(f"the chat template exceeded the sandbox's {limit} limit ({value})")


class _Budget(threading.local):
    deadline: float | None = None  # monotonic time the current compile + render must finish by
    built: int = 0                 # chars and items built so far by the current render


_budget = _Budget()


def _check_time():
    if _budget.deadline is not None and time.monotonic() > _budget.deadline:
        raise _Overrun("render time", f"{RENDER_SECONDS} s")


def _str_limit(n: int):
    if n > MAX_TEXT_LEN:
        raise _Overrun("string length", f"{MAX_TEXT_LEN} chars")


# ---- the size of a value written out ----------------------------------------------------------------
_PLAIN = (list, tuple, dict, set, frozenset)
_CONTAINERS = (*_PLAIN, Namespace, abc.KeysView, abc.ValuesView, abc.ItemsView)


def _items(v):
    if isinstance(v, dict):
        return itertools.chain.from_iterable(v.items())
    if isinstance(v, Namespace):
        return itertools.chain.from_iterable(object.__getattribute__(v, "_Namespace__attrs").items())
    return iter(v)


def _measure(value, limit: int = MAX_TEXT_LEN) -> tuple[int, int]:
    """(size, depth) of `value` once written out by str(), tojson or pprint, about: characters of strings
    plus a few per item and number. A part reached twice counts twice, as the text repeats it (its size is
    remembered, so a list of references to references is measured in the time of its distinct parts); a
    part inside itself counts as '[...]'. Stops counting past `limit`. No recursion: nesting may be deep."""
    if isinstance(value, str):
        return len(value), 0
    size, depth, visits = 0, 0, 0
    stack = [(iter((value,)), None, 0)]  # (items left, id of the container, size before it)
    known: dict[int, int] = {}           # id -> size, for the containers measured whole
    on_path: set[int] = set()
    while stack and size <= limit:
        for v in stack[-1][0]:
            visits += 1
            if not visits & 0xFFFF:
                _check_time()
            t = type(v)
            if t is str or t is bytes:
                size += len(v) + 4  # quotes, separator
            elif t in _PLAIN or isinstance(v, _CONTAINERS):
                i = id(v)
                if i in known:
                    size += known[i]
                elif i in on_path:
                    size += 5
                else:
                    size += 4
                    stack.append((_items(v), i, size))
                    on_path.add(i)
                    depth = max(depth, len(stack) - 1)
                    break
            elif t is int:
                size += v.bit_length() // 3 + 2
            elif t is float or t is bool or v is None:
                size += 24
            elif isinstance(v, str):
                size += len(v) + 4
            else:  # other objects the template can reach print as a short repr
                size += 64
            if size > limit:
                break
        else:
            _, i, before = stack.pop()
            if i is not None:
                on_path.discard(i)
                known[i] = size - before + 4
    return size, depth


def _text_size(value) -> int:
    """Characters str(value) would write (about), refusing past the cap before anything is built."""
    if isinstance(value, str):
        return len(value)
    size = _measure(value)[0]
    if size > MAX_TEXT_LEN:
        raise _Overrun("value size", f"{MAX_TEXT_LEN}")
    return size


def _built(value):
    """What every checked operation returns: its size capped, and counted into the render's total."""
    if isinstance(value, (str, bytes)):
        _str_limit(len(value))
        n = len(value)
    elif isinstance(value, _CONTAINERS):
        _text_size(value)
        n = len(value) if hasattr(value, "__len__") else 1  # a namespace has no len()
    else:
        return value
    _budget.built += n
    if _budget.built > MAX_RENDER_SIZE:
        raise _Overrun("render size", f"{MAX_RENDER_SIZE} chars and items")
    return value


# ---- estimates, before an operation builds its result ------------------------------------------------
def _check_int_args(args, kwargs=None, limit=MAX_TEXT_LEN):
    """Refuse integers that size a result (widths, counts: 'x'.ljust(n), center(n), batch(n))."""
    for a in (*args, *(kwargs or {}).values()):
        if type(a) is int and abs(a) > limit:
            raise _Overrun("integer argument", limit)


def _digits(text: str) -> int:
    """Sum of the numbers written in a format spec (widths, precisions), huge ones capped."""
    return sum(int(d) if len(d) < 12 else 10**12 for d in re.findall(r"\d+", text))


# printf-style conversion: %[(key)][flags][width][.precision][length]type
_PRINTF = re.compile(r"%(?:\(([^)]*)\))?[#0\- +]*(\*|\d+)?(?:\.(\*|\d*))?[hlL]?(.)", re.S)


def _printf_size(fmt: str, values) -> int:
    """About the length of `fmt % values`: literal text, each conversion's value and width/precision."""
    mapping = values if isinstance(values, abc.Mapping) else None
    seq = values if isinstance(values, tuple) else (values,)
    size, widths, i = len(fmt), 0, 0
    for m in _PRINTF.finditer(fmt):
        key, width, precision, kind = m.groups()
        if kind == "%":
            continue
        for n in (width, precision):
            if n == "*":
                w = seq[i] if i < len(seq) else 0
                i += 1
                widths += abs(w) if type(w) is int else 0
            elif n:
                widths += _digits(n)
        if widths > MAX_TEXT_LEN:
            raise _Overrun("format width", MAX_TEXT_LEN)
        if key is not None and mapping is not None:
            v = mapping.get(key)
        else:
            v = seq[i] if i < len(seq) else None
            i += 1
        size += _text_size(v) + 24
        _str_limit(size + widths)
    return size + widths


class _BoundedFormatterMixin:
    """str.format fields, checked one at a time as string.Formatter makes them: the width and precision
    (after nested fields are filled in), the value, and the running total."""

    def vformat(self, format_string, args, kwargs):
        self._size, self._widths = len(format_string), 0
        return super().vformat(format_string, args, kwargs)

    def convert_field(self, value, conversion):
        _text_size(value)
        return super().convert_field(value, conversion)

    def format_field(self, value, format_spec):
        _check_time()
        self._widths += _digits(format_spec)
        if self._widths > MAX_TEXT_LEN:
            raise _Overrun("format width", MAX_TEXT_LEN)
        self._size += _text_size(value) + 24
        _str_limit(self._size + self._widths)
        return super().format_field(value, format_spec)


class _BoundedFormatter(_BoundedFormatterMixin, SandboxedFormatter):
    pass


class _BoundedEscapeFormatter(_BoundedFormatterMixin, SandboxedEscapeFormatter):
    pass


def _check_text_op(name, s, args, kwargs=None):
    """Estimate, before running it, what a string method or filter named `name` would build from `s`."""
    if not isinstance(s, str):
        return
    kwargs = kwargs or {}
    arg = (lambda i, key, default=None: args[i] if len(args) > i else kwargs.get(key, default))
    if name == "replace" and isinstance(arg(0, "old"), str) and isinstance(arg(1, "new"), str):
        old, new = arg(0, "old"), arg(1, "new")
        count = s.count(old) if old else len(s) + 1
        _str_limit(len(s) + count * len(new))
    elif name == "join" and isinstance(arg(0, "iterable"), (list, tuple)):
        items = arg(0, "iterable")
        _str_limit(sum(_text_size(x) for x in items) + len(s) * len(items))
    elif name == "expandtabs":
        tab = arg(0, "tabsize", 8)
        _str_limit(len(s) + s.count("\t") * (tab if type(tab) is int else 8))
    elif name == "translate" and isinstance(arg(0, "table"), abc.Mapping):
        longest = max((len(v) for v in arg(0, "table").values() if isinstance(v, str)), default=1)
        _str_limit(len(s) * max(1, longest))
    elif name == "indent":
        width = arg(0, "width", 4)
        width = len(width) if isinstance(width, str) else width if type(width) is int else 4
        _str_limit(len(s) + (len(s.splitlines()) + 1) * width)
    elif name == "wordwrap":
        width, wrapstring = arg(0, "width", 79), arg(2, "wrapstring")
        width = width if type(width) is int and width > 0 else 1
        if len(s) > MAX_WRAP_LEN or len(s) // width > MAX_WRAP_LINES:
            raise _Overrun("wordwrap size", f"{MAX_WRAP_LEN} chars, {MAX_WRAP_LINES} lines")
        breaks = len(s) // width + s.count(" ") + s.count("\n") + 1
        _str_limit(len(s) + breaks * (len(wrapstring) if isinstance(wrapstring, str) else 1))
    elif name == "urlize":
        extra = sum(len(a) for a in (*args, *kwargs.values()) if isinstance(a, str))
        _str_limit(3 * len(s) + len(s.split()) * (64 + extra))


def _check_binop(op, left, right):
    ints = type(left) is int and type(right) is int
    if op == "**" and ints and right > 0 and abs(left) > 1 and right * math.log2(abs(left)) > MAX_INT_BITS:
        raise _Overrun("integer size", f"{MAX_INT_BITS} bits")
    if op == "*":
        if ints and left.bit_length() + right.bit_length() > MAX_INT_BITS:
            raise _Overrun("integer size", f"{MAX_INT_BITS} bits")
        for seq, n in ((left, right), (right, left)):
            if type(n) is int and n > 0:
                if isinstance(seq, str):
                    _str_limit(len(seq) * n)
                elif isinstance(seq, (list, tuple)) and _measure(seq, MAX_TEXT_LEN // n + 1)[0] * n > MAX_TEXT_LEN:
                    raise _Overrun("value size", f"{MAX_TEXT_LEN}")
    if op == "+":
        if isinstance(left, str) and isinstance(right, str):
            _str_limit(len(left) + len(right))
        elif isinstance(left, (list, tuple)) and isinstance(right, (list, tuple)):
            if _measure(left)[0] + _measure(right)[0] > MAX_TEXT_LEN:
                raise _Overrun("value size", f"{MAX_TEXT_LEN}")
    if op == "%" and isinstance(left, str):  # printf-style
        _str_limit(_printf_size(left, right))


# filters that write their value out as text (str() of a container), sized before they run
_TEXT_FILTERS = frozenset({"capitalize", "center", "e", "escape", "forceescape", "format", "indent", "lower",
                           "pprint", "replace", "safe", "string", "striptags", "title", "tojson", "trim",
                           "truncate", "upper", "urlencode", "urlize", "wordcount", "wordwrap", "xmlattr"})
# filters whose integer parameters size their result, and the cap on those
_SIZING_FILTERS = {"center": MAX_TEXT_LEN, "indent": MAX_TEXT_LEN, "wordwrap": MAX_TEXT_LEN,
                   "truncate": MAX_TEXT_LEN, "urlize": MAX_TEXT_LEN, "batch": MAX_RANGE_LEN,
                   "slice": MAX_RANGE_LEN}


def _bounded_filter(name, f):
    """Filter `f` checked before (its parameters, what it would build) and after (its result's size).
    functools.wraps keeps jinja's pass_context / pass_eval_context marks."""
    skip = 2 if getattr(f, "jinja_pass_arg", None) else 1  # jinja passes [context,] value, parameters

    @functools.wraps(f)
    def bounded(*args, **kwargs):
        _check_time()
        if len(args) >= skip:
            value, params = args[skip - 1], args[skip:]
            if name in _SIZING_FILTERS:
                _check_int_args(params, kwargs, _SIZING_FILTERS[name])
            if name in _TEXT_FILTERS:
                size, depth = _measure(value)
                if (size * max(1, depth) if name == "pprint" else size) > MAX_TEXT_LEN:  # pprint indents levels
                    raise _Overrun("value size", f"{MAX_TEXT_LEN}")
            if name == "join" and isinstance(value, (list, tuple)):
                sep = params[0] if params and isinstance(params[0], str) else kwargs.get("d", "")
                _check_text_op("join", sep if isinstance(sep, str) else "", (value,))
            elif name == "format" and isinstance(value, str):
                _str_limit(_printf_size(value, kwargs or tuple(params)))
            else:
                _check_text_op(name, value, params, kwargs)
        return _built(f(*args, **kwargs))
    return bounded


def _timed_iter(iterable):
    """What every for-loop iterates: the items, checking the time budget at each."""
    for item in iterable:
        _check_time()
        yield item


def _concat_values(values):
    """What every `~` concatenation is: the text of its operands, sized before any is written out."""
    _str_limit(sum(_text_size(v) for v in values))
    return _built("".join(map(str, values)))


def _new_value(value):
    """What every list, tuple and dict literal and every slice is: size-checked ([x, x] doubles what x
    writes out) and counted."""
    return _built(value)


def _finalize(value):
    """Every `{{ value }}`, before it is written out."""
    _check_time()
    _text_size(value)
    return value


def _range(*args):
    r = range(*args)
    if len(r) > MAX_RANGE_LEN:
        raise _Overrun("range length", MAX_RANGE_LEN)
    return r


def _lipsum(n=5, html=True, min=20, max=100):
    if n * max > MAX_LIPSUM_WORDS:
        raise _Overrun("lipsum size", f"{MAX_LIPSUM_WORDS} words")
    return generate_lorem_ipsum(n, html, min, max)


@jinja2.pass_environment
def _sum(environment, iterable, attribute=None, start=0):
    """jinja's sum, one `+` at a time when the items are not numbers (summing lists is quadratic)."""
    if attribute is not None:
        iterable = map(make_attrgetter(environment, attribute), iterable)
    items = list(_timed_iter(iterable))
    if all(isinstance(x, (int, float, complex)) for x in items) or isinstance(start, (str, bytes, bytearray)):
        return sum(items, start)  # the builtin itself: the same float rounding, the same refusal of strings
    total = start
    for x in items:
        _check_time()
        _check_binop("+", total, x)
        total = total + x
    return total


class _Bound(NodeTransformer):
    """Routes every for-loop's iterable, every `~`, every container literal and slice through the checks
    above (jinja has no hook for them), checking the time budget at each node."""

    def generic_visit(self, node, *args, **kwargs):
        _check_time()
        return super().generic_visit(node, *args, **kwargs)

    def visit_For(self, node):
        self.generic_visit(node)
        node.iter = nodes.Filter(node.iter, "_sandbox_iter", [], [], None, None, lineno=node.lineno)
        return node

    def visit_Concat(self, node):
        self.generic_visit(node)
        return nodes.Filter(nodes.List(node.nodes, lineno=node.lineno), "_sandbox_concat", [], [], None, None,
                            lineno=node.lineno)

    def _new_value(self, node):
        self.generic_visit(node)
        if getattr(node, "ctx", "load") != "load":  # an assignment target: {% for a, b in ... %}
            return node
        return nodes.Filter(node, "_sandbox_new", [], [], None, None, lineno=node.lineno)

    visit_List = visit_Tuple = visit_Dict = _new_value

    def visit_Getitem(self, node):  # jinja writes slices as obj[a:b], without environment.getitem
        return self._new_value(node) if isinstance(node.arg, nodes.Slice) else self.generic_visit(node)


class _TimedCodeGenerator(CodeGenerator):
    def visit(self, node, *args, **kwargs):
        _check_time()
        return super().visit(node, *args, **kwargs)


class _TimedLexing(jinja2.ext.Extension):
    """Checks the time budget at every token: lexing and parsing a long template take a while."""

    def filter_stream(self, stream):
        for token in stream:
            _check_time()
            yield token


def _concat(pieces):
    """How jinja joins captured output ({% set %} blocks, macros, call blocks): size-checked first."""
    pieces = list(pieces)
    _str_limit(sum(map(len, pieces)))
    return _built("".join(pieces))


class _BoundedEnvironment(ImmutableSandboxedEnvironment):
    intercepted_binops = frozenset({"+", "*", "**", "%"})
    code_generator_class = _TimedCodeGenerator
    concat = staticmethod(_concat)

    def _parse(self, source, name, filename):
        return _Bound().visit(super()._parse(source, name, filename))

    def call_binop(self, context, operator, left, right):
        _check_time()
        _check_binop(operator, left, right)
        return _built(super().call_binop(context, operator, left, right))

    def getitem(self, obj, argument):
        _check_time()
        return super().getitem(obj, argument)

    def getattr(self, obj, attribute):
        _check_time()
        return super().getattr(obj, attribute)

    def wrap_str_format(self, value):
        """str.format / format_map with the bounded formatter (jinja's own, plus the size checks)."""
        wrapped = super().wrap_str_format(value)
        if wrapped is None:
            return None
        owner = value.__self__
        formatter = (_BoundedEscapeFormatter(self, escape=owner.escape) if isinstance(owner, Markup)
                     else _BoundedFormatter(self))
        is_map = value.__name__ == "format_map"

        def bounded(*args, **kwargs):
            if is_map:
                if kwargs or len(args) != 1:
                    return wrapped(*args, **kwargs)  # jinja's own error for the wrong arguments
                args, kwargs = (), args[0]
            return type(owner)(formatter.vformat(owner, args, kwargs))
        return functools.update_wrapper(bounded, value)

    def call(self, context, obj, /, *args, **kwargs):
        _check_time()
        owner = getattr(obj, "__self__", None)
        if isinstance(owner, str) and getattr(obj, "__name__", "") not in ("format", "format_map"):
            # a string method: 'x'.ljust(n), s.replace(a, b), ','.join(items); format is checked field by field
            _check_int_args(args, kwargs)
            _check_text_op(obj.__name__, owner, args, kwargs)
        return _built(SandboxedEnvironment.call(self, context, obj, *args, **kwargs))


class _TemplateRaised(jinja2.exceptions.TemplateError):
    """The template called raise_exception(): its message is meant for the user as it is."""


def _raise_exception(message):
    raise _TemplateRaised(str(message))


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    if indent is not None and (len(indent) if isinstance(indent, str) else indent) > MAX_JSON_INDENT:
        raise _Overrun("tojson indent", MAX_JSON_INDENT)
    # Jinja's own tojson HTML-escapes (<, >, &, '), which would change the prompt; HF's (json.dumps) does not.
    encoder = json.JSONEncoder(ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)
    if indent is None:
        return encoder.encode(x)  # in one go (C): a few times the value's size at most
    pieces, size = [], 0
    for piece in encoder.iterencode(x):  # indented (pure Python), so piece by piece: deep nesting multiplies
        size += len(piece)                # the indent, and the value's size alone does not bound the text
        _str_limit(size)
        _check_time()
        pieces.append(piece)
    return "".join(pieces)


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
    env = _BoundedEnvironment(trim_blocks=True, lstrip_blocks=True, finalize=_finalize,
                              extensions=[jinja2.ext.loopcontrols, _TimedLexing])
    env.filters["tojson"] = _tojson
    env.filters["sum"] = _sum
    env.filters = {name: _bounded_filter(name, f) for name, f in env.filters.items()}
    env.filters["_sandbox_iter"] = _timed_iter
    env.filters["_sandbox_concat"] = _concat_values
    env.filters["_sandbox_new"] = _new_value
    env.globals["range"] = _range
    env.globals["lipsum"] = _lipsum
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["namespace"] = _Namespace
    env.globals["dict"] = _Dict()
    return env


@lru_cache(maxsize=32)
def _compile(template: str) -> jinja2.Template:
    if len(template) > MAX_TEMPLATE_LEN:
        raise ChatTemplateError(str(_Overrun("template length", f"{MAX_TEMPLATE_LEN} chars")))
    try:
        return _environment().from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise ChatTemplateError(f"the chat template is not valid Jinja (line {e.lineno}): {e.message}") from e
    except _Overrun as e:
        raise ChatTemplateError(str(e)) from e
    except Exception as e:  # e.g. RecursionError on absurd nesting
        raise ChatTemplateError(f"the chat template failed to compile: {type(e).__name__}: {e}") from e


def _check_unicode(text: str, what: str):
    """Text the tokenizer can take: JSON's \\ud800 escapes make lone surrogates, which are no UTF-8."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ChatTemplateError(f"{what} is not valid Unicode text: {e.reason} at index {e.start}") from None


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
            raise ChatTemplateError(f"message {i} ({m['role']:.40}) needs a string 'content', got {content!r:.100}")
        if isinstance(content, str):
            _check_unicode(content, f"message {i} ({m['role']:.40}) content")
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
    _budget.deadline, _budget.built = time.monotonic() + RENDER_SECONDS, 0
    try:
        compiled = _compile(template)
        pieces, length = [], 0
        for piece in compiled.generate(messages=msgs, add_generation_prompt=add_generation_prompt,
                                       bos_token=bos_token, eos_token=eos_token, **_plain(extra)):
            length += len(piece)
            if length > MAX_TEXT_LEN:
                raise _Overrun("output length", f"{MAX_TEXT_LEN} chars")
            _budget.built += len(piece)
            _check_time()
            pieces.append(piece)
        text = "".join(pieces)
        _check_unicode(text, "the rendered prompt")  # a surrogate from another field, or from the template
        return text
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
