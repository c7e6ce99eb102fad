"""Compile the Pallas GPU kernels for an NVIDIA architecture on a machine that has no GPU.

Lowering a jitted function for the "cuda" platform needs no device: JAX lowers every pallas_call to
Triton IR on the host (custom call `__gpu$xla.gpu.triton`). The CUDA plugin's own Triton pipeline --
the one XLA runs on the GPU machine, of the same jaxlib version -- turns that IR into PTX without a
driver; ptxas assembles it (registers, spills, shared memory) and nvdisasm shows the machine code. So a
kernel that would not compile on the device fails here, and its register count and instruction stream
can be read before a device call is spent on it.

The toolchain is four wheels from the package index, downloaded once (toolchain_dir(): beside the
compilation cache, or where the caller says: the CLI's $REALIZAR_CUDA_TOOLCHAIN_DIR): jax-cudaNN-plugin and jax-cudaNN-pjrt of the
installed jax version (the Triton pipeline; loaded from there, never installed, so this process keeps
its CPU backend) and NVIDIA's ptxas and nvdisasm (pinned). Nothing here runs code on a GPU. The
pipeline is loaded once per process (_triton_compiler), from the first Toolchain asked.
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib.machinery
import importlib.util
import re
import subprocess
import sys
import tempfile
import zipfile
from collections import Counter
from pathlib import Path

from .errors import RealizarError

TRITON_TARGET = "__gpu$xla.gpu.triton"
CUDA_MAJOR = "12"
# (pinned: a new ptxas may allocate registers differently from the figures BENCHMARKS.md quotes)
TOOL_WHEELS = {
    "ptxas": ("nvidia-cuda-nvcc-cu12==12.9.86", "nvidia/cuda_nvcc/bin/ptxas"),
    "nvdisasm": ("nvidia-cuda-nvdisasm==13.5.37", "nvidia/cu13/bin/nvdisasm"),
}


class ToolchainError(RealizarError):
    """The offline CUDA toolchain could not be fetched or loaded, or a kernel did not compile (the
    message names the step and the kernel)."""


TOOLCHAIN_ENV = "REALIZAR_CUDA_TOOLCHAIN_DIR"   # read by the CLI (cli/gpu_compile.py), handed to fetch()


def toolchain_dir() -> Path:
    """Where fetch() keeps the toolchain when not told: cuda-toolchain/ beside the compilation cache."""
    from .compile_cache import cache_dir
    return cache_dir().parent / "cuda-toolchain"


def _fetch(requirement: str, into: Path) -> Path:
    """pip download one wheel (no dependencies) and unpack it as `into`; -> `into`. Unpacked beside it
    and renamed into place, so a second process never sees half a toolchain."""
    import jax
    if into.is_dir():
        return into
    into.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=into.parent, prefix=".fetch-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d", tmp,
               requirement]
        print(f"realizar-jax: fetching {requirement} for the offline CUDA toolchain into {into.parent}",
              file=sys.stderr)
        r = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if r.returncode or not wheels:
            last = (r.stderr or r.stdout).strip().splitlines()[-1:] or ["no wheel"]
            raise ToolchainError(f"pip download {requirement} failed (jax {jax.__version__}): {last[0]}")
        unpacked = Path(tmp) / "unpacked"
        with zipfile.ZipFile(wheels[0]) as z:
            z.extractall(unpacked)
        for exe in unpacked.rglob("bin/*"):
            exe.chmod(0o755)
        try:
            unpacked.rename(into)
        except OSError:
            if not into.is_dir():   # not another process that got there first
                raise
    return into


@dataclasses.dataclass(frozen=True)
class Toolchain:
    plugin_dir: Path   # jax_cudaNN_plugin (the Triton compile entry) and jax_plugins/xla_cudaNN (PJRT)
    ptxas: Path
    nvdisasm: Path

    @classmethod
    def fetch(cls, root: Path | None = None) -> "Toolchain":
        import jax
        root = Path(root).expanduser() if root else toolchain_dir()
        version = jax.__version__
        plugin = root / f"jax-cuda{CUDA_MAJOR}-{version}"
        _fetch(f"jax-cuda{CUDA_MAJOR}-plugin=={version}", plugin / "plugin")
        _fetch(f"jax-cuda{CUDA_MAJOR}-pjrt=={version}", plugin / "pjrt")
        tools = {}
        for name, (req, member) in TOOL_WHEELS.items():
            d = _fetch(req, root / req.replace("==", "-"))
            tools[name] = d / member
            if not tools[name].exists():
                raise ToolchainError(f"{req} has no {member}")
        return cls(plugin, tools["ptxas"], tools["nvdisasm"])


_compiler = None


def _triton_compiler(tc: Toolchain):
    """-> compile(ir bytes, arch "9.0", num_warps, num_ctas, num_stages) from the CUDA plugin, loaded by
    path: registering the plugin as a JAX backend would make JAX look for a GPU."""
    global _compiler
    if _compiler is None:
        from jax._src.lib import xla_client
        pkg = f"jax_cuda{CUDA_MAJOR}_plugin"
        so = tc.plugin_dir / "plugin" / pkg / "cuda_plugin_extension.so"
        pjrt = tc.plugin_dir / "pjrt" / "jax_plugins" / f"xla_cuda{CUDA_MAJOR}" / "xla_cuda_plugin.so"
        for f in (so, pjrt):
            if not f.exists():
                raise ToolchainError(f"{f} is missing: remove {tc.plugin_dir} and fetch again")
        spec = importlib.util.spec_from_file_location(f"{pkg}.cuda_plugin_extension", so,
                                                      loader=importlib.machinery.ExtensionFileLoader(
                                                          f"{pkg}.cuda_plugin_extension", str(so)))
        ext = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(ext)
        c_api = xla_client.load_pjrt_plugin_dynamically("cuda", str(pjrt))
        _compiler = lambda ir, arch, w, c, s: ext.compile_triton_to_asm(c_api, ir, arch, w, c, s)  # noqa: E731
    return _compiler


@dataclasses.dataclass(frozen=True)
class TritonCall:
    """One pallas_call as lowered for the GPU: its Triton IR and launch parameters."""
    name: str
    ir: bytes
    num_warps: int
    num_stages: int
    grid: tuple
    where: str     # the call site (JAX's named scopes) from the MLIR location

    @property
    def key(self) -> str:
        """Equal for two calls that compile to the same kernel (the IR without its source locations)."""
        text = _ir_text(self.ir) + f"|{self.num_warps},{self.num_stages}"
        return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()


def triton_calls(lowered) -> list[TritonCall]:
    """Every Triton custom call in a `jax.jit(f).trace(...).lower(lowering_platforms=("cuda",))` result,
    in program order (a kernel lowered twice with the same IR and launch parameters appears once)."""
    module = lowered.compiler_ir("stablehlo")
    found, seen = [], set()

    def walk(op):
        for region in op.regions:
            for block in region:
                for o in block.operations:
                    o = o.operation
                    if o.name == "stablehlo.custom_call" and str(o.attributes["call_target_name"]).strip('"') == TRITON_TARGET:
                        cfg = o.attributes["mhlo.backend_config"]
                        grid = tuple(int(str(cfg[f"grid_{a}"]).split(":")[0]) for a in "xyz")
                        call = TritonCall(str(cfg["name"]).strip('"'), bytes(cfg["ir"].value_bytes),
                                          _int_attr(cfg["num_warps"]), _int_attr(cfg["num_stages"]), grid,
                                          _scope(str(o.location)))
                        if call.key not in seen:
                            seen.add(call.key)
                            found.append(call)
                    walk(o)
    walk(module.operation)
    return found


def _ir_text(ir: bytes) -> str:
    from jax._src.lib.triton import dialect
    from jaxlib.mlir import ir as mlir
    with mlir.Context() as ctx:
        dialect.register_dialect(ctx)
        return mlir.Module.parse(ir).operation.get_asm(enable_debug_info=False)


def _int_attr(a) -> int:
    return int(str(a).split(":")[0])


def _scope(loc: str) -> str:
    m = re.search(r'loc\("([^"]*)"', loc)
    return m.group(1) if m else ""


@dataclasses.dataclass
class Compiled:
    call: TritonCall
    arch: str
    registers: int
    spill_stores: int
    spill_loads: int
    shared_bytes: int
    instructions: int          # SASS instructions in the kernel
    loop_instructions: int     # in its largest innermost loop (the K walk, for a matmul)
    loop_mix: dict             # opcode class -> count in that loop
    ptx: str = dataclasses.field(repr=False, default="")
    sass: str = dataclasses.field(repr=False, default="")

    def row(self) -> dict:
        c = self.call
        return dict(kernel=c.name, where=c.where, grid=list(c.grid), warps=c.num_warps, stages=c.num_stages,
                    registers=self.registers, spills=self.spill_stores + self.spill_loads,
                    shared_kib=round(self.shared_bytes / 1024, 1), sass=self.instructions,
                    loop=self.loop_instructions, loop_mix=self.loop_mix)


def compile_call(call: TritonCall, tc: Toolchain, arch: str = "sm_90a") -> Compiled:
    """Triton IR -> PTX (the plugin's pipeline) -> cubin (ptxas -v) -> SASS (nvdisasm). Raises
    ToolchainError naming the kernel when a step fails: that kernel would not compile on the device."""
    compile_ = _triton_compiler(tc)
    cc = re.fullmatch(r"sm_(\d)(\d)a?", arch)
    if not cc:
        raise ValueError(f"arch must look like sm_90a, got {arch!r}")
    try:
        res = compile_(call.ir, f"{cc.group(1)}.{cc.group(2)}", call.num_warps, 1, call.num_stages)
    except Exception as e:   # the pipeline raises its own error types
        raise ToolchainError(f"Triton could not compile {call.name} ({call.where}): {e}") from None
    with tempfile.TemporaryDirectory() as tmp:
        ptx, cubin = Path(tmp) / "k.ptx", Path(tmp) / "k.cubin"
        ptx.write_text(res.asm)
        r = subprocess.run([str(tc.ptxas), f"-arch={arch}", "-v", str(ptx), "-o", str(cubin)],
                           capture_output=True, text=True)
        if r.returncode:
            raise ToolchainError(f"ptxas failed on {call.name} ({call.where}): {r.stderr.strip()[-2000:]}")
        info = r.stderr
        d = subprocess.run([str(tc.nvdisasm), "-c", str(cubin)], capture_output=True, text=True)
        if d.returncode:
            raise ToolchainError(f"nvdisasm failed on {call.name}: {d.stderr.strip()[-500:]}")
        sass = d.stdout
    regs = int(_grab(r"Used (\d+) registers", info))
    stores, loads = int(_grab(r"(\d+) bytes spill stores", info)), int(_grab(r"(\d+) bytes spill loads", info))
    instr = parse_sass(sass)
    body = largest_loop(instr)
    return Compiled(call, arch, regs, stores, loads, int(res.smem_bytes), len(instr), len(body),
                    dict(Counter(opcode_class(op) for _, op, _ in body).most_common()), res.asm, sass)


def _grab(pattern: str, text: str) -> str:
    m = re.search(pattern, text)
    return m.group(1) if m else "0"


_SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)\s*([^;]*);")
_LABEL = re.compile(r"^(\.L_x_\d+):", re.M)


def parse_sass(sass: str) -> list[tuple[int, str, str]]:
    """nvdisasm -c output -> [(address, opcode with modifiers, operands)]; a branch's label operand is
    replaced by the address of the instruction after that label."""
    out, pending, labels = [], [], {}
    for line in sass.splitlines():
        label = _LABEL.match(line.strip())
        if label:
            pending.append(label.group(1))
            continue
        m = _SASS_LINE.search(line)
        if m:
            a = int(m.group(1), 16)
            for name in pending:
                labels[name] = a
            pending = []
            out.append((a, m.group(2), m.group(3)))
    resolved = [(a, op, re.sub(r"`?\((\.L_x_\d+)\)", lambda m: hex(labels.get(m.group(1), -1)), args))
                for a, op, args in out]
    return resolved


def largest_loop(instr: list[tuple[int, str, str]]) -> list[tuple[int, str, str]]:
    """The instructions of the largest loop that contains no other loop: a backward BRA to a label."""
    index = {a: i for i, (a, _, _) in enumerate(instr)}
    loops = []
    for i, (addr, op, args) in enumerate(instr):
        m = re.search(r"0x([0-9a-f]+)", args) if op.startswith("BRA") else None
        if m and int(m.group(1), 16) <= addr and int(m.group(1), 16) in index:
            loops.append((index[int(m.group(1), 16)], i))
    loops = [(s, e) for s, e in loops if e > s]   # not the one-instruction trap loop after EXIT
    innermost = [(s, e) for s, e in loops if not any(s <= s2 and e2 <= e and (s2, e2) != (s, e) for s2, e2 in loops)]
    if not innermost:
        return []
    s, e = max(innermost, key=lambda se: se[1] - se[0])
    return instr[s:e + 1]


OPCODE_CLASSES = (
    ("tensor", ("HMMA", "IMMA", "HGMMA", "IGMMA", "QGMMA", "WGMMA")),
    ("global load", ("LDG",)), ("shared", ("LDS", "STS", "LDSM", "LDGSTS", "LDGDEPBAR", "DEPBAR")),
    ("convert", ("I2F", "F2I", "F2F", "I2I", "F2FP", "I2FP")),
    ("float", ("FFMA", "FADD", "FMUL", "HFMA2", "HADD2", "HMUL2", "FMNMX", "FSEL", "FSETP")),
    ("int/logic", ("IMAD", "IADD", "LOP3", "SHF", "PRMT", "LEA", "ISETP", "SEL", "IABS", "IMNMX", "VIADD",
                   "SGXT", "BFE", "BFI", "VIMNMX", "IDP", "IMUL", "MOV", "UMOV", "UIADD", "ULEA", "ULOP3",
                   "USHF", "UISETP", "USEL", "UPRMT", "UIMAD", "MOV32I", "CS2R", "S2R", "S2UR", "R2UR")),
    ("control", ("BRA", "BAR", "BSYNC", "BSSY", "EXIT", "WARPSYNC", "NOP", "YIELD", "SYNCS", "ELECT")),
)


def opcode_class(opcode: str) -> str:
    base = opcode.split(".")[0]
    for name, prefixes in OPCODE_CLASSES:
        if any(base.startswith(p) for p in prefixes):
            return name
    return "other"


def lower_for_gpu(fn, *args, **static):
    """jax.jit(fn, static_argnames=static) traced on abstract `args` and lowered for CUDA (no device)."""
    import jax
    jitted = jax.jit(fn, static_argnames=tuple(static))
    return jitted.trace(*args, **static).lower(lowering_platforms=("cuda",))


def abstract_params(config, quant: str, dtype="bfloat16"):
    """The Params pytree `load()` would build on a GPU for a file of this config written with
    `convert --quant quant` (the types of gguf_writer.plan_qtype), as ShapeDtypeStructs: packed matrices
    go through the GPU repack under jax.eval_shape, so the kernels see exactly the layouts they get on
    the device, and no weight is made."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from .formats.gguf_writer import plan_qtype
    from .formats.roles import ROLES, expected_shape, required_layer_roles
    from .kernels.layout import repack_for_gpu
    from .quant.qtensor import QTensor
    from .quant.types import qtype_info, row_bytes
    from .weights import LAYER_FIELDS, LayerParams, Params, rope_inv_freq
    dtype = jnp.dtype(dtype)
    c = config

    def leaf(role, layer):
        shape = expected_shape(role, c)
        if ROLES[role].kind == "vector":
            return jax.ShapeDtypeStruct(shape, jnp.float32)
        qtype = plan_qtype(role, layer, shape, quant, c.num_layers, not c.tie_embeddings, num_experts=c.num_experts)
        if qtype_info(qtype).is_dense:
            return jax.ShapeDtypeStruct(shape, dtype)
        q = QTensor(jax.ShapeDtypeStruct((*shape[:-1], row_bytes(qtype, shape[-1])), jnp.uint8), qtype, shape)
        return q if ROLES[role].kind == "experts" else jax.eval_shape(repack_for_gpu, q)

    needed = set(required_layer_roles(c))
    layers = tuple(LayerParams(**{r: leaf(r, i) if r in needed else None for r in LAYER_FIELDS})
                   for i in range(c.num_layers))
    embed = leaf("embed", None)
    inv = np.asarray(rope_inv_freq(c))
    local = None if c.rope_local_theta is None else jax.ShapeDtypeStruct(inv.shape, jnp.float32)
    return Params(embed=embed, layers=layers, final_norm=leaf("final_norm", None),
                  lm_head=embed if c.tie_embeddings else leaf("lm_head", None),
                  rope_inv_freq=jax.ShapeDtypeStruct(inv.shape, jnp.float32), rope_local_inv_freq=local)


def lower_decode(params, config, *, slots: int, max_seq_len: int, kernels, dtype="bfloat16", steps: int = 1,
                 page_size: int | None = None):
    """The serving engine's decode chunk (serving.state.decode) for `slots` active rows over a page pool
    that holds every slot's max_seq_len positions, lowered for CUDA."""
    import functools
    import jax
    import jax.numpy as jnp
    from .cache import DEFAULT_PAGE_SIZE
    from .serving import state as st
    dtype = jnp.dtype(dtype)
    page_size = page_size or DEFAULT_PAGE_SIZE
    per_slot = -(-max_seq_len // page_size)
    state = jax.eval_shape(functools.partial(st.new_state, config, slots, max_seq_len, dtype,
                                             slots * per_slot + 1, page_size))
    release = jax.ShapeDtypeStruct((slots,), jnp.bool_)
    tables = jax.ShapeDtypeStruct((slots, per_slot), jnp.int32)
    fn = functools.partial(st.decode, config=config, dtype=dtype, kernels=kernels)
    return lower_for_gpu(fn, params, state, release, tables, steps=steps, logprobs=False, sample=False,
                         penalize=False, rows=slots)


def lower_prefill(params, config, *, batch: int, tokens: int, kernels, dtype="bfloat16"):
    """The serving engine's batched prefill (serving.state.prefill) of [batch, tokens], lowered for CUDA."""
    import functools
    import jax
    import jax.numpy as jnp
    from .serving import state as st
    dtype = jnp.dtype(dtype)
    fn = functools.partial(st.prefill, config=config, dtype=dtype, kv_dtype=dtype, kernels=kernels)
    return lower_for_gpu(fn, params, jax.ShapeDtypeStruct((batch, tokens), jnp.int32),
                         jax.ShapeDtypeStruct((batch,), jnp.int32))
