"""Preference triplets from every supported source.

Every source ends as rows ``{"anchor": str, "chosen": str, "rejected": list[str] (K items)}``;
rows of an ms-swift preference file also carry ``"prompt"``: their prompt turns, taken as written.

K rejected per anchor (``data.num_rejected``): a source's own rejected sentences come first (for
SNLI: the premise's contradiction hypotheses, then its neutral ones); when an anchor has fewer
than K, the rest are *other examples' chosen sentences*, drawn with a seeded RNG (random
in-corpus negatives, as in SimCSE's in-batch negatives). ``LoadReport.random_negatives`` counts them.

Files are parsed here (csv module, json, pyarrow), not through HF datasets: every bad row is named by
its file line (Parquet: row) and column and can be skipped on its own (``data.on_bad_row: skip``),
CSV cells stay text, and nothing but ``DataError`` escapes for bad data. Hub datasets still load
through HF datasets.

ms-swift's preference files (the SemPA authors' format, JSON lines or a JSON array, or Parquet) are
recognised by their fields: rows with ``messages`` (optional system turn, user/assistant turns, the
last one the assistant's chosen response) and ``rejected_response`` (one string, as ms-swift's DPO
reads it), and no ``data.anchor_column``. The turns before the chosen response are the prompt as
written: ``data.template`` and ``data.system_prompt`` are not applied to them (see data.tokenize).
"""

from __future__ import annotations

import csv
import json
import random
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any

from sempa_dist.config import DataConfig
from sempa_dist.paths import BUNDLED_PREFERENCES, data_dir

MAX_SENTENCE_CHARS = 2000  # longer "sentences" are corrupt rows (a whole file on one line, ...)
FILE_BUILDERS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
SWIFT_MESSAGES, SWIFT_REJECTED = "messages", "rejected_response"  # ms-swift's preference fields


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


def load_triplets(cfg: DataConfig, seed: int = 0) -> tuple[list[dict[str, Any]], LoadReport]:
    """Read, validate and complete (to K rejected) the triplets named by `cfg`."""
    if cfg.source == "bundled":
        where, report, cols = str(BUNDLED_PREFERENCES), LoadReport("bundled"), ("anchor", "chosen", "rejected")
        rows = _dict_rows(_read_jsonl_rows(BUNDLED_PREFERENCES), where, cols, cfg, report)
        triplets = _validate(rows, where, cols, cfg, report)
    elif cfg.source == "snli":
        return _snli(cfg, seed)
    else:
        triplets, report = _tabular(cfg)
    return _complete(triplets, cfg, seed, report)


Loc = int | str  # where a row is: its 1-based line (Parquet/hub: row), or "LINE: item N" inside a JSON array
Row = tuple[Loc, Any, Any, Any]  # (loc, anchor, chosen, rejected)
SKIP_HINT = " (set data.on_bad_row=skip to skip such rows)"
_SURROGATE = re.compile(r"[\ud800-\udfff]")  # only from JSON escapes like "\\ud83d"; UTF-8 cannot encode them
_JSON_WS = re.compile(r"[ \t\r\n]*")


def _short(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}"
    return text if len(text) <= 200 else text[:197] + "..."


def _read_jsonl_rows(path: Path) -> list[tuple[Loc, Any]]:
    hint = " (a .json file holds an array of row objects, or one row object per line)" if path.suffix.lower() == ".json" else ""
    out: list[tuple[Loc, Any]] = []
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
                raise DataError(f"{path}:{lineno}: invalid JSON: {e.msg} (column {e.colno}){hint}") from None
            except (ValueError, RecursionError) as e:  # a 5000-digit number, [[[[...]]]] nested too deeply
                raise DataError(f"{path}:{lineno}: invalid JSON: {_short(e)}") from None
    return out


