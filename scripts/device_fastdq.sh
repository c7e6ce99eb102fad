#!/usr/bin/env bash
# One device call for branch qmm-fastdq (carry .whl: gguf): the qmatmul's own Q4_K/Q6_K dequantizers
# checked compiled (`gpu` kernel tests and whole-model batch logits), then the 8B Q4_K_M decode at
# batches 8..64 with them, without them (FAST_DEQUANT emptied in a copy of the tree: main's kernel), and
# with Q6_K's 16-row tile at one superblock per step (gpu-compile: no spill, 120 registers).
# Prediction (gpu-compile's main-loop SASS): Q4_K -23..-27% instructions at equal occupancy, Q6_K -22%
# and no spill: the qmatmul's 5.8 ms of the 7.4 ms batch-8 step down by 15-25%.
set -o pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
mkdir -p /tmp/rb
F=/tmp/rb/llama3-8b-q4_k_m.gguf
[ -f $F ] || (python3 -c "from realizar_jax.cli.synth import write_synthetic_gguf as w; w('$F.part', 'llama3-8b', 'q4_k_m')" && mv $F.part $F) > "$OUT/synth.log" 2>&1 &
SYN=$!
timeout 200 python3 -m pytest -q -p no:cacheprovider -n 0 -m "gpu or not gpu" tests/test_kernels.py \
  -k "qmatmul or fast_dequant or rows_pick or large_shapes" 2>&1 | tail -4
timeout 200 python3 -m pytest -q -p no:cacheprovider -n 0 -m gpu tests/test_gpu_model.py 2>&1 | tail -4
wait $SYN
B=${BATCHES:-8,16,32,64}
Q6='tiles={"QMM_Q6_K_16":[64,16,1,4,3],"QMM_Q6_K_32":[64,32,1,4,4]}'
timeout 240 python3 -m realizar_jax.cli.bench --model $F --batch "$B" --gen 65 --json "$OUT/fastdq.json" \
  --ab "$Q6" 2>&1 | grep -v -e Warning -e 'loading .*%' | tail -14
rm -rf /tmp/base && mkdir /tmp/base && cp -r realizar_jax /tmp/base/
sed -i 's/^FAST_DEQUANT = .*/FAST_DEQUANT = {}/' /tmp/base/realizar_jax/kernels/qmatmul.py
grep -n "^FAST_DEQUANT" /tmp/base/realizar_jax/kernels/qmatmul.py
(cd /tmp/base && PYTHONPATH=/tmp/site:/tmp/base timeout 200 python3 -m realizar_jax.cli.bench --model $F --batch "$B" \
  --gen 65 --json "$OUT/base.json" 2>&1 | grep -v -e Warning -e 'loading .*%' | tail -10)
