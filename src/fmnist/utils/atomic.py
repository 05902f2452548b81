"""Atomic file writes: readers see the old file or the complete new one, never a half.

Write to a temp file in the same directory, fsync it, rename over the target, fsync the
directory (so the rename itself survives a power cut). A crash at any moment, kill -9
included, leaves at worst a stray `*.tmp` file beside an intact target.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from pathlib import Path


_UMASK = os.umask(0)
os.umask(_UMASK)


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return  # some filesystems do not allow opening directories; the rename is still atomic
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(target: str | Path):
    """Yield a temp path next to `target`; on success it replaces `target`, on error it vanishes."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file the mode open() would
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, target)
        _fsync_dir(target.parent)
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes(target: str | Path, data: bytes) -> None:
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)


def write_text(target: str | Path, text: str) -> None:
    write_bytes(target, text.encode())


def _finite(obj):
    """NaN and infinities as None: json.dumps would write NaN/Infinity, which JSON does not allow."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def write_json(target: str | Path, obj) -> None:
    """Strict JSON (a non-finite float becomes null), indented."""
    write_text(target, json.dumps(_finite(obj), indent=2, sort_keys=False, allow_nan=False) + "\n")


def read_record(path: str | Path) -> dict:
    """A benchmark record ({"sittings": [...]}), empty where the file does not exist yet."""
    path = Path(path)
    return json.loads(path.read_text()) if path.exists() else {"sittings": []}


def append_sitting(path: str | Path, sitting: dict) -> int:
    """Add one entry to a benchmark record `path` ({"sittings": [...]}); earlier entries stay,
    so a new measurement adds to the record instead of erasing it. -> how many now."""
    doc = read_record(path)
    doc["sittings"].append(sitting)
    write_json(path, doc)
    return len(doc["sittings"])


def torch_save(obj, target: str | Path) -> None:
    import torch

    with atomic_path(target) as tmp:
        torch.save(obj, tmp)
