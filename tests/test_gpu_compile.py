"""The GPU programs, lowered and compiled for an H100/H200 on this CPU machine (realizar_jax/offline_gpu.py).

Lowering runs on every machine (jaxlib lowers pallas_calls to Triton IR without a device): a kernel
that Pallas cannot lower for the GPU fails here, in the default suite. Compiling that IR to machine
code needs the offline toolchain (the CUDA plugin's Triton pipeline, ptxas, nvdisasm: ~230 MB of
wheels from the package index); its test skips, saying why, when the index cannot be reached, and
fails when a kernel does not compile.
"""
from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys

import jax
import pytest

from realizar_jax import offline_gpu as og
from realizar_jax.cli.synth import SHAPES
from realizar_jax.kernels.layout import GpuQTensor
from realizar_jax.kernels.tuning import KernelConfig
from realizar_jax.quant.qtensor import QTensor

GPU = KernelConfig(pallas=True, interpret=False)

SASS = """
        /*0000*/                   S2R R0, SR_TID.X ;
.L_x_0:
        /*0010*/                   LDG.E R2, desc[UR4][R4.64] ;
.L_x_1:
        /*0020*/                   FFMA R3, R2, R2, R3 ;
        /*0030*/                   IMAD R5, R0, 0x4, RZ ;
        /*0040*/              @!P0 BRA `(.L_x_1) ;
        /*0050*/                   HMMA.16816.F32.BF16 R8, R12, R16, R8 ;
        /*0060*/                   LOP3.LUT R6, R6, 0xf, RZ, 0xc0, !PT ;
        /*0070*/                   I2FP.F32.S32 R7, R6 ;
        /*0080*/                   F2FP.BF16.F32.PACK_AB R7, R7, R7 ;
        /*0090*/               @P1 BRA `(.L_x_0) ;
        /*00a0*/                   EXIT ;
.L_x_2:
        /*00b0*/                   BRA `(.L_x_2);
"""


def test_sass_parse_finds_the_largest_innermost_loop():
    instr = og.parse_sass(SASS)
    assert [a for a, _, _ in instr] == list(range(0, 0xc0, 0x10))
    assert instr[4][1] == "BRA" and "0x20" in instr[4][2]   # the label became the address after it
    # the outer loop (0x10..0x90) contains the inner one (0x20..0x40); the self-loop after EXIT is no loop
    assert [a for a, _, _ in og.largest_loop(instr)] == [0x20, 0x30, 0x40]
    classes = [og.opcode_class(op) for _, op, _ in instr]
    assert classes[:7] == ["int/logic", "global load", "float", "int/logic", "control", "tensor", "int/logic"]
    assert classes[7:9] == ["convert", "convert"]


def test_abstract_params_are_the_gpu_layouts_without_weights():
    config = SHAPES["llama3-8b"]
    params = og.abstract_params(config, "q4_k_m")
    leaves = jax.tree_util.tree_leaves(params)
    assert leaves and not any(isinstance(x, jax.Array) for x in leaves)   # nothing was made
    layer = params.layers[0]
    assert isinstance(layer.wq, GpuQTensor) and layer.wq.qtype == "Q4_K" and layer.wq.shape == (4096, 4096)
    assert isinstance(layer.w_down, GpuQTensor) and layer.w_down.qtype == "Q6_K"   # llama-quantize's mix
    assert params.layers[4].w_down.qtype == "Q4_K" and params.lm_head.qtype == "Q6_K"
    assert layer.attn_norm.shape == (4096,)
    moe = og.abstract_params(SHAPES["tiny-moe"], "q4_k_m").layers[0]
    assert isinstance(moe.experts_up, QTensor) and moe.experts_up.shape[0] == 16   # experts stay file blocks


@pytest.mark.parametrize("rows, kernels", [(1, ("gemv_", "decode_attention")), (8, ("qmatmul_", "decode_attention"))])
# (names contain these: the attention kernel over a page pool is paged_decode_attention_update)
def test_decode_lowers_for_the_gpu_on_a_cpu(rows, kernels):
    config = SHAPES["tiny"]
    lowered = og.lower_decode(og.abstract_params(config, "q4_k_m"), config, slots=rows, max_seq_len=64,
                              kernels=GPU)
    calls = og.triton_calls(lowered)
    names = {c.name for c in calls}
    for part in kernels:
        assert any(part in n for n in names), (part, names)
    assert all(c.ir and c.num_warps in (1, 2, 4, 8, 16) and min(c.grid) >= 1 for c in calls)
    # the layers' identical kernels are one entry each: fewer entries than launches per step
    launches = str(lowered.as_text()).count(og.TRITON_TARGET)
    assert 0 < len(calls) <= launches


