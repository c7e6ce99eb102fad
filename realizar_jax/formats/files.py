"""Bounded, regular-file-only reads of everything a model folder or file holds.

A model path, or a file inside an HF folder, may be a FIFO (opening it waits for a writer that never comes), a
device (/dev/zero reads for ever), a symlink loop, a folder, or a regular file far larger than the format can
need. Every reader here opens with O_NONBLOCK (a FIFO opens at once), checks what it opened with fstat (so the
check and the read see the same file), refuses anything but a regular file, and refuses a file larger than
its bound before reading a byte.

Symlinks to regular files are followed wherever they point: the Hugging Face cache is laid out that way
(snapshots/REV/config.json -> ../../blobs/HASH), and a link to /etc/passwd gives the reader nothing it could
not get by naming /etc/passwd itself; what matters is that nothing unbounded is read, and nothing blocks.
"""
from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from ..errors import DamagedFileError, MissingTensorError

MiB = 1024 * 1024
# Bounds, far above any published model's file and far below what would exhaust memory when parsed.
MAX_JSON_BYTES = 64 * MiB  # config.json, tokenizer_config.json, generation_config.json, the shard index
MAX_TOKENIZER_JSON_BYTES = 256 * MiB  # tokenizer.json (the largest published ones are ~35 MB)
MAX_TEMPLATE_BYTES = 4 * MiB  # chat_template.jinja (real ones are < 100 kB)
MAX_SPM_MODEL_BYTES = 64 * MiB  # a SentencePiece tokenizer.model (Gemma's 262k pieces: 4.7 MB)

_KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def _kind(mode: int) -> str:
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def open_regular(path, what: str | None = None):
    """(binary file object, size) of `path`, which must be a regular file (after following symlinks).

    Raises MissingTensorError if nothing is there, DamagedFileError for a FIFO, device, folder, socket, symlink
    loop, or a file that cannot be opened; every message names the path."""
    path = Path(path)
    what = what or path.name
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        if os.path.islink(path):
            raise MissingTensorError(f"{what} is a symlink to {os.readlink(path)!r:.200}, which is not found",
                                     path=path) from None
        raise MissingTensorError(f"{what} not found", path=path) from None
    except IsADirectoryError:
        raise DamagedFileError(f"{what} is a folder, not a regular file", path=path) from None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise DamagedFileError(f"{what} is a symlink loop", path=path) from None
        raise DamagedFileError(f"{what} cannot be opened: {e.strerror}", path=path) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise DamagedFileError(f"{what} is {_kind(st.st_mode)}, not a regular file", path=path)
        return os.fdopen(fd, "rb"), st.st_size
    except BaseException:
        os.close(fd)
        raise


def read_bounded(path, limit: int, what: str | None = None) -> bytes:
    """The bytes of the regular file `path`, refused (DamagedFileError naming it) if larger than `limit`."""
    what = what or Path(path).name
    f, size = open_regular(path, what)
    with f:
        if size > limit:
            raise DamagedFileError(f"{what} is {size} bytes, more than the {limit}-byte limit for it", path=path)
        data = f.read(limit + 1)  # the size may lie (a file growing, /proc): never read past the bound
    if len(data) > limit:
        raise DamagedFileError(f"{what} is more than the {limit}-byte limit for it", path=path)
    return data


def present(path) -> bool:
    """Whether anything is at `path` (a dangling or looping symlink counts: reading it then says what is wrong).

    Use this rather than Path.is_file() to decide whether an optional file is there: is_file() is False for a
    FIFO or a broken link, which would silently drop the file instead of reporting it."""
    return os.path.lexists(path)
