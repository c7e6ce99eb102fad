"""Open a GGUF file (v2/v3) as a validated ModelSource, memory-mapped.

The header is parsed here, not by gguf-py's GGUFReader: that reader trusts every length (a lying array
count makes it loop for ever, a lying dimension makes numpy allocate at random), and even on honest files
it spends ~30 us and ~1.5 kB per array element (a 30 MB file of 2M empty strings: 58 s, 3.3 GB; 300k tiny
tensors: 50 s, 1.9 GB). `_prescan` walks the header once with every length bounded by the file size and the
element count bounded by MAX_METADATA_ELEMENTS, decodes the metadata values, checks each tensor's type,
shape and byte range (in the file, not overlapping another's) and that the tensor count is one a model of
the file's block_count can use. Nothing is read into RAM but the header: tensor data are views of one
np.memmap of the file.
"""
from __future__ import annotations

import logging
import math
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from ..config import ConfigValueError, ModelConfig, RopeScaling
from ..errors import DamagedFileError, ModelFormatError, UnsupportedQuantError
from ..quant.types import qtype_info
from .files import open_regular
from .roles import GLOBAL_ROLES, LAYER_ROLES, canonical_architecture
from .source import ModelSource, TensorSource

GGUF_MAGIC = b"GGUF"
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_ARRAY_NESTING = 4
# Array elements over the whole header: a 262k-token vocabulary with scores, types and ~500k merges has ~1.3M.
# Parsed values cost ~60 bytes each, so this bounds the metadata to ~0.5 GB whatever the file holds.
MAX_METADATA_ELEMENTS = 2**23
# value type id -> struct format of a scalar (gguf spec); 8 = string, 9 = array
_SCALAR_FMT = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_SCALAR_SIZES = {t: struct.calcsize("<" + f) for t, f in _SCALAR_FMT.items()}
_NUMPY = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "<u1", 10: "<u8", 11: "<i8",
          12: "<f8"}
_STRING, _ARRAY, _UINT32, _FLOAT32, _BOOL = 8, 9, 4, 6, 7
_GGML_TYPES = {t.value: (t.name, *GGML_QUANT_SIZES[t]) for t in GGMLQuantizationType}  # id -> name, block, bytes
_MIN_KV_BYTES = 8 + 4 + 1  # empty key, type, one-byte value
_MIN_TENSOR_INFO_BYTES = 8 + 4 + 8 + 4 + 8  # empty name, n_dims, one dim, type, offset
# Tensors a model of n blocks can hold: every global role (+ ignorable extras) and every per-layer role.
_MAX_GLOBAL_TENSORS, _MAX_LAYER_TENSORS = len(GLOBAL_ROLES) + 8, len(LAYER_ROLES) + 8

# Keys we write for llama3 rope scaling: llama.cpp encodes it only as the rope_freqs.weight tensor,
# from which low/high_freq_factor and the original context cannot be recovered exactly.
REALIZAR_ROPE_PREFIX = "realizar.rope.scaling."
logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class _TensorInfo:
    name: str
    dims: tuple[int, ...]  # ggml order: dims[0] is the row length
    qtype: str
    offset: int  # relative to the data section
    nbytes: int


