"""Stack an HF checkpoint's per-expert tensors into one [experts, out, in] tensor per layer and role.

HF mixture-of-experts checkpoints (Mixtral, Qwen3-MoE) hold each expert's gate/up/down projection as its own
tensor (`...experts.{e}.w1.weight`); GGUF and our weights hold each layer's experts stacked. Stacking here, at
open, lets everything after it (validation, the weights builder, inspect, convert) see one 3-D tensor per
role, named as llama.cpp's converter names the merged tensor (roles.stacked). The stack is lazy: the expert
tensors are read only when it is converted.
"""
from __future__ import annotations

import math
import re

import numpy as np

from ..config import ModelConfig
from ..errors import MissingTensorError, ModelFormatError
from .roles import EXPERT_ROLES, expert_tensor_name, roles_of, tensor_name
from .source import TensorSource


class LazyStack:
    """Expert tensors stacked on a new first axis, read when converted (np.asarray) or indexed."""

    __slots__ = ("_parts", "shape", "dtype")

    def __init__(self, parts: list):
        self._parts = parts
        self.shape = (len(parts), *parts[0].shape)
        self.dtype = parts[0].dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * np.dtype(self.dtype).itemsize

    def __array__(self, dtype=None, copy=None):
        out = np.stack([np.asarray(p) for p in self._parts])
        return out if dtype is None else out.astype(dtype, copy=False)

    def __getitem__(self, key):
        return np.asarray(self)[key]


def stack_experts(tensors: dict[str, TensorSource], config: ModelConfig, path) -> dict[str, TensorSource]:
    """`tensors` with each layer's per-expert tensors replaced by their stack. A ModelFormatError names the
    tensor when an expert index is at or past the config's expert count, and a MissingTensorError names
    the first missing expert tensor; experts of one role must agree in type and shape."""
    if not config.moe:
        return tensors
    arch, n = config.architecture, config.num_experts
    out = dict(tensors)
    patterns = {}
    for role in EXPERT_ROLES:
        template = roles_of(arch)[role].hf
        regex = re.escape(template).replace(r"\{i\}", r"(\d+)").replace(r"\{e\}", r"(\d+)")
        patterns[role] = re.compile(regex + "$")
    for name in tensors:
        for role, pattern in patterns.items():
            m = pattern.match(name)
            if m and int(m.group(2)) >= n:
                raise ModelFormatError(f"expert {int(m.group(2))} of layer {int(m.group(1))}, but the config says "
                                       f"{n} experts (num_experts / num_local_experts)", path=path, tensor=name)
    for layer in range(config.num_layers):
        for role in EXPERT_ROLES:
            names = [expert_tensor_name(role, layer, e, arch) for e in range(n)]
            present = [x for x in names if x in tensors]
            if not present:
                continue   # validation reports the whole role missing
            absent = [x for x in names if x not in tensors]
            if absent:
                raise MissingTensorError(f"{len(absent)} of the {n} expert tensors of layer {layer} are missing, "
                                         f"first: {absent[0]}", path=path, tensor=absent[0])
            parts = [tensors[x] for x in names]
            first = parts[0]
            for p in parts[1:]:
                if p.qtype != first.qtype or tuple(p.shape) != tuple(first.shape):
                    raise ModelFormatError(f"{p.qtype} {list(p.shape)} but expert 0 ({first.name}) is {first.qtype} "
                                           f"{list(first.shape)}", path=path, tensor=p.name)
            for x in names:
                del out[x]
            name = tensor_name(role, "hf", layer, arch)
            out[name] = TensorSource(name, first.qtype, (n, *first.shape), LazyStack([p.data for p in parts]))
    return out
