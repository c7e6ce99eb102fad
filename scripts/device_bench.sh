#!/usr/bin/env bash
# Device run: whole-model benchmarks on random-weight GGUFs + the gpu-marked tests.
# usage: scripts/device_bench.sh "llama3.2-1b:q4_k_m llama3.2-1b:q8_0 llama3-8b:q4_k_m llama3-8b:bf16" [pytest]
set -o pipefail
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,memory.total --format=csv | tee "$OUT/gpu.txt"
if [ "${2:-}" = "pytest" ]; then
  timeout 240 python3 -m pytest -q -m gpu tests/test_kernels.py -p no:cacheprovider 2>&1 | tail -20 | tee "$OUT/pytest_gpu.log"
fi
for cfg in $1; do
  shape=${cfg%%:*}; quant=${cfg##*:}
  timeout 300 python3 -m realizar_jax.cli.bench --shape "$shape" --quant "$quant" --batch "${BATCH:-1}" \
     --dir /tmp/rb --json "$OUT/bench-$shape-$quant-b${BATCH:-1}.json" 2>&1 | tee -a "$OUT/bench.log"
  rm -f /tmp/rb/"$shape-$quant".gguf   # disk: the 8B bf16 file is 16 GB
done
python3 - "$OUT" <<'PY'
import glob, json, sys
from realizar_jax.cli.bench import format_table
rows = [json.load(open(p)) for p in sorted(glob.glob(sys.argv[1] + "/bench-*.json"))]
print(format_table(rows))
PY
