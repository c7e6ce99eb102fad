"""Time rj.load(folder, quantize=...) of a random-weight Llama-3-8B-shaped bf16 safetensors folder.

Builds the folder once (16 GB, written tensor by tensor: random bf16 words with |w| in [2^-7, 2^-6)),
then loads it quantized, printing the seconds (load included), the peak host RSS (VmHWM) and, with
--check, whether the device's bytes equal the numpy encoders' on a few rows of each quantized type.

    PYTHONPATH=. python scripts/quantize_on_load_8b.py --quant q4_k_m --check
    PYTHONPATH=. python scripts/quantize_on_load_8b.py --no-compile-cache   # a cold compile
"""
from __future__ import annotations

import argparse
import json
import struct
import time
from pathlib import Path

import numpy as np

SHAPES = {"llama3-8b": dict(hidden=4096, ffn=14336, layers=32, heads=32, kv_heads=8, vocab=128256),
          "tiny": dict(hidden=256, ffn=512, layers=2, heads=4, kv_heads=2, vocab=512)}   # to try the script


def _tensors(s):
    h, f, kv = s["hidden"], s["ffn"], s["hidden"] // s["heads"] * s["kv_heads"]
    yield "model.embed_tokens.weight", (s["vocab"], h)
    for i in range(s["layers"]):
        p = f"model.layers.{i}."
        yield p + "input_layernorm.weight", (h,)
        for name, shape in (("q_proj", (h, h)), ("k_proj", (kv, h)), ("v_proj", (kv, h)), ("o_proj", (h, h))):
            yield p + f"self_attn.{name}.weight", shape
        yield p + "post_attention_layernorm.weight", (h,)
        for name, shape in (("gate_proj", (f, h)), ("up_proj", (f, h)), ("down_proj", (h, f))):
            yield p + f"mlp.{name}.weight", shape
    yield "model.norm.weight", (h,)
    yield "lm_head.weight", (s["vocab"], h)


def build(folder: Path, s: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": s["hidden"],
        "intermediate_size": s["ffn"], "num_hidden_layers": s["layers"], "num_attention_heads": s["heads"],
        "num_key_value_heads": s["kv_heads"], "vocab_size": s["vocab"], "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0, "max_position_embeddings": 8192, "tie_word_embeddings": False,
        "torch_dtype": "bfloat16"}))
    header, offset = {}, 0
    for name, shape in _tensors(s):
        n = int(np.prod(shape)) * 2
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    rng = np.random.default_rng(0)
    tmp = folder / "model.safetensors.partial"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for name, shape in _tensors(s):
            rows = shape[0] if len(shape) > 1 else 1
            cols = shape[-1]
            for a in range(0, rows, 4096):
                r = min(rows, a + 4096) - a
                w = rng.integers(0, 1 << 16, (r, cols), dtype=np.uint16)
                f.write(((w & 0x807F) | 0x3C00).astype("<u2").tobytes())   # sign, low mantissa, exponent 2^-7
    tmp.rename(folder / "model.safetensors")


def vm_hwm_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def check(folder: Path, quant: str, rows: int = 64) -> None:
    """Device bytes == numpy bytes for the first rows of each planned type's tensors."""
    from realizar_jax.formats import open_model
    from realizar_jax.formats.quantized import quantized_source
    from realizar_jax.quant import quantize
    from realizar_jax.quant.device_quant import quantize_on_device
    raw = open_model(folder)
    seen = {}
    for t in quantized_source(raw, quant).tensors.values():
        if len(t.shape) == 2 and t.qtype not in seen and t.qtype not in ("F32", "F16", "BF16"):
            x = np.asarray(raw.tensors[t.name].data[:rows], np.float32)
            seen[t.qtype] = bool(np.array_equal(np.asarray(quantize_on_device(x, t.qtype)), quantize(x, t.qtype)))
            print(f"check {t.qtype} ({t.name}, {rows} rows): device bytes == numpy bytes: {seen[t.qtype]}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b")
    ap.add_argument("--folder", type=Path, help="default: /tmp/realizar-bench/<shape>-bf16")
    ap.add_argument("--quant", default="q4_k_m")
    ap.add_argument("--no-compile-cache", action="store_true", help="load(compile_cache=False): compile cold")
    ap.add_argument("--check", action="store_true", help="also compare device and numpy bytes on a few rows")
    args = ap.parse_args()
    args.folder = args.folder or Path(f"/tmp/realizar-bench/{args.shape}-bf16")
    if not (args.folder / "model.safetensors").exists():
        t = time.perf_counter()
        build(args.folder, SHAPES[args.shape])
        print(f"built {args.folder} in {time.perf_counter() - t:.1f} s", flush=True)
    import jax

    import realizar_jax as rj
    t = time.perf_counter()
    model = rj.load(args.folder, quantize=args.quant, compile_cache=not args.no_compile_cache, max_seq_len=2048)
    jax.block_until_ready(model.params)
    secs = time.perf_counter() - t
    print(f"load(quantize={args.quant!r}) on {jax.devices()[0].device_kind}: {secs:.1f} s, "
          f"VmHWM {vm_hwm_mib():,.0f} MiB", flush=True)
    if args.check:
        check(args.folder, args.quant)


if __name__ == "__main__":
    main()
