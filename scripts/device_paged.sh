#!/usr/bin/env bash
# One device call for the paged KV cache (issue 20's GPU list; carry .whl: gguf + the web-server wheels):
#   tests    the gpu tests (the paged decode kernel compiled, against the jnp reference)
#   decode   `bench` decode at batch 1 and 32, contiguous rows vs pages of 16 and 32 positions
#   capacity `serve` with a KV pool sized for 16 sequences of 4,096 tokens (8 GiB for Llama-3-8B bf16 KV),
#            64 clients of ~1,000-token sequences: the /metrics preemption counter must stay 0
#   prefix   `serve` + `bench-serve --shared-prefix 1000`: TTFT p50 of later requests / the first's
# usage: bash scripts/device_paged.sh [tests] [decode] [capacity] [prefix]   (default: all four)
set -o pipefail
export PYTHONUNBUFFERED=1
STEPS=${*:-tests decode capacity prefix}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
F=/tmp/rb/llama3-8b-q4_k_m.gguf
has() { [[ " $STEPS " == *" $1 "* ]]; }
bench() {  # label, extra bench args
  timeout ${BENCH_TIMEOUT:-300} python3 -m realizar_jax.cli.bench --shape llama3-8b --quant q4_k_m --dir /tmp/rb \
    --batch 1,32 --json "$OUT/bench-$1.json" "${@:2}" 2>&1 | grep -v -e Warning -e 'loading .*%' | sed "s/^/[$1] /" \
    | tee -a "$OUT/bench.log" | tail -4
}
serve() {  # serve args...; waits for /health
  python3 -m realizar_jax.cli.main serve --model "$F" --port 8000 "$@" > "$OUT/serve-$STEP.log" 2>&1 &
  SERVER=$!
  for i in $(seq 300); do curl -sf localhost:8000/health >/dev/null && break; sleep 1; done
  grep "KV cache" "$OUT/serve-$STEP.log"
}
stop() {
  curl -s localhost:8000/metrics | grep -E "^realizar:(kv_cache|prefix_cache|num_preemptions|prefill_tokens)" \
    | tee "$OUT/metrics-$STEP.txt"
  kill -TERM $SERVER; wait $SERVER; echo "serve exit $?"
}
if has tests; then
  timeout ${TEST_TIMEOUT:-300} python3 -m pytest -q -m gpu tests -p no:cacheprovider 2>&1 | tail -25 \
    | tee "$OUT/pytest_gpu.log"
fi
if has decode; then   # the Done-when bar: paged >= 97% of contiguous decode tok/s at batch 1 and 32
  bench contiguous
  bench paged16 --page-size 16
  bench paged32 --page-size 32
fi
[ -f "$F" ] || python3 -m realizar_jax.cli.bench --shape llama3-8b --quant q4_k_m --dir /tmp/rb --gen 2 >/dev/null 2>&1
if has capacity; then   # 16 x 4,096 tokens of KV = 8 GiB; 64 sequences of 550 + 450 tokens = 64,000 positions
  STEP=capacity serve --max-slots 64 --max-seq-len 4096 --kv-cache-memory 8 --warmup 64,512
  timeout 500 python3 -m realizar_jax.cli.main bench-serve --url http://127.0.0.1:8000 --clients 64 \
    --prompt-tokens 550 --max-tokens 450 --requests-per-client 1 --json "$OUT/bench_serve-capacity.json" 2>&1 | tail -6
  STEP=capacity stop
fi
if has prefix; then   # the Done-when bar: ttft_p50_over_first <= 0.20
  STEP=prefix serve --max-slots 32 --max-seq-len 2048
  timeout 400 python3 -m realizar_jax.cli.main bench-serve --url http://127.0.0.1:8000 --clients 1,8 \
    --prompt-tokens 128 --max-tokens 32 --requests-per-client 4 --shared-prefix 1000 \
    --json "$OUT/bench_serve-prefix.json" 2>&1 | tail -8
  STEP=prefix stop
fi
