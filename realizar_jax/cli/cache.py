"""`realizar-jax cache info [--json] | clear`: the persistent compilation cache's directory, what it
holds, and emptying it (realizar_jax/compile_cache.py). Neither starts JAX."""
from __future__ import annotations

import argparse
import json
import os
import sys

from .parser import Parser, run

PROG = "realizar-jax cache"


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog=PROG, description="Show or empty realizar-jax's persistent compilation cache.")
    sub = p.add_subparsers(dest="action", required=True, parser_class=Parser)
    i = sub.add_parser("info", help="the cache directory, its compiled programs and their size")
    i.add_argument("--json", action="store_true", help="print one JSON object")
    sub.add_parser("clear", help="remove every compiled program from the cache directory")
    return p


def _size(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    for unit in ("KiB", "MiB", "GiB"):
        n /= 1024
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}"


def _programs(n: int) -> str:
    return f"{n} compiled program{'' if n == 1 else 's'}"


def _notes() -> list[str]:
    from ..compile_cache import NO_CACHE_ENV, disabled_by_env
    notes = []
    if disabled_by_env():
        notes.append(f"{NO_CACHE_ENV} is set: load() does not use this cache")
    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        notes.append(f"JAX_COMPILATION_CACHE_DIR is set: JAX caches in {os.environ['JAX_COMPILATION_CACHE_DIR']} "
                     f"instead")
    return notes


def _cache(args) -> int:
    from .. import compile_cache
    if args.action == "info":
        report = {**compile_cache.info(), "notes": _notes()}
        if args.json:
            print(json.dumps(report))
            return 0
        state = "" if report["exists"] else " (does not exist yet)"
        print(f"directory  {report['directory']}{state}")
        print(f"entries    {_programs(report['entries'])}")
        print(f"size       {_size(report['bytes'])}")
        for note in report["notes"]:
            print(f"note       {note}")
        return 0
    removed = compile_cache.clear()
    if removed["bytes"] == 0 and removed["entries"] == 0:
        print(f"nothing to remove: {removed['directory']} is empty" if removed["exists"]
              else f"nothing to remove: {removed['directory']} does not exist")
    else:
        print(f"removed {_programs(removed['entries'])} ({_size(removed['bytes'])}) from "
              f"{removed['directory']}")
    return 0


def cache_main(argv=None) -> int:
    return run(PROG, _cache, build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(cache_main())
