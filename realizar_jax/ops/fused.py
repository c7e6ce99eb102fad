"""The residual stream and the ops around it: `Stream`, `norm_linear`, `norm_mlp`, and the norm-less
`project` / `mlp` of blocks without pre-norms (OLMo 2).

A block reads as the reference (`h = x + attn(norm(x)); out = h + mlp(norm(h))`): `x + delta` on a
Stream records the delta, and the next norm op adds it. On the GPU's decode route that add runs
inside the norm's own launch and takes the delta as the previous GEMV left it (its K-split partial
sums, a kernels' SplitSum), so neither the sum of the splits nor the add is a kernel of its own. The
reference adds first, rounding as `x + linear(...)` rounds.
"""
from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp

from ..layers import geglu, rms_norm as _rms_norm, swiglu
from .linear import check_input, linear, linear_many, summed
from .routes import route, rows_of

ACTIVATIONS = {"silu": swiglu, "gelu_tanh": geglu}   # the gated MLP's activation and its gate


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class Stream:
    """The residual stream: x [..., hidden] plus a delta not yet added (None, an array like x, or a
    SplitSum of one)."""
    x: jax.Array
    delta: object = None

    def __add__(self, delta) -> "Stream":
        if tuple(delta.shape) != tuple(self.x.shape):
            raise ValueError(f"residual add: delta {tuple(delta.shape)} does not match the stream {tuple(self.x.shape)}")
        return Stream(self.value(), delta) if self.delta is not None else Stream(self.x, delta)

    @property
    def shape(self) -> tuple:
        return tuple(self.x.shape)

    def value(self) -> jax.Array:
        """x + delta as an array, rounded as `x + linear(...)` rounds."""
        return self.x if self.delta is None else self.x + summed(self.delta).astype(self.x.dtype)


def as_stream(x) -> Stream:
    return x if isinstance(x, Stream) else Stream(jnp.asarray(x))


def rms_norm(x, weight, eps):
    """RMSNorm of an array, a Stream or a SplitSum (layers.rms_norm)."""
    x = x.value() if isinstance(x, Stream) else summed(x)
    return _rms_norm(x, weight, eps)


def _check_norm(x, norm_weight, what: str) -> None:
    if norm_weight.shape != x.shape[-1:]:
        raise ValueError(f"{what}: the norm weight has shape {tuple(norm_weight.shape)} but x has {x.shape[-1]} features")


def norm_linear(stream, norm_weight, eps: float, ws) -> tuple[Stream, list]:
    """(the stream with its delta added, [linear(rms_norm(stream), w) for w in ws])."""
    stream, norm_weight = as_stream(stream), jnp.asarray(norm_weight)
    _check_norm(stream.x, norm_weight, "norm_linear")
    for w in ws:
        check_input(stream.x, w)
    kernel = route("norm_linear", rows_of(stream.x), ws[0])
    res = kernel(stream.x, stream.delta, norm_weight, eps, ws) if kernel is not None else None
    if res is not None:
        return Stream(res[0]), res[1]
    x = stream.value()
    return Stream(x), linear_many(_rms_norm(x, norm_weight, eps), ws)


def norm_mlp(stream, norm_weight, eps: float, w_gate, w_up, w_down, activation: str = "silu") -> tuple:
    """(the stream with its delta added, the gated MLP of rms_norm(stream)):
    linear(act(gate) * up, w_down) with gate, up = the normed projections; act = ACTIVATIONS[activation].
    The MLP's output may be a SplitSum: a delta for the stream."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"norm_mlp: activation must be one of {', '.join(ACTIVATIONS)}, got {activation!r}")
    stream, norm_weight = as_stream(stream), jnp.asarray(norm_weight)
    _check_norm(stream.x, norm_weight, "norm_mlp")
    for w in (w_gate, w_up):
        check_input(stream.x, w)
    if w_gate.shape != w_up.shape or w_down.shape[1] != w_gate.shape[0]:
        raise ValueError(f"norm_mlp: gate {tuple(w_gate.shape)}, up {tuple(w_up.shape)} and down "
                         f"{tuple(w_down.shape)} do not chain")
    kernel = route("mlp", rows_of(stream.x), w_gate)
    res = (kernel(stream.x, stream.delta, norm_weight, eps, w_gate, w_up, w_down, activation)
           if kernel is not None else None)
    if res is not None:
        return Stream(res[0]), res[1]
    stream, (gate, up) = norm_linear(stream, norm_weight, eps, (w_gate, w_up))
    return stream, linear(ACTIVATIONS[activation](gate, up), w_down, unsummed=True)


def project(stream, ws) -> tuple[Stream, list]:
    """(the stream with its delta added, [linear(stream, w) for w in ws]): projections without a pre-norm."""
    stream = as_stream(stream)
    x = stream.value()
    return Stream(x), linear_many(x, ws)


def mlp(stream, w_gate, w_up, w_down, activation: str = "silu") -> tuple:
    """(the stream with its delta added, the gated MLP of the stream itself, no pre-norm):
    linear(act(gate) * up, w_down), maybe a SplitSum."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"mlp: activation must be one of {', '.join(ACTIVATIONS)}, got {activation!r}")
    if w_gate.shape != w_up.shape or w_down.shape[1] != w_gate.shape[0]:
        raise ValueError(f"mlp: gate {tuple(w_gate.shape)}, up {tuple(w_up.shape)} and down "
                         f"{tuple(w_down.shape)} do not chain")
    stream, (gate, up) = project(stream, (w_gate, w_up))
    return stream, linear(ACTIVATIONS[activation](gate, up), w_down, unsummed=True)
