"""Files and directories that are never seen half-written: written under a temporary sibling name,
then renamed into place (a rename within a directory is atomic), so a reader, or a restart after a
crash, sees the old content or the new, never a torn one."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path


def _tmp_sibling(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


@contextlib.contextmanager
def atomic_file(path: Path, durable: bool = True) -> Iterator[Path]:
    """A temporary sibling path to write the file at; renamed over `path` when the block succeeds
    (after an fsync when `durable`: the content is on disk before the name points at it), removed
    when it raises."""
    tmp = _tmp_sibling(path)
    try:
        yield tmp
        if durable:
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_atomic(path: Path, text: str, durable: bool = True) -> None:
    """Write `text` to `path` atomically (atomic_file). `durable=False` skips the fsync: for files
    rewritten every few seconds whose loss in a power cut costs nothing (heartbeats)."""
    with atomic_file(path, durable) as tmp:
        tmp.write_text(text)


@contextlib.contextmanager
def atomic_dir(path: Path) -> Iterator[Path]:
    """A temporary sibling directory to build the directory in; when the block succeeds it takes the
    place of `path` (an old one is renamed aside first and removed after, so `path` is missing only
    between two renames), and when it raises it is removed. Leftovers of a killed build are swept."""
    for debris in path.parent.glob(f".{path.name}.tmp*"):
        shutil.rmtree(debris, ignore_errors=True)
    tmp, old = _tmp_sibling(path), path.with_name(f".{path.name}.tmp{os.getpid()}-old")
    tmp.mkdir(parents=True)
    try:
        yield tmp
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
