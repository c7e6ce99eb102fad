"""Open a Hugging Face model folder (config.json + *.safetensors) as a validated ModelSource.

Each safetensors header (8-byte little-endian length, then JSON) is checked here first, so that a damaged
file's error names the field and the tensor (the library's own errors name neither): every length, offset
and span against the file size. The tensors are then read through the safetensors library (`safe_open`,
numpy), each one only when it is used: opening a folder reads nothing but headers.
"""
from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import ml_dtypes  # registers bfloat16 with numpy, which the safetensors library's numpy backend needs
import numpy as np
from safetensors import SafetensorError, safe_open

from ..config import LAYER_TYPES, MAX_SIZE, ConfigValueError, ModelConfig, RopeScaling, yarn_attention_factor
from ..errors import DamagedFileError, MissingTensorError, ModelFormatError, UnsupportedQuantError
from .files import MAX_JSON_BYTES, MAX_TOKENIZER_JSON_BYTES, open_regular, present, read_bounded
from .experts import split_gate_up, stack_experts
from .roles import canonical_architecture
from .source import ModelSource, TensorSource
from .gguf_file import default_add_bos

# safetensors dtype -> (gguf qtype spelling, numpy dtype)
ST_DTYPES = {"F32": ("F32", np.dtype(np.float32)), "F16": ("F16", np.dtype(np.float16)),
             "BF16": ("BF16", np.dtype(ml_dtypes.bfloat16)),
             "U8": ("U8", np.dtype(np.uint8))}   # gpt-oss's MXFP4 blocks and scales only (formats/experts.py)
ST_KNOWN_DTYPES = {"BOOL", "U8", "I8", "U16", "I16", "U32", "I32", "U64", "I64", "F64", "F8_E4M3", "F8_E5M2",
                   "F8_E8M0", "F4", "F6_E2M3", "F6_E3M2", "C64"}
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors library's own limit
INDEX_FILE = "model.safetensors.index.json"


def _read_json(path: Path, what: str, limit: int = MAX_JSON_BYTES) -> dict:
    raw = read_bounded(path, limit, what)  # a regular file within the bound, or a DamagedFileError naming it
    try:
        value = json.loads(raw)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise DamagedFileError(f"{what} is not valid JSON: {str(e)[:200]}", path=path) from None
    if not isinstance(value, dict):
        raise DamagedFileError(f"{what} should hold a JSON object", path=path)
    return value


def read_safetensors_header(path: Path) -> tuple[dict, int]:
    """Parsed and checked header of one .safetensors file -> (entries by name, data start offset)."""
    f, size = open_regular(path)
    with f:
        if size < 8:
            raise DamagedFileError(f"file is {size} bytes, too short for a safetensors header", path=path)
        (n,) = struct.unpack("<Q", f.read(8))
        if n > size - 8 or n > MAX_HEADER_BYTES:
            raise DamagedFileError(f"header length {n} exceeds the file ({size} bytes) or the "
                                   f"{MAX_HEADER_BYTES}-byte limit", path=path)
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise DamagedFileError(f"header is not valid JSON: {str(e)[:120]}", path=path) from None
    if not isinstance(header, dict):
        raise DamagedFileError("header is not a JSON object", path=path)
    header.pop("__metadata__", None)
    data_start, data_len = 8 + n, size - 8 - n
    spans = []
    for name, entry in header.items():
        if not isinstance(entry, dict):
            raise DamagedFileError("header entry is not an object", path=path, tensor=name)
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
            raise DamagedFileError(f"bad shape {shape!r:.80}", path=path, tensor=name)
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
                and 0 <= offsets[0] <= offsets[1] <= data_len):
            raise DamagedFileError(f"data_offsets {offsets!r:.80} outside the {data_len} data bytes",
                                   path=path, tensor=name)
        if not isinstance(dtype, str) or dtype not in ST_DTYPES:
            if isinstance(dtype, str) and dtype in ST_KNOWN_DTYPES:
                raise UnsupportedQuantError(f"dtype {dtype} is not supported (supported: F32, F16, BF16)",
                                            path=path, tensor=name)
            raise DamagedFileError(f"unknown dtype {dtype!r:.40}", path=path, tensor=name)
        n_elements = 1
        for d in shape:
            n_elements *= d
        if n_elements * ST_DTYPES[dtype][1].itemsize != offsets[1] - offsets[0]:
            raise DamagedFileError(f"{dtype} {shape} needs {n_elements * ST_DTYPES[dtype][1].itemsize} bytes but "
                                   f"data_offsets span {offsets[1] - offsets[0]}", path=path, tensor=name)
        spans.append((offsets[0], offsets[1], name))
    # The library wants the data covered exactly, tensor after tensor: say which tensor breaks that.
    covered, prev = 0, None
    for start, end, name in sorted(spans):
        if start < covered:
            raise DamagedFileError(f"data of {prev!r} and {name!r} overlap", path=path, tensor=name)
        if start > covered:
            raise DamagedFileError(f"{start - covered} data bytes before this tensor belong to no tensor",
                                   path=path, tensor=name)
        covered, prev = end, name
    if covered != data_len:
        raise DamagedFileError(f"{data_len - covered} data bytes after the last tensor belong to no tensor",
                               path=path)
    return header, data_start


