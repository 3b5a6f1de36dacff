"""STS benchmarks in the SentEval protocol, and their scoring.

Sets (files under ``$SEMPA_DATA_DIR/sts``, layouts described in that folder's SOURCES.md):

- ``sts12`` .. ``sts16``: SemEval STS test sets, ``STS.input.<subset>.txt`` (tab-separated pair)
  with ``STS.gs.<subset>.txt`` (gold 0-5; an empty gold line marks an unlabeled pair, skipped).
  Scored in the "all" setting: the pairs of every subset of a year concatenated, one Spearman.
- ``stsb-dev`` / ``stsb-test``: STS Benchmark, tab-separated genre, file, year, id, score, s1, s2.
- ``sickr-test``: SICK relatedness test set, tab-separated id, sentence_A, sentence_B, score, label.

Task names, aliases and ``resolve_tasks`` live in `sempa_dist.sts_tasks` (light: the config
validates with them); this module reads and scores the sets.

Where a set is read from (`load_task`): the SentEval folder when its files are there; otherwise the
hub's copy of the set by name, as MTEB loads it (``mteb/sts12-sts`` .. ``mteb/sts16-sts``,
``mteb/stsbenchmark-sts`` validation/test, ``mteb/sickr-sts``; columns sentence1, sentence2, score;
MTEB's pinned revisions), through ``datasets``, written once into ``<cache root>/sts/<namespace>/`` in
the SentEval layout and read from there like the local files. The hub sets carry no SemEval subset, so a
year's pairs are cached as one subset file ``STS.input.all.txt``: the "all" setting concatenates the
subsets anyway, and a Spearman over the concatenation does not depend on how it is cut. ``$SEMPA_STS_HUB``
(or ``hub=``) names another namespace, or a local folder laid out as the hub datasets are
(``<folder>/sts12-sts/test.jsonl.gz``, ...). Every set records its source (``STSPairs.source``:
``local:<dir>`` or ``hub:<dataset> (<split>; cached at <dir>)``); `evaluate_sts` returns them with the
scores (``STSScores.sources``). `main` (``FETCH_HINT`` [TASK ...]) fetches and names them, on a login
node before a job whose nodes have no network.

Sentences are whitespace-tokenised and re-joined with single spaces, as SentEval's batchers do.
Score: Spearman correlation x 100 between the cosine similarity of the two embeddings and gold.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy.stats import spearmanr

from sempa_dist.fileio import atomic_file
from sempa_dist.paths import data_dir, sts_cache_dir
from sempa_dist.sts_tasks import ALL_TASKS, resolve_tasks

# SentEval's subset lists: STS13's SMT subset ships without its input file (licence), so it is absent
STS_SUBSETS = {
    "sts12": ("STS12-en-test", ["MSRpar", "MSRvid", "SMTeuroparl", "surprise.OnWN", "surprise.SMTnews"]),
    "sts13": ("STS13-en-test", ["FNWN", "headlines", "OnWN"]),
    "sts14": ("STS14-en-test", ["deft-forum", "deft-news", "headlines", "images", "OnWN", "tweet-news"]),
    "sts15": ("STS15-en-test", ["answers-forums", "answers-students", "belief", "headlines", "images"]),
    "sts16": ("STS16-en-test", ["answer-answer", "headlines", "plagiarism", "postediting", "question-question"]),
}


# The hub's copies of the sets, by name, as MTEB loads them: task -> (dataset in the namespace, split,
# the revision MTEB pins for the "mteb" namespace; mteb/tasks/STS/en/*.py)
HUB_SETS = {
    "sts12": ("sts12-sts", "test", "a0d554a64d88156834ff5ae9920b964011b16384"),
    "sts13": ("sts13-sts", "test", "7e90230a92c190f1bf69ae9002b8cea547a64cca"),
    "sts14": ("sts14-sts", "test", "6031580fec1f6af667f0bd2da0a551cf4f0b2375"),
    "sts15": ("sts15-sts", "test", "ae752c7c21bf194d8b67fd573edf7ae58183cbe3"),
    "sts16": ("sts16-sts", "test", "4d8694f8f0e0100860b497b999b3dbed754a0513"),
    "stsb-dev": ("stsbenchmark-sts", "validation", "b0fddb56ed78048fa8b90373c8a3cfc37b684831"),
    "stsb-test": ("stsbenchmark-sts", "test", "b0fddb56ed78048fa8b90373c8a3cfc37b684831"),
    "sickr-test": ("sickr-sts", "test", "20a6d6f312dd54037fe07a32d58e5e168867909d"),
}
DEFAULT_HUB = "mteb"
HUB_ENV = "SEMPA_STS_HUB"
HUB_SUBSET = "all"  # the one subset file a year's hub pairs are cached as (the hub keeps no SemEval subset)
HUB_COLUMNS = ("sentence1", "sentence2", "score")
# the fetch command (`main`); not `python -m`: sempa_dist.eval imports this module first, and runpy warns
FETCH_HINT = "python -c 'from sempa_dist.eval.sts import main; raise SystemExit(main())'"


class STSDataError(ValueError):
    """An STS file is missing or malformed; the message names the file and line."""


@dataclass
class STSPairs:
    name: str
    left: list[str]
    right: list[str]
    gold: np.ndarray  # float, one per pair
    skipped: int = 0  # unlabeled pairs left out
    source: str = ""  # where the pairs were read: "local:<dir>" or "hub:<dataset> (<split>; cached at <dir>)"

    def __len__(self) -> int:
        return len(self.gold)

    def subset(self, max_pairs: int | None, seed: int = 0) -> STSPairs:
        """A fixed random subset of at most `max_pairs` pairs (the same for a given seed)."""
        if max_pairs is None or max_pairs >= len(self):
            return self
        idx = np.sort(np.random.default_rng(seed).choice(len(self), size=max_pairs, replace=False))
        return STSPairs(self.name, [self.left[i] for i in idx], [self.right[i] for i in idx], self.gold[idx],
                        self.skipped, self.source)


class STSScores(dict):
    """Spearman x 100 per task and their average ('avg'): a plain dict of floats to its readers (the
    table, eval.json, the tracker), with ``sources``: task -> where its pairs were read."""

    def __init__(self, scores: Mapping[str, float], sources: Mapping[str, str]) -> None:
        super().__init__(scores)
        self.sources = dict(sources)


def sts_dir() -> Path:
    """<SEMPA_DATA_DIR>/sts; raises STSDataError naming the variable when no data folder is found."""
    root = data_dir()
    if root is None:
        raise STSDataError("STS data not found: set SEMPA_DATA_DIR to the folder holding sts/ (see its SOURCES.md)")
    return root / "sts"


def _words(s: str) -> str:
    return " ".join(s.split())


def _read_lines(path: Path) -> list[str]:
    if not path.is_file():
        raise STSDataError(f"{path}: file not found (set SEMPA_DATA_DIR to the folder holding sts/)")
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise STSDataError(f"{path}: not UTF-8 ({e})") from None


def _score(value: str, path: Path, lineno: int) -> float:
    try:
        return float(value)
    except ValueError:
        raise STSDataError(f"{path}:{lineno}: gold score {value!r} is not a number") from None


def read_senteval_sts(folder: Path, subsets: Sequence[str], name: str) -> STSPairs:
    """STS12-16 layout: input pairs + gold lines, empty gold = unlabeled (skipped)."""
    left, right, gold, skipped = [], [], [], 0
    for subset in subsets:
        inp, gs = folder / f"STS.input.{subset}.txt", folder / f"STS.gs.{subset}.txt"
        pairs, scores = _read_lines(inp), _read_lines(gs)
        if len(pairs) != len(scores):
            raise STSDataError(f"{gs}: {len(scores)} gold lines for {len(pairs)} pairs in {inp.name}")
        for i, (pair, score) in enumerate(zip(pairs, scores, strict=True), 1):
            if not score.strip():
                skipped += 1
                continue
            parts = pair.split("\t")
            if len(parts) < 2:
                raise STSDataError(f"{inp}:{i}: expected two tab-separated sentences, got {pair[:80]!r}")
            left.append(_words(parts[0]))
            right.append(_words(parts[1]))
            gold.append(_score(score.strip(), gs, i))
    return STSPairs(name, left, right, np.asarray(gold, dtype=np.float64), skipped)


def read_columns(path: Path, name: str, score_col: int, a_col: int, b_col: int, header: bool = False) -> STSPairs:
    """Tab-separated file with a score and two sentence columns (STS-B, SICK)."""
    left, right, gold = [], [], []
    for i, line in enumerate(_read_lines(path), 1):
        if (header and i == 1) or not line.strip():
            continue
        parts = line.rstrip("\n").split("\t")
        if len(parts) <= max(score_col, a_col, b_col):
            raise STSDataError(f"{path}:{i}: expected at least {max(score_col, a_col, b_col) + 1} tab-separated columns, got {len(parts)}")
        left.append(_words(parts[a_col]))
        right.append(_words(parts[b_col]))
        gold.append(_score(parts[score_col], path, i))
    return STSPairs(name, left, right, np.asarray(gold, dtype=np.float64))


def _task_files(task: str, root: Path, subsets: Sequence[str] | None = None) -> list[Path]:
    """The files one set is read from under a SentEval-layout `root` (`subsets`: STS12-16's, default SentEval's)."""
    if task in STS_SUBSETS:
        folder, default = STS_SUBSETS[task]
        names = subsets if subsets is not None else default
        return [root / folder / f"STS.{kind}.{s}.txt" for s in names for kind in ("input", "gs")]
    if task in ("stsb-dev", "stsb-test"):
        return [root / "STSBenchmark" / f"sts-{task.split('-')[1]}.csv"]
    return [root / "SICK" / "SICK_test_annotated.txt"]


def read_task(task: str, root: Path, subsets: Sequence[str] | None = None) -> STSPairs:
    """One set from a SentEval-layout folder (`subsets`: the STS12-16 subset files to read, default
    SentEval's lists); raises STSDataError naming a missing or malformed file."""
    if task in STS_SUBSETS:
        folder, default = STS_SUBSETS[task]
        return read_senteval_sts(root / folder, subsets if subsets is not None else default, task)
    if task in ("stsb-dev", "stsb-test"):
        return read_columns(_task_files(task, root)[0], task, 4, 5, 6)
    path = _task_files(task, root)[0]
    first = _read_lines(path)[:1]
    return read_columns(path, task, 3, 1, 2, header=bool(first) and first[0].lower().startswith("pair_id"))


def load_task(task: str, root: Path | None = None, hub: str | None = None) -> STSPairs:
    """Pairs and gold scores of one STS set (names as in `resolve_tasks`), with their source.

    `root` given: that SentEval folder only. Otherwise the SentEval folder under $SEMPA_DATA_DIR when
    the set's files are all there, else the hub's copy by name (`hub`, default $SEMPA_STS_HUB or
    "mteb"), fetched once into the cache and read from it after."""
    if task not in HUB_SETS:
        raise ValueError(f"unknown STS task {task!r}")
    if root is not None:
        return _local(task, Path(root))
    local = _local_root()
    if local is not None and all(f.is_file() for f in _task_files(task, local)):
        return _local(task, local)
    return _from_hub(task, hub or sts_hub(), local)


def _local(task: str, root: Path) -> STSPairs:
    pairs = read_task(task, root)
    pairs.source = f"local:{root}"
    return pairs


def _local_root() -> Path | None:
    try:
        return sts_dir()
    except STSDataError:  # no data folder at all: the hub is the only source
        return None


def sts_hub() -> str:
    """$SEMPA_STS_HUB, else "mteb": the hub namespace holding the STS sets, or a local folder laid out
    as it (recognised by a path separator or a leading '.' or '~')."""
    return os.environ.get(HUB_ENV) or DEFAULT_HUB


def _is_folder(hub: str) -> bool:
    # a hub namespace is one name without '/'; anything path-like is a folder laid out as the hub
    return "/" in hub or os.sep in hub or hub.startswith((".", "~"))


def hub_dataset(task: str, hub: str | None = None) -> tuple[str, str, str | None]:
    """(dataset path or id, split, revision) of a set's hub copy; a revision only for MTEB's namespace."""
    hub = hub or sts_hub()
    name, split, revision = HUB_SETS[task]
    if _is_folder(hub):
        return str(Path(hub).expanduser() / name), split, None
    return f"{hub}/{name}", split, revision if hub == DEFAULT_HUB else None


def hub_cache(hub: str | None = None) -> Path:
    """Where the sets fetched from `hub` are kept, in the SentEval layout: <cache root>/sts/<namespace>
    (a folder: local-<hash of its path>, so two folders never share a cache)."""
    hub = hub or sts_hub()
    if _is_folder(hub):
        resolved = str(Path(hub).expanduser().resolve())
        slug = f"local-{hashlib.sha256(resolved.encode()).hexdigest()[:12]}"
    else:
        slug = re.sub(r"[^A-Za-z0-9._-]", "_", hub)
    return sts_cache_dir() / slug


def _marker(cache: Path, task: str) -> Path:
    return cache / "fetched" / f"{task}.json"


def _from_hub(task: str, hub: str, local: Path | None) -> STSPairs:
    """The set from the cache of `hub`, fetched first when it is not there yet."""
    cache = hub_cache(hub)
    info = _fetched(cache, task)
    if info is None:
        info = fetch_task(task, hub, local)
    pairs = read_task(task, cache, [HUB_SUBSET])
    pairs.source = f"hub:{info['dataset']} ({info['split']}; cached at {cache})"
    return pairs


def _fetched(cache: Path, task: str) -> dict[str, Any] | None:
    """The record of a completed fetch (written after the set's files), or None."""
    try:
        info = json.loads(_marker(cache, task).read_text(encoding="utf-8"))
    except (OSError, ValueError):  # absent, or torn by a crash: fetch again
        return None
    ok = isinstance(info, dict) and all(isinstance(info.get(k), str) for k in ("dataset", "split"))
    return info if ok and all(f.is_file() for f in _task_files(task, cache, [HUB_SUBSET])) else None


def fetch_task(task: str, hub: str | None = None, local: Path | None = None) -> dict[str, Any]:
    """Load a set's hub copy through `datasets` and write it into the hub's cache in the SentEval
    layout (each file renamed into place, the record last: a reader sees a whole set or none);
    returns the record. `local`: the SentEval folder that lacked the set, for the error message."""
    import datasets

    hub = hub or sts_hub()
    dataset, split, revision = hub_dataset(task, hub)
    cache = hub_cache(hub)
    where = f"hub:{dataset}[{split}]"
    try:
        ds = datasets.load_dataset(dataset, split=split, revision=revision, cache_dir=str(cache / "hf-datasets"))
    except Exception as e:  # noqa: BLE001 - offline, unknown name, bad files: one error naming both sources
        looked = f"{_task_files(task, local)[0].parent} has no {task} files" if local else "no SEMPA_DATA_DIR"
        raise STSDataError(
            f"{task}: not found locally ({looked}) and {where} could not be loaded "
            f"({type(e).__name__}: {str(e)[:200]}). Offline? Fetch it where the hub is reachable ({FETCH_HINT} "
            f"{task}; it fills {cache}), or set SEMPA_DATA_DIR to a folder with sts/ in the SentEval layout."
        ) from None
    missing = [c for c in HUB_COLUMNS if c not in ds.column_names]
    if missing:
        raise STSDataError(f"{where}: missing column(s) {missing}; the dataset has {list(ds.column_names)}")
    rows = _hub_rows(ds, where)
    _write_layout(task, cache, rows)
    info = {"task": task, "dataset": dataset, "split": split, "revision": revision, "pairs": len(rows)}
    _write_text(_marker(cache, task), json.dumps(info, indent=2) + "\n")
    print(f"sts: {task}: fetched {where} ({len(rows)} pairs) into {cache}", file=sys.stderr)
    return info


def _hub_rows(ds: Any, where: str) -> list[tuple[str, str, float]]:
    """(sentence1, sentence2, score) of every row, whitespace-normalised (as the reader does, so the
    cached TSV holds no tab or newline inside a sentence); a bad row names its 1-based row number."""
    rows = []
    for i, rec in enumerate(ds, 1):
        pair = []
        for col in HUB_COLUMNS[:2]:
            value = rec[col]
            if not isinstance(value, str) or not value.strip():
                raise STSDataError(f"{where}:{i}: column {col!r}: not a sentence: {value!r:.80}")
            pair.append(_words(value))
        score = rec["score"]
        try:
            gold = float(score)
        except (TypeError, ValueError):
            gold = math.nan
        if isinstance(score, bool) or not math.isfinite(gold):
            raise STSDataError(f"{where}:{i}: column 'score': gold score {score!r:.80} is not a number")
        rows.append((pair[0], pair[1], gold))
    if not rows:
        raise STSDataError(f"{where}: no rows")
    return rows


def _write_layout(task: str, root: Path, rows: list[tuple[str, str, float]]) -> None:
    """`rows` as the SentEval files `read_task` reads (STS12-16 as the one subset HUB_SUBSET)."""
    files = _task_files(task, root, [HUB_SUBSET])
    if task in STS_SUBSETS:
        _write_text(files[0], "".join(f"{a}\t{b}\n" for a, b, _ in rows))
        _write_text(files[1], "".join(f"{g!r}\n" for _, _, g in rows))
    elif task in ("stsb-dev", "stsb-test"):  # genre, file, year, id, score, s1, s2
        _write_text(files[0], "".join(f"hub\thub\t-\t{i:04d}\t{g!r}\t{a}\t{b}\n" for i, (a, b, g) in enumerate(rows, 1)))
    else:  # SICK: pair_ID, sentence_A, sentence_B, relatedness_score, entailment_judgment
        header = "pair_ID\tsentence_A\tsentence_B\trelatedness_score\tentailment_judgment\n"
        _write_text(files[0], header + "".join(f"{i}\t{a}\t{b}\t{g!r}\t-\n" for i, (a, b, g) in enumerate(rows, 1)))


def _write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of two [N, D] arrays (0 for a zero vector)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    denom = np.where((na * nb) > 0, na * nb, 1.0)
    return (a * b).sum(axis=1) / denom


def spearman100(pred: np.ndarray, gold: np.ndarray) -> float:
    """Spearman correlation x 100 (ties get average ranks)."""
    if len(pred) < 2:
        raise ValueError("Spearman needs at least 2 pairs")
    return float(spearmanr(pred, gold).statistic * 100)


def evaluate_sts(
    encode: Callable[[list[str]], np.ndarray], tasks: Sequence[str], max_pairs: int | None = None,
    root: Path | None = None, seed: int = 0, hub: str | None = None,
) -> STSScores:
    """Spearman x 100 per task and their average ('avg'), encoding each distinct sentence once; the
    result's ``sources`` names where each set was read (`load_task`)."""
    if not tasks:
        raise ValueError("no STS task given")
    sets = [load_task(t, root, hub).subset(max_pairs, seed) for t in resolve_tasks(tasks)]
    sentences = sorted({s for p in sets for s in (*p.left, *p.right)})
    index = {s: i for i, s in enumerate(sentences)}
    emb = encode(sentences)
    out: dict[str, float] = {}
    for p in sets:
        a = emb[[index[s] for s in p.left]]
        b = emb[[index[s] for s in p.right]]
        out[p.name] = spearman100(cosine(a, b), p.gold)
    out["avg"] = float(np.mean([out[p.name] for p in sets]))
    return STSScores(out, {p.name: p.source for p in sets})


def data_available(root: Path | None = None) -> bool:
    """Whether the local SentEval files are on disk (`root`, else SEMPA_DATA_DIR/sts). Not the hub's
    cached copies: the callers (tests of the real sets' counts and scores, the demo) mean the SentEval files."""
    root = Path(root) if root is not None else _local_root()
    return root is not None and _task_files("stsb-test", root)[0].is_file()


def main(argv: Sequence[str] | None = None) -> int:
    """FETCH_HINT [TASK ...]: read each set (default: every one), fetching what is not found locally,
    and print its pair count and source; 2 when a set cannot be read."""
    names = list(sys.argv[1:] if argv is None else argv) or ALL_TASKS
    try:
        tasks = resolve_tasks(names)
        for task in tasks:
            pairs = load_task(task)
            print(f"{task}: {len(pairs)} pairs from {pairs.source}")
    except (ValueError, STSDataError) as e:  # STSDataError is a ValueError; both name what is wrong
        print(f"sts: {e}", file=sys.stderr)
        return 2
    return 0
