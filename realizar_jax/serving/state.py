"""The engine's device state and the pure jitted functions that step it.

`SlotState` is one pytree: the KV cache of `slots` sequences, and per slot the next input token, an
active flag, the token budget left, the sampling settings as arrays, a PRNG key, the seen-token mask
(repetition penalty), output-token counts (presence/frequency penalties) and stop token ids. Requests
come and go by writing slots (`insert`, `start`), never by changing shapes, so one compiled `decode`
serves every mix of requests and settings; the state is donated to each call and updated in place.

A slot's sampled token at its g-th generated position uses the key fold_in(slot key, g): a request's
seed gives the same tokens whatever its batchmates (as long as its logits are the same).

The KV cache is paged (cache.PagedKVCache): one pool of pages shared by the slots, a block table per
slot. The host allocator (pages.py) picks the pages; every call that writes a slot's cache takes the
slot's table row (insert, extend) or all tables (decode) from the host, so the device tables are
always the allocator's. The cache API the scheduler uses is `insert` (a prefilled prompt into a
slot's pages), `extend` (prompt chunks into several slots, each from any position: chunked prefill,
or the rest of a prompt whose prefix pages are cached), `copy` (copy-on-write of shared pages), `release` masks
in `decode` (free slots) and the per-slot lengths.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from ..cache import PagedKVCache, copy_pages, init_cache, init_paged_cache, page_bytes, write_pages_all_layers
from ..config import ModelConfig
from ..kernels.tuning import KernelConfig
from ..models import decode_logits, extend as model_extend, prefill as model_prefill
from ..sampling import SamplingParams, apply_repetition_penalty, filter_logits
from ..weights import Params
from .requests import MAX_STOP_TOKEN_IDS, MAX_TOP_LOGPROBS

STOP_IDS = MAX_STOP_TOKEN_IDS + 8   # a slot's stop ids: the request's plus the model's EOS ids


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class SlotSettings:
    """One request's settings as scalars (a slot's row of the state): built on the host per request."""
    temperature: jax.Array         # f32
    top_k: jax.Array               # i32
    top_p: jax.Array               # f32
    min_p: jax.Array               # f32
    repetition_penalty: jax.Array  # f32
    presence_penalty: jax.Array    # f32
    frequency_penalty: jax.Array   # f32
    key: jax.Array                 # u32 [2]
    stop_ids: jax.Array            # i32 [STOP_IDS], -1 padded
    max_tokens: jax.Array          # i32


def settings(*, temperature=0.0, top_k=0, top_p=1.0, min_p=0.0, repetition_penalty=1.0, presence_penalty=0.0,
             frequency_penalty=0.0, seed: int = 0, stop_ids=(), max_tokens: int = 1) -> SlotSettings:
    stop = np.full((STOP_IDS,), -1, np.int32)
    stop_ids = list(dict.fromkeys(stop_ids))
    if len(stop_ids) > STOP_IDS:
        raise ValueError(f"at most {STOP_IDS} stop token ids, got {len(stop_ids)}")
    stop[:len(stop_ids)] = stop_ids
    seed %= 2**64
    key = np.asarray([seed >> 32, seed & 0xFFFFFFFF], np.uint32)   # a threefry key's two words
    f = np.float32
    return SlotSettings(f(temperature), np.int32(top_k), f(top_p), f(min_p), f(repetition_penalty),
                        f(presence_penalty), f(frequency_penalty), key, stop, np.int32(max_tokens))


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class SlotState:
    cache: PagedKVCache       # pools k/v [L, P, Hkv, ps, D], tables [S, max_pages], lengths [S]
    tokens: jax.Array         # i32 [S]: the next decode input (each slot's last sampled token)
    active: jax.Array         # bool [S]: decoding (not finished, not free)
    remaining: jax.Array      # i32 [S]: tokens the slot may still produce
    generated: jax.Array      # i32 [S]: tokens produced so far (the PRNG position)
    sampling: SamplingParams  # [S] each
    presence_penalty: jax.Array   # f32 [S]
    frequency_penalty: jax.Array  # f32 [S]
    keys: jax.Array           # u32 [S, 2]
    stop_ids: jax.Array       # i32 [S, STOP_IDS]
    seen: jax.Array           # bool [S, V]: prompt and output tokens (repetition penalty)
    counts: jax.Array         # i32 [S, V]: output tokens (presence / frequency penalties)

    @property
    def slots(self) -> int:
        return self.tokens.shape[0]


def new_state(config: ModelConfig, slots: int, max_seq_len: int, kv_dtype, pages: int, page_size: int) -> SlotState:
    """`pages` pages of `page_size` positions (the null page included), tables covering max_seq_len."""
    s, v = slots, config.vocab_size
    f, i = jnp.float32, jnp.int32
    sampling = SamplingParams(jnp.zeros((s,), f), jnp.zeros((s,), i), jnp.ones((s,), f), jnp.zeros((s,), f),
                              jnp.ones((s,), f))
    cache = init_paged_cache(config, pages, page_size, s, max_seq_len, kv_dtype)
    return SlotState(cache, jnp.zeros((s,), i), jnp.zeros((s,), bool),
                     jnp.zeros((s,), i), jnp.zeros((s,), i), sampling, jnp.zeros((s,), f), jnp.zeros((s,), f),
                     jnp.zeros((s, 2), jnp.uint32), jnp.full((s, STOP_IDS), -1, i), jnp.zeros((s, v), bool),
                     jnp.zeros((s, v), i))


def state_bytes(config: ModelConfig, slots: int, kv_dtype, pages: int, page_size: int) -> int:
    """Device bytes of a state: the page pool and the per-slot seen/counts rows (the rest is small)."""
    return pages * page_bytes(config, page_size, kv_dtype) + slots * config.vocab_size * 5


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class Prefilled:
    """Prompts run from position 0: their cache k/v [L, B, Hkv, T, D], tokens [B, T], lengths [B] and
    the logits [B, V] at each one's last token. Inserting a row into n slots shares its prefill (n > 1)."""
    k: jax.Array
    v: jax.Array
    tokens: jax.Array
    length: jax.Array
    logits: jax.Array


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class Sampled:
    """Tokens [..., S] (-1 where a slot was not active) and, when asked, their log-probabilities and
    the top MAX_TOP_LOGPROBS alternatives of the raw distribution."""
    tokens: jax.Array
    logprob: jax.Array | None = None
    top_ids: jax.Array | None = None
    top_logprobs: jax.Array | None = None