class LazyTensor:
    """One tensor of an open safetensors file: shape, dtype and nbytes now; its data, through the library, when
    converted (np.asarray) or sliced. Each read copies out only that tensor or slice."""

    __slots__ = ("_file", "_name", "shape", "dtype")

    def __init__(self, file, name: str, shape, dtype: np.dtype):
        self._file, self._name, self.shape, self.dtype = file, name, tuple(shape), dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    def __array__(self, dtype=None, copy=None):
        data = self._file.get_tensor(self._name)
        return data if dtype is None else data.astype(dtype, copy=False)

    def __getitem__(self, key) -> np.ndarray:
        return self._file.get_slice(self._name)[key]


def _open_safetensors(path: Path) -> dict[str, TensorSource]:
    header, _ = read_safetensors_header(path)
    try:
        file = safe_open(str(path), framework="numpy")
    except (SafetensorError, OSError) as e:
        raise DamagedFileError(f"the safetensors library cannot open it: {e}", path=path) from None
    return {name: TensorSource(name, ST_DTYPES[entry["dtype"]][0], tuple(entry["shape"]),
                               LazyTensor(file, name, entry["shape"], ST_DTYPES[entry["dtype"]][1]))
            for name, entry in header.items()}


def _weight_files(folder: Path) -> list[tuple[Path, set[str] | None]]:
    """The safetensors files to read, each with the tensor names the index assigns to it (or None)."""
    index_path = folder / INDEX_FILE
    if present(index_path):
        index = _read_json(index_path, INDEX_FILE)
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise DamagedFileError("index has no weight_map", path=index_path)
        files: dict[str, set[str]] = {}
        for name, fname in weight_map.items():
            if not isinstance(fname, str) or Path(fname).name != fname or not fname.endswith(".safetensors"):
                raise DamagedFileError(f"weight_map names file {fname!r:.80}", path=index_path, tensor=name)
            files.setdefault(fname, set()).add(name)
        for fname in files:
            if not present(folder / fname):
                raise MissingTensorError(f"shard {fname} named by the index is missing", path=index_path)
        return [(folder / fname, names) for fname, names in sorted(files.items())]
    paths = sorted(folder.glob("*.safetensors"))
    if not paths:
        raise MissingTensorError("no *.safetensors files in the folder", path=folder)
    return [(p, None) for p in paths]


