#!/usr/bin/env bash
# One device call for issue 4: kernel microbench (picks GEMV tiles and the prefill route), whole-model
# benches, GPU tests. usage (device tool, carry .whl): bash scripts/device_issue4.sh [STEP...]
# steps (default: micro q4 q8 tests bf16; in this order): smoke tests micro sweep ncu prof ab q4 q8 dense1b bf16
#   smoke: compiles the fused activation prep and the fused attention step; where one fails, the later
#          steps run REALIZAR_GEMV_XPREP=kernel / REALIZAR_ATTN_UPDATE=xla
#   micro: scripts/device_microbench.py; its best GEMV tiles and prefill route are exported to the
#          later steps (REALIZAR_GEMV_TILES, REALIZAR_PREFILL_GEMM) unless USE_DEFAULTS=1
#   ab: 8B Q4_K_M and 1B Q8_0 benches (with --profile), each re-timed under the other value of each switch (--ab)
#   sweep: the int8 GEMV launches of an 8B layer under REALIZAR_GEMV_TILES settings (scripts/device_gemv_sweep.py)
#   ncu: Nsight Compute counters of the GEMV / unpack kernels (scripts/device_ncu.py; NCU_KINDS picks them)
#   prof: 8B Q4_K_M bench with --profile (kernel time per decode step; XQ_AB=1: also the prep's tiles,
#         here and in q4/q8)
#   q4: 8B and 1B Q4_K_M benches; q8: 1B Q8_0 bench; dense1b: 1B bf16 with REALIZAR_DENSE_GEMV=pallas|xla
#   tests: pytest -m gpu (one process per file part / switch); bf16: 8B bf16 bench (BF16_AB=1: also re-timed with XLA's dot)
set -o pipefail
export PYTHONUNBUFFERED=1
STEPS=${*:-micro q4 q8 tests bf16}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,clocks.max.sm,clocks.max.mem,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
date -u | tee -a "$OUT/gpu.txt"
has() { [[ " $STEPS " == *" $1 "* ]]; }
# EXTRA_AB="NAME=VALUE ...": every bench also re-times under each of these switch settings
EXTRA=(); for a in ${EXTRA_AB:-}; do EXTRA+=(--ab "$a"); done
# OLD_TREE=DIR (another checkout, e.g. `git archive COMMIT | tar -x -C DIR`): every bench also runs
# on that code, in its own process, after ours (for changes no switch selects, e.g. a weight layout)
bench() {  # shape quant [extra args]
  local shape=$1 quant=$2; shift 2
  set -- "$@" "${EXTRA[@]}"
  timeout ${BENCH_TIMEOUT:-240} python3 -m realizar_jax.cli.bench --shape "$shape" --quant "$quant" --dir /tmp/rb \
     --json "$OUT/bench-$shape-$quant-b1.json" "$@" 2>&1 | grep -v -e Warning -e 'loading .*%' \
     | tee -a "$OUT/bench.log"
  if [ -n "${OLD_TREE:-}" ]; then   # run from inside it: `python -m` puts the working directory first
    local mod=realizar_jax.cli.bench; [ -e "$OLD_TREE/realizar_jax/cli/bench.py" ] || mod=realizar_jax.bench  # before the cli/ move
    (cd "$OLD_TREE" && PYTHONPATH=/tmp/site:$OLD_TREE timeout ${BENCH_TIMEOUT:-240} python3 -m $mod \
      --shape "$shape" --quant "$quant" --dir /tmp/rb --json "$OUT/old-$shape-$quant-b1.json" 2>&1) \
      | grep -v -e Warning -e 'loading .*%' | sed 's/^/[old] /' | tee -a "$OUT/bench.log"
  fi
}
if has smoke; then   # the fused activation prep compiles on this GPU, else the benches fall back to XLA's
  if ! timeout 120 python3 -c "
import jax, jax.numpy as jnp
from realizar_jax.kernels.xquant import quantize_x
x = jnp.ones((1, 4096), jnp.bfloat16)
for g in (16, 32):
    for pre, o in ((None, None), ('norm', jnp.ones(4096)), ('swiglu', x)):
        print(g, pre, [a.shape for a in jax.block_until_ready(quantize_x(x, g, pre=pre, other=o, eps=1e-5 if pre else None))])
