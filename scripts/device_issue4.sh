#!/usr/bin/env bash
# One device call for issue 4: GPU tests, kernel microbench (picks the prefill route), whole-model benches.
# usage (device tool, carry .whl): bash scripts/device_issue4.sh
set -o pipefail
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,clocks.max.sm,clocks.max.mem,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
date -u | tee -a "$OUT/gpu.txt"
timeout 150 python3 scripts/device_microbench.py 2>&1 | tee "$OUT/microbench.log"
ROUTE=$(grep -o 'PREFILL_ROUTE=[a-z]*' "$OUT/microbench.log" | tail -1 | cut -d= -f2)
export REALIZAR_PREFILL_GEMM=${ROUTE:-xla}
echo "prefill route for the benches: $REALIZAR_PREFILL_GEMM" | tee -a "$OUT/bench.log"
for cfg in llama3-8b:q4_k_m llama3.2-1b:q4_k_m llama3.2-1b:q8_0; do
  shape=${cfg%%:*}; quant=${cfg##*:}
  timeout 200 python3 -m realizar_jax.bench --shape "$shape" --quant "$quant" --dir /tmp/rb \
     --json "$OUT/bench-$shape-$quant-b1.json" 2>&1 | grep -v Warning | tee -a "$OUT/bench.log"
done
timeout 170 python3 -m pytest -q -m gpu tests/test_kernels.py tests/test_gpu_model.py -p no:cacheprovider -x 2>&1 \
  | tail -25 | tee "$OUT/pytest_gpu.log"
timeout 150 python3 -m realizar_jax.bench --shape llama3-8b --quant bf16 --dir /tmp/rb \
   --json "$OUT/bench-llama3-8b-bf16-b1.json" 2>&1 | grep -v Warning | tee -a "$OUT/bench.log"
python3 - "$OUT" <<'PY'
import glob, json, sys
from realizar_jax.bench import format_table
rows = [json.load(open(p)) for p in sorted(glob.glob(sys.argv[1] + "/bench-*.json"))]
print(format_table(rows))
PY