def _tensors(folder: Path) -> dict[str, TensorSource]:
    tensors: dict[str, TensorSource] = {}
    for path, names in _weight_files(folder):
        got = _open_safetensors(path)
        if names is not None:
            absent = sorted(names - got.keys())
            if absent:
                raise MissingTensorError(f"{len(absent)} tensor(s) the index assigns to this shard are not in it: "
                                         f"{', '.join(absent[:5])}", path=path, tensor=absent[0])
        for name, t in got.items():
            if name in tensors:
                raise DamagedFileError("tensor appears in more than one shard", path=path, tensor=name)
            tensors[name] = t
    return tensors


# ---- ModelConfig from config.json ----------------------------------------------------------------

def _rope_dicts(cfg: dict) -> tuple[dict, dict | None]:
    """(the global RoPE parameters, the sliding layers' or None) from the transformers<5 (`rope_theta`,
    `rope_scaling`) or >=5 (`rope_parameters`, nested by layer type for Gemma 3) form."""
    params = cfg.get("rope_parameters")
    params = params if isinstance(params, dict) else {}
    local = None
    if any(t in params for t in LAYER_TYPES):
        local = params.get("sliding_attention")
        local = local if isinstance(local, dict) else {}
        params = params.get("full_attention")
        params = params if isinstance(params, dict) else {}
    scaling = cfg.get("rope_scaling")
    if isinstance(scaling, dict):
        params = {**params, **scaling}
    return params, local


def _rope(cfg: dict, path, arch: str = "llama") -> tuple[float, RopeScaling | None]:
    """(rope_theta, scaling) of the global (full-attention) layers."""
    params, _ = _rope_dicts(cfg)
    default_theta = {"gemma3": 1_000_000.0, "gptoss": 150000.0}.get(arch, 10000.0)
    theta = cfg.get("rope_theta", params.get("rope_theta", default_theta))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return theta, None
    if kind in ("linear", "llama3") and "factor" not in params:
        raise DamagedFileError(f"config.json rope scaling {params!r:.120} has no factor", path=path)
    if kind == "linear":
        return theta, RopeScaling("linear", factor=params["factor"])
    if kind == "llama3":  # RopeScaling checks each value
        return theta, RopeScaling("llama3", factor=params["factor"],
                                  low_freq_factor=params.get("low_freq_factor", 1.0),
                                  high_freq_factor=params.get("high_freq_factor", 4.0),
                                  original_context_length=params.get("original_max_position_embeddings", 8192))
    if kind in ("longrope", "su"):   # Phi-3 ('su' is its older name); transformers' _compute_longrope_parameters
        for key in ("short_factor", "long_factor"):
            if not isinstance(params.get(key), list):
                raise DamagedFileError(f"config.json rope scaling {kind} needs a list {key}", path=path)
        # transformers gives Phi-3's top-level original_max_position_embeddings priority
        original = cfg.get("original_max_position_embeddings") or params.get("original_max_position_embeddings") \
            or cfg.get("max_position_embeddings")
        factor = params.get("factor")
        if factor is None and _is_int(original) and original > 0 and _is_int(cfg.get("max_position_embeddings")):
            factor = cfg["max_position_embeddings"] / original
        factor = 1.0 if factor is None else factor
        attention = params.get("attention_factor")
        if attention is None:
            try:
                attention = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
            except (TypeError, ValueError, ZeroDivisionError, OverflowError):
                attention = math.nan   # RopeScaling names the bad value
        return theta, RopeScaling("longrope", factor=factor, original_context_length=original,
                                  short_factor=tuple(params["short_factor"]), long_factor=tuple(params["long_factor"]),
                                  attention_factor=attention)
    if kind == "yarn":   # transformers' _compute_yarn_parameters
        original = params.get("original_max_position_embeddings")
        if original is None:
            raise DamagedFileError(f"config.json rope scaling yarn {params!r:.120} has no "
                                   f"original_max_position_embeddings", path=path)
        factor = params.get("factor")
        if factor is None and _is_int(original) and original > 0 and _is_int(cfg.get("max_position_embeddings")):
            factor = cfg["max_position_embeddings"] / original
        attention = params.get("attention_factor")
        if attention is None:
            attention = yarn_attention_factor(factor, params.get("mscale"), params.get("mscale_all_dim"))
        return theta, RopeScaling("yarn", factor=factor, original_context_length=original,
                                  beta_fast=params.get("beta_fast") or 32.0, beta_slow=params.get("beta_slow") or 1.0,
                                  truncate=params.get("truncate", True), attention_factor=attention)
    raise ModelFormatError(f"rope scaling type {kind!r:.40} is not supported (supported: linear, llama3, longrope, "
                           f"yarn)", path=path)


