"""Stack an HF checkpoint's per-expert tensors into one [experts, out, in] tensor per layer and role.

HF mixture-of-experts checkpoints (Mixtral, Qwen3-MoE) hold each expert's gate/up/down projection as its own
tensor (`...experts.{e}.w1.weight`); GGUF and our weights hold each layer's experts stacked. gpt-oss's hold them
stacked but transposed ([experts, in, out]), gate and up interleaved in one `gate_up_proj` (gate the even
columns, up the odd ones, as transformers' GptOssExperts reads them) with its bias likewise: `split_gate_up`
turns them into the same per-role stacks and bias stacks. OpenAI's published gpt-oss checkpoints hold the
experts as MXFP4 instead (`gate_up_proj_blocks` U8 [experts, out, in / 32, 16] and `_scales` U8 [experts,
out, in / 32], not transposed; gate and up interleaved by rows): those become packed MXFP4 stacks, the
blocks re-laid out as llama.cpp's converter does (scale byte first; ggml's nibble order), bit for bit. Stacking here, at
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


class LazyView:
    """fn(*bases) of lazy tensors (each read as np.asarray(base)), computed when converted (np.asarray) or indexed."""

    __slots__ = ("_bases", "_fn", "shape", "dtype")

    def __init__(self, bases: tuple, fn, shape, dtype):
        self._bases, self._fn, self.shape, self.dtype = bases, fn, tuple(shape), dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * np.dtype(self.dtype).itemsize

    def __array__(self, dtype=None, copy=None):
        out = np.ascontiguousarray(self._fn(*(np.asarray(b) for b in self._bases)))
        return out if dtype is None else out.astype(dtype, copy=False)

    def __getitem__(self, key):
        return np.asarray(self)[key]


# gpt-oss's HF expert tensors (per layer, after model.layers.{i}.mlp.experts.) -> what they become:
# (role, the part: "even"/"odd" columns of the interleaved gate|up, or None, and whether it is transposed)
_GPTOSS_SPLIT = {"gate_up_proj": (("experts_gate", "even"), ("experts_up", "odd")),
                 "gate_up_proj_bias": (("experts_gate_bias", "even"), ("experts_up_bias", "odd")),
                 "down_proj": (("experts_down", None),), "down_proj_bias": (("experts_down_bias", None),)}


def mxfp4_from_openai(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """OpenAI's MXFP4 (blocks uint8 [..., G, 16]: value 2j in byte j's low nibble, 2j + 1 in its high one;
    scales uint8 [..., G], E8M0) -> ggml MXFP4 blocks uint8 [..., G * 17]: the scale byte, then 16 bytes
    with value j in byte j's low nibble and value j + 16 in its high one."""
    lo, hi = blocks & 0x0F, blocks >> 4
    values = np.stack([lo, hi], axis=-1).reshape(*blocks.shape[:-1], 32)
    qs = values[..., :16] | (values[..., 16:] << 4)
    return np.concatenate([scales[..., None], qs], axis=-1).reshape(*blocks.shape[:-2], -1)


def _mxfp4_pair(tensors, name: str, path):
    """The blocks / scales pair of `name` (e.g. ...experts.down_proj) as (blocks, scales) TensorSources, or None."""
    b, s = tensors.get(name + "_blocks"), tensors.get(name + "_scales")
    if b is None and s is None:
        return None
    if b is None or s is None:
        missing = name + ("_blocks" if b is None else "_scales")
        raise MissingTensorError(f"MXFP4 experts need both {name}_blocks and {name}_scales", path=path, tensor=missing)
    for t in (b, s):
        if t.qtype != "U8":
            raise ModelFormatError(f"MXFP4 {t.name.rsplit('_', 1)[1]} should be U8, got {t.qtype}", path=path,
                                   tensor=t.name)
    if len(b.shape) != 4 or b.shape[-1] != 16 or tuple(s.shape) != tuple(b.shape[:-1]):
        raise ModelFormatError(f"MXFP4 blocks {list(b.shape)} and scales {list(s.shape)}: expected [experts, rows, "
                               f"groups, 16] and [experts, rows, groups]", path=path, tensor=b.name)
    return b, s


