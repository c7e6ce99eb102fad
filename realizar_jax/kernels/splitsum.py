"""SplitSum: a decode matmul's result left as the float32 partial sums of its K splits.

The GEMV splits K over programs when a matrix has too few rows to fill the GPU (the o and down
projections of an 8B model: 2 splits) and an XLA reduce adds the splits. When the result only joins
the residual stream, that reduce and the add are one more kernel per projection; handing the
partials over instead lets the next RMSNorm's activation prep add them (xquant.norm_quantize_x).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


@jax.tree_util.register_pytree_node_class
class SplitSum:
    """parts [S, ..., out] float32; total() is what the matmul returns: their sum in `dtype`."""

    def __init__(self, parts: jax.Array, dtype):
        self.parts = parts
        self.dtype = jnp.dtype(dtype)

    @property
    def shape(self) -> tuple:
        return tuple(self.parts.shape[1:])

    def total(self) -> jax.Array:
        return self.parts.sum(axis=0).astype(self.dtype)

    def tree_flatten(self):
        return (self.parts,), self.dtype

    @classmethod
    def tree_unflatten(cls, dtype, children):
        return cls(children[0], dtype)

    def __repr__(self) -> str:
        return f"SplitSum({self.parts.shape[0]} splits of {self.shape}, {self.dtype})"


def as_parts(delta, rows: int, cols: int) -> jax.Array:
    """delta (a SplitSum or an array [..., cols]) as partial sums [S, rows, cols] (S = 1 for an array)."""
    parts = delta.parts if isinstance(delta, SplitSum) else jnp.asarray(delta)[None]
    return parts.reshape(parts.shape[0], rows, cols)
