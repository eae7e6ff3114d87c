"""Reading a file the user named (a prompt file, a suite): bounded, and never blocked by what is not a file."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from detaudit.errors import UsageError


def read_user_file(path: Path, cap: int, what: str) -> bytes:
    """The bytes of a regular file of at most `cap` bytes. Opened non-blocking, so a FIFO cannot hang the open, and
    checked on the open descriptor, so a device (/dev/zero) or a FIFO is refused, not read forever."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as e:
        raise UsageError(f"cannot read {what} {path}: {e.strerror or e}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise UsageError(f"cannot read {what} {path}: not a regular file (a directory, FIFO or device)")
        with os.fdopen(fd, "rb", closefd=False) as f:
            raw = f.read(cap + 1)
    except OSError as e:
        raise UsageError(f"cannot read {what} {path}: {e.strerror or e}") from None
    finally:
        os.close(fd)
    if len(raw) > cap:
        raise UsageError(f"{what} {path} is larger than {cap // 2**20} MiB")
    return raw
