"""Preference triplets from every supported source.

Every source ends as rows ``{"anchor": str, "chosen": str, "rejected": list[str] (K items)}``.

K rejected per anchor (``data.num_rejected``): a source's own rejected sentences come first (for
SNLI: the premise's contradiction hypotheses, then its neutral ones); when an anchor has fewer
than K, the rest are *other examples' chosen sentences*, drawn with a seeded RNG (random
in-corpus negatives, as in SimCSE's in-batch negatives). ``LoadReport.random_negatives`` counts them.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sempa_dist.config import DataConfig

MAX_SENTENCE_CHARS = 2000  # longer "sentences" are corrupt rows (a whole file on one line, ...)
FILE_BUILDERS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


class DataError(ValueError):
    """Bad input data. The message names the file, the row (1-based, as an editor shows it) and the column."""


@dataclass
class LoadReport:
    source: str
    rows_read: int = 0
    kept: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    first_bad: list[str] = field(default_factory=list)
    random_negatives: int = 0

    def drop(self, reason: str, detail: str | None = None) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1
        if detail is not None and len(self.first_bad) < 5:
            self.first_bad.append(detail)


def bundled_path() -> Path:
    return Path(__file__).parent / "bundled" / "preferences.jsonl"


def data_dir() -> Path | None:
    """$SEMPA_DATA_DIR, else ../shared/data beside the repo (or the working directory) when it exists."""
    env = os.environ.get("SEMPA_DATA_DIR")
    if env:
        return Path(env)
    for base in (Path(__file__).resolve().parents[2], Path.cwd()):
        cand = base.parent / "shared" / "data"
        if cand.is_dir():
            return cand
    return None


def load_triplets(cfg: DataConfig, seed: int = 0) -> tuple[list[dict[str, Any]], LoadReport]:
    """Read, validate and complete (to K rejected) the triplets named by `cfg`."""
    if cfg.source == "bundled":
        rows, where, report = _read_jsonl_rows(bundled_path()), str(bundled_path()), LoadReport("bundled")
        rows = [(i, r.get("anchor"), r.get("chosen"), r.get("rejected")) for i, r in rows]
        cols = ("anchor", "chosen", "rejected")
    elif cfg.source == "snli":
        return _snli(cfg, seed)
    else:
        rows, where, report, cols = _tabular(cfg)
    triplets = _validate(rows, where, cols, cfg, report)
    return _complete(triplets, cfg, seed, report)


def _read_jsonl_rows(path: Path) -> list[tuple[int, dict[str, Any]]]:
    out = []
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            line = _decode(raw, path, lineno).strip()
            if lineno == 1:
                line = line.lstrip("\ufeff")  # a UTF-8 byte order mark
            if not line:
                continue
            try:
                out.append((lineno, json.loads(line)))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: invalid JSON: {e.msg}") from None
    return out


def _decode(raw: bytes, path: Path | str, lineno: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}:{lineno}: not UTF-8 (byte {raw[e.start]:#04x} at column {e.start + 1})") from None


def _first_bad_utf8_line(path: Path) -> int | None:
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError:
                return lineno
    return None


def _tabular(cfg: DataConfig):
    """CSV/JSONL/Parquet files and hub datasets through HF datasets."""
    import datasets

    cols = (cfg.anchor_column, cfg.chosen_column, *cfg.rejected_columns)
    if cfg.source == "file":
        path = Path(cfg.path or "")
        if not path.is_file():
            raise DataError(f"data.path: file not found: {path}")
        builder = FILE_BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise DataError(f"{path}: unsupported file type {path.suffix!r} (use {', '.join(FILE_BUILDERS)})")
        if path.stat().st_size == 0:
            raise DataError(f"{path}: file is empty")
        if builder != "parquet" and (bad := _first_bad_utf8_line(path)) is not None:
            with open(path, "rb") as fh:
                raw = fh.readlines()[bad - 1]
            _decode(raw, path, bad)
        where = str(path)
        if builder == "json" and _is_json_lines(path):
            # Read JSON lines ourselves: row numbers stay file lines (HF skips blank lines), a bad line
            # is one bad row rather than an opaque parser failure of the whole file.
            return _json_lines(path, cols, cfg)
        kwargs: dict[str, Any] = {}
        if builder == "csv":  # keep "NA", "null", "None" ... as text; an empty cell is an empty sentence
            kwargs = {"keep_default_na": False, **({"delimiter": "\t"} if path.suffix.lower() == ".tsv" else {})}
        try:
            ds = datasets.load_dataset(builder, data_files=str(path), split="train", **kwargs)
        except Exception as e:  # noqa: BLE001 - turn any parser failure into one clear error
            raise DataError(f"{path}: could not be parsed as {builder}: {type(e).__name__}: {e}") from None
        first_row = 2 if builder == "csv" else 1  # CSV row 1 is the header
    else:
        try:
            ds = datasets.load_dataset(cfg.path, data_files=cfg.hub_file, split=cfg.split)
        except Exception as e:  # noqa: BLE001
            raise DataError(
                f"data.path: hub dataset {cfg.path!r} (file {cfg.hub_file!r}) could not be loaded "
                f"({type(e).__name__}: {str(e)[:200]}). Offline? Download it to a file and use data.source=file."
            ) from None
        where, first_row = f"hub:{cfg.path}", 1
    missing = [c for c in cols if c not in ds.column_names]
    if missing:
        raise DataError(f"{where}: missing column(s) {missing}; the file has {ds.column_names} (set data.*_column)")
    report = LoadReport(where)
    rows = []
    for i, rec in enumerate(ds):
        rejected = [rec[c] for c in cfg.rejected_columns]
        if len(rejected) == 1 and isinstance(rejected[0], list):
            rejected = rejected[0]
        rows.append((i + first_row, rec[cfg.anchor_column], rec[cfg.chosen_column], rejected))
    return rows, where, report, cols


def _is_json_lines(path: Path) -> bool:
    """.jsonl, or a .json file whose first non-blank character opens an object (not a JSON array)."""
    if path.suffix.lower() == ".jsonl":
        return True
    with open(path, "rb") as fh:
        head = fh.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    return head.startswith(b"{")


def _json_lines(path: Path, cols, cfg: DataConfig):
    where, report = str(path), LoadReport(str(path))
    records = _read_jsonl_rows(path)
    names = list(dict.fromkeys(k for _, rec in records if isinstance(rec, dict) for k in rec))
    missing = [c for c in cols if c not in names]
    if missing:
        raise DataError(f"{where}: missing column(s) {missing}; the file has {names} (set data.*_column)")
    rows = []
    for lineno, rec in records:
        if not isinstance(rec, dict):
            msg = f"{where}:{lineno}: not a JSON object: {_show(rec)}"
            if cfg.on_bad_row == "error":
                raise DataError(msg + " (set data.on_bad_row=skip to skip such rows)")
            report.rows_read += 1
            report.drop("not a JSON object", msg)
            continue
        rejected = [rec.get(c) for c in cfg.rejected_columns]
        if len(rejected) == 1 and isinstance(rejected[0], list):
            rejected = rejected[0]
        rows.append((lineno, rec.get(cfg.anchor_column), rec.get(cfg.chosen_column), rejected))
    return rows, where, report, cols


def _validate(rows, where: str, cols, cfg: DataConfig, report: LoadReport) -> list[dict[str, Any]]:
    anchor_col, chosen_col = cols[0], cols[1]
    rejected_col = cols[2] if len(cols) == 3 else ",".join(cols[2:])
    out = []
    for lineno, anchor, chosen, rejected in rows:
        report.rows_read += 1
        problem = _check(anchor, anchor_col) or _check(chosen, chosen_col)
        if problem is None:
            if not isinstance(rejected, list) or not rejected:
                problem = (rejected_col, "no rejected sentence", rejected)
            else:
                for r in rejected:
                    if (problem := _check(r, rejected_col)) is not None:
                        break
        if problem is not None:
            col, why, value = problem
            msg = f"{where}:{lineno}: column {col!r}: {why}: {_show(value)}"
            if cfg.on_bad_row == "error":
                raise DataError(msg + " (set data.on_bad_row=skip to skip such rows)")
            report.drop(why, msg)
            continue
        out.append({"anchor": anchor.strip(), "chosen": chosen.strip(), "rejected": [r.strip() for r in rejected]})
    return out


def _check(value: Any, col: str) -> tuple[str, str, Any] | None:
    if not isinstance(value, str):
        return (col, "not a string", value)
    if not value.strip():
        return (col, "empty sentence", value)
    if len(value) > MAX_SENTENCE_CHARS:
        return (col, f"longer than {MAX_SENTENCE_CHARS} characters", value)
    return None


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _complete(triplets: list[dict[str, Any]], cfg: DataConfig, seed: int, report: LoadReport):
    """Cut or fill every example to exactly K rejected; apply max_examples."""
    k = cfg.num_rejected
    if cfg.max_examples is not None:
        triplets = triplets[: cfg.max_examples]
    if not triplets:
        raise DataError(f"{report.source}: no usable examples (dropped: {report.dropped or 'none'})")
    rng = random.Random(seed)
    for i, t in enumerate(triplets):
        rej = t["rejected"][:k]
        tries = 0
        while len(rej) < k:
            if len(triplets) < 2:
                raise DataError(f"{report.source}: cannot find {k} rejected sentences for a single example")
            tries += 1
            if tries > 20 * k:  # few distinct sentences: draw from the exact pool, or fail instead of looping forever
                pool = sorted({o["chosen"] for o in triplets} - {t["chosen"], *rej})
                need = k - len(rej)
                if len(pool) < need:
                    raise DataError(
                        f"{report.source}: example {i + 1} has only {len(rej) + len(pool)} distinct rejected sentences "
                        f"(its own plus other examples' chosen ones), fewer than data.num_rejected={k}; lower it"
                    )
                rej.extend(rng.sample(pool, need))
                report.random_negatives += need
                break
            j = rng.randrange(len(triplets) - 1)
            j = j + 1 if j >= i else j  # never the example itself
            cand = triplets[j]["chosen"]
            if cand != t["chosen"] and cand not in rej:
                rej.append(cand)
                report.random_negatives += 1
        t["rejected"] = rej
    report.kept = len(triplets)
    return triplets, report


def _snli(cfg: DataConfig, seed: int) -> tuple[list[dict[str, Any]], LoadReport]:
    """SentEval SNLI layout (s1.<split>, s2.<split>, labels.<split>) -> triplets per premise."""
    if cfg.path:
        root = Path(cfg.path)
    else:
        base = data_dir()
        if base is None:
            raise DataError("data.path: no SNLI directory given and SEMPA_DATA_DIR is unset (expected <data>/nli/snli)")
        root = base / "nli" / "snli"
    files = [root / f"{name}.{cfg.split}" for name in ("s1", "s2", "labels")]
    for f in files:
        if not f.is_file():
            raise DataError(f"{f}: SNLI file not found (data.path / data.split)")
    columns = []
    for f in files:
        with open(f, "rb") as fh:
            columns.append([_decode(raw, f, n).rstrip("\n") for n, raw in enumerate(fh, 1)])
    s1, s2, labels = columns
    if not (len(s1) == len(s2) == len(labels)):
        raise DataError(f"{root}: s1/s2/labels.{cfg.split} have different line counts {len(s1)}/{len(s2)}/{len(labels)}")
    report = LoadReport(str(root))
    groups: dict[str, dict[str, list[str]]] = {}
    for n, (p, h, lab) in enumerate(zip(s1, s2, labels, strict=True), 1):
        report.rows_read += 1
        lab = lab.strip()
        if lab not in ("entailment", "neutral", "contradiction"):
            msg = f"{files[2]}:{n}: unknown label {lab!r}"
            if cfg.on_bad_row == "error":
                raise DataError(msg)
            report.drop("unknown label", msg)
            continue
        if not p.strip() or not h.strip():
            msg = f"{files[0] if not p.strip() else files[1]}:{n}: empty sentence"
            if cfg.on_bad_row == "error":
                raise DataError(msg)
            report.drop("empty sentence", msg)
            continue
        g = groups.setdefault(p.strip(), {"entailment": [], "neutral": [], "contradiction": []})
        g[lab].append(h.strip())
    triplets = []
    for premise, g in groups.items():
        if not g["entailment"] or not g["contradiction"]:
            report.drop("premise lacks an entailment or a contradiction")
            continue
        triplets.append({"anchor": premise, "chosen": g["entailment"][0], "rejected": g["contradiction"] + g["neutral"]})
    return _complete(triplets, cfg, seed, report)
