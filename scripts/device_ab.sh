#!/usr/bin/env bash
# One device call: the gpu tests, then whole-model benches of this tree and of OLD_TREE (another checkout,
# e.g. `git archive COMMIT | tar -x -C .ab/old`) on the same random-weight files, each in its own process,
# in the order new, old (and new again on the first model: the run-to-run spread).
# usage (device tool, carry .whl and .ab): OLD_TREE=.ab/old bash scripts/device_ab.sh [tests] [ab] [gen]
#   gen: Model.generate() decode speed on the first model's file (128-token prompt, 256 new tokens), new tree
#   MODELS="llama3-8b:q4_k_m llama3-8b:bf16" picks the files; EXTRA="--ab int8_activations=false" adds variants.
set -o pipefail
export PYTHONUNBUFFERED=1
STEPS=${*:-tests ab}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,clocks.max.sm,clocks.max.mem,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
has() { [[ " $STEPS " == *" $1 "* ]]; }
bench() {  # tree label shape quant
  local tree=$1 label=$2 shape=$3 quant=$4 mod=realizar_jax.cli.bench
  [ -f "$tree/realizar_jax/cli/bench.py" ] || mod=realizar_jax.bench
  (cd "$tree" && PYTHONPATH=/tmp/site:$PWD timeout ${BENCH_TIMEOUT:-200} python3 -m $mod --shape "$shape" \
     --quant "$quant" --dir /tmp/rb --json "$OUT/$label-$shape-$quant.json" ${EXTRA:-} 2>&1) \
     | grep -v -e Warning -e 'loading .*%' | sed "s/^/[$label] /" | tee -a "$OUT/bench.log"
}
if has tests; then
  PYTHONPATH=/tmp/site:$PWD timeout ${TEST_TIMEOUT:-240} python3 -m pytest -q -m gpu tests -p no:cacheprovider \
     2>&1 | tail -25 | tee "$OUT/pytest_gpu.log"
fi
if has ab; then
  MODELS=${MODELS:-llama3-8b:q4_k_m llama3-8b:bf16}
  for m in $MODELS; do
    shape=${m%%:*}; quant=${m##*:}
    bench "$PWD" new "$shape" "$quant"
    [ -n "${OLD_TREE:-}" ] && bench "$OLD_TREE" old "$shape" "$quant"
    [ "$m" = "${MODELS%% *}" ] && bench "$PWD" new2 "$shape" "$quant"   # the spread, on the first model
    if has gen && [ -z "${GEN_DONE:-}" ]; then
      GEN_DONE=1; PYTHONPATH=/tmp/site:$PWD timeout 200 python3 - /tmp/rb/"$shape-$quant".gguf <<'PY' 2>&1 | grep -v Warning | tee -a "$OUT/gen.log"
import sys, numpy as np, realizar_jax as rj
m = rj.load(sys.argv[1], max_seq_len=1024)
ids = [int(t) for t in np.random.default_rng(0).integers(3, m.config.vocab_size, 128)]
m.generate(ids, max_new_tokens=16)   # compiles
for _ in range(2):
    g = m.generate(ids, max_new_tokens=256, stop_token_ids=[])
    print("generate:", g.stats.summary())
PY
    fi
    rm -f /tmp/rb/"$shape-$quant".gguf   # disk: the 8B bf16 file is 16 GB
  done
  python3 - "$OUT" <<'PY'
import glob, json, sys
for p in sorted(glob.glob(sys.argv[1] + "/*-*.json")):
    r = json.load(open(p))
    print(f"{p.rsplit('/', 1)[1]:40s} decode {r['decode_tok_s']:8.1f} tok/s  prefill {r['prefill_tok_s']:8.0f} tok/s  "
          f"compile {r['compile_s']:5.1f} s  load {r['load_s']:5.1f} s")
PY
fi
