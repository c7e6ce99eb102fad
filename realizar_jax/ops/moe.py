"""Mixture-of-experts ops: the router (`route_experts`) and the routed gated MLP (`moe`, `norm_moe`).

Experts are stacked role arrays [experts, out, in]: dense, or a QTensor of the file's packed blocks with
the experts as its leading axis. Only the chosen experts' weights are read, in one of two formulations
picked by the static shapes:
- gathered (few rows: decode): each token's k experts' weights are gathered (packed blocks gathered,
  then only those dequantized) and multiplied per token;
- grouped (many rows: prefill): the (token, expert) assignments are sorted by expert into blocks of
  BLOCK rows that each belong to one expert (megablox's layout), and a loop over the used blocks
  multiplies each by its expert's weights, dequantizing that expert alone.
Both round as the dense MLP does (each projection accumulated in float32, rounded to x's dtype); the
chosen experts' outputs are weighted and summed in float32, rounded once.

The router's logits are computed by the exact reference dot on every route: an approximate one (int8
activations) could flip which experts a token picks. Per-call features (gpt-oss): `router_bias=`,
`order="topk_softmax"` (the top_k logits, then their softmax), `biases=` (the experts' gate, up and down
biases [experts, out]) and `activation="clamped_swiglu"` with its `limit=` and `alpha=`. A kernel route ("moe" in ops/routes.py) may take
the experts' matmuls; none is registered yet, so every platform runs the formulations here.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from ..quant.dequant import dequantize_blocks
from ..quant.qtensor import QTensor
from .fused import ACTIVATIONS, Stream, as_stream, _check_norm
from ..layers import clamped_swiglu, rms_norm as _rms_norm
from .linear import reference_linear
from .routes import route, rows_of


ORDERS = ("softmax_topk", "topk_softmax")


def route_experts(logits, k: int, normalize: bool, order: str = "softmax_topk"):
    """Router logits [..., experts] -> (weights float32 [..., k], expert ids int32 [..., k]): softmax in
    float32, the k largest probabilities (ties: the lower expert id first, as lax.top_k orders them),
    renormalized to sum to 1 when `normalize` (Mixtral always; Qwen3-MoE with norm_topk_prob).
    order="topk_softmax" (gpt-oss): the k largest logits, then the softmax over those k (`normalize` moot)."""
    if order not in ORDERS:
        raise ValueError(f"route_experts: order must be one of {', '.join(ORDERS)}, got {order!r}")
    if order == "topk_softmax":
        top, ids = lax.top_k(jnp.asarray(logits).astype(jnp.float32), k)
        return jax.nn.softmax(top, axis=-1), ids.astype(jnp.int32)
    probs = jax.nn.softmax(jnp.asarray(logits).astype(jnp.float32), axis=-1)
    top, ids = lax.top_k(probs, k)
    if normalize:
        top = top / jnp.sum(top, axis=-1, keepdims=True)
    return top, ids.astype(jnp.int32)


def _check_experts(x, router, w_gate, w_up, w_down) -> None:
    e, f, h = w_gate.shape
    if (tuple(w_up.shape) != (e, f, h) or tuple(w_down.shape) != (e, h, f) or tuple(router.shape) != (e, h)
            or x.shape[-1] != h):
        raise ValueError(f"moe: x {tuple(x.shape)}, router {tuple(router.shape)}, experts gate {tuple(w_gate.shape)}, "
                         f"up {tuple(w_up.shape)} and down {tuple(w_down.shape)} do not chain")


def _take(w, ids, dtype):
    """Experts `ids` (any int shape S) of a stack [experts, out, in] -> S + (out, in) in dtype; a packed
    stack's blocks are gathered first and only those dequantized."""
    if isinstance(w, QTensor):
        return dequantize_blocks(jnp.take(w.data, ids, axis=0), w.qtype, dtype)
    return jnp.take(jnp.asarray(w), ids, axis=0).astype(dtype)


def _dot(x, w, spec: str):
    precision = lax.Precision.HIGHEST if x.dtype == jnp.float32 else None
    return jnp.einsum(spec, x, w, precision=precision, preferred_element_type=jnp.float32).astype(x.dtype)


def _bias(y, b, ids):
    """y + the biases [experts, out] of experts ids (any int shape), in y's dtype; y itself when b is None."""
    return y if b is None else y + jnp.take(b, ids, axis=0).astype(y.dtype)


def _gathered(x, ids, w_gate, w_up, w_down, act, biases=(None, None, None)):
    """x [N, H], ids [N, k] -> [N, k, H]: every token's chosen experts, their weights gathered per token."""
    bg, bu, bd = biases
    gate = _bias(_dot(x, _take(w_gate, ids, x.dtype), "nh,nkfh->nkf"), bg, ids)
    up = _bias(_dot(x, _take(w_up, ids, x.dtype), "nh,nkfh->nkf"), bu, ids)
    return _bias(_dot(act(gate, up), _take(w_down, ids, x.dtype), "nkf,nkhf->nkh"), bd, ids)


BLOCK = 64   # the most rows of one expert's block in the grouped formulation


