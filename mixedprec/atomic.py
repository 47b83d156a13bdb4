"""Atomic file writes: a failed or interrupted save leaves the previous file (or none), never a
partial one. The data is complete in memory before the target's folder is touched; it goes to a
temporary file next to the target, is flushed to disk, then renamed over the target."""
from __future__ import annotations

import os
import tempfile


def write_atomically(path: str | os.PathLike, data: bytes | str) -> None:
    """Writes ``data`` (a str as UTF-8) to ``path``, with an ordinary new file's permissions."""
    if isinstance(data, str):
        data = data.encode()
    path = os.fspath(path)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            umask = os.umask(0)
            os.umask(umask)
            os.fchmod(f.fileno(), 0o666 & ~umask)  # mkstemp makes it owner-only
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
