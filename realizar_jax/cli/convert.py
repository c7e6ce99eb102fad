"""`realizar-jax convert HF_DIR OUT.gguf [--quant ...]`: write a GGUF file llama.cpp can load."""
from __future__ import annotations

import argparse
import sys

from ..formats.gguf_writer import QUANT_CHOICES, write_gguf
from .parser import Parser, run

PROG = "realizar-jax convert"


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog=PROG, description="Convert an HF model folder to a GGUF file.")
    p.add_argument("hf_dir", help="folder with config.json, *.safetensors and the tokenizer files")
    p.add_argument("out", help="output .gguf path (written atomically)")
    p.add_argument("--quant", default="f16", type=str.lower, choices=QUANT_CHOICES,
                   help="tensor type: f16 (default), q8_0, q4_0, q4_k, q5_k, q6_k, q4_k_m (llama-quantize's mix), "
                        "mxfp4_moe (llama-quantize's: MXFP4 experts, Q8_0 elsewhere), mxfp4 (every matrix), f32, bf16; "
                        "1-D tensors always stay F32")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def convert_main(argv=None) -> int:
    return run(PROG, _convert, build_parser().parse_args(argv))


def _convert(args) -> int:
    out = write_gguf(args.hf_dir, args.out, args.quant, progress=False if args.no_progress else None)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(convert_main())
