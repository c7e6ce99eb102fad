"""The persistent compilation cache: JAX's own, pointed at realizar-jax's cache directory by load().

A second process that loads the same model and shapes reads the executables the first one wrote
instead of compiling them again. JAX keys an entry by the lowered program (the HLO: every shape,
dtype and qtype is in it, and so is every choice a KernelConfig or ModelConfig makes, as both are
static jit arguments), the compile options and XLA flags, the device kind, and the jax/jaxlib
version; so another model, shape, KernelConfig or jax version gets entries of its own, and one
that compiles to the same program rightly shares them (tests/test_compile_cache.py counts them).

Where: $REALIZAR_CACHE_DIR/jax-compile, else $XDG_CACHE_HOME/realizar-jax/jax-compile, else
~/.cache/realizar-jax/jax-compile. Only programs that took at least MIN_COMPILE_SECONDS to compile
are written (the model's steps; not the many small eager ops). Off: REALIZAR_NO_COMPILE_CACHE=1, or
load(compile_cache=False). `realizar-jax cache info|clear` shows and empties the directory.

JAX has one cache per process, so this is a per-process switch that each load() sets: a load()
with the cache off turns it off for the models loaded before it too, and the next load() with it
on turns it back on. A cache directory the user gave JAX itself (jax_compilation_cache_dir, or
JAX_COMPILATION_CACHE_DIR) is theirs: load() then neither moves it nor turns it off. Turning the
cache on after this process compiled something is fine (JAX reads the setting at each compile);
the programs compiled before are not written. Nothing happens at import: only load() touches the
disk. JAX trusts the directory's contents (it runs what it finds there): keep it private.
"""
from __future__ import annotations

import os
import shutil
import threading
import warnings
from pathlib import Path

CACHE_DIR_ENV = "REALIZAR_CACHE_DIR"   # realizar-jax's cache root; compiled programs go in its jax-compile/
NO_CACHE_ENV = "REALIZAR_NO_COMPILE_CACHE"
SUBDIR = "jax-compile"
MIN_COMPILE_SECONDS = 0.5
ENTRY_SUFFIX = "-cache"   # JAX's file name for one executable (an "-atime" file may sit beside it)

_lock = threading.Lock()
_ours: str | None = None   # the directory this module handed JAX, while JAX still uses it


def cache_dir() -> Path:
    """The directory realizar-jax keeps compiled programs in (it may not exist yet)."""
    root = os.environ.get(CACHE_DIR_ENV)
    if root:
        return Path(root).expanduser() / SUBDIR
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg and Path(xdg).is_absolute() else Path.home() / ".cache"
    return base / "realizar-jax" / SUBDIR


def disabled_by_env() -> bool:
    return os.environ.get(NO_CACHE_ENV, "").strip().lower() not in ("", "0", "false", "no", "off")


def configure(enabled: bool = True) -> str | None:
    """Turn the cache on (enabled=True, unless REALIZAR_NO_COMPILE_CACHE is set) or off for this
    process. Returns the directory JAX now writes compiled programs to (ours or the user's), or None.
    Called by load(); a directory that cannot be created warns and leaves the cache off."""
    import jax
    from jax.experimental.compilation_cache import compilation_cache as cc
    global _ours
    want = enabled and not disabled_by_env()
    with _lock:
        current = jax.config.jax_compilation_cache_dir
        if current and current != _ours:   # the user's own JAX cache: not ours to move or turn off
            return current if jax.config.jax_enable_compilation_cache else None
        path = str(cache_dir()) if want else None
        if path == current:
            return path
        if path is not None:
            try:
                Path(path).mkdir(parents=True, exist_ok=True)
            except OSError as e:
                warnings.warn(f"compilation cache off: cannot create {path}: {e.strerror or e}", stacklevel=3)
                path = None
        # reset: JAX remembers whether (and where) it opened a cache since its first compile
        cc.reset_cache()
        jax.config.update("jax_compilation_cache_dir", path)
        if path is not None and jax.config.jax_persistent_cache_min_compile_time_secs == 1.0:  # JAX's default
            jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS)
        _ours = path
        return path if jax.config.jax_enable_compilation_cache else None


def info(path: Path | None = None) -> dict:
    """{"directory", "exists", "entries" (compiled programs), "bytes" (every file under it)}."""
    path = Path(path or cache_dir())
    entries = total = 0
    if path.is_dir():
        for p in path.rglob("*"):
            if p.is_file() and not p.is_symlink():
                total += p.stat().st_size
                entries += p.parent == path and p.name.endswith(ENTRY_SUFFIX)
    return {"directory": str(path), "exists": path.is_dir(), "entries": entries, "bytes": total}


def clear(path: Path | None = None) -> dict:
    """Remove everything in the cache directory (the directory itself stays); info() of what went."""
    path = Path(path or cache_dir())
    removed = info(path)
    if path.is_dir():
        for p in path.iterdir():
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
    return removed