from realizar_jax.kernels.xquant import norm_quantize_x
r = jnp.ones((2, 1, 4096), jnp.float32)
print('norm + residual', [a.shape for a in jax.tree_util.tree_leaves(jax.block_until_ready(norm_quantize_x(x, (32, 16), jnp.ones(4096), 1e-5, residual=r)))])
from realizar_jax.kernels.xquant import norm_x
print('dense norm + residual', [a.shape for a in jax.block_until_ready(norm_x(x, jnp.ones(4096), 1e-5, residual=r))])
print('PREP OK')
from realizar_jax.kernels.attention import decode_attention_update
from realizar_jax.layers import rope_tables
b = jnp.ones((1, 32, 128), jnp.bfloat16); kv = jnp.ones((1, 8, 128), jnp.bfloat16)
c = jnp.ones((2, 1, 8, 1024, 128), jnp.bfloat16); pos = jnp.asarray([5], jnp.int32)
cs, sn = rope_tables(jnp.ones(64), pos)
print('attention update', [a.shape for a in jax.block_until_ready(decode_attention_update(b, kv, kv, c, c, pos, cs, sn, 0.1, 1))])
def two(c1, c2):   # the caches must be updated in place: no copy of the [2, 1, 8, 1024, 128] stacks
    for i in range(2):
        o, c1, c2 = decode_attention_update(b, kv, kv, c1, c2, pos, cs, sn, 0.1, i)
    return o, c1, c2
hlo = jax.jit(two, donate_argnums=(0, 1)).lower(c, c + 1).compile().as_text()
print('cache copies in the compiled step:', sum('copy' in l and '1024,128' in l for l in hlo.splitlines()))
from realizar_jax.kernels.attention import decode_attention_merged
from realizar_jax.attention import attention_sync
for g in (None, 32):
    r = jax.block_until_ready(decode_attention_merged(b, kv, kv, c, c, pos, cs, sn, 0.1, 1, attention_sync(c), group=g))
    print('merged attention', g, [a.shape for a in jax.tree_util.tree_leaves(r)])
print('MERGE OK')
" 2>&1 | tail -n 20 | tee "$OUT/smoke.log"; then echo "SMOKE: python failed"; fi
  if ! grep -q 'PREP OK' "$OUT/smoke.log"; then   # the prep did not compile: XLA prepares the int8s
    export REALIZAR_GEMV_XPREP=kernel; echo "SMOKE FAILED: XPREP=kernel"
  elif ! grep -q 'attention update' "$OUT/smoke.log"; then   # the fused step did not: XLA rotates and writes
    export REALIZAR_ATTN_UPDATE=xla; echo "SMOKE FAILED: ATTN_UPDATE=xla"
  elif ! grep -q 'MERGE OK' "$OUT/smoke.log"; then   # no merge in the attention launch: the prep merges
    export REALIZAR_ATTN_MERGE=prep; echo "SMOKE FAILED: ATTN_MERGE=prep"
  fi
fi
if has tests; then   # first: the GPU checks decide which numbers mean anything; one process per part
  parts=("tests/test_kernels.py" "tests/test_gpu_model.py -k match_cpu")
  for sw in "XPREP and kernel" "XPREP and xla" INPLACE UPDATE MERGE RESIDUAL SWIGLU FUSE DENSE ACT "PREFILL and xla" "PREFILL and pallas"; do
    parts+=("tests/test_gpu_model.py -k 'switches and $sw'")
  done
  for part in "${parts[@]}"; do
    eval "XLA_PYTHON_CLIENT_PREALLOCATE=false timeout ${TESTS_TIMEOUT:-280} python3 -m pytest -q -m gpu $part" \
      "-p no:cacheprovider" > "$OUT/pytest-${part//[^a-zA-Z]/_}.log" 2>&1 &
  done
  wait
  for f in "$OUT"/pytest-*.log; do echo "== $f"; tail -n 25 "$f"; done > "$OUT/pytest_gpu.log"
  rm -f "$OUT"/pytest-*.log; grep -e '^==' -e passed -e failed -e Error "$OUT/pytest_gpu.log"
fi
if has micro; then
  timeout 200 python3 scripts/device_microbench.py 2>&1 | tee "$OUT/microbench.log"
  if [ "${USE_DEFAULTS:-0}" != 1 ]; then
    TILES=$(grep -o 'GEMV_TILES=.*' "$OUT/microbench.log" | tail -1 | cut -d= -f2-)
    ROUTE=$(grep -o 'PREFILL_ROUTE=[a-z]*' "$OUT/microbench.log" | tail -1 | cut -d= -f2)
    [ -n "$TILES" ] && export REALIZAR_GEMV_TILES="$TILES"
    [ -n "$ROUTE" ] && export REALIZAR_PREFILL_GEMM="$ROUTE"
  fi
