"""What a client hands the engine and what it gets back: per-request options, streamed events,
the final result, and the errors submit() raises (the server maps each to its HTTP status)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

from ..errors import RealizarError

MAX_STOP_STRINGS = 16
MAX_STOP_TOKEN_IDS = 16
MAX_TOP_LOGPROBS = 20
MAX_N = 16


class QueueFullError(RealizarError):
    """The engine's waiting queue is full (HTTP 429): retry after `retry_after` seconds."""

    def __init__(self, message: str, retry_after: float = 1.0):
        super().__init__(message)
        self.retry_after = retry_after


class ContextLengthError(RealizarError, ValueError):
    """prompt + max_tokens do not fit the engine's max_seq_len (HTTP 400, param 'max_tokens' or 'prompt')."""

    def __init__(self, message: str, param: str = "max_tokens"):
        super().__init__(message)
        self.param = param


class EngineClosedError(RealizarError):
    """The engine is shutting down or closed and takes no new requests (HTTP 503)."""


class OptionError(RealizarError, ValueError):
    """A request option has a bad value (HTTP 400); `param` names the field."""

    def __init__(self, param: str, message: str):
        super().__init__(f"{param}: {message}")
        self.param = param


@dataclass(frozen=True)
class SamplingOptions:
    """One request's generation settings. temperature 0 is greedy; top_k 0, top_p 1, min_p 0,
    repetition_penalty 1 and the two OpenAI penalties 0 turn those off. seed None: fresh randomness;
    an int: the same tokens whatever else the engine is running. logprobs None: none; k in [0, 20]:
    the chosen token's log-probability and the k most likely alternatives (of the model's raw
    distribution) per token. n: independent completions sharing one prefill."""

    max_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None
    n: int = 1

    def __post_init__(self):
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop or ()))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids or ()))
        self.check()

    def check(self) -> None:
        _int("max_tokens", self.max_tokens, 1)
        _num("temperature", self.temperature, 0.0, None)
        _num("top_p", self.top_p, 0.0, 1.0, lo_open=True)
        _int("top_k", self.top_k, 0, 2**31 - 1)
        _num("min_p", self.min_p, 0.0, 1.0)
        _num("repetition_penalty", self.repetition_penalty, 0.0, None, lo_open=True)
        _num("presence_penalty", self.presence_penalty, -2.0, 2.0)
        _num("frequency_penalty", self.frequency_penalty, -2.0, 2.0)
        if self.seed is not None:
            _int("seed", self.seed, -2**63, 2**64 - 1)
        if not all(isinstance(s, str) for s in self.stop):
            raise OptionError("stop", "must be a string or a list of strings")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise OptionError("stop", f"at most {MAX_STOP_STRINGS} stop strings, got {len(self.stop)}")
        if any(s == "" for s in self.stop):
            raise OptionError("stop", "stop strings must not be empty")
        if len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            raise OptionError("stop_token_ids", f"at most {MAX_STOP_TOKEN_IDS}, got {len(self.stop_token_ids)}")
        for t in self.stop_token_ids:
            _int("stop_token_ids", t, 0)
        if not isinstance(self.ignore_eos, bool):
            raise OptionError("ignore_eos", f"must be a boolean, got {self.ignore_eos!r:.40}")
        if self.logprobs is not None:
            _int("logprobs", self.logprobs, 0, MAX_TOP_LOGPROBS)
        _int("n", self.n, 1, MAX_N)


def _int(name, value, lo, hi=None):
    if isinstance(value, bool) or not isinstance(value, int):
        raise OptionError(name, f"must be an integer, got {type(value).__name__} {value!r:.40}")
    if value < lo or (hi is not None and value > hi):
        raise OptionError(name, f"must be in [{lo}, {'...' if hi is None else hi}], got {value}")


def _num(name, value, lo, hi, lo_open=False):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise OptionError(name, f"must be a number, got {type(value).__name__} {value!r:.40}")
    if not math.isfinite(value):
        raise OptionError(name, f"must be finite, got {value}")
    if (value <= lo if lo_open else value < lo) or (hi is not None and value > hi):
        lo_b = "(" if lo_open else "["
        raise OptionError(name, f"must be in {lo_b}{lo}, {'...' if hi is None else hi}], got {value}")


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token: its id, text piece (bytes decoded as far as they form characters), its
    log-probability, and the top alternatives as (token id, logprob), most likely first."""
    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class Event:
    """A piece of one choice's output, in order. text never splits a UTF-8 character and never holds
    any part of a stop string; token_ids are the tokens whose text it completes (a stop string's
    tokens are left out). finish_reason is set on the choice's last event: 'length' (max_tokens),
    'eos' (an EOS or stop token id), 'stop' (a stop string), 'cancelled', 'timeout' (deadline) or
    'error' (then `error` holds the message)."""
    choice: int
    text: str
    token_ids: tuple[int, ...] = ()
    logprobs: tuple[TokenLogprob, ...] | None = None
    finish_reason: str | None = None
    error: str | None = None


@dataclass
class RequestStats:
    """Timings of one request on the engine's clock (time.perf_counter seconds)."""
    submitted: float = 0.0
    admitted: float | None = None     # left the queue for a slot
    first_token: float | None = None  # first token read on the host
    finished: float | None = None
    prompt_tokens: int = 0
    cached_tokens: int = 0            # prompt tokens found in the prefix cache (not prefilled)
    generated_tokens: int = 0         # over all choices, stop/EOS tokens not counted

    @property
    def queue_s(self) -> float | None:
        return None if self.admitted is None else self.admitted - self.submitted

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.submitted


@dataclass(frozen=True)
class Choice:
    index: int
    text: str
    token_ids: tuple[int, ...]
    finish_reason: str
    logprobs: tuple[TokenLogprob, ...] | None = None
    generated_tokens: int = 0   # sampled tokens (EOS excluded), those of a matched stop string included


@dataclass(frozen=True)
class Completion:
    """A finished request: its choices (in index order), prompt token ids and stats."""
    choices: tuple[Choice, ...]
    prompt_token_ids: tuple[int, ...]
    stats: RequestStats = field(default_factory=RequestStats)

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def completion_tokens(self) -> int:
        """Tokens generated over all choices (what OpenAI's usage.completion_tokens counts)."""
        return sum(c.generated_tokens for c in self.choices)


def as_options(options: SamplingOptions | None = None, **kw) -> SamplingOptions:
    if options is not None and kw:
        raise TypeError("pass either a SamplingOptions or keyword options, not both")
    return options if options is not None else SamplingOptions(**kw)


def check_stop_strings(stop: str | Sequence[str] | None) -> tuple[str, ...]:
    stop = (stop,) if isinstance(stop, str) else stop
    if stop is not None and (not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) for s in stop)):
        raise OptionError("stop", f"must be a string or a list of strings, got {stop!r:.80}")
    return tuple(stop or ())
