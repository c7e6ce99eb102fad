"""Open a GGUF file (v2/v3) as a validated ModelSource, memory-mapped.

gguf-py's GGUFReader trusts every length in the header: a lying array count makes it loop for
ever, a lying dimension makes numpy allocate or reshape at random. So `_prescan` first walks the
whole header itself with every length bounded by the file size, checks each tensor's type, shape
and byte range, and only then hands the file to GGUFReader (whose failures are wrapped anyway).
Nothing is read into RAM but the header: tensor data stays a view of the reader's np.memmap.
"""
from __future__ import annotations

import logging
import math
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from ..config import ConfigValueError, ModelConfig, RopeScaling
from ..errors import DamagedFileError, ModelFormatError, UnsupportedQuantError
from ..quant.types import qtype_info
from .roles import canonical_architecture
from .source import ModelSource, TensorSource

GGUF_MAGIC = b"GGUF"
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_ARRAY_NESTING = 4
# value type id -> byte size of a scalar (gguf spec); 8 = string, 9 = array
_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY, _UINT32 = 8, 9, 4
_MIN_KV_BYTES = 8 + 4 + 1  # empty key, type, one-byte value
_MIN_TENSOR_INFO_BYTES = 8 + 4 + 8 + 4 + 8  # empty name, n_dims, one dim, type, offset

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

    def skip_value(self, vtype: int, what: str, depth: int = 0):
        if vtype in _SCALAR_SIZES:
            self.need(_SCALAR_SIZES[vtype], what)
            self.pos += _SCALAR_SIZES[vtype]
        elif vtype == _STRING:
            n = self.unpack("Q", f"length of {what}")
            self.need(n, what)
            self.pos += n
        elif vtype == _ARRAY:
            if depth >= MAX_ARRAY_NESTING:
                raise DamagedFileError(f"{what}: arrays nested deeper than {MAX_ARRAY_NESTING}", path=self.path)
            itype = self.unpack("I", f"element type of {what}")
            count = self.unpack("Q", f"length of {what}")
            min_item = _SCALAR_SIZES.get(itype, 8 if itype == _STRING else 12)
            if itype not in _SCALAR_SIZES and itype not in (_STRING, _ARRAY):
                raise DamagedFileError(f"{what}: unknown array element type {itype}", path=self.path)
            self.need(count * min_item, f"{count} elements of {what}")
            if itype in _SCALAR_SIZES:
                self.pos += count * min_item
            else:
                for _ in range(count):
                    self.skip_value(itype, what, depth + 1)
        else:
            raise DamagedFileError(f"{what}: unknown value type {vtype}", path=self.path)


def _decode(raw: bytes, what: str, path) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise DamagedFileError(f"{what} is not valid UTF-8: {raw[:40]!r}", path=path) from None


