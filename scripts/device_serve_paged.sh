#!/usr/bin/env bash
# One device call (carry .whl: gguf + the web-server wheels; run 54 on 8e23b2a): 1) the compiled paged
# kernel tests while the 8B file is written; 2) serve + bench-serve at 1 and 64 clients (issue 17) and with a
# 1,000-token shared prefix at 1 and 8 (issue 20); 3) bench b32 through pages with PAGED_ATTN tile variants.
set -o pipefail
export PYTHONUNBUFFERED=1
T0=$(date +%s); el() { echo "[t=$(( $(date +%s) - T0 ))s] $*"; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
mkdir -p /tmp/rb; F=/tmp/rb/llama3-8b-q4_k_m.gguf
[ -f $F ] || (python3 -c "from realizar_jax.cli.synth import write_synthetic_gguf as w; w('$F', 'llama3-8b', 'q4_k_m')"; echo "synth rc $?") &
SYN=$!
el paged gpu tests
timeout 100 python3 -m pytest -q -p no:cacheprovider -n 0 -m gpu tests/test_paged_attention.py 2>&1 | tail -4 | tee $OUT/paged_tests.log
wait $SYN; el synth done
python3 -m realizar_jax.cli.main serve --model $F --port 8000 --max-slots 64 --max-seq-len 2048 --warmup 128,256 > $OUT/serve.log 2>&1 &
SERVER=$!
for i in $(seq 200); do curl -sf localhost:8000/health >/dev/null && break; sleep 1; done
el serving; tr '\r' '\n' < $OUT/serve.log | grep -e compiled -e "KV cache"
timeout 60 python3 -m realizar_jax.cli.main bench-serve --url http://127.0.0.1:8000 --clients 1,64 --prompt-tokens 128 \
  --max-tokens 128 --requests-per-client 4 --json $OUT/bs_main.json 2>&1 | tail -7
el prefix
timeout 50 python3 -m realizar_jax.cli.main bench-serve --url http://127.0.0.1:8000 --clients 1,8 --prompt-tokens 128 \
  --max-tokens 32 --requests-per-client 4 --shared-prefix 1000 --json $OUT/bs_prefix.json 2>&1 | tail -7
curl -s localhost:8000/metrics | grep -E "^realizar:(num_preemptions|prefix_cache_hit_rate|prefill_tokens)"
kill -TERM $SERVER; wait $SERVER; el "serve exit $?"
timeout 110 python3 -m realizar_jax.cli.bench --model $F --batch 32 --gen 65 --page-size 16 --json $OUT/paged_b32.json \
  --ab 'tiles={"PAGED_ATTN":[128,0,4,2]}' --ab 'tiles={"PAGED_ATTN":[64,0,4,3]}' --ab 'tiles={"PAGED_ATTN":[64,0,8,2]}' \
  2>&1 | grep -v -e Warning -e 'loading .*%' | tail -6
el end
