"""Atomic file writes: a reader (or a resumed run) sees the old file or the new one, never half of one.

The content goes to a temporary file in the same folder (same file system, so the rename is atomic),
named after this process and thread so that two writers never share a temporary file; it is
flushed and fsynced, then renamed over the target, and the folder is fsynced so the rename itself
survives a power cut.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any, Callable


def atomic_write(path: str | Path, data: bytes | str) -> Path:
    """Write `data` (text is UTF-8 encoded) to `path` atomically."""
    payload = data.encode() if isinstance(data, str) else data
    return atomic_write_with(path, lambda fh: fh.write(payload))


def atomic_write_with(path: str | Path, write: Callable[[Any], Any]) -> Path:
    """Call `write(binary file)` on a temporary file, then rename it over `path` atomically
    (for writers that stream, such as torch.save)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def atomic_write_json(path: str | Path, value: Any, *, indent: int | None = 2) -> Path:
    return atomic_write(path, json.dumps(value, indent=indent, default=_plain) + "\n")


def _plain(o: Any) -> Any:
    """JSON for numpy/torch scalars and arrays; anything else as its text."""
    if hasattr(o, "tolist"):
        return o.tolist()
    return str(o)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # some file systems do not open folders
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
