"""`realizar-jax convert HF_DIR OUT.gguf [--quant ...]`: write a GGUF file llama.cpp can load."""
from __future__ import annotations

import argparse
import sys

from ..errors import RealizarError
from ..formats.gguf_writer import QUANT_CHOICES, write_gguf


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = parser or argparse.ArgumentParser(prog="realizar-jax convert",
                                          description="Convert an HF model folder to a GGUF file.")
    p.add_argument("hf_dir", help="folder with config.json, *.safetensors and the tokenizer files")
    p.add_argument("out", help="output .gguf path (written atomically)")
    p.add_argument("--quant", default="f16", type=str.lower, choices=QUANT_CHOICES,
                   help="tensor type: f16 (default), q8_0, q4_0, q4_k, q5_k, q6_k, q4_k_m (llama-quantize's mix), "
                        "f32, bf16; 1-D tensors always stay F32")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def convert_main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        out = write_gguf(args.hf_dir, args.out, args.quant, progress=None if not args.no_progress else False)
    except (RealizarError, OSError) as e:
        print(f"realizar-jax convert: error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(convert_main())
