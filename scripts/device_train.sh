#!/usr/bin/env bash
# Train the embedded default model on the device machine (see TRAINING.md).
#   bash scripts/device_train.sh [extra train_default_model.py args]     one run with the recipe's defaults
#   SWEEP='--dropout 0.1;--dropout 0.2 --max-epochs 20' bash scripts/device_train.sh
#       one run per ';'-separated variant; the one with the lowest validation loss is returned
# Writes the HF folder to $OUT/model (bf16 safetensors, sharded < 16 MiB), logs to $OUT/train.log.
set -o pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
RUNS=/tmp/train_runs
rm -rf "$RUNS"; mkdir -p "$RUNS" "$OUT"
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader || true
python3 -c "import jax, optax, tokenizers; print('jax', jax.__version__, jax.devices(), 'optax', optax.__version__)" || exit 1
IFS=';' read -r -a VARIANTS <<< "${SWEEP:- }"
for i in "${!VARIANTS[@]}"; do
    echo "=== run $i: ${VARIANTS[$i]} $*" | tee -a "$OUT/train.log"
    # shellcheck disable=SC2086  # variants are word-split on purpose
    python3 scripts/train_default_model.py --out "$RUNS/$i" --save-dtype bfloat16 ${VARIANTS[$i]} "$@" 2>&1 \
        | tee -a "$OUT/train.log" || exit 1
done
# Pick the run with the lowest validation loss; print a table of all.
python3 - "$RUNS" "$OUT" <<'PY' | tee -a "$OUT/train.log"
import json, shutil, sys
from pathlib import Path
runs, out = Path(sys.argv[1]), Path(sys.argv[2])
logs = {d: json.loads((d / "train_log.json").read_text()) for d in sorted(runs.iterdir())}
print(f"{'run':>3} {'steps':>6} {'epochs':>6} {'dropout':>7} {'train':>6} {'valid':>6} {'test':>6} {'bpb':>6} {'time':>6}")
for d, r in logs.items():
    print(f"{d.name:>3} {r['recipe']['steps']:6d} {r['epochs']:6.1f} {r['recipe']['dropout']:7.2f} "
          f"{r['final_train_loss']:6.3f} {r['valid_loss']:6.3f} {r['heldout_loss']:6.3f} "
          f"{r['heldout_bits_per_byte']:6.3f} {r['train_time_s']:6.1f}")
best = min(logs, key=lambda d: logs[d]["valid_loss"])
print("returning run", best.name)
shutil.copytree(best, out / "model")
PY
# Quality check with an independent implementation: transformers, greedy, on the exported folder.
python3 - "$OUT/model" <<'PY' 2>&1 | grep -v -i -e warn -e "Loading weights" | tee -a "$OUT/train.log"
import sys, torch, transformers
d = sys.argv[1]
tok = transformers.AutoTokenizer.from_pretrained(d)
m = transformers.LlamaForCausalLM.from_pretrained(d, torch_dtype=torch.float32).eval()
for prompt in ["def fibonacci(n):", "import os\n\ndef ", "class Stack:\n    def __init__(self):"]:
    ids = tok(prompt, return_tensors="pt").input_ids
    out = m.generate(ids, max_new_tokens=60, do_sample=False)
    print("=" * 20, repr(prompt)); print(tok.decode(out[0], skip_special_tokens=True))
PY
ls -la "$OUT/model"