def _prescan(buf, path) -> tuple[list[_TensorInfo], int]:
    """Validate the header against the file size. Returns the tensor infos and the data offset."""
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
    keys = set()
    for i in range(n_kv):
        key = _decode(c.string(f"key #{i}"), f"key #{i}", path)
        if key in keys:
            raise DamagedFileError(f"duplicate metadata key {key!r}", path=path)
        keys.add(key)
        vtype = c.unpack("I", f"type of {key!r}")
        start = c.pos
        c.skip_value(vtype, f"value of {key!r}")
        if key == "general.alignment":
            if vtype != _UINT32:
                raise DamagedFileError("general.alignment must be a uint32", path=path)
            alignment = struct.unpack_from("<I", buf, start)[0]
            if alignment == 0 or alignment & (alignment - 1):
                raise DamagedFileError(f"general.alignment {alignment} is not a power of two", path=path)
    infos, names = [], set()
    for i in range(n_tensors):
        name = _decode(c.string(f"name of tensor #{i}"), f"name of tensor #{i}", path)
        if name in names:
            raise DamagedFileError("duplicate tensor name", path=path, tensor=name)
        names.add(name)
        n_dims = c.unpack("I", f"n_dims of {name!r}")
        if not 1 <= n_dims <= MAX_DIMS:
            raise DamagedFileError(f"{n_dims} dimensions (must be 1..{MAX_DIMS})", path=path, tensor=name)
        dims = tuple(c.unpack("Q", f"dims of {name!r}") for _ in range(n_dims))
        type_id = c.unpack("I", f"type of {name!r}")
        offset = c.unpack("Q", f"offset of {name!r}")
        try:
            gtype = GGMLQuantizationType(type_id)
        except ValueError:
            raise UnsupportedQuantError(f"unknown ggml type id {type_id}", path=path, tensor=name) from None
        if min(dims) < 1:
            raise DamagedFileError(f"dimension of size 0 in {list(dims)}", path=path, tensor=name)
        block, type_size = GGML_QUANT_SIZES[gtype]
        if dims[0] % block:
            raise DamagedFileError(f"row length {dims[0]} is not a multiple of the {gtype.name} block size "
                                   f"{block}", path=path, tensor=name)
        n_elements = 1
        for d in dims:
            n_elements *= d
        nbytes = n_elements // block * type_size
        if offset % alignment:
            raise DamagedFileError(f"data offset {offset} is not a multiple of the alignment {alignment}",
                                   path=path, tensor=name)
        infos.append(_TensorInfo(name, dims, gtype.name, offset, nbytes))
    data_offset = -(-c.pos // alignment) * alignment
    for t in infos:
        if data_offset + t.offset + t.nbytes > c.size:
            raise DamagedFileError(
                f"data ({t.nbytes} bytes of {t.qtype} {list(t.dims)}) at offset {t.offset} runs past the end "
                f"of the file ({max(0, c.size - data_offset)} bytes of tensor data)", path=path, tensor=t.name)
    for t in infos:  # structure is sound; now what we cannot read
        qtype_info(t.qtype, path=path, tensor=t.name)
    return infos, data_offset


def _read_with_gguf_py(path: Path):
    from gguf import GGUFReader
    try:
        return GGUFReader(path, "r")
    except Exception as e:  # header passed _prescan, so this is damage we did not foresee
        raise DamagedFileError(f"GGUF reader failed: {type(e).__name__}: {e}", path=path) from e


def _field_value(field, path):
    from gguf import GGUFValueType
    try:
        value = field.contents()
    except (UnicodeDecodeError, IndexError, ValueError) as e:
        raise DamagedFileError(f"metadata {field.name!r} unreadable: {e}", path=path) from None
    if field.types and field.types[0] == GGUFValueType.BOOL:
        value = bool(value)
    elif field.types == [GGUFValueType.FLOAT32]:
        value = float(str(np.float32(value)))  # shortest decimal that round-trips: 1e-05, not 9.99999974e-06
    return value


def _tensor_sources(reader, infos: list[_TensorInfo], path) -> dict[str, TensorSource]:
    by_name = {t.name: t for t in reader.tensors}
    if len(by_name) != len(infos) or set(by_name) != {t.name for t in infos}:
        raise DamagedFileError("GGUF reader and header scan disagree on the tensor list", path=path)
    out = {}
    for info in infos:
        rt = by_name[info.name]
        if rt.data_offset != reader.data_offset + info.offset or rt.n_bytes != info.nbytes:
            raise DamagedFileError("GGUF reader and header scan disagree on the data range",
                                   path=path, tensor=info.name)
        shape = tuple(reversed(info.dims))
        flat = rt.data.reshape(-1).view(np.uint8) if rt.data.dtype != np.uint8 else rt.data.reshape(-1)
        if qtype_info(info.qtype).is_dense:
            data = flat.view(qtype_info(info.qtype).dtype).reshape(shape)
        else:
            rows = int(np.prod(shape[:-1], dtype=np.int64)) if len(shape) > 1 else 1
            data = flat.reshape(rows, info.nbytes // rows)
        out[info.name] = TensorSource(info.name, info.qtype, shape, data)
    return out


def open_gguf(path) -> ModelSource:
    """Open and validate a GGUF file; tensors stay memory-mapped. Raises ModelFormatError subclasses."""
    path = Path(path)
    if not path.is_file():
        raise ModelFormatError("no such file", path=path)
    size = os.path.getsize(path)
    if size < 24:
        raise DamagedFileError(f"file is {size} bytes, too short for a GGUF header", path=path)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        infos, _ = _prescan(buf, path)
    reader = _read_with_gguf_py(path)
    metadata = {name: _field_value(field, path) for name, field in reader.fields.items()
                if not name.startswith("GGUF.")}
    tensors = _tensor_sources(reader, infos, path)
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


def _rope_scaling(meta, arch_key, tensors, path, head_dim) -> RopeScaling | None:
    kind = _get(meta, f"{arch_key}.rope.scaling.type", "str", path, default=None)
    factor_key = f"{arch_key}.rope.scaling.factor"
    if kind is None and f"{arch_key}.rope.scale_linear" in meta:  # older llama.cpp files
        kind, factor_key = "linear", f"{arch_key}.rope.scale_linear"
    factor = _get(meta, factor_key, "float", path, default=None)
    if kind not in (None, "none", "linear"):
        raise ModelFormatError(f"rope scaling type {kind!r:.40} is not supported (supported: linear, llama3)",
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
_GGUF_KEYS = {"hidden_size": "embedding_length", "num_layers": "block_count", "num_heads": "attention.head_count",
              "num_kv_heads": "attention.head_count_kv", "head_dim": "attention.key_length",
              "intermediate_size": "feed_forward_length", "norm_eps": "attention.layer_norm_rms_epsilon",
              "rope_theta": "rope.freq_base", "context_length": "context_length"}


def config_from_gguf(meta: dict, tensors: dict[str, TensorSource], path) -> ModelConfig:
    """Build the ModelConfig from `{arch}.*` and `tokenizer.ggml.*` metadata plus tensor shapes."""
    arch_key = _get(meta, "general.architecture", "str", path, required=True)
    arch = canonical_architecture(arch_key, path=path)

    def key(name, kind, **kw):
        return _get(meta, f"{arch_key}.{name}", kind, path, **kw)

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
            qk_norm="blk.0.attn_q_norm.weight" in tensors,
            bos_token_id=bos,
            eos_token_ids=eos_ids,
            add_bos=default_add_bos(arch, bos) if add_bos is None else add_bos,
        )
    except ModelFormatError:
        raise
    except ConfigValueError as e:
        if e.field.startswith("rope_scaling."):  # llama3: our keys, or the largest rope_freqs.weight entry
            where = REALIZAR_ROPE_PREFIX + e.field[13:]
            where = where if where in meta else "max(rope_freqs.weight)"
        else:
            where = "token_embd.weight rows" if e.field == "vocab_size" else f"{arch_key}.{_GGUF_KEYS[e.field]}"
        raise DamagedFileError(f"metadata {where} = {e.value!r:.60} {e.why}", path=path) from None
    except ValueError as e:  # ModelConfig's own consistency checks
        raise DamagedFileError(f"inconsistent model metadata: {e}", path=path) from None


def default_add_bos(arch: str, bos_token_id) -> bool:
    """When the tokenizer does not say: Llama/Mistral prepend BOS, Qwen does not."""
    return bos_token_id is not None and arch in ("llama", "mistral")
