"""Where things live on disk: the one home of every path the package computes.

Standard library only (os, pathlib), so that any module can import it without pulling anything
else in; tests/test_imports.py checks that. The cache root and the data dir read the environment on
every call, not at import, so that a variable set after the import (a test's monkeypatch, a launcher
exporting it to its ranks) still counts.

- ``REPO_ROOT``: the directory holding the ``sempa_dist`` package. Running from a checkout (an
  editable install or ``PYTHONPATH``) that is the checkout, with ``configs/`` and ``.git``; a wheel
  install has no repository, and there it is site-packages: the users treat it as "look here if it
  exists" (a relative DeepSpeed config path, the demo's config, ``../shared/data``, git metadata)
  and fall back or report as they did before.
- ``cache_root()``: ``$SEMPA_CACHE``, default ``~/.cache/sempa-dist`` (built models, tokenised data).
- ``sts_cache_dir()``: ``<cache root>/sts``: STS sets fetched from the hub, kept in the SentEval layout.
- ``data_dir()``: ``$SEMPA_DATA_DIR``, else ``../shared/data`` beside the checkout or the working directory.
- ``BUNDLED_DIR`` and its files: the small data shipped inside the package (package-data in pyproject).
"""

from __future__ import annotations

import os
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
REPO_ROOT = PACKAGE_DIR.parent
BUNDLED_DIR = PACKAGE_DIR / "data" / "bundled"
BUNDLED_PREFERENCES = BUNDLED_DIR / "preferences.jsonl"  # the `data.source: bundled` triplets
BUNDLED_HELDOUT_ENGLISH = BUNDLED_DIR / "heldout_english.txt"  # the generation check's English sample


def cache_root() -> Path:
    """$SEMPA_CACHE, else ~/.cache/sempa-dist: built models under models/, tokenised data under datasets/."""
    return Path(os.environ.get("SEMPA_CACHE", Path.home() / ".cache" / "sempa-dist"))


def sts_cache_dir() -> Path:
    """<cache root>/sts: the STS sets fetched by name from the hub (sempa_dist.eval.sts), one folder
    per hub namespace, each in the SentEval layout."""
    return cache_root() / "sts"


def data_dir() -> Path | None:
    """$SEMPA_DATA_DIR, else ../shared/data beside the repo (or the working directory) when it
    exists; else None."""
    env = os.environ.get("SEMPA_DATA_DIR")
    if env:
        return Path(env)
    for base in (REPO_ROOT, Path.cwd()):
        cand = base.parent / "shared" / "data"
        if cand.is_dir():
            return cand
    return None