def split_gate_up(tensors: dict[str, TensorSource], config: ModelConfig, path) -> dict[str, TensorSource]:
    """gpt-oss: each layer's fused, transposed expert tensors replaced by the stacks of our roles
    ([experts, out, in] matrices, [experts, out] biases), named by roles.tensor_name. Lazy, as the stacks.
    A fused tensor of the wrong rank or an odd gate|up width is a ModelFormatError naming it."""
    if config.architecture != "gptoss":
        return tensors
    out = dict(tensors)
    for layer in range(config.num_layers):
        for suffix, parts in _GPTOSS_SPLIT.items():
            fused = f"model.layers.{layer}.mlp.experts.{suffix}"
            pair = None if suffix.endswith("_bias") else _mxfp4_pair(tensors, fused, path)
            if pair is not None:
                b, s = pair
                if len(parts) == 2 and b.shape[1] % 2:
                    raise ModelFormatError(f"shape {list(b.shape)}: an odd number of interleaved gate|up rows",
                                           path=path, tensor=b.name)
                del out[b.name], out[s.name]
                e, rows, groups = b.shape[:3]
                for role, part in parts:
                    sel = slice(None) if part is None else slice(0 if part == "even" else 1, None, 2)
                    n = rows if part is None else rows // 2
                    fn = lambda bl, sc, sel=sel, e=e, n=n: mxfp4_from_openai(bl[:, sel], sc[:, sel]).reshape(e * n, -1)
                    new = tensor_name(role, "hf", layer, "gptoss")
                    data = LazyView((b.data, s.data), fn, (e * n, groups * 17), np.uint8)
                    out[new] = TensorSource(new, "MXFP4", (e, n, groups * 32), data)
                continue
            name = f"model.layers.{layer}.mlp.experts.{suffix}"
            t = tensors.get(name)
            if t is None:
                continue   # validation names the role's tensor missing
            bias = suffix.endswith("_bias")
            shape = tuple(t.shape)
            if len(shape) != (2 if bias else 3) or (parts[0][1] is not None and shape[-1] % 2):
                raise ModelFormatError(f"shape {list(shape)}: expected [experts, {'' if bias else 'in, '}"
                                       f"{'2 * out (gate and up interleaved)' if len(parts) == 2 else 'out'}]",
                                       path=path, tensor=name)
            del out[name]
            for role, part in parts:
                cols = slice(None) if part is None else slice(0 if part == "even" else 1, None, 2)
                width = shape[-1] if part is None else shape[-1] // 2
                if bias:
                    fn, new_shape = (lambda a, c=cols: a[..., c]), (shape[0], width)
                else:   # [experts, in, out] -> [experts, out, in]
                    fn, new_shape = (lambda a, c=cols: np.swapaxes(a[..., c], 1, 2)), (shape[0], width, shape[1])
                new = tensor_name(role, "hf", layer, "gptoss")
                out[new] = TensorSource(new, t.qtype, new_shape, LazyView((t.data,), fn, new_shape, t.data.dtype))
    return out


def stack_experts(tensors: dict[str, TensorSource], config: ModelConfig, path) -> dict[str, TensorSource]:
    """`tensors` with each layer's per-expert tensors replaced by their stack. A ModelFormatError names the
    tensor when an expert index is at or past the config's expert count, and a MissingTensorError names
    the first missing expert tensor; experts of one role must agree in type and shape."""
    if not config.moe:
        return tensors
    arch, n = config.architecture, config.num_experts
    out = dict(tensors)
    patterns = {}
    per_expert = [r for r in EXPERT_ROLES if "{e}" in (roles_of(arch)[r].hf or "")]
    if not per_expert:
        return tensors   # the checkpoint holds the stacks themselves (gpt-oss: split_gate_up)
    for role in per_expert:
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