def test_prefill_lowers_for_the_gpu_on_a_cpu():
    config = SHAPES["tiny-gemma3"]   # sliding windows, q/k norms, softcap-free GeGLU
    lowered = og.lower_prefill(og.abstract_params(config, "q8_0"), config, batch=2, tokens=32, kernels=GPU)
    assert og.triton_calls(lowered)


@pytest.mark.parametrize("args, message", [
    (["--arch", "sm90"], "--arch must look like sm_90a"),
    (["--tiles", "{bad"], "--tiles: REALIZAR_GEMV_TILES must be JSON"),
    (["--shape", "tiny", "--rows", "8", "--tiles", '{"QMM_Q4_K_16": [1]}'], "must be 5 ints"),   # found tracing
    (["--kernel", "qmatmul("], "--kernel is not a regular expression"),
    (["--prefill", "-1"], "--prefill must be >= 0"),
    (["--rows", "0"], "batch sizes must be >= 1"),
    (["--shape", "llama9"], "invalid choice"),
])
def test_bad_arguments_fail_before_anything_is_fetched(args, message, tmp_path):
    """Each bad argument: one error line naming it, a nonzero exit, no toolchain download started."""
    env = dict(os.environ, REALIZAR_CUDA_TOOLCHAIN_DIR=str(tmp_path / "tc"))
    r = subprocess.run([sys.executable, "-m", "realizar_jax.cli.main", "gpu-compile", *args], capture_output=True,
                       text=True, env=env, timeout=120)
    assert r.returncode in (1, 2) and message in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "tc").exists()


def _toolchain():
    try:
        return og.Toolchain.fetch(os.environ.get(og.TOOLCHAIN_ENV) or None)
    except og.ToolchainError as e:
        pytest.skip(f"offline CUDA toolchain unavailable: {e}")


def test_every_kernel_of_the_tiny_model_compiles_for_hopper(tmp_path):
    """The command line end to end, in its own process (it loads the CUDA plugin's compiler)."""
    _toolchain()
    out = tmp_path / "report.json"
    r = subprocess.run([sys.executable, "-m", "realizar_jax.cli.main", "gpu-compile", "--shape", "tiny",
                        "--rows", "1,8", "--prefill", "64", "--json", str(out)], capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["arch"] == "sm_90a" and set(report["steps"]) == {"decode b1", "decode b8", "prefill 64"}
    rows = [row for step in report["steps"].values() for row in step]
    names = {row["kernel"] for row in rows}
    assert any(n.startswith("gemv_") for n in names) and any(n.startswith("qmatmul_") for n in names)
    for row in rows:
        assert 0 < row["registers"] <= 255 and row["sass"] > 0 and row["shared_kib"] <= 227, row
    assert "decode b1" in r.stdout and "regs" in r.stdout


def test_a_kernel_that_cannot_compile_is_named():
    _toolchain()
    config = SHAPES["tiny"]
    call = og.triton_calls(og.lower_decode(og.abstract_params(config, "q4_k_m"), config, slots=1,
                                           max_seq_len=64, kernels=GPU))[0]
    broken = og.TritonCall(call.name, call.ir[: len(call.ir) // 2], call.num_warps, call.num_stages, call.grid,
                           call.where)
    script = ("import os, sys, pickle; from realizar_jax import offline_gpu as og\n"
              "call = pickle.loads(sys.stdin.buffer.read())\n"
              "try:\n    og.compile_call(call, og.Toolchain.fetch(os.environ.get(og.TOOLCHAIN_ENV) or None))\n"
              "except og.ToolchainError as e:\n"
              "    print('ERR', e); sys.exit(3)\n")
    r = subprocess.run([sys.executable, "-c", script], input=pickle.dumps(broken), capture_output=True, timeout=300)
    assert r.returncode == 3, (r.stdout, r.stderr[-2000:])
    assert call.name in r.stdout.decode()