def _rope_local_theta(cfg: dict, path) -> float:
    """Gemma 3's RoPE base of the sliding layers (unscaled)."""
    _, local = _rope_dicts(cfg)
    local = local or {}
    kind = local.get("rope_type", local.get("type", "default"))
    if kind != "default":
        raise ModelFormatError(f"rope scaling {kind!r:.40} on the sliding layers is not supported", path=path)
    return local.get("rope_theta", cfg.get("rope_local_base_freq", 10000.0))


def _rope_dim(cfg: dict, head_dim, path) -> int | None:
    """The rotated dimensions per head when partial_rotary_factor < 1 (Phi-4-mini), else None."""
    params, _ = _rope_dicts(cfg)
    factor = params.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))
    if factor is None or factor == 1.0 or not _is_int(head_dim):
        return None
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not 0 < factor < 1:
        raise DamagedFileError(f"config.json partial_rotary_factor = {factor!r:.40} must be a number in (0, 1]",
                               path=path)
    return int(head_dim * factor)


def _obj(value) -> dict:
    """value if it is a JSON object, else {}: tokenizer.json is read here before the tokenizers library checks it."""
    return value if isinstance(value, dict) else {}


def _token_id(tok_json: dict | None, content) -> int | None:
    if isinstance(content, dict):
        content = content.get("content")
    if tok_json is None or not isinstance(content, str):
        return None
    added = tok_json.get("added_tokens")
    for a in added if isinstance(added, list) else []:
        if isinstance(a, dict) and a.get("content") == content:
            return a["id"] if type(a.get("id")) is int else None
    vocab = _obj(tok_json.get("model")).get("vocab")
    if isinstance(vocab, list):  # Unigram: [[piece, score], ...], the id is the position
        return next((i for i, e in enumerate(vocab) if isinstance(e, list) and e and e[0] == content), None)
    found = _obj(vocab).get(content)
    return found if type(found) is int else None


def _bos_in_post_processor(tok_json: dict | None) -> bool | None:
    """Whether tokenizer.json's TemplateProcessing puts a special token first (how Llama 3 adds BOS)."""
    if tok_json is None:
        return None
    pp = _obj(tok_json.get("post_processor"))
    steps = pp.get("processors", []) if pp.get("type") == "Sequence" else [pp]
    for step in steps if isinstance(steps, list) else []:
        if _obj(step).get("type") == "TemplateProcessing":
            single = step.get("single") or []
            return isinstance(single, list) and bool(single) and "SpecialToken" in _obj(single[0])
    return None


def _ids(value) -> list[int]:
    if isinstance(value, bool):
        return []
    if isinstance(value, int):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, int) and not isinstance(v, bool)]
    return []


# ModelConfig field -> the config.json key it comes from, for error messages
_HF_KEYS = {"attn_softcap": "attn_logit_softcapping", "final_softcap": "final_logit_softcapping",
            "rope_local_theta": "rope_local_base_freq", "rope_dim": "partial_rotary_factor",
            "norm_eps": "rms_norm_eps", "eos_token_ids": "eos_token_id", "context_length": "max_position_embeddings", "num_layers": "num_hidden_layers",
            "num_heads": "num_attention_heads", "num_kv_heads": "num_key_value_heads",
            "rope_scaling.original_context_length": "rope_scaling.original_max_position_embeddings",
            "num_experts": "num_local_experts (or num_experts)", "experts_per_token": "num_experts_per_tok",
            "expert_intermediate_size": "moe_intermediate_size"}


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_ids(v) -> bool:
    return _is_int(v) or (isinstance(v, list) and all(_is_int(i) for i in v))