def _decode(raw: bytes, path: Path | str, lineno: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}:{lineno}: not UTF-8 (byte {raw[e.start]:#04x} at column {e.start + 1})") from None


def _has_text(path: Path) -> bool:
    """Whether the file has a non-blank line; raises DataError at the first line that is not UTF-8."""
    found = False
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            line = _decode(raw, path, lineno)
            found = found or bool(line.lstrip("\ufeff").strip())
    return found


def _require_columns(where: str, cols: tuple[str, ...], names: list[str]) -> None:
    missing = [c for c in dict.fromkeys(cols) if c not in names]
    if missing:
        raise DataError(f"{where}: missing column(s) {missing}; the file has {names} (set data.*_column)")


def _bad_row(cfg: DataConfig, report: LoadReport, reason: str, msg: str) -> None:
    """A row that cannot be used: fail naming it, or (on_bad_row=skip) count it and go on."""
    if cfg.on_bad_row == "error":
        raise DataError(msg + SKIP_HINT)
    report.drop(reason, msg)


def _rejected(values: list[Any]) -> Any:
    """One column holding a list is the list of rejected sentences; otherwise one sentence per column."""
    return values[0] if len(values) == 1 and isinstance(values[0], list) else values


def _tabular(cfg: DataConfig) -> tuple[list[dict[str, Any]], LoadReport]:
    """Validated triplets of CSV/TSV, JSON (lines or array) and Parquet files, read here; hub
    datasets through HF datasets."""
    cols = (cfg.anchor_column, cfg.chosen_column, *cfg.rejected_columns)
    if cfg.source == "file":
        path = Path(cfg.path or "")
        if not path.is_file():
            raise DataError(f"data.path: file not found: {path}")
        builder = FILE_BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise DataError(f"{path}: unsupported file type {path.suffix!r} (use {', '.join(FILE_BUILDERS)})")
        report = LoadReport(str(path))
        try:
            return _read_file(path, builder, cols, cfg, report), report
        except OSError as e:  # unreadable (permissions, a vanished mount): still one DataError naming the file
            raise DataError(f"{path}: cannot be read ({_short(e)})") from None

    import datasets

    try:
        ds = datasets.load_dataset(cfg.path, data_files=cfg.hub_file, split=cfg.split)
    except Exception as e:  # noqa: BLE001
        raise DataError(
            f"data.path: hub dataset {cfg.path!r} (file {cfg.hub_file!r}) could not be loaded "
            f"({type(e).__name__}: {str(e)[:200]}). Offline? Download it to a file and use data.source=file."
        ) from None
    where = f"hub:{cfg.path}"
    _require_columns(where, cols, list(ds.column_names))
    report = LoadReport(where)
    rows = _dict_rows(((i, rec) for i, rec in enumerate(ds, 1)), where, cols, cfg, report)
    return _validate(rows, where, cols, cfg, report), report


def _read_file(path: Path, builder: str, cols: tuple[str, ...], cfg: DataConfig,
               report: LoadReport) -> list[dict[str, Any]]:
    where = str(path)
    if path.stat().st_size == 0:
        raise DataError(f"{path}: file is empty")
    if builder == "parquet":
        records = _parquet_records(path, cols)
    else:
        if not _has_text(path):
            raise DataError(f"{path}: file is empty (only blank lines)")
        if builder == "csv":
            return _validate(_csv_rows(path, cols, cfg, report), where, cols, cfg, report)
        records = _json_array_records(path) if _is_json_array(path) else _read_jsonl_rows(path)
    if _is_swift(records, cols):
        return _swift_triplets(records, where, cfg, report)
    return _validate(_dict_rows(records, where, cols, cfg, report), where, cols, cfg, report)


def _csv_rows(path: Path, cols: tuple[str, ...], cfg: DataConfig, report: LoadReport) -> list[Row]:
    """CSV/TSV with Python's csv module: every cell stays text ("NA", "1" are sentences), a row is
    numbered by the file line it starts on (quoted cells may span lines), and a row with the wrong
    number of cells is one bad row, not a failure of the whole file."""
    where = str(path)
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    rows: list[Row] = []
    header: list[str] | None = None
    index: list[int] = []
    old_limit = csv.field_size_limit()
    # the default 128 KiB cell limit would abort the whole file on one absurd line; length is judged per sentence
    csv.field_size_limit(2**31 - 1)
    try:
        with open(path, encoding="utf-8-sig", newline="") as fh:
            reader = csv.reader(fh, delimiter=delimiter)
            end = 0
            try:
                for rec in reader:
                    start, end = end + 1, reader.line_num
                    if not rec:  # a blank line
                        continue
                    if header is None:
                        header = rec
                        _require_columns(where, cols, header)
                        twice = [c for c in dict.fromkeys(cols) if header.count(c) > 1]
                        if twice:
                            raise DataError(f"{where}:{start}: column(s) {twice} appear more than once in the header")
                        index = [header.index(c) for c in cols]
                        continue
                    if len(rec) != len(header):
                        report.rows_read += 1
                        span = f" (the row runs over lines {start}-{end}: an unclosed quote?)" if end > start else ""
                        msg = f"{where}:{start}: {len(rec)} cell(s) where the header has {len(header)}{span}"
                        _bad_row(cfg, report, "wrong number of cells", msg)
                        continue
                    values = [rec[i] for i in index]
                    rows.append((start, values[0], values[1], values[2:]))
            except csv.Error as e:
                raise DataError(f"{where}:{reader.line_num}: malformed CSV: {e}") from None
    finally:
        csv.field_size_limit(old_limit)
    if header is None:
        raise DataError(f"{where}: no header row")
    if not rows and not report.dropped:
        raise DataError(f"{where}: no rows after the header")
    return rows


def _is_json_array(path: Path) -> bool:
    """A .json file whose first non-blank character opens an array (else: JSON lines, as .jsonl)."""
    if path.suffix.lower() == ".jsonl":
        return False
    with open(path, "rb") as fh:
        head = fh.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    return head.startswith(b"[")


def _json_array_records(path: Path) -> list[tuple[Loc, Any]]:
    """The items of a JSON array, each with the line it starts on: parsed item by item so that an
    error or a bad row names its line and item rather than 'the file'."""
    with open(path, encoding="utf-8-sig") as fh:
        text = fh.read()
    decoder = json.JSONDecoder()
    out: list[tuple[Loc, Any]] = []
    line, counted = 1, 0  # `line` is the line number at offset `counted`

    def line_at(pos: int) -> int:
        nonlocal line, counted
        line += text.count("\n", counted, pos)
        counted = pos
        return line

    pos = _JSON_WS.match(text).end()
    if not text.startswith("[", pos):  # e.g. a second byte order mark
        raise DataError(f"{path}:{line_at(pos)}: invalid JSON: expected '[' (an array of row objects)")
    pos = _JSON_WS.match(text, pos + 1).end()
    closed = text.startswith("]", pos)
    pos += closed
    while not closed:
        item_line = line_at(pos)
        try:
            value, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: invalid JSON: {e.msg} (column {e.colno})") from None
        except (ValueError, RecursionError) as e:  # a 5000-digit number, [[[[...]]]] nested too deeply
            raise DataError(f"{path}:{item_line}: invalid JSON in item {len(out) + 1}: {_short(e)}") from None
        out.append((f"{item_line}: item {len(out) + 1}", value))
        pos = _JSON_WS.match(text, pos).end()
        if text.startswith(",", pos):
            pos = _JSON_WS.match(text, pos + 1).end()
        elif text.startswith("]", pos):
            pos, closed = pos + 1, True
        else:
            raise DataError(f"{path}:{line_at(pos)}: invalid JSON: expected ',' or ']' after item {len(out)}")
    pos = _JSON_WS.match(text, pos).end()
    if pos < len(text):
        raise DataError(f"{path}:{line_at(pos)}: invalid JSON: more data after the array's closing ']'")
    return out


def _parquet_records(path: Path, cols: tuple[str, ...]) -> list[tuple[Loc, Any]]:
    import pyarrow.parquet as pq

    try:
        with pq.ParquetFile(path) as pf:
            names = list(pf.schema_arrow.names)
            if SWIFT_MESSAGES in names and cols[0] not in names:  # an ms-swift file: its own fields
                wanted = [c for c in (SWIFT_MESSAGES, SWIFT_REJECTED) if c in names]
            else:
                _require_columns(str(path), cols, names)
                wanted = list(dict.fromkeys(cols))
            records = pf.read(columns=wanted).to_pylist()
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - pyarrow raises ArrowInvalid, OSError, ...: one clear error
        raise DataError(f"{path}: not a readable Parquet file ({_short(e)})") from None
    return list(enumerate(records, 1))


def _dict_rows(records: Iterable[tuple[Loc, Any]], where: str, cols: tuple[str, ...], cfg: DataConfig,
               report: LoadReport) -> list[Row]:
    """Rows that are objects (JSON, Parquet, hub) -> (loc, anchor, chosen, rejected); a row that is
    not an object is a bad row."""
    records = list(records)
    if not records:
        raise DataError(f"{where}: no rows")
    objects = [rec for _, rec in records if isinstance(rec, dict)]
    if not objects:
        loc, rec = records[0]
        raise DataError(f"{where}:{loc}: not a JSON object: {_show(rec)} (and no other row is one)")
    _require_columns(where, cols, list(dict.fromkeys(k for rec in objects for k in rec)))
    rows: list[Row] = []
    for loc, rec in records:
        if not isinstance(rec, dict):
            report.rows_read += 1
            _bad_row(cfg, report, "not a JSON object", f"{where}:{loc}: not a JSON object: {_show(rec)}")
            continue
        rejected = _rejected([rec.get(c) for c in cols[2:]])
        rows.append((loc, rec.get(cols[0]), rec.get(cols[1]), rejected))
    return rows


def _is_swift(records: list[tuple[Loc, Any]], cols: tuple[str, ...]) -> bool:
    """Whether the rows are ms-swift preference rows: some have ``messages`` and none the anchor column."""
    objects = [rec for _, rec in records if isinstance(rec, dict)]
    return any(SWIFT_MESSAGES in rec for rec in objects) and not any(cols[0] in rec for rec in objects)


def _swift_triplets(records: list[tuple[Loc, Any]], where: str, cfg: DataConfig,
                    report: LoadReport) -> list[dict[str, Any]]:
    """ms-swift preference rows -> triplets whose ``prompt`` is the turns before the chosen response,
    as written (not stripped: the prompt is the file's own); chosen and rejected are stripped like
    every other source's sentences. A row that cannot be used is a bad row (data.on_bad_row)."""
    out = []
    for loc, rec in records:
        report.rows_read += 1
        if not isinstance(rec, dict):
            _bad_row(cfg, report, "not a JSON object", f"{where}:{loc}: not a JSON object: {_show(rec)}")
            continue
        turns, problem = _swift_turns(rec.get(SWIFT_MESSAGES))
        rejected = rec.get(SWIFT_REJECTED)
        if problem is None:
            if isinstance(rejected, list):  # ms-swift's DPO reads one string; a list is its embedding format
                problem = (SWIFT_REJECTED, "a list (ms-swift's DPO rejected_response is one string)", rejected)
            elif rejected is None and "rejected_messages" in rec:
                problem = (SWIFT_REJECTED, "missing (rejected_messages is not read: give rejected_response)", None)
            else:
                problem = _check(rejected, SWIFT_REJECTED)
        if problem is not None:
            col, why, value = problem
            _bad_row(cfg, report, why, f"{where}:{loc}: column {col!r}: {why}: {_show(value)}")
            continue
        prompt = turns[:-1]
        out.append({"anchor": prompt[-1]["content"].strip(), "chosen": turns[-1]["content"].strip(),
                    "rejected": [rejected.strip()], "prompt": prompt})
    return out


SWIFT_ROLES = ("system", "user", "assistant")


def _swift_turns(messages: Any) -> tuple[list[dict[str, str]], tuple[str, str, Any] | None]:
    """The turns of a ``messages`` value as {"role", "content"} dicts, or the problem with it: ms-swift's
    standard format is an optional system turn first, then user and assistant turns in turn, here
    ending with the assistant's chosen response after a user turn."""
    col = SWIFT_MESSAGES
    if not isinstance(messages, list):
        return [], (col, "not a list of turns", messages)
    turns: list[dict[str, str]] = []
    for i, m in enumerate(messages):
        name = f"{col}[{i}]"
        if not isinstance(m, dict):
            return [], (name, "not a turn object", m)
        role, content = m.get("role"), m.get("content")
        if role not in SWIFT_ROLES:
            return [], (f"{name}.role", f"role is not one of {', '.join(SWIFT_ROLES)}", role)
        if role == "system" and i > 0:
            return [], (f"{name}.role", "a system turn after the first turn", role)
        # a system turn may be empty (as written: no system prompt); every other turn is a sentence
        problem = None if role == "system" and content == "" else _check(content, f"{name}.content")
        if problem is not None:
            return [], problem
        turns.append({"role": role, "content": content})
    talk = [t["role"] for t in turns if t["role"] != "system"]
    if len(talk) < 2 or talk[-1] != "assistant" or talk[-2] != "user":
        why = "does not end with a user turn and the assistant's chosen response"
        return [], (col, why, [t["role"] for t in turns])
    if any(a == b for a, b in pairwise(talk)):
        return [], (col, "user and assistant turns do not alternate", [t["role"] for t in turns])
    return turns, None


def _validate(rows: list[Row], where: str, cols: tuple[str, ...], cfg: DataConfig,
              report: LoadReport) -> list[dict[str, Any]]:
    anchor_col, chosen_col = cols[0], cols[1]
    rejected_col = cols[2] if len(cols) == 3 else ",".join(cols[2:])
    out = []
    for loc, anchor, chosen, rejected in rows:
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
            _bad_row(cfg, report, why, f"{where}:{loc}: column {col!r}: {why}: {_show(value)}")
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
    if _SURROGATE.search(value):  # the tokenizer and Arrow cannot encode it (a UnicodeEncodeError later)
        return (col, "lone UTF-16 surrogate (a broken JSON \\u escape?)", value)
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
        if f.stat().st_size == 0:
            raise DataError(f"{f}: file is empty")
        with open(f, "rb") as fh:
            lines = [_decode(raw, f, n).rstrip("\n") for n, raw in enumerate(fh, 1)]
        lines[0] = lines[0].lstrip("\ufeff")  # a UTF-8 byte order mark
        columns.append(lines)
    s1, s2, labels = columns
    if not (len(s1) == len(s2) == len(labels)):
        raise DataError(f"{root}: s1/s2/labels.{cfg.split} have different line counts {len(s1)}/{len(s2)}/{len(labels)}")
    report = LoadReport(str(root))
    groups: dict[str, dict[str, list[str]]] = {}
    for n, (p, h, lab) in enumerate(zip(s1, s2, labels, strict=True), 1):
        report.rows_read += 1
        p, h, lab = p.strip(), h.strip(), lab.strip()
        if lab not in ("entailment", "neutral", "contradiction"):
            _bad_row(cfg, report, "unknown label", f"{files[2]}:{n}: unknown label {_show(lab)}")
            continue
        problem = None
        for f, text in ((files[0], p), (files[1], h)):
            if not text:
                problem = ("empty sentence", f"{f}:{n}: empty sentence")
            elif len(text) > MAX_SENTENCE_CHARS:
                why = f"longer than {MAX_SENTENCE_CHARS} characters"
                problem = (why, f"{f}:{n}: {why}: {_show(text)}")
            if problem is not None:
                break
        if problem is not None:
            _bad_row(cfg, report, *problem)
            continue
        g = groups.setdefault(p, {"entailment": [], "neutral": [], "contradiction": []})
        g[lab].append(h)
    triplets = []
    for premise, g in groups.items():
        if not g["entailment"] or not g["contradiction"]:
            report.drop("premise lacks an entailment or a contradiction")
            continue
        triplets.append({"anchor": premise, "chosen": g["entailment"][0], "rejected": g["contradiction"] + g["neutral"]})
    return _complete(triplets, cfg, seed, report)
