#!/usr/bin/env bash
# One device call: `bench` batch 1, then `realizar-jax serve` on the same file measured by
# `realizar-jax bench-serve` at several client counts (carry .whl: gguf + the web-server wheels).
# usage: bash scripts/device_serve.sh [CLIENTS] (default 1,8,32,64)
set -o pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
F=/tmp/rb/llama3-8b-q4_k_m.gguf
[ -n "${SKIP_BENCH:-}" ] || timeout 200 python3 -m realizar_jax.cli.bench --shape llama3-8b --quant q4_k_m --dir /tmp/rb --json "$OUT/bench.json" \
  2>&1 | grep -v -e Warning -e 'loading .*%' | tail -2
python3 -m realizar_jax.cli.main serve --model "$F" --port 8000 --max-slots 64 --max-seq-len 1024 \
  ${SERVE_ARGS:-} > "$OUT/serve.log" 2>&1 &
SERVER=$!
for i in $(seq 240); do curl -sf localhost:8000/health >/dev/null && break; sleep 1; done
curl -s localhost:8000/health; echo
timeout 300 python3 -m realizar_jax.cli.main bench-serve --url http://127.0.0.1:8000 --clients "${1:-1,8,32,64}" \
  --prompt-tokens 128 --max-tokens 128 --requests-per-client ${RPC:-2} ${BS_ARGS:-} --json "$OUT/bench_serve.json" 2>&1 | tail -20
curl -s localhost:8000/metrics | grep -E "^realizar:(num_requests|kv_cache|request_success)" | head
kill -TERM $SERVER; wait $SERVER; echo "serve exit $?"
tail -5 "$OUT/serve.log"
