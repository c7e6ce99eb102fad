#!/usr/bin/env bash
# The next device session's runs on main (carry .whl: gguf + the web-server wheels), one step per call:
#   tests   pytest -m gpu tests (every compiled kernel and family on the GPU route)
#   table   bench --batch 1,8,16,32,64,128 (issue 18's table; contiguous KV, as bench keeps by default)
#   paged   bench --batch 32 through pages of 16: the PAGED_ATTN tile variants, then --profile with and
#           without pages (where the paged step's extra 0.63 ms of run 51 goes)
#   serve   serve + bench-serve at 1 and 64 clients, then /metrics: queue / prefill / decode time and the
#           scheduler's time by phase (what holds 64 clients at ~3,500 tok/s and TTFT ~500 ms, run 54)
# usage: bash scripts/device_next.sh STEP [STEP...]
set -o pipefail
export PYTHONUNBUFFERED=1
STEPS=" $* "
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
T0=$(date +%s); el() { echo "[t=$(( $(date +%s) - T0 ))s] $*"; }
[ -d /tmp/site/fastapi ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
mkdir -p /tmp/rb; F=/tmp/rb/llama3-8b-q4_k_m.gguf
[ -f $F ] || (python3 -c "from realizar_jax.cli.synth import write_synthetic_gguf as w; w('$F', 'llama3-8b', 'q4_k_m')"; \
  echo "synth rc $?") &
SYN=$!
bench() { timeout ${BENCH_TIMEOUT:-300} python3 -m realizar_jax.cli.bench --model $F --gen 65 "$@" 2>&1 \
  | grep -v -e Warning -e 'loading .*%'; }
if [[ $STEPS == *" tests "* ]]; then
  el tests; timeout ${TEST_TIMEOUT:-400} python3 -m pytest -q -p no:cacheprovider -n 0 -m gpu tests 2>&1 | tail -25 \
    | tee $OUT/pytest_gpu.log
fi
wait $SYN
if [[ $STEPS == *" table "* ]]; then
  el table; bench --batch 1,8,16,32,64,128 --json $OUT/table.json | tail -8
fi
if [[ $STEPS == *" paged "* ]]; then
  el paged; bench --batch 32 --page-size 16 --json $OUT/paged_tiles.json --ab 'tiles={"PAGED_ATTN":[128,0,4,2]}' \
    --ab 'tiles={"PAGED_ATTN":[64,0,4,3]}' --ab 'tiles={"PAGED_ATTN":[64,0,8,2]}' | tail -5
  bench --batch 32 --page-size 16 --profile /tmp/prof_paged | tail -30 > $OUT/profile_paged.txt
  bench --batch 32 --profile /tmp/prof_contiguous | tail -30 > $OUT/profile_contiguous.txt
  tail -12 $OUT/profile_paged.txt $OUT/profile_contiguous.txt
fi
if [[ $STEPS == *" serve "* ]]; then
  el serve
  python3 -m realizar_jax.cli.main serve --model $F --port 8000 --max-slots 64 --max-seq-len 2048 --warmup 128,256 \
    > $OUT/serve.log 2>&1 &
  SERVER=$!
  for i in $(seq 240); do curl -sf localhost:8000/health >/dev/null && break; sleep 1; done
  tr '\r' '\n' < $OUT/serve.log | grep -e compiled -e "KV cache"
  timeout 120 python3 -m realizar_jax.cli.main bench-serve --url http://127.0.0.1:8000 --clients 1,64 --prompt-tokens 128 \
    --max-tokens 128 --requests-per-client 4 --json $OUT/bench_serve.json 2>&1 | tail -7
  curl -s localhost:8000/metrics | grep -E "^realizar:(engine_seconds|request_(queue|prefill|decode)_time_seconds_(sum|count))" \
    | tee $OUT/metrics.txt
  kill -TERM $SERVER; wait $SERVER; el "serve exit $?"
fi
el end
