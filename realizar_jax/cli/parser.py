"""What every realizar-jax command shares: its argument parser and its one error line.

A command that fails ends with `realizar-jax CMD: error: MESSAGE` on stderr and exit code 2 for a bad
command line, 1 for a failure while running (a missing or damaged file, a value the model refuses): no
usage block, no traceback.
"""
from __future__ import annotations

import argparse
import sys

from ..errors import RealizarError

DTYPES = ("float32", "bfloat16", "float16")
# formats.gguf_writer.QUANT_CHOICES, spelled out so that parsing a command line does not import jax
# (tests/test_quantize_on_load.py keeps the two equal)
QUANT_CHOICES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_k", "q5_k", "q6_k", "q4_k_m", "mxfp4_moe", "mxfp4")
# What a user can cause; any other exception is a bug and keeps its traceback.
USER_ERRORS = (RealizarError, OSError, ValueError)


def fail(prog: str, error, code: int = 1) -> int:
    """Print `PROG: error: MESSAGE` for `error` (an exception or a message) on stderr and return `code`."""
    if isinstance(error, OSError) and error.filename is not None and error.strerror:
        error = f"{error.filename}: {error.strerror}"  # not "[Errno 2] No such file or directory: 'x'"
    print(f"{prog}: error: {error}", file=sys.stderr)
    return code


def run(prog: str, fn, *args) -> int:
    """fn(*args), a user's error turned into the error line and exit code 1."""
    try:
        return fn(*args)
    except USER_ERRORS as e:
        return fail(prog, e)
    except KeyboardInterrupt:
        return 130


class Parser(argparse.ArgumentParser):
    """argparse with the error line instead of usage + error (still exit 2)."""

    def error(self, message):
        raise SystemExit(fail(self.prog, message, 2))


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value