def prefill(params: Params, tokens, length, *, config: ModelConfig, dtype, kv_dtype, kernels: KernelConfig):
    """tokens [B, T] (right-padded), length [B] -> Prefilled."""
    cache = init_cache(config, tokens.shape[0], tokens.shape[1], kv_dtype)
    logits, cache = model_prefill(params, cache, tokens, length, config=config, dtype=dtype, kernels=kernels)
    return Prefilled(cache.k, cache.v, tokens, length, logits)


def _row_set(x, slot, row):
    """x with x[slot] = row (row shaped like x[0])."""
    return jax.lax.dynamic_update_index_in_dim(x, jnp.asarray(row, x.dtype), slot, 0)


def _seen_row(tokens, length, vocab: int):
    valid = jnp.arange(tokens.shape[-1]) < length
    ids = jnp.where(valid, tokens.reshape(-1), vocab)
    return jnp.zeros((vocab + 1,), bool).at[ids].set(True)[:vocab]


def insert(state: SlotState, pre: Prefilled, row, slot, setting: SlotSettings, table):
    """Write prompt `row` of a prefilled batch into `slot`'s pages (its table row `table` [max_pages])
    and start it (its first token sampled from the prompt's logits). -> (state, Sampled [1] with logprobs)."""
    cache = state.cache
    length = pre.length[row]
    # the row's [L, T, Hkv, D]
    take = lambda x: jax.lax.dynamic_index_in_dim(x, row, 1, keepdims=False).swapaxes(1, 2)  # noqa: E731
    k = write_pages_all_layers(cache.k, table, take(pre.k), length)
    v = write_pages_all_layers(cache.v, table, take(pre.v), length)
    cache = PagedKVCache(k, v, _row_set(cache.tables, slot, table), _row_set(cache.lengths, slot, length))
    seen = _row_set(state.seen, slot, _seen_row(pre.tokens[row], length, state.seen.shape[1]))
    state = dataclasses.replace(state, cache=cache, seen=seen)
    return start(state, slot, jax.lax.dynamic_slice_in_dim(pre.logits, row, 1, 0), setting, jnp.int32(0))


