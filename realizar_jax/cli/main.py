"""Command line: realizar-jax generate | perplexity | inspect | convert | bench | bench-serve | serve | cache |
gpu-compile.

Every failure the user can cause (missing file, damaged model, bad argument) ends in one line on
stderr, `realizar-jax CMD: error: ...`, and exit code 2 (command line) or 1 (while running).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .. import __version__, default_model_path
from .parser import DTYPES, QUANT_CHOICES, Parser, positive_int, run

DEFAULT_MODEL = default_model_path()
DELEGATED = ("inspect", "convert", "bench", "bench-serve", "serve", "cache", "gpu-compile")  # own parser in cli/NAME.py (a dash there: _)


def _resolve_model(path: str | None) -> Path:
    if path:
        return Path(path)
    if not DEFAULT_MODEL.exists():
        raise FileNotFoundError(f"no --model given and the embedded default model is missing ({DEFAULT_MODEL})")
    print(f"realizar-jax: no --model given; using the embedded default model ({DEFAULT_MODEL.name}, "
          f"a small LLaMA trained on Python's standard library)", file=sys.stderr)
    return DEFAULT_MODEL


def cmd_generate(args) -> int:
    import realizar_jax as rj
    model = rj.load(_resolve_model(args.model), dtype=args.dtype, max_seq_len=args.max_seq_len,
                    quantize=args.quantize)
    kw = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
              min_p=args.min_p, repetition_penalty=args.repetition_penalty, seed=args.seed, stop=args.stop or None)
    pieces = iter(model.chat([{"role": "user", "content": args.prompt}], stream=True, **kw) if args.chat
                  else model.stream(args.prompt, **kw))
    first = next(pieces, "")  # a prompt the model refuses fails here, before anything reaches stdout
    sys.stdout.write(("" if args.chat else args.prompt) + first)
    for piece in pieces:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    print(f"[realizar-jax] {model.last_stats.summary()}", file=sys.stderr)
    return 0


def cmd_perplexity(args) -> int:
    import realizar_jax as rj
    text = Path(args.file).read_text(encoding="utf-8")
    model = rj.load(_resolve_model(args.model), dtype=args.dtype, max_seq_len=args.max_seq_len,
                    quantize=args.quantize)
    ppl = model.perplexity(text, stride=args.stride)
    print(f"{ppl:.4f}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="realizar-jax", description="LLM inference on JAX for GGUF and safetensors models")
    p.add_argument("--version", action="version", version=f"realizar-jax {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=Parser)

    g = sub.add_parser("generate", help="generate text (streams to stdout, stats to stderr)")
    g.add_argument("--model", help="a .gguf file or HF folder (default: the embedded model)")
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-new-tokens", type=positive_int, default=64)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--min-p", type=float, default=0.0)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=None, help="sampling seed (default: fresh randomness)")
    g.add_argument("--stop", action="append", help="stop string (repeatable)")
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    g.add_argument("--dtype", choices=DTYPES)
    g.add_argument("--max-seq-len", type=positive_int)
    g.add_argument("--quantize", choices=QUANT_CHOICES, help="quantize an HF folder's weights as they load "
                   "(the types `convert --quant` writes)")
    g.set_defaults(func=cmd_generate)

    x = sub.add_parser("perplexity", help="perplexity of a text file")
    x.add_argument("file")
    x.add_argument("--model")
    x.add_argument("--stride", type=positive_int)
    x.add_argument("--dtype", choices=DTYPES)
    x.add_argument("--max-seq-len", type=positive_int)
    x.add_argument("--quantize", choices=QUANT_CHOICES, help="quantize an HF folder's weights as they load")
    x.set_defaults(func=cmd_perplexity)

    for name, helptext in [("inspect", "show a model's config, memory estimate and tensors by role"),
                           ("convert", "convert an HF folder to GGUF (optionally quantized)"),
                           ("bench", "benchmark load/compile/prefill/decode on random-weight GGUFs"),
                           ("bench-serve", "load an OpenAI-compatible server with concurrent streaming clients"),
                           ("serve", "serve a model over an OpenAI-compatible HTTP API (completions, chat)"),
                           ("cache", "the persistent compilation cache: info (directory, entries, size) | clear"),
                           ("gpu-compile", "compile the GPU kernels for an NVIDIA GPU on this machine (no GPU): "
                            "registers, spills, machine code")]:
        s = sub.add_parser(name, help=helptext, add_help=False)
        s.add_argument("rest", nargs=argparse.REMAINDER)
        s.set_defaults(func=_delegate(name))
    return p


def _delegate(name: str):
    module = name.replace("-", "_")  # bench-serve -> cli/bench_serve.py's bench_serve_main

    def call(args) -> int:  # cli/NAME.py's NAME_main(argv)
        import importlib
        return getattr(importlib.import_module(f"realizar_jax.cli.{module}"), f"{module}_main")(args.rest)
    return call


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    if argv and argv[0] in DELEGATED:
        # argparse's REMAINDER drops a leading option (`convert --help`, `inspect --json X`): hand the
        # subcommand every argument itself, its own parser checks them.
        args = parser.parse_args(argv[:1])
        args.rest = argv[1:]
    else:
        args = parser.parse_args(argv)
    return run(f"realizar-jax {args.command}", args.func, args)


if __name__ == "__main__":
    raise SystemExit(main())