def _is_token(v) -> bool:  # a special token in tokenizer_config.json: its text, or an AddedToken object
    return isinstance(v, str) or (isinstance(v, dict) and isinstance(v.get("content"), str))


# key -> (check, what it must be): the keys the readers use that ModelConfig does not check itself. null (None)
# is always allowed and means "not given", as in transformers.
_TYPES = {
    "config.json": {
        "architectures": (lambda v: isinstance(v, list) and all(isinstance(a, str) for a in v), "a list of strings"),
        "model_type": (lambda v: isinstance(v, str), "a string"),
        "tie_word_embeddings": (lambda v: isinstance(v, bool), "true or false"),
        "attention_bias": (lambda v: isinstance(v, bool), "true or false"),
        "rope_scaling": (lambda v: isinstance(v, dict), "an object"),
        "rope_parameters": (lambda v: isinstance(v, dict), "an object"),
        "bos_token_id": (_is_int, "an integer"),
        "eos_token_id": (_is_ids, "an integer or a list of integers"),
        "layer_types": (lambda v: isinstance(v, list) and all(isinstance(t, str) for t in v), "a list of strings"),
        "hidden_act": (lambda v: isinstance(v, str), "a string"),
        "hidden_activation": (lambda v: isinstance(v, str), "a string"),
        "use_sliding_window": (lambda v: isinstance(v, bool), "true or false"),
        "use_bidirectional_attention": (lambda v: isinstance(v, bool), "true or false"),
        "norm_topk_prob": (lambda v: isinstance(v, bool), "true or false"),
        "mlp_only_layers": (lambda v: isinstance(v, list), "a list of layer indices"),
    },
    "generation_config.json": {
        "bos_token_id": (_is_int, "an integer"),
        "eos_token_id": (_is_ids, "an integer or a list of integers"),
    },
    "tokenizer_config.json": {
        "add_bos_token": (lambda v: isinstance(v, bool), "true or false"),
        "add_eos_token": (lambda v: isinstance(v, bool), "true or false"),
        "bos_token": (_is_token, "a string or an object with a string 'content'"),
        "eos_token": (_is_token, "a string or an object with a string 'content'"),
        "chat_template": (lambda v: isinstance(v, (str, list)), "a string or a list of named templates"),
    },
}


def check_types(value: dict, file: str, path) -> None:
    """A DamagedFileError naming `file`'s key and value if a key the readers use has the wrong JSON type."""
    for key, (ok, what) in _TYPES[file].items():
        v = value.get(key)
        if v is not None and not ok(v):
            raise DamagedFileError(f"{file} {key} = {json.dumps(v)[:60]} must be {what}", path=path)


