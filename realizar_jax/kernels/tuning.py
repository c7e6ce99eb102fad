"""KernelConfig: the one object that says how the kernels run, built once at load() and passed to
jit as a static argument beside the ModelConfig. Only kernels/ and ops/ read it; nothing reads the
environment while a function traces.

The fields a user may want are load() arguments (`int8_activations`). The experiment knobs are
read from the environment here, once, when a KernelConfig is built (`KernelConfig.from_env`):
- REALIZAR_GEMV_TILES: JSON tile overrides for sweeps on a new GPU (the defaults were measured on
  an H100/H200; see BENCHMARKS.md). Keys: a weight type ("Q4_K": [rows, superblocks, warps,
  stages]), "SWIGLU_<type>", "XQUANT" / "XMERGE" ([groups, warps]), "ATTN" ([positions per block,
  splits (0: auto), warps, stages]).
- REALIZAR_PALLAS_INTERPRET=1: run the Pallas routes in interpret mode (on a CPU: the kernels'
  code paths without a GPU, for tests and debugging).
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass

TILES_ENV = "REALIZAR_GEMV_TILES"
INTERPRET_ENV = "REALIZAR_PALLAS_INTERPRET"


def _backend() -> str:
    import jax
    return jax.default_backend()


def parse_tiles(text: str) -> tuple:
    """REALIZAR_GEMV_TILES' JSON -> KernelConfig.tiles (sorted (key, ints) pairs)."""
    try:
        raw = json.loads(text)
        return tuple(sorted((str(k), tuple(int(v) for v in t)) for k, t in raw.items()))
    except (ValueError, TypeError, AttributeError) as e:
        raise ValueError(f"{TILES_ENV} must be JSON like {{\"Q4_K\": [32, 2, 4, 2]}}: {e}") from None


@dataclass(frozen=True)
class KernelConfig:
    """How the compute runs. Frozen and hashable: jit specializes on it.

    pallas: take the Pallas kernel routes where they apply; False (the bare default; from_env: on a
    GPU) runs every op as its jnp reference. interpret: run those kernels in Pallas interpret mode
    (from_env: when the backend is not a GPU), so `KernelConfig(pallas=True)` is the compiled GPU path. int8_activations: decode matmuls on Q4_K/Q6_K/Q8_0 weights round bf16/f16
    activations to int8 per scale group and multiply with dp4a, as llama.cpp's MMVQ does (about
    0.5-1% relative error per matmul); False keeps them float32. tiles: tile overrides,
    ((key, ints), ...), see the module doc.
    """

    pallas: bool = False
    interpret: bool = False
    int8_activations: bool = True
    tiles: tuple = ()

    @classmethod
    def from_env(cls, *, pallas: bool | None = None, int8_activations: bool = True) -> "KernelConfig":
        """The config for this process's default backend, with the experiment knobs of the environment."""
        on_gpu = _backend() == "gpu"
        raw = os.environ.get(TILES_ENV)
        interpret = os.environ.get(INTERPRET_ENV, "") == "1" or not on_gpu
        return cls(pallas=on_gpu if pallas is None else bool(pallas), interpret=interpret,
                   int8_activations=bool(int8_activations), tiles=parse_tiles(raw) if raw else ())

    def replace(self, **changes) -> "KernelConfig":
        return dataclasses.replace(self, **changes)

    def tile(self, key: str, default: tuple, min_value: int = 1) -> tuple:
        """The tile for `key`: the override in `tiles`, checked against the default's length, or the default."""
        for k, t in self.tiles:
            if k == key:
                if len(t) != len(default) or min(t) < min_value:
                    raise ValueError(f"{TILES_ENV}[{key!r}] must be {len(default)} ints >= {min_value}, got {list(t)}")
                return tuple(t)
        return tuple(default)


def parse_variant(spec: str, base: KernelConfig) -> KernelConfig:
    """'int8_activations=false,tiles={"Q4_K":[32,2,4,2]}' -> base with those fields (bench --ab)."""
    import re
    changes: dict = {}
    for item in filter(None, (p.strip() for p in re.split(r",(?=\s*[a-z_0-9]+=)", spec))):
        name, sep, value = item.partition("=")
        if not sep or name not in ("int8_activations", "tiles", "pallas"):
            raise ValueError(f"--ab: expected FIELD=VALUE with FIELD one of int8_activations, pallas, "
                             f"tiles; got {item!r}")
        if name == "tiles":
            try:
                changes[name] = parse_tiles(value)
            except ValueError as e:
                raise ValueError(f"--ab: tiles: {e}") from None
        elif value.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            changes[name] = value.lower() in ("1", "true", "yes", "on")
        else:
            raise ValueError(f"--ab: {name} takes true or false, got {value!r}")
    if not changes:
        raise ValueError("--ab: empty variant")
    return base.replace(**changes)
