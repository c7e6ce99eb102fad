"""Quantize on load: an HF ModelSource whose tensors read as the GGUF `convert --quant` would write.

`quantized_source(src, "q4_k_m")` plans every tensor's type as the GGUF writer does (gguf_writer.
plan_qtype: the same llama-quantize mix and fallbacks) and hands each one to build_params as that
file's tensor would be: uint8 blocks for a quantized type, the type's values for a dense one. Each
tensor is quantized when build_params reads it (`packed()`): on JAX's device, a chunk of rows at a
time, where that is faster (quant.device_quant.faster_on_device: any accelerator; on a CPU the
32-value types), else by the numpy encoders on the host, holding one tensor's float copy. Both run
the same encoder code and write the same bytes. The GGUF writer permutes wq/wk rows for llama.cpp's
RoPE and the loader permutes them back; blocks never span rows, so quantizing the unpermuted rows
gives the same bytes.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from ..errors import ModelFormatError
from ..quant.types import qtype_info, row_bytes
from .source import ModelSource, TensorSource

_DENSE_VIEWS = {"F32": np.float32, "F16": np.float16}


class QuantizedTensor:
    """One tensor quantized when it is read: np.asarray gives the blocks (or dense values) that the
    GGUF writer would store, packed() the same blocks where they are fastest made; a slice of rows
    (a fused tensor's part) is a QuantizedTensor of those rows alone."""

    __slots__ = ("_source", "_qtype", "_path", "_rows", "shape", "dtype")

    def __init__(self, source: TensorSource, qtype: str, path, rows: tuple[int, int] | None = None):
        self._source, self._qtype, self._path = source, qtype, path
        n, cols = (int(np.prod(source.shape[:-1])), source.shape[-1]) if len(source.shape) > 1 else (1, source.shape[0])
        self._rows = rows
        if rows is not None:
            n = rows[1] - rows[0]
        if qtype_info(qtype).is_dense:
            self.shape, self.dtype = (n, *source.shape[1:]) if rows else tuple(source.shape), _dense_dtype(qtype)
        else:
            self.shape, self.dtype = (n, row_bytes(qtype, cols)), np.dtype(np.uint8)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize

    def _error(self, e: ValueError) -> ModelFormatError:
        return ModelFormatError(f"cannot quantize to {self._qtype}: {e}", path=self._path, tensor=self._source.name)

    def _values(self):
        data = self._source.data
        return data if self._rows is None else data[self._rows[0]:self._rows[1]]

    def _encode(self, values) -> np.ndarray:
        from ..quant.quantize import quantize
        x = np.asarray(values, dtype=np.float32)
        try:
            out = quantize(x.reshape(-1, x.shape[-1]) if x.ndim > 1 else x, self._qtype)
        except ValueError as e:
            raise self._error(e) from None
        if qtype_info(self._qtype).is_dense:
            return out.view(_dense_dtype(self._qtype)).reshape(x.shape)
        return out

    def __array__(self, dtype=None, copy=None):
        out = self._encode(self._values())
        return out if dtype is None else out.astype(dtype, copy=False)

    def __getitem__(self, key):
        if isinstance(key, slice) and key.step in (None, 1) and len(self._source.shape) == 2:
            start, stop, _ = key.indices(self.shape[0])
            base = 0 if self._rows is None else self._rows[0]
            return QuantizedTensor(self._source, self._qtype, self._path, (base + start, base + max(start, stop)))
        return self._encode(self._values()[key])

    def packed(self):
        """The blocks as build_params takes them: a jax.Array made on the device where that is faster
        (a quantized type, a matrix), else np.asarray(self)."""
        from ..quant.device_quant import faster_on_device, quantize_rows_on_device
        if qtype_info(self._qtype).is_dense or len(self._source.shape) != 2 or not faster_on_device(self._qtype):
            return np.asarray(self)
        data, base = self._source.data, 0 if self._rows is None else self._rows[0]
        try:
            return quantize_rows_on_device(lambda a, b: data[base + a:base + b], self.shape[0],
                                           self._source.shape[1], self._qtype)
        except ValueError as e:
            raise self._error(e) from None


def _dense_dtype(qtype: str) -> np.dtype:
    if qtype == "BF16":
        import ml_dtypes
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(_DENSE_VIEWS[qtype])


def quantized_source(src: ModelSource, quant: str) -> ModelSource:
    """src (an HF folder's ModelSource) with every tensor planned and quantized as `convert --quant
    quant` writes it. ValueError for an unknown quant or a source that is already a GGUF file."""
    from .gguf_writer import QUANT_CHOICES, plan_qtype
    from .roles import tensor_name
    from .validate import validate_roles

    quant = str(quant).lower()
    if quant not in QUANT_CHOICES:
        raise ValueError(f"quantize must be one of {', '.join(QUANT_CHOICES)}, got {quant!r}")
    if src.format != "hf":
        raise ValueError(f"quantize= applies to an HF safetensors folder; {src.path.name} is a {src.format} file "
                         f"whose tensors are already stored as {sorted({t.qtype for t in src.tensors.values()})}")
    c = src.config
    role_map = validate_roles(src)
    has_output = ("lm_head", None) in role_map and not c.tie_embeddings
    tensors = dict(src.tensors)
    for (role, layer), name in role_map.items():
        t = src.tensors[name]
        qtype = plan_qtype(role, layer, tuple(t.shape), quant, c.num_layers, has_output,
                           tensor=tensor_name(role, "gguf", layer, c.architecture), num_experts=c.num_experts)
        tensors[name] = dataclasses.replace(t, qtype=qtype, data=QuantizedTensor(t, qtype, src.path))
    return dataclasses.replace(src, tensors=tensors)