def config_from_hf(cfg: dict, folder: Path, tensors: dict[str, TensorSource]) -> ModelConfig:
    path = folder / "config.json"
    check_types(cfg, "config.json", path)
    archs = cfg.get("architectures")
    name = cfg.get("model_type") or (archs[0] if isinstance(archs, list) and archs else None)
    if not isinstance(name, str):
        raise DamagedFileError(f"config.json names no model_type or architectures (model_type "
                               f"{cfg.get('model_type')!r:.40}, architectures {archs!r:.40})", path=path)
    arch = canonical_architecture(name, path=path)
    tok_cfg = _read_json(folder / "tokenizer_config.json", "tokenizer_config.json") \
        if present(folder / "tokenizer_config.json") else {}
    check_types(tok_cfg, "tokenizer_config.json", folder / "tokenizer_config.json")
    tok_json = _read_json(folder / "tokenizer.json", "tokenizer.json", MAX_TOKENIZER_JSON_BYTES) \
        if present(folder / "tokenizer.json") else None
    gen_cfg = _read_json(folder / "generation_config.json", "generation_config.json") \
        if present(folder / "generation_config.json") else {}
    check_types(gen_cfg, "generation_config.json", folder / "generation_config.json")

    bos = cfg.get("bos_token_id")
    if not isinstance(bos, int) or isinstance(bos, bool):
        bos = _token_id(tok_json, tok_cfg.get("bos_token"))
    eos = list(dict.fromkeys(_ids(cfg.get("eos_token_id")) + _ids(gen_cfg.get("eos_token_id"))))
    if not eos:
        eos = _ids(_token_id(tok_json, tok_cfg.get("eos_token")))
    add_bos = tok_cfg.get("add_bos_token")
    if not isinstance(add_bos, bool):
        add_bos = _bos_in_post_processor(tok_json)
    if add_bos is None:
        add_bos = default_add_bos(arch, bos)

    try:
        hidden = cfg["hidden_size"]
        heads = cfg["num_attention_heads"]
        head_dim = cfg.get("head_dim") or (hidden // heads if isinstance(hidden, int) and isinstance(heads, int)
                                           and heads > 0 else 0)
        theta, scaling = _rope(cfg, path, arch)
        layers = cfg["num_hidden_layers"]
        embed = tensors.get("model.embed_tokens.weight")
        return ModelConfig(
            architecture=arch,
            vocab_size=cfg.get("vocab_size") or (embed.shape[0] if embed is not None else 0),
            hidden_size=hidden,
            num_layers=cfg["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=head_dim,
            intermediate_size=cfg["intermediate_size"],
            norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=theta,
            rope_scaling=scaling,
            context_length=cfg.get("max_position_embeddings", 2048),
            # Gemma's transformers configs tie unless told otherwise
            tie_embeddings=cfg.get("tie_word_embeddings", arch in ("gemma2", "gemma3")) is True,
            # gpt-oss: attention_bias defaults to true (transformers' GptOssConfig), on q/k/v and o
            qkv_bias=arch == "qwen2" or cfg.get("attention_bias", arch == "gptoss") is True,
            attn_out_bias=arch == "gptoss" and cfg.get("attention_bias", True) is True,
            qk_norm=arch in ("qwen3", "olmo2", "gemma3", "qwen3moe"),
            bos_token_id=bos,
            eos_token_ids=tuple(eos),
            add_bos=add_bos,
            **_family_fields(cfg, arch, layers, head_dim, path),
            **_moe_fields(cfg, arch, path),
        )
    except ModelFormatError:
        raise
    except ConfigValueError as e:
        raise DamagedFileError(f"config.json {_HF_KEYS.get(e.field, e.field)} = {e.value!r:.60} {e.why}",
                               path=path) from None
    except KeyError as e:
        raise DamagedFileError(f"config.json lacks {e.args[0]!r}", path=path) from None
    except (TypeError, ValueError) as e:
        raise DamagedFileError(f"config.json is inconsistent: {e}", path=path) from None


# transformers' defaults of the Gemma configs, for config.json files that leave a key out
_GEMMA_DEFAULTS = {"gemma2": dict(sliding_window=4096, attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
                                  query_pre_attn_scalar=256, sliding_window_pattern=2),
                   "gemma3": dict(sliding_window=4096, attn_logit_softcapping=None, final_logit_softcapping=None,
                                  query_pre_attn_scalar=256, sliding_window_pattern=6)}
_ACTIVATIONS = {"gemma2": ("gelu_pytorch_tanh", "gelu_tanh"), "gemma3": ("gelu_pytorch_tanh", "gelu_tanh")}


def _layer_types(cfg: dict, arch: str, layers, window, path) -> tuple[str, ...] | None:
    """Which layers slide, as transformers decides it: config.json's layer_types, else Gemma's pattern (every
    n-th layer global), Qwen2's max_window_layers (the layers from it on slide) or None (every layer slides)."""
    types = cfg.get("layer_types")
    if types is not None:
        return tuple(types) if isinstance(types, list) else types   # ModelConfig checks the entries
    if not _is_int(layers) or not 0 < layers <= MAX_SIZE:
        return None   # ModelConfig names num_hidden_layers
    if arch in _GEMMA_DEFAULTS:
        n = cfg.get("sliding_window_pattern", _GEMMA_DEFAULTS[arch]["sliding_window_pattern"])
        if not _is_int(n) or n < 1:
            raise DamagedFileError(f"config.json sliding_window_pattern = {n!r:.40} must be a positive integer",
                                   path=path)
        return tuple("sliding_attention" if (i + 1) % n else "full_attention" for i in range(layers))
    if arch == "gptoss":   # GptOssConfig: the even layers slide, the odd ones attend to everything
        return tuple("sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(layers))
    if arch in ("qwen2", "qwen3") and window is not None:
        first = cfg.get("max_window_layers", 0)
        first = first if _is_int(first) else 0
        return tuple("sliding_attention" if i >= first else "full_attention" for i in range(layers))
    return None


def _family_fields(cfg: dict, arch: str, layers, head_dim, path) -> dict:
    """The ModelConfig fields beyond the llama block: sliding windows, soft-capping, the attention scale,
    Gemma 3's local RoPE base, partial RoPE."""
    act = cfg.get("hidden_activation", cfg.get("hidden_act"))
    allowed = _ACTIVATIONS.get(arch, ("silu",))
    if act is not None and act not in allowed:
        raise ModelFormatError(f"config.json activation {act!r:.40} is not supported for {arch} "
                               f"(supported: {', '.join(allowed)})", path=path)
    if cfg.get("use_bidirectional_attention"):
        raise ModelFormatError("use_bidirectional_attention (an embedding model) is not supported", path=path)
    defaults = _GEMMA_DEFAULTS.get(arch, {})
    get = lambda key: cfg.get(key, defaults.get(key))   # noqa: E731
    window = get("sliding_window")
    if arch == "gptoss" and "sliding_window" not in cfg:
        window = 128   # GptOssConfig's default
    if arch in ("qwen2", "qwen3", "qwen3moe") and not cfg.get("use_sliding_window"):
        window = None   # transformers: sliding_window only with use_sliding_window
    if arch in ("llama", "olmo2"):
        window = None   # no sliding window in these models' transformers code
    fields = dict(sliding_window=window, layer_types=None, rope_dim=_rope_dim(cfg, head_dim, path))
    if window is not None:
        fields["layer_types"] = _layer_types(cfg, arch, layers, window, path)
    if arch in _GEMMA_DEFAULTS:
        fields.update(attn_softcap=get("attn_logit_softcapping"), final_softcap=get("final_logit_softcapping"),
                      query_pre_attn_scalar=get("query_pre_attn_scalar"))
        if window is None:
            fields["layer_types"] = None
    if arch == "gemma3":
        fields["rope_local_theta"] = _rope_local_theta(cfg, path)
    return fields


def _moe_fields(cfg: dict, arch: str, path) -> dict:
    """The mixture-of-experts fields: Mixtral's num_local_experts (its experts as wide as intermediate_size,
    always renormalized); Qwen3-MoE's num_experts, moe_intermediate_size and norm_topk_prob (transformers'
    default false). Qwen3-MoE configs with dense layers between the sparse ones are refused: llama.cpp's
    qwen3moe has none either. gpt-oss: num_local_experts, top-k, each expert intermediate_size wide, the
    clamped SwiGLU's swiglu_limit / swiglu_alpha, biases and sinks always (GptOssConfig's defaults)."""
    if arch not in ("mixtral", "qwen3moe", "gptoss"):
        return {}
    experts = cfg.get("num_local_experts", cfg.get("num_experts"))
    fields = dict(num_experts=experts, experts_per_token=cfg.get("num_experts_per_tok", 2))
    if arch == "gptoss":   # GptOssConfig's defaults: 128 experts, top-4, limit 7, alpha 1.702; always sinks
        fields = dict(num_experts=cfg.get("num_local_experts", 128),
                      experts_per_token=cfg.get("num_experts_per_tok", 4),
                      expert_intermediate_size=cfg.get("intermediate_size"), moe_router="topk_softmax",
                      moe_bias=True, attn_sinks=True, swiglu_limit=cfg.get("swiglu_limit", 7.0),
                      swiglu_alpha=cfg.get("swiglu_alpha", 1.702))
        return fields
    if arch == "qwen3moe":
        step, dense = cfg.get("decoder_sparse_step", 1), cfg.get("mlp_only_layers") or []
        if step != 1 or dense:
            raise ModelFormatError(f"dense MLP layers in a Qwen3-MoE model (decoder_sparse_step = {step!r:.20}, "
                                   f"mlp_only_layers = {dense!r:.60}) are not supported", path=path)
        fields.update(expert_intermediate_size=cfg.get("moe_intermediate_size"),
                      norm_topk_prob=cfg.get("norm_topk_prob", False) is True)
        if fields["expert_intermediate_size"] is None:
            raise DamagedFileError("config.json lacks 'moe_intermediate_size'", path=path)
    if experts is None:
        raise DamagedFileError("config.json lacks 'num_local_experts' (or 'num_experts')", path=path)
    return fields


def _check_tied_head(tensors: dict[str, TensorSource], folder: Path) -> None:
    """tie_word_embeddings=true beside an lm_head.weight: fine if the tensor is a copy of the embedding (some
    exporters save both), a DamagedFileError naming it if not. Which one such a file means is ambiguous:
    transformers ties (the embedding wins, or whichever loads last), other tools use the tensor. Guessing
    would silently give one of two different models, so we refuse and say how to resolve it."""
    head, embed = tensors["lm_head.weight"], tensors.get("model.embed_tokens.weight")
    same = embed is not None and head.shape == embed.shape and head.qtype == embed.qtype
    if same:
        rows = max(1, (64 << 20) // max(1, head.nbytes // max(1, head.shape[0])))  # compare ~64 MiB at a time
        for start in range(0, head.shape[0], rows):
            stop = min(start + rows, head.shape[0])  # the library's slices do not clamp
            a, b = np.asarray(head.data[start:stop]), np.asarray(embed.data[start:stop])
            if a.tobytes() != b.tobytes():
                same = False
                break
    if not same:
        raise DamagedFileError("config.json says tie_word_embeddings=true, but the folder has its own lm_head.weight "
                               "that differs from model.embed_tokens.weight; set tie_word_embeddings to false to use "
                               "it, or delete it to tie", path=folder, tensor="lm_head.weight")


def open_hf_dir(path) -> ModelSource:
    """Open and validate an HF model folder; tensors stay memory-mapped. Raises ModelFormatError subclasses."""
    folder = Path(path)
    if not folder.is_dir():
        raise ModelFormatError("no such folder", path=folder)
    cfg = _read_json(folder / "config.json", "config.json")
    tensors = _tensors(folder)
    config = config_from_hf(cfg, folder, tensors)
    tensors = stack_experts(split_gate_up(tensors, config, folder), config, folder)
    raw = next((t for t in tensors.values() if t.qtype == "U8"), None)
    if raw is not None:   # U8 is read for gpt-oss's MXFP4 experts; split_gate_up has turned those into MXFP4
        raise UnsupportedQuantError("dtype U8 is not supported (supported: F32, F16, BF16; U8 only as gpt-oss's "
                                    "MXFP4 expert blocks and scales)", path=folder, tensor=raw.name)
    if config.tie_embeddings and "lm_head.weight" in tensors:
        _check_tied_head(tensors, folder)
        tensors = {k: v for k, v in tensors.items() if k != "lm_head.weight"}
    source = ModelSource(path=folder, format="hf", config=config, tensors=tensors, metadata=cfg)
    from .validate import validate_roles
    validate_roles(source)
    return source