def extend(params: Params, state: SlotState, slots, tokens, start_pos, length, tables, reset, *, config: ModelConfig,
           dtype, kernels: KernelConfig):
    """Chunks tokens [R, C] of R prompts (length [R] real tokens each) into slots [R] (their table rows
    tables [R, max_pages]) at positions start_pos [R]; the positions before a row's start are in its
    pages already (earlier chunks, or cached prefix pages). reset [R]: the row's chunk starts its slot's
    seen mask (else adds to it). A padding row has length 0 and a slot out of range: nothing of it is
    written or kept. -> (state, logits [R, V] at each row's last real token)."""
    cache = state.cache
    rows = PagedKVCache(cache.k, cache.v, tables, None)
    logits, rows = model_extend(params, rows, tokens, start_pos, length, config=config, dtype=dtype,
                                kernels=kernels)
    put = lambda x, value: x.at[slots].set(jnp.asarray(value, x.dtype), mode="drop")  # noqa: E731
    cache = PagedKVCache(rows.k, rows.v, put(cache.tables, tables), put(cache.lengths, rows.lengths))
    vocab = state.seen.shape[1]
    old = jnp.where(reset[:, None], False, state.seen[jnp.minimum(slots, state.seen.shape[0] - 1)])
    new = jax.vmap(lambda t, n: _seen_row(t, n, vocab))(tokens, length)
    state = dataclasses.replace(state, cache=cache, seen=put(state.seen, old | new), active=put(state.active, False))
    return state, logits


def mark(state: SlotState, slot, tokens, length, reset, output):
    """Tokens [1, C] (length [1] real) into `slot`'s seen mask, and with output (a bool scalar) into
    its output-token counts; reset (a bool scalar) clears both first. For what the slot's cache holds
    without an extend having seen it: a cached prefix, a preempted request's generated tokens."""
    v = state.seen.shape[1]
    seen = jnp.where(reset, False, state.seen[slot]) | _seen_row(tokens, length[0], v)
    ids = jnp.where(jnp.arange(tokens.shape[-1]) < length[0], tokens.reshape(-1), v)
    add = jnp.zeros((v + 1,), jnp.int32).at[ids].add(1)[:v]
    counts = jnp.where(reset, 0, state.counts[slot]) + jnp.where(output, add, 0)
    return dataclasses.replace(state, seen=_row_set(state.seen, slot, seen),
                               counts=_row_set(state.counts, slot, counts))


def copy(state: SlotState, src, dst):
    """Pages src [K] copied onto pages dst [K] (copy on write; NULL_PAGE pairs pad)."""
    cache = state.cache
    return dataclasses.replace(state, cache=PagedKVCache(copy_pages(cache.k, src, dst), copy_pages(cache.v, src, dst),
                                                         cache.tables, cache.lengths))