class _Cursor:
    """Bounds-checked little-endian reads from a buffer."""

    def __init__(self, buf, path):
        self.buf, self.pos, self.size, self.path = buf, 0, len(buf), path
        self.elements_left = MAX_METADATA_ELEMENTS

    def need(self, n: int, what: str):
        if n < 0 or self.pos + n > self.size:
            raise DamagedFileError(f"truncated header: {what} at byte {self.pos} needs {n} bytes "
                                   f"but the file has {self.size}", path=self.path)

    def unpack(self, fmt: str, what: str):
        n = struct.calcsize(fmt)
        self.need(n, what)
        value = struct.unpack_from("<" + fmt, self.buf, self.pos)[0]
        self.pos += n
        return value

    def string(self, what: str) -> bytes:
        n = self.unpack("Q", f"length of {what}")
        self.need(n, what)
        value = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        return value

    def text(self, what: str) -> str:
        return _decode(self.string(what), what, self.path)

    def value(self, vtype: int, what: str, depth: int = 0):
        """The value of type `vtype` at the cursor, as gguf-py's ReaderField.contents() gives it (str, int,
        float, bool, or a list of them); a float32 scalar as the shortest decimal that round-trips."""
        if vtype in _SCALAR_FMT:
            value = self.unpack(_SCALAR_FMT[vtype], what)
            if vtype == _FLOAT32:
                value = float(str(np.float32(value)))  # 1e-05, not 9.99999974e-06
            return value
        if vtype == _STRING:
            return self.text(what)
        if vtype != _ARRAY:
            raise DamagedFileError(f"{what}: unknown value type {vtype}", path=self.path)
        if depth >= MAX_ARRAY_NESTING:
            raise DamagedFileError(f"{what}: arrays nested deeper than {MAX_ARRAY_NESTING}", path=self.path)
        itype = self.unpack("I", f"element type of {what}")
        count = self.unpack("Q", f"length of {what}")
        if itype not in _SCALAR_FMT and itype not in (_STRING, _ARRAY):
            raise DamagedFileError(f"{what}: unknown array element type {itype}", path=self.path)
        min_item = _SCALAR_SIZES.get(itype, 8 if itype == _STRING else 12)
        self.need(count * min_item, f"{count} elements of {what}")
        if count > self.elements_left:
            raise DamagedFileError(f"{what}: {count} array elements, more than the {MAX_METADATA_ELEMENTS} the "
                                   f"whole header may hold", path=self.path)
        self.elements_left -= count
        if itype in _SCALAR_FMT:
            if not count:
                return []
            values = np.frombuffer(self.buf, _NUMPY[itype], count, self.pos)
            self.pos += count * min_item
            return (values != 0).tolist() if itype == _BOOL else values.tolist()
        if itype == _STRING:
            return self._strings(count, what)
        return [self.value(itype, what, depth + 1) for _ in range(count)]

    def _strings(self, count: int, what: str) -> list[str]:
        """`count` strings at the cursor: the vocabulary's hot loop, so it checks bounds inline."""
        buf, pos, size, unpack_from = self.buf, self.pos, self.size, struct.unpack_from
        out = []
        for _ in range(count):
            if pos + 8 > size:
                self.pos = pos
                self.need(8, f"length of an element of {what}")
            (n,) = unpack_from("<Q", buf, pos)
            pos += 8
            if pos + n > size:
                self.pos = pos
                self.need(n, f"an element of {what}")
            out.append(buf[pos:pos + n])
            pos += n
        self.pos = pos
        try:
            return [raw.decode("utf-8") for raw in out]
        except UnicodeDecodeError:
            bad = next(i for i, raw in enumerate(out) if not _utf8(raw))
            raise DamagedFileError(f"{what}[{bad}] is not valid UTF-8: {out[bad][:40]!r}", path=self.path) from None


