"""What a run directory keeps of its MLflow run, so nothing depends on the store being up:

- ``tracking.json``: where the run is (store URI, experiment, run id, parent, fallback store);
- ``mlflow_journal.jsonl``: every entry the tracker queued (a fallback store is built from it);
- ``mlflow_pending.jsonl``: the entries the store has not taken yet (sent when it is back, or by
  ``sempa-tracking replay``);
- ``mlflow_fallback.db``: the whole run as a local store, when the store was down at the end;
- ``mlflow_artifacts/``: the redacted copies of the artifacts.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

from sempa_dist.fileio import write_atomic

JOURNAL, PENDING, STATE = "mlflow_journal.jsonl", "mlflow_pending.jsonl", "tracking.json"
FALLBACK_DB, ARTIFACTS = "mlflow_fallback.db", "mlflow_artifacts"


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The entries in `path` (none if it is missing); a line cut by a crash mid-write is skipped."""
    if not path.is_file():
        return []
    ops = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            ops.append(json.loads(line))
    return ops


def append_jsonl(path: Path, ops: list[dict[str, Any]]) -> None:
    """Append `ops` to `path`, one JSON line each."""
    with open(path, "a") as fh:
        fh.write("".join(json.dumps(op) + "\n" for op in ops))
        fh.flush()


def count_values(ops: list[dict[str, Any]]) -> int:
    """Values in `ops` (each metric, param and tag; an artifact counts one): for the notes to the user."""
    return sum(len(op.get("data", ())) if op.get("op") != "artifact" else 1 for op in ops)


def read_state(run_dir: Path) -> dict[str, Any]:
    """`run_dir`'s tracking.json, or {} when the directory was never tracked."""
    path = run_dir / STATE
    return json.loads(path.read_text()) if path.is_file() else {}


def write_state(run_dir: Path, state: dict[str, Any]) -> None:
    """Replace `run_dir`'s tracking.json (atomically: a reader never sees half of it)."""
    write_atomic(run_dir / STATE, json.dumps(state, indent=2) + "\n")
