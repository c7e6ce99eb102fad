#!/usr/bin/env bash
# One device call: the 8B GGUF synthesized, then `bench --batch $BATCHES --profile` on the whole model
# (carry .whl: gguf). Logs and JSON land in $OUT. (Run 48 also ran a probe of the int8 GEMV at 5..16
# rows, scripts/gemv_rows_probe.py of fb7d82b: it lost to qmatmul and was deleted, BENCHMARKS.md.)
set -o pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
mkdir -p /tmp/rb
F=/tmp/rb/llama3-8b-q4_k_m.gguf
[ -f $F ] || (python3 -c "from realizar_jax.cli.synth import write_synthetic_gguf as w; w('$F.part', 'llama3-8b', 'q4_k_m')" && mv $F.part $F) > "$OUT/synth.log" 2>&1 &
SYN=$!
wait $SYN
timeout ${BENCH_S:-330} python3 -m realizar_jax.cli.bench --model $F --batch "${BATCHES:-1,2,4,8,16,32,64,128}" --gen 65 \
  --profile /tmp/prof --json "$OUT/bench_batches.json" ${BENCH_ARGS:-} 2>&1 | grep -v -e Warning -e 'loading .*%' > "$OUT/bench.log"
grep -v "us/step\|us/prefill" "$OUT/bench.log" | tail -40