def _utf8(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def _decode(raw: bytes, what: str, path) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise DamagedFileError(f"{what} is not valid UTF-8: {raw[:40]!r}", path=path) from None


def _max_tensors(metadata: dict) -> int | None:
    """How many tensors a model with this metadata's block count can use, or None if it gives none."""
    arch = metadata.get("general.architecture")
    layers = metadata.get(f"{arch}.block_count") if isinstance(arch, str) else None
    if isinstance(layers, bool) or not isinstance(layers, int) or layers < 0:
        return None
    return _MAX_GLOBAL_TENSORS + _MAX_LAYER_TENSORS * layers


def _prescan(buf, path) -> tuple[list[_TensorInfo], int, dict]:
    """Validate the header against the file size. Returns the tensor infos, the data offset and the metadata."""
    c = _Cursor(buf, path)
    c.need(4, "magic")
    if bytes(buf[:4]) != GGUF_MAGIC:
        raise DamagedFileError(f"not a GGUF file (magic {bytes(buf[:4])!r}, expected b'GGUF')", path=path)
    c.pos = 4
    version = c.unpack("I", "version")
    if version not in (2, 3):
        if struct.unpack(">I", struct.pack("<I", version))[0] in (2, 3):
            raise ModelFormatError("big-endian GGUF files are not supported", path=path)
        raise DamagedFileError(f"unsupported GGUF version {version} (supported: 2, 3)", path=path)
    n_tensors = c.unpack("Q", "tensor count")
    n_kv = c.unpack("Q", "key/value count")
    if n_tensors * _MIN_TENSOR_INFO_BYTES > c.size or n_kv * _MIN_KV_BYTES > c.size:
        raise DamagedFileError(f"header claims {n_tensors} tensors and {n_kv} metadata keys, more than "
                               f"a {c.size}-byte file can hold", path=path)
    alignment = 32
    metadata = {}
    for i in range(n_kv):
        key = c.text(f"key #{i}")
        if key in metadata:
            raise DamagedFileError(f"duplicate metadata key {key!r:.80}", path=path)
        vtype = c.unpack("I", f"type of {key!r}")
        metadata[key] = value = c.value(vtype, f"value of {key!r}")
        if key == "general.alignment":
            if vtype != _UINT32:
                raise DamagedFileError("general.alignment must be a uint32", path=path)
            alignment = value
            if alignment == 0 or alignment & (alignment - 1):
                raise DamagedFileError(f"general.alignment {alignment} is not a power of two", path=path)
    limit = _max_tensors(metadata)
    if limit is not None and n_tensors > limit:
        arch = metadata["general.architecture"]
        raise DamagedFileError(f"header claims {n_tensors} tensors, but a model of {arch}.block_count = "
                               f"{metadata[f'{arch}.block_count']} blocks has at most {limit}", path=path)
    infos, names = [], set()
    unpack_from = struct.unpack_from
    for i in range(n_tensors):  # the hot loop of a many-tensor file: messages are built only on failure
        pos = c.pos
        if pos + 8 > c.size:
            c.need(8, f"length of name of tensor #{i}")
        (n,) = unpack_from("<Q", buf, pos)
        if pos + 8 + n + 4 > c.size:
            c.string(f"name of tensor #{i}")
            c.need(4, f"n_dims of tensor #{i}")
        name = _decode(bytes(buf[pos + 8:pos + 8 + n]), f"name of tensor #{i}", path)
        if name in names:
            raise DamagedFileError("duplicate tensor name", path=path, tensor=name)
        names.add(name)
        (n_dims,) = unpack_from("<I", buf, pos + 8 + n)
        if not 1 <= n_dims <= MAX_DIMS:
            raise DamagedFileError(f"{n_dims} dimensions (must be 1..{MAX_DIMS})", path=path, tensor=name)
        c.pos = pos + 8 + n + 4
        if c.pos + 8 * n_dims + 12 > c.size:
            c.need(8 * n_dims + 12, f"dims, type and offset of {name!r}")
        dims = unpack_from(f"<{n_dims}Q", buf, c.pos)
        type_id, offset = unpack_from("<IQ", buf, c.pos + 8 * n_dims)
        c.pos += 8 * n_dims + 12
        gtype = _GGML_TYPES.get(type_id)
        if gtype is None:
            raise UnsupportedQuantError(f"unknown ggml type id {type_id}", path=path, tensor=name)
        if min(dims) < 1:
            raise DamagedFileError(f"dimension of size 0 in {list(dims)}", path=path, tensor=name)
        qtype, block, type_size = gtype
        if dims[0] % block:
            raise DamagedFileError(f"row length {dims[0]} is not a multiple of the {qtype} block size "
                                   f"{block}", path=path, tensor=name)
        nbytes = math.prod(dims) // block * type_size
        if offset % alignment:
            raise DamagedFileError(f"data offset {offset} is not a multiple of the alignment {alignment}",
                                   path=path, tensor=name)
        infos.append(_TensorInfo(name, dims, qtype, offset, nbytes))
    data_offset = -(-c.pos // alignment) * alignment
    for t in infos:
        if data_offset + t.offset + t.nbytes > c.size:
            raise DamagedFileError(
                f"data ({t.nbytes} bytes of {t.qtype} {list(t.dims)}) at offset {t.offset} runs past the end "
                f"of the file ({max(0, c.size - data_offset)} bytes of tensor data)", path=path, tensor=t.name)
    prev = None
    for t in sorted(infos, key=lambda t: t.offset):  # one byte, one tensor: aliased data is damage, not sharing
        if prev is not None and t.offset < prev.offset + prev.nbytes:
            raise DamagedFileError(f"data of {prev.name!r} (bytes {prev.offset}..{prev.offset + prev.nbytes}) and "
                                   f"{t.name!r} (from byte {t.offset}) overlap", path=path, tensor=t.name)
        prev = t
    for qtype in dict.fromkeys(t.qtype for t in infos):  # structure is sound; now what we cannot read
        qtype_info(qtype, path=path, tensor=next(t.name for t in infos if t.qtype == qtype))
    return infos, data_offset, metadata


def _tensor_sources(data: np.ndarray, infos: list[_TensorInfo], data_offset: int) -> dict[str, TensorSource]:
    out = {}
    for info in infos:
        shape = tuple(reversed(info.dims))
        start = data_offset + info.offset
        flat = data[start:start + info.nbytes]
        qinfo = qtype_info(info.qtype)
        if qinfo.is_dense:
            array = flat.view(qinfo.dtype).reshape(shape)
        else:
            rows = math.prod(shape[:-1])
            array = flat.reshape(rows, info.nbytes // rows)
        out[info.name] = TensorSource(info.name, info.qtype, shape, array)
    return out


def _scan_file(path: Path):
    """(infos, data offset, metadata, np.memmap of the whole file) of the GGUF file `path`."""
    f, size = open_regular(path)  # a regular file, or a DamagedFileError naming what it is
    with f:
        if size < 24:
            raise DamagedFileError(f"file is {size} bytes, too short for a GGUF header", path=path)
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            infos, data_offset, metadata = _prescan(buf, path)
        data = np.memmap(f, dtype=np.uint8, mode="r", shape=(size,)).view(np.ndarray)  # plain views: cheaper
    return infos, data_offset, metadata, data


def read_gguf_metadata(path) -> dict:
    """The metadata key/values of the GGUF file `path`, checked as open_gguf checks them."""
    return _scan_file(Path(path))[2]


def open_gguf(path) -> ModelSource:
    """Open and validate a GGUF file; tensors stay memory-mapped. Raises ModelFormatError subclasses."""
    path = Path(path)
    infos, data_offset, metadata, data = _scan_file(path)
    tensors = _tensor_sources(data, infos, data_offset)
    config = config_from_gguf(metadata, tensors, path)
    source = ModelSource(path=path, format="gguf", config=config, tensors=tensors, metadata=metadata)
    from .validate import validate_roles
    validate_roles(source)
    return source


# ---- ModelConfig from metadata ------------------------------------------------------------------

def _get(meta, key, kind, path, default=None, required=False):
    if key not in meta:
        if required:
            raise DamagedFileError(f"metadata key {key!r} is missing", path=path)
        return default
    value = meta[key]
    ok = {"int": isinstance(value, int) and not isinstance(value, bool),
          "float": isinstance(value, (int, float)) and not isinstance(value, bool),
          "str": isinstance(value, str), "bool": isinstance(value, bool)}[kind]
    if not ok:
        raise DamagedFileError(f"metadata {key!r} should be {kind}, got {value!r:.60}", path=path)
    return float(value) if kind == "float" else value


def _factors(tensors, name, path) -> tuple[float, ...]:
    t = tensors[name]
    if t.qtype != "F32" or len(t.shape) != 1:
        raise DamagedFileError(f"{name} should be a 1-D F32 tensor, got {t.qtype} {t.shape}", path=path, tensor=name)
    values = np.asarray(t.data, np.float64)
    bad = ~np.isfinite(values) | (values <= 0)
    if bad.any():
        raise DamagedFileError(f"{name}[{int(np.argmax(bad))}] = {float(values[np.argmax(bad)])} (frequency divisors "
                               f"must be finite and > 0)", path=path, tensor=name)
    return tuple(float(v) for v in values.astype(np.float32))


def _longrope(meta, arch_key, tensors, path, context) -> RopeScaling:
    """Phi-3's longrope from llama.cpp's rope_factors_long/short tensors and rope.scaling keys."""
    names = ("rope_factors_short.weight", "rope_factors_long.weight")
    absent = [n for n in names if n not in tensors]
    if absent:
        raise DamagedFileError(f"{absent[0]} is missing (longrope needs both factor tensors)", path=path,
                               tensor=absent[0])
    short, long = (_factors(tensors, n, path) for n in names)
    original = _get(meta, f"{arch_key}.rope.scaling.original_context_length", "int", path, default=context)
    factor = context / original if isinstance(original, int) and original > 0 else 1.0
    attention = _get(meta, f"{arch_key}.rope.scaling.attn_factor", "float", path, default=None)
    if attention is None:   # what transformers computes from the two context lengths
        attention = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    return RopeScaling("longrope", factor=factor, original_context_length=original, short_factor=short,
                       long_factor=long, attention_factor=attention)


def _rope_scaling(meta, arch_key, tensors, path, head_dim) -> RopeScaling | None:
    if "rope_factors_long.weight" in tensors or "rope_factors_short.weight" in tensors:
        context = _get(meta, f"{arch_key}.context_length", "int", path, default=2048)
        return _longrope(meta, arch_key, tensors, path, context)
    kind = _get(meta, f"{arch_key}.rope.scaling.type", "str", path, default=None)
    factor_key = f"{arch_key}.rope.scaling.factor"
    if kind is None and f"{arch_key}.rope.scale_linear" in meta:  # older llama.cpp files
        kind, factor_key = "linear", f"{arch_key}.rope.scale_linear"
    factor = _get(meta, factor_key, "float", path, default=None)
    if kind == "yarn":
        return _yarn(meta, arch_key, path, factor)
    if kind not in (None, "none", "linear"):
        raise ModelFormatError(f"rope scaling type {kind!r:.40} is not supported (supported: linear, llama3, yarn)",
                               path=path)
    freqs = tensors.get("rope_freqs.weight")
    if freqs is not None:  # the weights builder divides by these: check them whatever the scaling type
        if freqs.qtype != "F32" or len(freqs.shape) != 1:
            raise DamagedFileError(f"rope_freqs.weight should be a 1-D F32 tensor, got {freqs.qtype} "
                                   f"{freqs.shape}", path=path, tensor=freqs.name)
        values = np.asarray(freqs.data, np.float64)
        bad = ~np.isfinite(values) | (values <= 0)
        if bad.any():
            i = int(np.argmax(bad))
            raise DamagedFileError(f"rope_freqs.weight[{i}] = {float(values[i])} (frequency divisors must be finite "
                                   f"and > 0)", path=path, tensor=freqs.name)
    if kind == "linear" and factor is not None and factor != 1.0:
        if freqs is not None:
            raise DamagedFileError("linear rope scaling and a rope_freqs.weight tensor: the model would apply "
                                   "only the tensor", path=path, tensor=freqs.name)
        try:
            return RopeScaling("linear", factor=factor)
        except ConfigValueError as e:
            raise DamagedFileError(f"metadata {factor_key} = {e.value!r} {e.why}", path=path) from None
    if freqs is None:
        return None
    p = REALIZAR_ROPE_PREFIX
    scaling = RopeScaling("llama3",
                          factor=_get(meta, p + "factor", "float", path, default=float(values.max())),
                          low_freq_factor=_get(meta, p + "low_freq_factor", "float", path, default=1.0),
                          high_freq_factor=_get(meta, p + "high_freq_factor", "float", path, default=4.0),
                          original_context_length=_get(meta, p + "original_context_length", "int", path,
                                                       default=8192))
    if p + "factor" not in meta and values.size * 2 == head_dim:
        # llama.cpp files carry only the factors; we assumed Llama 3.1's low/high/original context.
        theta = _get(meta, f"{arch_key}.rope.freq_base", "float", path, default=10000.0)
        if not np.allclose(llama3_rope_factors(head_dim, theta, scaling), values, rtol=1e-4):
            logger.warning("%s: rope_freqs.weight differs from llama3 scaling with %s; the model will use the "
                           "config's scaling", path, scaling)
    return scaling


# Our key for YaRN's `truncate` (transformers rounds the ramp's ends outwards unless a config says false, as
# gpt-oss's does; llama.cpp always rounds): absent, gpt-oss files follow transformers' gpt-oss, others round.
REALIZAR_YARN_TRUNCATE = REALIZAR_ROPE_PREFIX + "yarn_truncate"
REALIZAR_ATTENTION_FACTOR = REALIZAR_ROPE_PREFIX + "attention_factor"


def _yarn(meta, arch_key, path, factor) -> RopeScaling:
    """YaRN from llama.cpp's rope.scaling keys (factor, original context, yarn_beta_fast / _slow) and ours
    (the attention factor where it is not YaRN's default for the factor, truncate)."""
    from ..config import yarn_attention_factor
    key = lambda name, kind, **kw: _get(meta, f"{arch_key}.{name}", kind, path, **kw)   # noqa: E731
    original = key("rope.scaling.original_context_length", "int", required=True)
    factor = 1.0 if factor is None else factor
    attention = _get(meta, REALIZAR_ATTENTION_FACTOR, "float", path, default=None)
    truncate = _get(meta, REALIZAR_YARN_TRUNCATE, "bool", path, default=arch_key != "gpt-oss")
    try:
        return RopeScaling("yarn", factor=factor, original_context_length=original,
                           beta_fast=key("rope.scaling.yarn_beta_fast", "float", default=32.0),
                           beta_slow=key("rope.scaling.yarn_beta_slow", "float", default=1.0), truncate=truncate,
                           attention_factor=yarn_attention_factor(factor) if attention is None else attention)
    except ConfigValueError as e:
        where = {"rope_scaling.attention_factor": REALIZAR_ATTENTION_FACTOR, "rope_scaling.truncate": REALIZAR_YARN_TRUNCATE,
                 "rope_scaling.beta_fast": f"{arch_key}.rope.scaling.yarn_beta_fast",
                 "rope_scaling.beta_slow": f"{arch_key}.rope.scaling.yarn_beta_slow"}.get(
                     e.field, f"{arch_key}.rope.scaling.{e.field.removeprefix('rope_scaling.')}")
        raise DamagedFileError(f"metadata {where} = {e.value!r:.60} {e.why}", path=path) from None


def llama3_rope_factors(head_dim: int, theta: float, scaling: RopeScaling) -> np.ndarray:
    """Per-frequency divisors of RoPE's inverse frequencies for llama3 scaling (rope_freqs.weight), computed
    as llama.cpp's convert_hf_to_gguf.py does."""
    freqs = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    low_wavelen = scaling.original_context_length / scaling.low_freq_factor
    high_wavelen = scaling.original_context_length / scaling.high_freq_factor
    out = []
    for f in freqs:
        wavelen = 2 * math.pi / f
        if wavelen < high_wavelen:
            out.append(1.0)
        elif wavelen > low_wavelen:
            out.append(scaling.factor)
        else:
            smooth = ((scaling.original_context_length / wavelen - scaling.low_freq_factor)
                      / (scaling.high_freq_factor - scaling.low_freq_factor))
            out.append(1.0 / ((1 - smooth) / scaling.factor + smooth))
    return np.asarray(out, np.float32)


# ModelConfig field -> the `{arch}.` metadata key it comes from, for error messages
_GGUF_KEYS = {"sliding_window": "attention.sliding_window", "attn_softcap": "attn_logit_softcapping",
              "final_softcap": "final_logit_softcapping", "rope_local_theta": "rope.freq_base_swa",
              "rope_dim": "rope.dimension_count",
              "hidden_size": "embedding_length", "num_layers": "block_count", "num_heads": "attention.head_count",
              "num_kv_heads": "attention.head_count_kv", "head_dim": "attention.key_length",
              "intermediate_size": "feed_forward_length", "norm_eps": "attention.layer_norm_rms_epsilon",
              "rope_theta": "rope.freq_base", "context_length": "context_length",
              "num_experts": "expert_count", "experts_per_token": "expert_used_count",
              "expert_intermediate_size": "expert_feed_forward_length"}


def config_from_gguf(meta: dict, tensors: dict[str, TensorSource], path) -> ModelConfig:
    """Build the ModelConfig from `{arch}.*` and `tokenizer.ggml.*` metadata plus tensor shapes."""
    arch_key = _get(meta, "general.architecture", "str", path, required=True)
    arch = canonical_architecture(arch_key, path=path)

    def key(name, kind, **kw):
        return _get(meta, f"{arch_key}.{name}", kind, path, **kw)

    if arch == "llama" and (key("expert_count", "int", default=0) or "blk.0.ffn_gate_inp.weight" in tensors):
        arch = "mixtral"   # llama.cpp writes Mixtral as a llama with experts
    layers = key("block_count", "int", required=True)
    if not 0 < layers <= len(tensors):
        raise DamagedFileError(f"block_count {layers} is impossible for a file with {len(tensors)} tensors",
                               path=path)
    hidden = key("embedding_length", "int", required=True)
    heads = key("attention.head_count", "int", required=True)
    if heads <= 0 or hidden <= 0:
        raise DamagedFileError(f"embedding_length {hidden} / head_count {heads} must be positive", path=path)
    head_dim = key("attention.key_length", "int", default=None)
    if head_dim is None:
        if hidden % heads:
            raise DamagedFileError(f"embedding_length {hidden} is not a multiple of head_count {heads} and "
                                   f"attention.key_length is not given", path=path)
        head_dim = hidden // heads
    embd = tensors.get("token_embd.weight")
    tokens = meta.get("tokenizer.ggml.tokens")
    if embd is not None and len(embd.shape) == 2:
        vocab = embd.shape[0]
    elif isinstance(tokens, list) and tokens:
        vocab = len(tokens)
    else:
        vocab = key("vocab_size", "int", required=True)
    eos = [meta.get(f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot", "eom")]
    eos_ids = tuple(dict.fromkeys(i for i in eos if isinstance(i, int) and not isinstance(i, bool)))
    bos = _get(meta, "tokenizer.ggml.bos_token_id", "int", path, default=None)
    add_bos = _get(meta, "tokenizer.ggml.add_bos_token", "bool", path, default=None)
    try:
        return ModelConfig(
            architecture=arch,
            vocab_size=vocab,
            hidden_size=hidden,
            num_layers=layers,
            num_heads=heads,
            num_kv_heads=key("attention.head_count_kv", "int", default=heads),
            head_dim=head_dim,
            intermediate_size=key("feed_forward_length", "int", required=True),
            norm_eps=key("attention.layer_norm_rms_epsilon", "float", default=1e-5),
            rope_theta=key("rope.freq_base", "float", default=10000.0),
            rope_scaling=_rope_scaling(meta, arch_key, tensors, path, head_dim),
            context_length=key("context_length", "int", default=2048),
            tie_embeddings="output.weight" not in tensors,
            qkv_bias="blk.0.attn_q.bias" in tensors,
            attn_out_bias="blk.0.attn_output.bias" in tensors,
            qk_norm="blk.0.attn_q_norm.weight" in tensors,
            bos_token_id=bos,
            eos_token_ids=eos_ids,
            add_bos=default_add_bos(arch, bos) if add_bos is None else add_bos,
            **_family_fields(meta, arch, arch_key, layers, hidden, heads, head_dim, path),
            **_moe_fields(meta, arch, arch_key, path),
        )
    except ModelFormatError:
        raise
    except ConfigValueError as e:
        if e.field.startswith("rope_scaling."):  # llama3: our keys, or the largest rope_freqs.weight entry
            where = REALIZAR_ROPE_PREFIX + e.field[13:]
            where = where if where in meta else "max(rope_freqs.weight)"
        else:
            where = {"vocab_size": "token_embd.weight rows", "bos_token_id": "tokenizer.ggml.bos_token_id",
                     "eos_token_ids": "tokenizer.ggml.eos_token_id (or eot/eom)",
                     "query_pre_attn_scalar": REALIZAR_QUERY_SCALAR}.get(e.field)
            where = where or f"{arch_key}.{_GGUF_KEYS.get(e.field, e.field)}"
        raise DamagedFileError(f"metadata {where} = {e.value!r:.60} {e.why}", path=path) from None
    except ValueError as e:  # ModelConfig's own consistency checks
        raise DamagedFileError(f"inconsistent model metadata: {e}", path=path) from None


# Keys we write where llama.cpp derives a value by its own rule (Gemma's attention scale from the model size)
REALIZAR_QUERY_SCALAR = "realizar.attention.query_pre_attn_scalar"
REALIZAR_SWIGLU = "realizar.swiglu_"   # + limit / alpha: gpt-oss's clamped SwiGLU (llama.cpp fixes 7.0 / 1.702)
# llama.cpp's fixed layer patterns (every n-th layer attends globally) and defaults, by architecture
GEMMA_SWA_PATTERN = {"gemma2": 2, "gemma3": 6}
SWA_PATTERN = {**GEMMA_SWA_PATTERN, "gptoss": 2}
GEMMA_27B_LAYERS = {"gemma2": 46, "gemma3": 62}


def llamacpp_query_scalar(arch: str, layers: int, hidden: int, heads: int, head_dim: int) -> float:
    """The query_pre_attn_scalar llama.cpp assumes for a Gemma model (hidden / heads for the 27B sizes)."""
    return float(hidden // heads if layers == GEMMA_27B_LAYERS.get(arch) else head_dim)


def _family_fields(meta, arch, arch_key, layers, hidden, heads, head_dim, path) -> dict:
    """The ModelConfig fields beyond the llama block, from the keys llama.cpp's converter writes."""
    def key(name, kind, **kw):
        return _get(meta, f"{arch_key}.{name}", kind, path, **kw)

    fields = {}
    window = key("attention.sliding_window", "int", default=4096 if arch == "gemma2" else None)
    if window is not None and window > 0:
        fields["sliding_window"] = window
        pattern = meta.get(f"{arch_key}.attention.sliding_window_pattern")
        if pattern is None and arch in SWA_PATTERN:
            pattern = SWA_PATTERN[arch]
        if isinstance(pattern, int) and not isinstance(pattern, bool) and pattern > 0:
            pattern = [bool((i + 1) % pattern) for i in range(layers)]   # llama.cpp's set_swa_pattern(n)
        if pattern is not None:
            if not (isinstance(pattern, list) and len(pattern) == layers and all(isinstance(b, bool) for b in pattern)):
                raise DamagedFileError(f"metadata {arch_key}.attention.sliding_window_pattern = {pattern!r:.60} must "
                                       f"be a positive integer or {layers} booleans", path=path)
            fields["layer_types"] = tuple("sliding_attention" if b else "full_attention" for b in pattern)
    dim = key("rope.dimension_count", "int", default=None)
    if dim is not None and dim != head_dim:
        fields["rope_dim"] = dim
    if arch in GEMMA_SWA_PATTERN:
        fields["final_softcap"] = key("final_logit_softcapping", "float", default=30.0 if arch == "gemma2" else None)
        if arch == "gemma2":   # llama.cpp soft-caps Gemma 2's attention always (50 unless the key says)
            fields["attn_softcap"] = key("attn_logit_softcapping", "float", default=50.0)
        fields["query_pre_attn_scalar"] = _get(meta, REALIZAR_QUERY_SCALAR, "float", path, default=None) or \
            llamacpp_query_scalar(arch, layers, hidden, heads, head_dim)
        for name in ("final_softcap", "attn_softcap"):
            if fields.get(name) == 0.0:
                fields[name] = None
    if arch == "gemma3":
        fields["rope_local_theta"] = key("rope.freq_base_swa", "float", default=10000.0)
    return fields


def _moe_fields(meta, arch, arch_key, path) -> dict:
    """The mixture-of-experts fields from llama.cpp's expert keys. Whether the chosen experts' weights are
    renormalized: our `expert_weights_norm` key where written, else llama.cpp's rule (its llama and qwen3moe
    graphs always renormalize)."""
    if arch not in ("mixtral", "qwen3moe", "gptoss"):
        return {}

    def key(name, kind, **kw):
        return _get(meta, f"{arch_key}.{name}", kind, path, **kw)

    if arch == "gptoss":   # llama.cpp's gpt-oss graph: biases, sinks, top-k then softmax, SwiGLU limit 7, alpha 1.702
        return dict(num_experts=key("expert_count", "int", required=True),
                    experts_per_token=key("expert_used_count", "int", required=True),
                    expert_intermediate_size=key("expert_feed_forward_length", "int", default=None),
                    moe_router="topk_softmax", moe_bias=True, attn_sinks=True,
                    swiglu_limit=_get(meta, REALIZAR_SWIGLU + "limit", "float", path, default=7.0),
                    swiglu_alpha=_get(meta, REALIZAR_SWIGLU + "alpha", "float", path, default=1.702))

    fields = dict(num_experts=key("expert_count", "int", required=True),
                  experts_per_token=key("expert_used_count", "int", required=True),
                  norm_topk_prob=key("expert_weights_norm", "bool", default=True))
    if arch == "qwen3moe":
        fields["expert_intermediate_size"] = key("expert_feed_forward_length", "int", required=True)
    return fields


def default_add_bos(arch: str, bos_token_id) -> bool:
    """When the tokenizer does not say: Llama/Mistral/Gemma/Phi-3 prepend BOS (SentencePiece vocabularies, as
    llama.cpp defaults them, Mixtral's too), Qwen and OLMo 2 do not."""
    return bos_token_id is not None and arch in ("llama", "mistral", "gemma2", "gemma3", "phi3", "mixtral")
