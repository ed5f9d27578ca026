"""Atomic file writes: a reader (or a resumed run) sees the old file or the new one, never half of one.

Every file a run or a bench writes goes through here (config.json, the history, metrics.csv,
summary.md, the checkpoint, a method's artifacts, figures, bench tables). The content goes to a
temporary file in the same folder (same file system, so the rename is atomic), named after this
process and thread so that two writers never share a temporary file; it is flushed and fsynced,
then renamed over the target, and the folder is fsynced so the rename itself survives a power cut.
A process killed mid-write leaves the old file and a stale `.NAME.PID.TID.tmp`, which the next
process to open the run folder removes (`remove_stale_temporaries`).

Appends (`append_line`) are for logs that only grow (a payload audit): one `write` of one whole line
on a descriptor opened with O_APPEND, then fsync. A kill can at worst leave the last line without
its newline; `append_line` first completes such a torn line, so every line before it stays whole.

`FEDPEFT_TEST_WRITE_DELAY=SECONDS` (a testing hook, never set it in production) makes every atomic
write sleep that long between writing its temporary file and renaming it, so that a fault-injection
campaign (benchmarks/faults.py) can land a kill inside a checkpoint or history write.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
from pathlib import Path
from typing import Any, Callable

_TMP = re.compile(r"^\..+\.\d+\.\d+\.tmp$")


def atomic_write(path: str | Path, data: bytes | str) -> Path:
    """Write `data` (text is UTF-8 encoded) to `path` atomically."""
    payload = data.encode() if isinstance(data, str) else data
    return atomic_write_with(path, lambda fh: fh.write(payload))


def atomic_write_with(path: str | Path, write: Callable[[Any], Any]) -> Path:
    """Call `write(binary file)` on a temporary file, then rename it over `path` atomically
    (for writers that stream, such as torch.save or a figure's savefig)."""
    path = Path(path)
    tmp = temporary_name(path)
    try:
        with open(tmp, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        _test_delay()
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def atomic_write_json(path: str | Path, value: Any, *, indent: int | None = 2) -> Path:
    return atomic_write(path, json.dumps(value, indent=indent, default=_plain) + "\n")


def append_line(path: str | Path, line: str) -> None:
    """Append one line (a newline is added) to `path` with a single O_APPEND write, then fsync."""
    path = Path(path)
    data = (line.rstrip("\n") + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        size = os.fstat(fd).st_size
        if size:
            with open(path, "rb") as fh:  # a line torn by a kill: end it, so this one starts on its own
                fh.seek(size - 1)
                if fh.read(1) != b"\n":
                    data = b"\n" + data
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def temporary_name(path: Path) -> Path:
    """The temporary file of `path` for this process and thread."""
    return path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Delete the temporary files a killed writer left in `folder`. Call it only while holding the
    folder's lock (run/assemble.py), when no other process can be writing there."""
    removed = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    for entry in folder.iterdir():
        if _TMP.match(entry.name) and entry.is_file():
            entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed


def _test_delay() -> None:
    delay = os.environ.get("FEDPEFT_TEST_WRITE_DELAY")
    if delay:
        try:
            time.sleep(float(delay))
        except ValueError:
            pass


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