def start(state: SlotState, slot, logits, setting: SlotSettings, generated):
    """Set `slot`'s settings and sample its first token from the prompt's logits [1, V] (the cache and
    seen mask already hold the prompt). generated (an i32 scalar): tokens the request produced before
    (a preempted one, recomputed: its cache holds them, `mark` counted them); its next token is then
    drawn at that position of its key, as it would have been. -> (state, Sampled [1] with logprobs)."""
    sp = state.sampling
    sampling = SamplingParams(*(_row_set(getattr(sp, f), slot, getattr(setting, f))
                                for f in ("temperature", "top_k", "top_p", "min_p", "repetition_penalty")))
    state = dataclasses.replace(
        state, sampling=sampling,
        presence_penalty=_row_set(state.presence_penalty, slot, setting.presence_penalty),
        frequency_penalty=_row_set(state.frequency_penalty, slot, setting.frequency_penalty),
        keys=_row_set(state.keys, slot, setting.key), stop_ids=_row_set(state.stop_ids, slot, setting.stop_ids),
        counts=_row_set(state.counts, slot, jnp.where(generated == 0, 0, state.counts[slot])),
        generated=_row_set(state.generated, slot, generated),
        remaining=_row_set(state.remaining, slot, setting.max_tokens - generated),
        active=_row_set(state.active, slot, True))
    # the slot's rows alone, so the first token sees exactly the settings decode would use
    one = jax.tree_util.tree_map(lambda x: jax.lax.dynamic_slice_in_dim(x, slot, 1, 0),
                                 dataclasses.replace(state, cache=None))
    tok, lp = _pick(one, logits.astype(jnp.float32), sample=True, penalize=True, with_logprobs=True)
    one = _advance(one, tok)
    state = dataclasses.replace(state, **{f: jax.lax.dynamic_update_slice_in_dim(getattr(state, f), getattr(one, f),
                                                                                  slot, 0)
                                          for f in ("tokens", "active", "remaining", "generated", "seen", "counts")})
    return state, dataclasses.replace(lp, tokens=tok)


def _penalized(state: SlotState, logits):
    """Repetition penalty (HF, over prompt + output) then OpenAI's presence/frequency penalties (output)."""
    x = apply_repetition_penalty(logits, state.sampling.repetition_penalty, state.seen)
    c = state.counts.astype(jnp.float32)
    return x - state.presence_penalty[:, None] * (c > 0) - state.frequency_penalty[:, None] * c


def _pick(state: SlotState, logits, *, sample: bool, penalize: bool, with_logprobs: bool):
    """Each slot's next token from its logits [S, V] (float32), with its own key at its own position.

    sample / penalize are static: a chunk whose slots are all greedy, or all without penalties, is
    compiled without the sort and the penalty pass. (Not a lax.cond: on a GPU a conditional copies its
    predicate to the host and blocks the dispatching thread until the device gets there.)
    """
    x = _penalized(state, logits) if penalize else logits
    tok = jnp.argmax(x, axis=-1).astype(jnp.int32)
    if sample:
        keys = jax.vmap(lambda k, g: jax.random.fold_in(jax.random.wrap_key_data(k), g))(state.keys, state.generated)
        drawn = jax.vmap(lambda k, row: jax.random.categorical(k, row))(keys, filter_logits(x, state.sampling))
        tok = jnp.where(state.sampling.temperature > 0, drawn.astype(jnp.int32), tok)
    if not with_logprobs:
        return tok, Sampled(tok)
    logp = jax.nn.log_softmax(logits, axis=-1)
    top_lp, top_ids = jax.lax.top_k(logp, min(MAX_TOP_LOGPROBS, logits.shape[-1]))
    chosen = jnp.take_along_axis(logp, tok[:, None], axis=-1)[:, 0]
    return tok, Sampled(tok, chosen, top_ids.astype(jnp.int32), top_lp)


def _advance(state: SlotState, tok):
    """Book the sampled tokens [S] of the active slots: stops, budgets, seen/counts, the next input."""
    act = state.active
    is_stop = jnp.any(tok[:, None] == state.stop_ids, axis=-1)
    took = act & ~is_stop
    rows = jnp.arange(tok.shape[0])
    remaining = state.remaining - took
    return dataclasses.replace(
        state, tokens=jnp.where(act, tok, state.tokens), active=took & (remaining > 0), remaining=remaining,
        generated=state.generated + act,
        seen=state.seen.at[rows, tok].set(state.seen[rows, tok] | took), counts=state.counts.at[rows, tok].add(took.astype(jnp.int32)))