fi
if has sweep; then timeout ${SWEEP_TIMEOUT:-300} python3 scripts/device_gemv_sweep.py 2>&1 | tee "$OUT/sweep.log"; fi
if has ncu; then
  NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
  for kind in ${NCU_KINDS:-q4k q8 q6k dense unpack}; do
    timeout 100 "$NCU" --clock-control none -k regex:'gemv|unpack' --launch-skip 2 --launch-count 1 \
      --section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy --section LaunchStats \
      --section WarpStateStats --section SchedulerStats python3 scripts/device_ncu.py $kind 2>&1 \
      | grep -v -e '^==PROF==' -e Warning >> "$OUT/ncu.log"
  done
  grep -e 'gemv\|unpack' -e 'Duration' -e 'DRAM Throughput' -e 'Memory Throughput' -e 'Achieved Occupancy' \
       -e 'Registers Per' -e 'Issue Slots Busy' -e 'No Eligible' "$OUT/ncu.log" | head -80
fi
echo "benches run with REALIZAR_GEMV_TILES=${REALIZAR_GEMV_TILES:-<defaults>}" \
     "REALIZAR_PREFILL_GEMM=${REALIZAR_PREFILL_GEMM:-<default>}" | tee -a "$OUT/bench.log"
if has prof; then
  if [ "${XQ_AB:-0}" = 1 ]; then   # the activation prep's tiles (xquant.TILE = 32 groups, 8 warps)
    bench llama3-8b q4_k_m --profile /tmp/prof8b --ab 'REALIZAR_GEMV_TILES={"XQUANT":[32,4]}' \
      --ab 'REALIZAR_GEMV_TILES={"XQUANT":[16,2]}' --ab 'REALIZAR_GEMV_TILES={"XQUANT":[256,8]}'
  else
    bench llama3-8b q4_k_m --profile /tmp/prof8b
  fi
  for part in decode prefill; do
    f=$(find /tmp/prof8b/$part -name '*.trace.json.gz' -printf '%T@ %p\n' | sort -n | tail -1 | cut -d" " -f2-); [ -n "$f" ] && cp "$f" "$OUT/$part-8b.trace.json.gz"
  done
fi
if has ab; then
  for v in llama3-8b:q4_k_m llama3.2-1b:q8_0; do
    timeout ${AB_TIMEOUT:-420} python3 -m realizar_jax.cli.bench --shape "${v%%:*}" --quant "${v##*:}" --dir /tmp/rb \
      --json "$OUT/ab-${v%%:*}-${v##*:}.json" --profile "/tmp/prof-${v%%:*}" --ab REALIZAR_GEMV_XPREP=kernel 2>&1 | grep -v -e Warning -e 'loading .*%' \
      | tee -a "$OUT/ab.log"
  done
fi
# XQ_AB=1 also re-times the 1B models under other activation-prep tiles (xquant.TILE = 32 groups, 8 warps)
XQ_1B=(); [ "${XQ_AB:-0}" = 1 ] && XQ_1B=(--ab 'REALIZAR_GEMV_TILES={"XQUANT":[64,4]}' --ab 'REALIZAR_GEMV_TILES={"XQUANT":[16,2]}')
if has q4; then has prof || has ab || bench llama3-8b q4_k_m; bench llama3.2-1b q4_k_m "${XQ_1B[@]}"; fi
if has q8; then bench llama3.2-1b q8_0 "${XQ_1B[@]}"; fi
if has dense1b; then   # dense bf16 decode: Pallas GEMV vs XLA's dot, same file, same process kind
  for route in pallas xla; do
    REALIZAR_DENSE_GEMV=$route timeout 240 python3 -m realizar_jax.cli.bench --shape llama3.2-1b --quant bf16 \
      --dir /tmp/rb --json "$OUT/dense1b-$route.json" 2>&1 | grep -v -e Warning -e 'loading .*%' \
      | sed "s/^/[dense $route] /" | tee -a "$OUT/bench.log"
  done
fi
if has bf16; then bench llama3-8b bf16 ${BF16_AB:+--ab REALIZAR_DENSE_GEMV=xla}; fi
python3 - "$OUT" <<'PY'
import glob, json, sys
from realizar_jax.cli.bench import format_table
rows = [json.load(open(p)) for p in sorted(glob.glob(sys.argv[1] + "/bench-*.json"))]
print(format_table(rows))
PY