def _block_rows(assignments: int, experts: int) -> int:
    """Rows per block: about an expert's average share (a multiple of 8), at most BLOCK: small enough that
    each expert's padding stays small, large enough that the loop is short."""
    share = -(-assignments // experts)
    return int(min(BLOCK, max(8, -(-share // 8) * 8)))


def _grouped(x, ids, w_gate, w_up, w_down, act, biases=(None, None, None)):
    """x [N, H], ids [N, k] -> [N, k, H]: the assignments sorted by expert into blocks of one expert each,
    each used block multiplied by its expert's weights (that expert alone dequantized)."""
    n, k = ids.shape
    e, hidden = w_gate.shape[0], x.shape[-1]
    a = n * k
    b = _block_rows(a, e)
    max_blocks = -(-a // b) + e   # each expert's padding wastes less than one block
    flat = ids.reshape(-1)
    order = jnp.argsort(flat, stable=True)   # assignment indices, grouped by expert
    expert_of = flat[order]
    sizes = jnp.zeros((e,), jnp.int32).at[flat].add(1)
    blocks = (sizes + b - 1) // b
    block_end = jnp.cumsum(blocks)
    block_start = block_end - blocks
    group_start = jnp.cumsum(sizes) - sizes
    pos = block_start[expert_of] * b + (jnp.arange(a, dtype=jnp.int32) - group_start[expert_of])
    x_pad = jnp.zeros((max_blocks * b, hidden), x.dtype).at[pos].set(x[order // k])
    used = block_end[-1]
    block_expert = jnp.minimum(jnp.searchsorted(block_end, jnp.arange(max_blocks), side="right"), e - 1)

    def one(i, y_pad):
        def run(y_pad):
            ex = block_expert[i]
            rows = lax.dynamic_slice_in_dim(x_pad, i * b, b)
            pick = lambda w: _take(w, ex, x.dtype)   # noqa: E731
            bg, bu, bd = biases
            gate = _bias(reference_linear(rows, pick(w_gate)), bg, ex)
            up = _bias(reference_linear(rows, pick(w_up)), bu, ex)
            out = _bias(reference_linear(act(gate, up), pick(w_down)), bd, ex)
            return lax.dynamic_update_slice_in_dim(y_pad, out, i * b, 0)
        return lax.cond(i < used, run, lambda y: y, y_pad)   # a scan, not a while loop: jax.grad goes through

    y_pad = lax.fori_loop(0, max_blocks, one, jnp.zeros_like(x_pad))
    y = jnp.zeros((a, hidden), x.dtype).at[order].set(y_pad[pos])
    return y.reshape(n, k, hidden)


def _activation(activation: str, limit, alpha):
    if activation == "clamped_swiglu":
        if limit is None or alpha is None:
            raise ValueError("moe: activation 'clamped_swiglu' needs limit= and alpha=")
        return lambda gate, up: clamped_swiglu(gate, up, alpha, limit)
    if activation not in ACTIVATIONS:
        raise ValueError(f"moe: activation must be one of {', '.join(ACTIVATIONS)}, clamped_swiglu, got {activation!r}")
    return ACTIVATIONS[activation]


def moe(x, router, w_gate, w_up, w_down, *, top_k: int, normalize: bool, activation: str = "silu",
        router_bias=None, order: str = "softmax_topk", biases=None, limit: float | None = None,
        alpha: float | None = None):
    """The routed gated MLP of x [..., H]: sum over the router's top_k experts of weight * down(act(gate) * up),
    in x's dtype. router [E, H]; w_gate/w_up [E, F, H]; w_down [E, H, F]. router_bias [E] (added to the
    router's float32 logits); biases: (gate [E, F], up [E, F], down [E, H]) added to each expert's
    projections (None: none); order: route_experts'; activation "clamped_swiglu" takes limit and alpha
    (layers.clamped_swiglu)."""
    act = _activation(activation, limit, alpha)
    x = jnp.asarray(x)
    _check_experts(x, router, w_gate, w_up, w_down)
    biases = (None, None, None) if biases is None else tuple(biases)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    logits = reference_linear(x2, router)
    if router_bias is not None:
        logits = logits.astype(jnp.float32) + jnp.asarray(router_bias, jnp.float32)
    weights, ids = route_experts(logits, top_k, normalize, order)
    kernel = route("moe", rows_of(x2), w_gate)
    y = (kernel(x2, weights, ids, w_gate, w_up, w_down, activation, biases=biases, limit=limit, alpha=alpha)
         if kernel is not None else None)   # a kernel route declines what it lacks (biases, the clamp)
    if y is None:
        # gathering copies k experts per row: cheaper than the grouped loop until the copies outnumber the stack
        form = _gathered if x2.shape[0] * top_k <= w_gate.shape[0] else _grouped
        per_expert = form(x2, ids, w_gate, w_up, w_down, act, biases)
        y = jnp.einsum("nkh,nk->nh", per_expert.astype(jnp.float32), weights,
                       precision=lax.Precision.HIGHEST).astype(x.dtype)
    return y.reshape(*lead, x.shape[-1])


def norm_moe(stream, norm_weight, eps: float, router, w_gate, w_up, w_down, *, top_k: int, normalize: bool,
             activation: str = "silu", **features) -> tuple:
    """(the stream with its delta added, moe(rms_norm(stream), ...)): the mixture-of-experts MLP of a pre-norm
    block, as norm_mlp is the dense one's. features: moe's router_bias, order, biases, limit, alpha."""
    stream, norm_weight = as_stream(stream), jnp.asarray(norm_weight)
    _check_norm(stream.x, norm_weight, "norm_moe")
    x = stream.value()
    return Stream(x), moe(_rms_norm(x, norm_weight, eps), router, w_gate, w_up, w_down, top_k=top_k,
                          normalize=normalize, activation=activation, **features)
