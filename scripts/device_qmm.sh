#!/usr/bin/env bash
# One device call for the batched decode matmul: the 8B GGUF synthesized in the background while the
# kernel tests run compiled and scripts/qmatmul_probe.py sweeps shapes x rows x tiles, then
# `bench --batch $BATCHES` on the whole model (carry .whl: gguf).
set -o pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
mkdir -p /tmp/rb
F=/tmp/rb/llama3-8b-q4_k_m.gguf
[ -f $F ] || (python3 -c "from realizar_jax.cli.synth import write_synthetic_gguf as w; w('$F.part', 'llama3-8b', 'q4_k_m')" && mv $F.part $F) > "$OUT/synth.log" 2>&1 &
SYN=$!
if [ -z "${SKIP_TESTS:-}" ]; then
  timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py -k "qmatmul or rows_pick or large_shapes or routes_and or prefill_linear" -m "gpu or not gpu" 2>&1 | tail -6
fi
[ -n "${SKIP_PROBE:-}" ] || timeout -s INT ${PROBE_S:-200} python3 scripts/qmatmul_probe.py ${PROBE_ARGS:-} 2>&1 | grep -v Warning | tee "$OUT/probe.log" | tail -${PROBE_TAIL:-200}
wait $SYN
if [ -s "$OUT/qmm_tiles.json" ] && [ -z "${DEFAULT_TILES:-}" ]; then export REALIZAR_GEMV_TILES="$(cat $OUT/qmm_tiles.json)"; fi
echo "REALIZAR_GEMV_TILES=${REALIZAR_GEMV_TILES:-}"
timeout ${BENCH_S:-280} python3 -m realizar_jax.cli.bench --model $F --batch "${BATCHES:-1,4,8,16,32,64}" --gen 65 \
  --json "$OUT/bench_batches.json" ${BENCH_ARGS:-} 2>&1 | grep -v -e Warning -e 'loading .*%' | tail -30
