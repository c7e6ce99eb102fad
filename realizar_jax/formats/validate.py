"""Check a ModelSource's tensors against the role table and its config, before anything is built.

`validate_roles` is called by open_gguf / open_hf_dir (so open_model returns only validated
sources) and its result, role -> tensor name, is what the weights builder walks.
"""
from __future__ import annotations

from ..errors import MissingTensorError, ModelFormatError, ShapeMismatchError, UnsupportedQuantError
from ..quant.types import qtype_info
from functools import lru_cache

from .roles import (FUSED, MOE_BIAS_ROLES, MOE_ROLES, ROLES, expected_shape, required_global_roles, required_layer_roles, roles_of, stacked,
                    tensor_name)

RoleKey = tuple[str, "int | None"]  # (role, layer); layer is None for global roles

# Buffers some HF checkpoints carry that no model needs.
IGNORABLE_SUFFIXES = ("rotary_emb.inv_freq",)
_SHOW = 5


@lru_cache(maxsize=None)
def _name_tables(fmt: str, arch: str = "llama"):
    """global name -> role, and (prefix, suffix) -> role for per-layer templates like 'blk.{i}.attn_q.weight'."""
    global_names, layer_names = {}, {}
    for role in roles_of(arch).values():
        template = role.gguf if fmt == "gguf" else role.hf
        if template is None:
            continue
        template = stacked(template)   # HF experts: the stacked tensor formats/experts.py made
        if role.per_layer:
            prefix, suffix = template.split("{i}")
            layer_names.setdefault(prefix, {})[suffix] = role.name
        else:
            global_names[template] = role.name
    return global_names, layer_names


def parse_tensor_name(name: str, fmt: str, arch: str = "llama") -> RoleKey | None:
    """(role, layer) for a tensor name of format `fmt` ('gguf' or 'hf') of architecture `arch`, or None
    if it is no role's."""
    global_names, layer_names = _name_tables(fmt, arch)
    if name in global_names:
        return global_names[name], None
    for prefix, suffixes in layer_names.items():
        if name.startswith(prefix):
            index, dot, rest = name[len(prefix):].partition(".")
            if dot and index.isdigit() and (index == "0" or not index.startswith("0")):
                role = suffixes.get("." + rest)
                if role is not None:
                    return role, int(index)
    return None


def _listing(names) -> str:
    names = list(names)
    more = f" (and {len(names) - _SHOW} more)" if len(names) > _SHOW else ""
    return ", ".join(names[:_SHOW]) + more


def validate_roles(source) -> dict[RoleKey, str]:
    """Map (role, layer) -> tensor name for `source`, raising a ModelFormatError subclass on any problem:
    tensors no role explains, missing roles, shapes that disagree with the config, quantized vectors."""
    config, path, fmt = source.config, source.path, source.format
    if config.num_layers * 4 > len(source.tensors):  # every layer has >= 4 tensors; also bounds the loops below
        raise MissingTensorError(f"the config says {config.num_layers} layers but the model has only "
                                 f"{len(source.tensors)} tensors", path=path)
    found: dict[RoleKey, str] = {}
    unknown = []
    for name in source.tensors:
        key = parse_tensor_name(name, fmt, config.architecture)
        if key is None or (key[1] is not None and key[1] >= config.num_layers):
            if not name.endswith(IGNORABLE_SUFFIXES):
                unknown.append(name)
            continue
        found[key] = name
    if unknown:
        raise ModelFormatError(f"{len(unknown)} tensor(s) that no {config.architecture} role explains "
                               f"(the model would silently ignore them): {_listing(unknown)}",
                               path=path, tensor=unknown[0])

    # Tensors the config says the model does not use would be silently dropped: refuse them.
    unused_roles = set()
    if not config.qkv_bias:
        unused_roles |= {"bq", "bk", "bv"}
    if not config.qk_norm:
        unused_roles |= {"q_norm", "k_norm"}
    if not config.attn_out_bias:
        unused_roles.add("bo")
    if not config.attn_sinks:
        unused_roles.add("attn_sinks")
    if not config.moe_bias:
        unused_roles |= set(MOE_BIAS_ROLES)
    if config.rope_scaling is None or config.rope_scaling.kind != "longrope":
        unused_roles |= {"rope_factors_long", "rope_factors_short"}
    unused = [n for (role, _), n in found.items() if role in unused_roles]
    if unused:
        raise ModelFormatError(f"tensor(s) present that the config does not use (qkv_bias={config.qkv_bias}, "
                               f"qk_norm={config.qk_norm}, rope scaling "
                               f"{getattr(config.rope_scaling, 'kind', None)}): {_listing(unused)}",
                               path=path, tensor=unused[0])

    missing = []
    wanted: list[RoleKey] = [(r, None) for r in required_global_roles(config)]
    for i in range(config.num_layers):
        roles = list(required_layer_roles(config))
        for fused, parts in FUSED.items():
            if any(tensor_name(p, fmt, i, config.architecture) is None for p in parts if p in roles):
                roles = [r for r in roles if r not in parts] + [fused]   # this format has only the fused tensor
            if (fused, i) in found:
                clash = [p for p in parts if (p, i) in found]
                if clash:
                    raise ModelFormatError(f"layer {i} has both the fused {fused} and separate {clash} tensors",
                                           path=path, tensor=found[(fused, i)])
                roles = [r for r in roles if r not in parts] + ([] if fused in roles else [fused])
        wanted += [(r, i) for r in roles]
    for role, layer in wanted:
        if (role, layer) not in found:
            missing.append(tensor_name(role, fmt, layer, config.architecture) or role)
    if missing:
        raise MissingTensorError(f"{len(missing)} tensor(s) missing, first few: {_listing(missing)}",
                                 path=path, tensor=missing[0])

    for (role, layer), name in found.items():
        t = source.tensors[name]
        want = expected_shape(role, config)
        if role in MOE_ROLES + MOE_BIAS_ROLES and (len(t.shape) != len(want) or t.shape[0] != want[0]):
            raise ShapeMismatchError(f"shape {list(t.shape)} holds {t.shape[0] if t.shape else 0} experts but the "
                                     f"config says {want[0]} (expected {list(want)})", path=path, tensor=name)
        if tuple(t.shape) != want:
            raise ShapeMismatchError(f"shape {list(t.shape)} but the config needs {list(want)} for role {role}",
                                     path=path, tensor=name)
        if ROLES[role].kind == "vector" and not qtype_info(t.qtype).is_dense:
            raise UnsupportedQuantError(f"1-D tensor stored as {t.qtype}; only F32/F16/BF16 vectors are supported",
                                        path=path, tensor=name)
    return found