def decode(params: Params, state: SlotState, release, tables, *, steps: int, logprobs: bool, sample: bool, penalize: bool,
           rows: int, config: ModelConfig, dtype, kernels: KernelConfig):
    """Free the `release` slots [S] bool, take the host's block tables [S, max_pages], then `steps`
    decode steps of every active slot in one call.
    -> (state, Sampled [steps, S]: -1 where a slot was not active at that step). logprobs / sample /
    penalize (static): whether any slot asks for logprobs, samples (temperature > 0), has penalties.
    rows (static): only slots [0, rows) are stepped (the others hold no request), so one request on a
    64-slot engine costs a 1-row step, not a 64-row one."""
    cache = state.cache
    state = dataclasses.replace(state, active=state.active & ~release,
                                cache=PagedKVCache(cache.k, cache.v, tables, jnp.where(release, 0, cache.lengths)))
    full = state
    if rows < full.slots:   # only the first `rows` slots hold requests: step those alone
        state = _first_rows(full, rows)

    def step(state, _):
        logits, cache = decode_logits(params, state.cache, state.tokens, config=config, dtype=dtype, kernels=kernels)
        # a slot that is not active keeps its length (its write at that position is beyond its content)
        cache = PagedKVCache(cache.k, cache.v, cache.tables, jnp.where(state.active, cache.lengths,
                                                                        state.cache.lengths))
        tok, out = _pick(state, logits.astype(jnp.float32), sample=sample, penalize=penalize, with_logprobs=logprobs)
        emitted = jnp.where(state.active, tok, -1)
        state = _advance(dataclasses.replace(state, cache=cache), tok)
        return state, dataclasses.replace(out, tokens=emitted)

    state, out = jax.lax.scan(step, state, None, length=steps)
    if rows < full.slots:
        state = _put_rows(full, state)
        out = jax.tree_util.tree_map(lambda y: jnp.pad(y, ((0, 0), (0, full.slots - rows)) + ((0, 0),) * (y.ndim - 2),
                                                       constant_values=-1 if y.dtype == jnp.int32 else 0), out)
    return state, out


def _slot_axes(state: SlotState) -> list[int | None]:
    """The slot axis of each leaf of a SlotState: None for the page pools (shared, not per slot), else 0."""
    def axis(path):
        names = [getattr(k, "name", None) for k in path]
        return None if names[:1] == ["cache"] and names[-1] in ("k", "v") else 0
    return [axis(path) for path, _ in jax.tree_util.tree_flatten_with_path(state)[0]]


def _first_rows(state: SlotState, rows: int) -> SlotState:
    leaves, treedef = jax.tree_util.tree_flatten(state)
    return treedef.unflatten([x if a is None else jax.lax.slice_in_dim(x, 0, rows, axis=a)
                              for x, a in zip(leaves, _slot_axes(state))])


def _put_rows(full: SlotState, part: SlotState) -> SlotState:
    leaves, treedef = jax.tree_util.tree_flatten(full)
    return treedef.unflatten([y if a is None else jax.lax.dynamic_update_slice_in_dim(x, y, 0, axis=a) for x, y, a in
                              zip(leaves, jax.tree_util.tree_leaves(part), _slot_axes(full))])


class SlotSteps:
    """The jitted engine functions of one model (config, dtype, kernels), compiled ahead of time per
    shape; shared by every Engine of the model."""

    def __init__(self, config: ModelConfig, dtype, kv_dtype, kernels: KernelConfig):
        from ..generate import Compiled
        static = dict(config=config, dtype=dtype, kernels=kernels)
        self.prefill = Compiled(jax.jit(partial(prefill, kv_dtype=kv_dtype, **static)))
        self.insert = Compiled(jax.jit(lambda _, *a: insert(*a), donate_argnums=(1,)))
        self.start = Compiled(jax.jit(lambda _, *a: start(*a), donate_argnums=(1,)))
        self.extend = Compiled(jax.jit(partial(extend, **static), donate_argnums=(1,)))
        self.mark = Compiled(jax.jit(lambda _, *a: mark(*a), donate_argnums=(1,)))
        self.copy = Compiled(jax.jit(lambda _, *a: copy(*a), donate_argnums=(1,)))
        self.decode = Compiled(jax.jit(partial(decode, **static), static_argnames=("steps", "logprobs", "sample", "penalize", "rows"),
                                       donate_argnums=(1,)))
        self.all = (self.prefill, self.insert, self.start, self.extend, self.mark, self.copy, self.decode)

    @property
    def compile_seconds(self) -> float:
        return sum(c.compile_seconds for c in self.all)

    @property
    def compiles(self) -> int:
        return sum(c.compiles for c in self.all)
