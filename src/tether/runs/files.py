"""Atomic writes: write to a temporary file (or directory) beside the target, fsync, rename.

A crash or kill at any point leaves either the old file or the new one, never a torn one.

Every JSON file tether writes is strict JSON. JSON has no literal for NaN and infinities, so a
non-finite float is written as the string ``"nan"``, ``"inf"`` or ``"-inf"`` (:func:`json_ready`), in
``summary.json`` as in ``metrics.jsonl``; :func:`restore_nonfinite` reads them back as floats (the
arena's :func:`tether.arena.runs.to_float` reads them too).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

NONFINITE = frozenset({"nan", "inf", "-inf"})
"""How a non-finite float is written in tether's JSON files."""


def json_ready(obj: Any) -> Any:
    """``obj`` with every non-finite float (in dicts, lists and tuples, at any depth) replaced by its
    string, ``"nan"`` / ``"inf"`` / ``"-inf"``: what ``json.dumps(..., allow_nan=False)`` accepts."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else str(obj)
    if isinstance(obj, Mapping):
        return {k: json_ready(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_ready(v) for v in obj]
    return obj


def restore_nonfinite(obj: Any) -> Any:
    """The inverse of :func:`json_ready`: the strings "nan", "inf", "-inf" (in dicts and lists, at
    any depth) back to floats; a bare ``NaN`` literal that an older tether wrote is read by
    :mod:`json` as a float already."""
    if isinstance(obj, str) and obj in NONFINITE:
        return float(obj)
    if isinstance(obj, dict):
        return {k: restore_nonfinite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [restore_nonfinite(v) for v in obj]
    return obj


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(target.parent)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    """``obj`` as strict JSON (non-finite floats as strings, see :func:`json_ready`), atomically."""
    atomic_write_text(path, json.dumps(json_ready(obj), indent=2, sort_keys=True, allow_nan=False) + "\n")


@contextlib.contextmanager
def atomic_directory(path: str | Path) -> Iterator[Path]:
    """Write a whole directory, then swap it into place: ``with atomic_directory(d) as tmp:``.

    The files go to a hidden sibling; only when the block ends without error does the old
    directory (if any) move aside and the new one take its name, after which the old one is
    removed. A kill mid-write leaves the previous directory untouched (and a stale sibling that
    the next write clears). Between the two renames there is an instant with no directory at all,
    never a torn one.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    for stale in target.parent.glob(f".tmp-{target.name}-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}-", dir=target.parent))
    try:
        yield tmp
        for child in tmp.rglob("*"):
            if child.is_file():
                with open(child, "rb") as fh:
                    os.fsync(fh.fileno())
        old = None
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".old-{target.name}-", dir=target.parent))
            os.replace(target, old / target.name)
        os.replace(tmp, target)
        fsync_dir(target.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
