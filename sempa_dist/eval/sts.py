"""STS benchmarks in the SentEval protocol, and their scoring.

Sets (files under ``$SEMPA_DATA_DIR/sts``, layouts described in that folder's SOURCES.md):

- ``sts12`` .. ``sts16``: SemEval STS test sets, ``STS.input.<subset>.txt`` (tab-separated pair)
  with ``STS.gs.<subset>.txt`` (gold 0-5; an empty gold line marks an unlabeled pair, skipped).
  Scored in the "all" setting: the pairs of every subset of a year concatenated, one Spearman.
- ``stsb-dev`` / ``stsb-test``: STS Benchmark, tab-separated genre, file, year, id, score, s1, s2.
- ``sickr-test``: SICK relatedness test set, tab-separated id, sentence_A, sentence_B, score, label.

Task names, aliases and ``resolve_tasks`` live in `sempa_dist.sts_tasks` (light: the config
validates with them); this module reads and scores the sets.

Sentences are whitespace-tokenised and re-joined with single spaces, as SentEval's batchers do.
Score: Spearman correlation x 100 between the cosine similarity of the two embeddings and gold.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr

from sempa_dist.paths import data_dir
from sempa_dist.sts_tasks import resolve_tasks

# SentEval's subset lists: STS13's SMT subset ships without its input file (licence), so it is absent
STS_SUBSETS = {
    "sts12": ("STS12-en-test", ["MSRpar", "MSRvid", "SMTeuroparl", "surprise.OnWN", "surprise.SMTnews"]),
    "sts13": ("STS13-en-test", ["FNWN", "headlines", "OnWN"]),
    "sts14": ("STS14-en-test", ["deft-forum", "deft-news", "headlines", "images", "OnWN", "tweet-news"]),
    "sts15": ("STS15-en-test", ["answers-forums", "answers-students", "belief", "headlines", "images"]),
    "sts16": ("STS16-en-test", ["answer-answer", "headlines", "plagiarism", "postediting", "question-question"]),
}


class STSDataError(ValueError):
    """An STS file is missing or malformed; the message names the file and line."""


@dataclass
class STSPairs:
    name: str
    left: list[str]
    right: list[str]
    gold: np.ndarray  # float, one per pair
    skipped: int = 0  # unlabeled pairs left out

    def __len__(self) -> int:
        return len(self.gold)

    def subset(self, max_pairs: int | None, seed: int = 0) -> STSPairs:
        """A fixed random subset of at most `max_pairs` pairs (the same for a given seed)."""
        if max_pairs is None or max_pairs >= len(self):
            return self
        idx = np.sort(np.random.default_rng(seed).choice(len(self), size=max_pairs, replace=False))
        return STSPairs(self.name, [self.left[i] for i in idx], [self.right[i] for i in idx], self.gold[idx], self.skipped)


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


def load_task(task: str, root: Path | None = None) -> STSPairs:
    """Pairs and gold scores of one STS set (names as in `resolve_tasks`)."""
    root = Path(root) if root is not None else sts_dir()
    if task in STS_SUBSETS:
        folder, subsets = STS_SUBSETS[task]
        return read_senteval_sts(root / folder, subsets, task)
    if task in ("stsb-dev", "stsb-test"):
        return read_columns(root / "STSBenchmark" / f"sts-{task.split('-')[1]}.csv", task, 4, 5, 6)
    if task == "sickr-test":
        path = root / "SICK" / "SICK_test_annotated.txt"
        first = _read_lines(path)[:1]
        return read_columns(path, task, 3, 1, 2, header=bool(first) and first[0].lower().startswith("pair_id"))
    raise ValueError(f"unknown STS task {task!r}")


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
    root: Path | None = None, seed: int = 0,
) -> dict[str, float]:
    """Spearman x 100 per task and their average ('avg'), encoding each distinct sentence once."""
    if not tasks:
        raise ValueError("no STS task given")
    sets = [load_task(t, root).subset(max_pairs, seed) for t in resolve_tasks(tasks)]
    sentences = sorted({s for p in sets for s in (*p.left, *p.right)})
    index = {s: i for i, s in enumerate(sentences)}
    emb = encode(sentences)
    out: dict[str, float] = {}
    for p in sets:
        a = emb[[index[s] for s in p.left]]
        b = emb[[index[s] for s in p.right]]
        out[p.name] = spearman100(cosine(a, b), p.gold)
    out["avg"] = float(np.mean([out[p.name] for p in sets]))
    return out


def data_available(root: Path | None = None) -> bool:
    """Whether the STS files are on disk (SEMPA_DATA_DIR)."""
    try:
        root = Path(root) if root is not None else sts_dir()
    except STSDataError:
        return False
    return (root / "STSBenchmark" / "sts-test.csv").is_file()
