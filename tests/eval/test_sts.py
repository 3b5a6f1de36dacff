"""STS reading and scoring (sempa_dist.eval.sts) on hand-made files, the hub fallback on a local folder
laid out as the hub's datasets are (no network), plus the real sets' pair counts."""

from __future__ import annotations

import gzip
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from sempa_dist.eval import sts
from sempa_dist.eval.sts import (
    STSDataError,
    STSPairs,
    cosine,
    evaluate_sts,
    load_task,
    read_columns,
    read_senteval_sts,
    resolve_tasks,
    spearman100,
)
from sempa_dist.sts_tasks import ALIASES, ALL_TASKS, STANDARD_TASKS

needs_data = pytest.mark.skipif(not sts.data_available(), reason="STS data not found (set SEMPA_DATA_DIR to shared/data)")


def write(path: Path, lines: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


# ----------------------------------------------------------------------------------------------
# scoring


def test_spearman_perfect_monotone_is_100():
    gold = np.array([0.0, 1.0, 2.5, 3.0, 5.0])
    assert spearman100(gold ** 3 + 7, gold) == pytest.approx(100.0)
    assert spearman100(np.log1p(gold), gold) == pytest.approx(100.0)


def test_spearman_reversed_is_minus_100():
    gold = np.array([0.0, 1.0, 2.5, 3.0, 5.0])
    assert spearman100(-gold, gold) == pytest.approx(-100.0)


def test_spearman_hand_computed_permutation():
    # ranks [3, 1, 2] vs [1, 2, 3]: sum d^2 = 6, rho = 1 - 6 * 6 / (3 * 8) = -0.5
    assert spearman100(np.array([30.0, 10.0, 20.0]), np.array([1.0, 2.0, 3.0])) == pytest.approx(-50.0)


def test_spearman_ties_get_average_ranks():
    # pred ranks [1, 2.5, 2.5, 4] vs gold ranks [1, 2, 3, 4]: Pearson of the ranks = 4.5 / sqrt(4.5 * 5) = sqrt(0.9)
    pred, gold = np.array([0.1, 0.7, 0.7, 0.9]), np.array([1.0, 2.0, 3.0, 4.0])
    assert spearman100(pred, gold) == pytest.approx(100 * math.sqrt(0.9))
    # symmetric: the ties in gold instead
    assert spearman100(gold, pred) == pytest.approx(100 * math.sqrt(0.9))


def test_spearman_needs_two_pairs():
    with pytest.raises(ValueError, match="at least 2"):
        spearman100(np.array([1.0]), np.array([2.0]))


def test_cosine_orthogonal_parallel_antiparallel_zero():
    a = np.array([[1.0, 0.0, 0.0], [1.0, 2.0, 3.0], [1.0, 2.0, 3.0], [0.0, 0.0, 0.0], [3.0, 4.0, 0.0]])
    b = np.array([[0.0, 5.0, 0.0], [2.0, 4.0, 6.0], [-0.5, -1.0, -1.5], [1.0, 1.0, 1.0], [4.0, 3.0, 0.0]])
    got = cosine(a, b)
    assert got.shape == (5,)
    assert got == pytest.approx([0.0, 1.0, -1.0, 0.0, 24.0 / 25.0])


def test_cosine_of_two_zero_vectors_is_zero_and_finite():
    got = cosine(np.zeros((2, 4)), np.zeros((2, 4)))
    assert np.all(np.isfinite(got)) and got == pytest.approx([0.0, 0.0])


def test_cosine_accepts_float32_lists():
    got = cosine(np.array([[1, 1]], dtype=np.float32), [[1.0, 0.0]])
    assert got == pytest.approx([1 / math.sqrt(2)])


# ----------------------------------------------------------------------------------------------
# STS12-16 layout


def test_read_senteval_sts_pairs_gold_and_skipped(tmp_path):
    write(tmp_path / "STS.input.a.txt", ["a  dog runs .\tthe dog  is running .", "x\ty", "cats sleep\tkittens nap"])
    write(tmp_path / "STS.gs.a.txt", ["4.2", "", "3"])
    write(tmp_path / "STS.input.b.txt", ["p\tq", "r\ts"])
    write(tmp_path / "STS.gs.b.txt", ["", " 0.5 "])
    pairs = read_senteval_sts(tmp_path, ["a", "b"], "mine")
    assert pairs.name == "mine"
    assert len(pairs) == 3
    assert pairs.skipped == 2
    # whitespace-tokenised and re-joined with single spaces, subsets concatenated in order
    assert pairs.left == ["a dog runs .", "cats sleep", "r"]
    assert pairs.right == ["the dog is running .", "kittens nap", "s"]
    assert pairs.gold.dtype == np.float64
    assert pairs.gold.tolist() == [4.2, 3.0, 0.5]


def test_read_senteval_sts_line_count_mismatch_names_the_file(tmp_path):
    write(tmp_path / "STS.input.a.txt", ["a\tb", "c\td", "e\tf"])
    gs = write(tmp_path / "STS.gs.a.txt", ["1", "2"])
    with pytest.raises(STSDataError) as err:
        read_senteval_sts(tmp_path, ["a"], "t")
    msg = str(err.value)
    assert str(gs) in msg and "2 gold lines" in msg and "3 pairs" in msg and "STS.input.a.txt" in msg


def test_read_senteval_sts_non_numeric_gold_gives_file_and_line(tmp_path):
    write(tmp_path / "STS.input.a.txt", ["a\tb", "c\td", "e\tf"])
    gs = write(tmp_path / "STS.gs.a.txt", ["1", "", "high"])
    with pytest.raises(STSDataError, match=r"gold score 'high' is not a number") as err:
        read_senteval_sts(tmp_path, ["a"], "t")
    assert f"{gs}:3:" in str(err.value)


def test_read_senteval_sts_pair_without_tab_gives_file_and_line(tmp_path):
    inp = write(tmp_path / "STS.input.a.txt", ["a\tb", "only one sentence"])
    write(tmp_path / "STS.gs.a.txt", ["1", "2"])
    with pytest.raises(STSDataError, match="two tab-separated") as err:
        read_senteval_sts(tmp_path, ["a"], "t")
    assert f"{inp}:2:" in str(err.value)


def test_read_senteval_sts_missing_file_is_named(tmp_path):
    write(tmp_path / "STS.input.a.txt", ["a\tb"])
    with pytest.raises(STSDataError, match="file not found") as err:
        read_senteval_sts(tmp_path, ["a"], "t")
    assert str(tmp_path / "STS.gs.a.txt") in str(err.value)


# ----------------------------------------------------------------------------------------------
# STS-B and SICK layouts


STSB_LINES = [
    "main-captions\tMSRvid\t2012test\t0001\t5.000\ta man  is playing a flute .\ta man is playing a flute .",
    "main-news\theadlines\t2013\t0002\t0.750\tmarkets fall\tstocks rise\textra\tcolumns",
    "",
    "main-forums\tdeft-forum\t2014\t0003\t2.4\tone ,\ttwo .",
]


def test_read_columns_stsb_layout(tmp_path):
    path = write(tmp_path / "sts-test.csv", STSB_LINES)
    pairs = read_columns(path, "stsb-test", 4, 5, 6)
    assert len(pairs) == 3 and pairs.skipped == 0
    assert pairs.left == ["a man is playing a flute .", "markets fall", "one ,"]
    assert pairs.right == ["a man is playing a flute .", "stocks rise", "two ."]
    assert pairs.gold.tolist() == [5.0, 0.75, 2.4]


SICK_LINES = [
    "6\tThere is no boy playing\tA group of kids is playing\t3.3\tNEUTRAL",
    "7\tA  group of boys\tThe young boys are playing\t3.7\tNEUTRAL",
    "8\tA man\tA woman\t1\tCONTRADICTION",
]


def test_read_columns_sick_layout(tmp_path):
    path = write(tmp_path / "SICK_test_annotated.txt", SICK_LINES)
    pairs = read_columns(path, "sickr-test", 3, 1, 2)
    assert pairs.left == ["There is no boy playing", "A group of boys", "A man"]
    assert pairs.right == ["A group of kids is playing", "The young boys are playing", "A woman"]
    assert pairs.gold.tolist() == [3.3, 3.7, 1.0]


def test_read_columns_header_is_skipped(tmp_path):
    path = write(tmp_path / "sick.txt", ["pair_ID\tsentence_A\tsentence_B\trelatedness_score\tentailment_judgment", *SICK_LINES])
    assert len(read_columns(path, "s", 3, 1, 2, header=True)) == 3
    with pytest.raises(STSDataError, match=r":1: gold score 'relatedness_score'"):
        read_columns(path, "s", 3, 1, 2, header=False)


def test_read_columns_too_short_line_gives_file_and_line(tmp_path):
    path = write(tmp_path / "sick.txt", [SICK_LINES[0], "7\tonly a\tand b"])
    with pytest.raises(STSDataError, match="expected at least 4 tab-separated columns, got 3") as err:
        read_columns(path, "s", 3, 1, 2)
    assert f"{path}:2:" in str(err.value)


def test_read_columns_non_numeric_score_gives_file_and_line(tmp_path):
    path = write(tmp_path / "sts-dev.csv", [STSB_LINES[0], "g\tf\ty\t1\tn/a\ts1\ts2"])
    with pytest.raises(STSDataError, match=r"gold score 'n/a' is not a number") as err:
        read_columns(path, "stsb-dev", 4, 5, 6)
    assert f"{path}:2:" in str(err.value)


def test_load_task_from_a_root_with_both_sick_header_styles(tmp_path):
    write(tmp_path / "STSBenchmark" / "sts-test.csv", STSB_LINES)
    write(tmp_path / "STSBenchmark" / "sts-dev.csv", STSB_LINES[:1])
    write(tmp_path / "SICK" / "SICK_test_annotated.txt", SICK_LINES)
    assert load_task("stsb-test", tmp_path).gold.tolist() == [5.0, 0.75, 2.4]
    assert load_task("stsb-dev", tmp_path).name == "stsb-dev" and len(load_task("stsb-dev", tmp_path)) == 1
    assert len(load_task("sickr-test", tmp_path)) == 3
    write(tmp_path / "SICK" / "SICK_test_annotated.txt", ["pair_ID\tsentence_A\tsentence_B\trelatedness_score\tx", *SICK_LINES])
    assert load_task("sickr-test", tmp_path).gold.tolist() == [3.3, 3.7, 1.0]
    with pytest.raises(ValueError, match="unknown STS task"):
        load_task("sts17", tmp_path)


# ----------------------------------------------------------------------------------------------
# task names


def test_resolve_all_is_the_seven_standard_sets():
    assert resolve_tasks(["all"]) == STANDARD_TASKS
    assert STANDARD_TASKS == ["sts12", "sts13", "sts14", "sts15", "sts16", "stsb-test", "sickr-test"]
    assert "stsb-dev" not in resolve_tasks(["all"])


def test_resolve_aliases_and_case():
    assert resolve_tasks(["stsb", "sickr", "SICK-R", "STS12"]) == ["stsb-test", "sickr-test", "sts12"]
    assert set(ALIASES.values()) <= set(ALL_TASKS)


def test_resolve_has_no_duplicates_and_keeps_first_order():
    assert resolve_tasks(["stsb-dev", "sts13", "all", "stsb", "sts13"]) == ["stsb-dev", "sts13", "sts12", "sts14", "sts15",
                                                                          "sts16", "stsb-test", "sickr-test"]


def test_resolve_unknown_lists_known_names():
    with pytest.raises(ValueError) as err:
        resolve_tasks(["sts12", "sts17"])
    msg = str(err.value)
    assert "'sts17'" in msg
    for known in ALL_TASKS:
        assert known in msg


# ----------------------------------------------------------------------------------------------
# subsets


def numbered_pairs(n: int) -> STSPairs:
    return STSPairs("t", [f"l{i}" for i in range(n)], [f"r{i}" for i in range(n)], np.arange(n, dtype=np.float64), skipped=3)


def test_subset_is_deterministic_aligned_and_bounded():
    pairs = numbered_pairs(50)
    a, b = pairs.subset(12, seed=1), pairs.subset(12, seed=1)
    assert len(a) == 12 and a.left == b.left and a.right == b.right and np.array_equal(a.gold, b.gold)
    # pairs stay aligned, in their original order, without repeats; metadata kept
    idx = [int(s[1:]) for s in a.left]
    assert idx == sorted(set(idx))
    assert a.right == [f"r{i}" for i in idx] and a.gold.tolist() == idx
    assert a.name == "t" and a.skipped == 3
    assert pairs.subset(12, seed=2).left != a.left  # another seed, another subset (50 choose 12: no clash)


def test_subset_none_or_larger_returns_everything():
    pairs = numbered_pairs(5)
    assert pairs.subset(None) is pairs
    assert len(pairs.subset(5)) == 5 and len(pairs.subset(500)) == 5


# ----------------------------------------------------------------------------------------------
# evaluate_sts with a fake encoder whose cosines are a known function of gold


def stsb_root(tmp_path: Path) -> tuple[Path, dict[str, float]]:
    """An STS-B folder where every left sentence is the same and right sentence i carries pair i's gold.
    Returns the root and {right sentence: gold} (test and dev use different right sentences)."""
    rng = np.random.default_rng(0)
    gold_of: dict[str, float] = {}
    for split, n in (("test", 60), ("dev", 45)):
        lines = []
        for i in range(n):
            g = float(rng.integers(0, 11)) / 2  # 0.0 .. 5.0 in halves: many ties
            right = f"{split} sentence number {i} ."
            gold_of[right] = g
            lines.append(f"genre\tfile\t2012\t{i:04d}\t{g}\tthe shared   anchor .\t{right}")
        write(tmp_path / "STSBenchmark" / f"sts-{split}.csv", lines)
    return tmp_path, gold_of


def fake_encoder(gold_of: dict[str, float], reverse_dev: bool = False, calls: list | None = None):
    """Anchor -> e1; a right sentence -> at angle theta(gold) from e1, so cosine = cos(theta) is monotone in gold."""

    def encode(sentences: list[str]) -> np.ndarray:
        if calls is not None:
            calls.append(list(sentences))
        out = np.zeros((len(sentences), 3), dtype=np.float32)
        for i, s in enumerate(sentences):
            if s not in gold_of:
                out[i] = [2.0, 0.0, 0.0]  # the anchor (any length)
                continue
            frac = gold_of[s] / 5.0
            if reverse_dev and s.startswith("dev"):
                frac = 1.0 - frac
            theta = (1.0 - frac) * math.pi / 2
            out[i] = [math.cos(theta), math.sin(theta), 0.0]
        return out

    return encode


def test_evaluate_sts_fake_encoder_gives_100(tmp_path):
    root, gold_of = stsb_root(tmp_path)
    calls: list = []
    got = evaluate_sts(fake_encoder(gold_of, calls=calls), ["stsb"], root=root)
    assert got == {"stsb-test": pytest.approx(100.0), "avg": pytest.approx(100.0)}
    # one call, each distinct (whitespace-normalised) sentence once
    assert len(calls) == 1
    assert len(calls[0]) == len(set(calls[0])) == 61
    assert "the shared anchor ." in calls[0]


def test_evaluate_sts_reversed_set_and_average(tmp_path):
    root, gold_of = stsb_root(tmp_path)
    calls: list = []
    got = evaluate_sts(fake_encoder(gold_of, reverse_dev=True, calls=calls), ["stsb-test", "stsb-dev"], root=root)
    assert got["stsb-test"] == pytest.approx(100.0)
    assert got["stsb-dev"] == pytest.approx(-100.0)
    assert got["avg"] == pytest.approx(0.0, abs=1e-9)
    assert list(got) == ["stsb-test", "stsb-dev", "avg"]
    # the anchor is shared by both sets and encoded once
    assert len(calls) == 1 and len(calls[0]) == len(set(calls[0])) == 1 + 60 + 45


def test_evaluate_sts_max_pairs_encodes_only_the_subset(tmp_path):
    root, gold_of = stsb_root(tmp_path)
    calls: list = []
    got = evaluate_sts(fake_encoder(gold_of, calls=calls), ["stsb-test"], max_pairs=10, root=root, seed=3)
    assert got["stsb-test"] == pytest.approx(100.0)
    assert len(calls[0]) == 11
    expected = load_task("stsb-test", root).subset(10, seed=3).right
    assert sorted(s for s in calls[0] if s in gold_of) == sorted(expected)


# ----------------------------------------------------------------------------------------------
# the real files


REAL_COUNTS = {"sts12": 3108, "sts13": 1500, "sts14": 3750, "sts15": 3000, "sts16": 1186,
               "stsb-test": 1379, "stsb-dev": 1500, "sickr-test": 4927}
REAL_SKIPPED = {"sts15": 5500, "sts16": 7997}  # unlabeled pairs: 8500 - 3000 and 9183 - 1186


@needs_data
@pytest.mark.data
@pytest.mark.parametrize("task", list(REAL_COUNTS))
def test_real_pair_counts(task):
    pairs = load_task(task)
    assert len(pairs) == REAL_COUNTS[task]
    assert len(pairs.left) == len(pairs.right) == len(pairs)
    assert pairs.skipped == REAL_SKIPPED.get(task, 0)
    lo = 1.0 if task == "sickr-test" else 0.0
    assert pairs.gold.min() >= lo and pairs.gold.max() <= 5.0
    assert all(pairs.left) and all(pairs.right)


# ----------------------------------------------------------------------------------------------
# sets not found locally: fetched by name from the hub (here a local folder laid out as the hub's
# datasets are: <hub>/<dataset>/<split>.jsonl.gz), cached in the SentEval layout, the source named


def write_hub(hub: Path, dataset: str, splits: dict[str, list[dict]]) -> Path:
    """`splits` as <hub>/<dataset>/<split>.jsonl.gz, the files MTEB's STS datasets hold."""
    folder = hub / dataset
    folder.mkdir(parents=True, exist_ok=True)
    for split, rows in splits.items():
        with gzip.open(folder / f"{split}.jsonl.gz", "wt", encoding="utf-8") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in rows)
    return folder


def hub_rows(prefix: str, n: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"sentence1": f"{prefix} left  {i} .", "sentence2": f"{prefix}\tright {i} .", "score": float(rng.integers(0, 11)) / 2}
            for i in range(n)]


@pytest.fixture
def hub_env(tmp_path, monkeypatch):
    """No local STS folder, a private cache, and the hub pointed at a local folder; the real hub unreachable."""
    (tmp_path / "data").mkdir()
    monkeypatch.setenv("SEMPA_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("SEMPA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("SEMPA_STS_HUB", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path / "hub"


def no_datasets(monkeypatch):
    import datasets

    def refuse(*a, **kw):
        raise AssertionError("the hub was asked although the set is on disk")

    monkeypatch.setattr(datasets, "load_dataset", refuse)


def test_hub_names_are_mtebs(monkeypatch):
    monkeypatch.delenv("SEMPA_STS_HUB", raising=False)
    assert sts.sts_hub() == "mteb"
    assert set(sts.HUB_SETS) == set(ALL_TASKS)
    assert sts.hub_dataset("sts12") == ("mteb/sts12-sts", "test", "a0d554a64d88156834ff5ae9920b964011b16384")
    assert sts.hub_dataset("stsb-dev")[:2] == ("mteb/stsbenchmark-sts", "validation")
    assert sts.hub_dataset("stsb-test")[:2] == ("mteb/stsbenchmark-sts", "test")
    assert sts.hub_dataset("sickr-test")[:2] == ("mteb/sickr-sts", "test")
    assert [sts.hub_dataset(t)[0] for t in ("sts13", "sts14", "sts15", "sts16")] == [
        f"mteb/sts{y}-sts" for y in (13, 14, 15, 16)]
    assert sts.hub_dataset("sts12", "someone") == ("someone/sts12-sts", "test", None)  # MTEB's revisions are MTEB's
    assert sts.hub_dataset("sts12", "/data/hub") == ("/data/hub/sts12-sts", "test", None)
    assert sts.hub_cache("mteb").name == "mteb"
    assert sts.hub_cache("/a/hub") != sts.hub_cache("/b/hub")


def test_missing_set_is_fetched_from_the_hub_cached_and_named(hub_env, tmp_path, monkeypatch):
    dev, test = hub_rows("dev", 7, 1), hub_rows("test", 9, 2)
    write_hub(hub_env, "stsbenchmark-sts", {"train": hub_rows("train", 3), "validation": dev, "test": test})
    pairs = load_task("stsb-test")
    cache = tmp_path / "cache" / "sts" / sts.hub_cache().name
    assert pairs.source == f"hub:{hub_env / 'stsbenchmark-sts'} (test; cached at {cache})"
    assert pairs.left == [" ".join(r["sentence1"].split()) for r in test]
    assert pairs.right == [" ".join(r["sentence2"].split()) for r in test]
    assert pairs.gold.tolist() == [r["score"] for r in test]
    # the SentEval layout, read by the reader that reads the local files
    again = read_columns(cache / "STSBenchmark" / "sts-test.csv", "stsb-test", 4, 5, 6)
    assert (again.left, again.right, again.gold.tolist()) == (pairs.left, pairs.right, pairs.gold.tolist())
    assert load_task("stsb-dev").gold.tolist() == [r["score"] for r in dev]  # validation is the dev set
    assert not sts.data_available()  # the local SentEval files, which the real-set tests need
    # read from the cache from now on, the hub not asked again (it may be gone: an offline node)
    shutil.rmtree(hub_env)
    no_datasets(monkeypatch)
    cached = load_task("stsb-test")
    assert cached.source == pairs.source and cached.left == pairs.left and cached.gold.tolist() == pairs.gold.tolist()


def test_sickr_from_the_hub(hub_env, tmp_path):
    rows = hub_rows("sick", 6, 3)
    write_hub(hub_env, "sickr-sts", {"test": rows})
    pairs = load_task("sickr-test")
    assert pairs.gold.tolist() == [r["score"] for r in rows] and len(pairs) == 6  # the header line is not a pair
    assert (sts.hub_cache() / "SICK" / "SICK_test_annotated.txt").read_text().startswith("pair_ID\t")


def senteval_year(root: Path, rows_by_subset: dict[str, list[tuple[str, str, str]]]) -> None:
    folder, subsets = sts.STS_SUBSETS["sts12"]
    assert list(rows_by_subset) == subsets
    for subset, rows in rows_by_subset.items():
        write(root / folder / f"STS.input.{subset}.txt", [f"{a}\t{b}" for a, b, _ in rows])
        write(root / folder / f"STS.gs.{subset}.txt", [g for _, _, g in rows])


def hashed_encoder(sentences: list[str]) -> np.ndarray:
    """A fixed pseudo-random vector per sentence (the same sentence, the same vector)."""
    return np.stack([np.random.default_rng(sum(map(ord, s)) * 7919 + len(s)).normal(size=8) for s in sentences])


def test_a_hub_year_scores_as_the_senteval_all_setting(hub_env, tmp_path):
    """STS12 from the hub (one concatenated set, no subsets) gives the "all" score of the SentEval files."""
    rng = np.random.default_rng(5)
    subsets = sts.STS_SUBSETS["sts12"][1]
    by_subset = {s: [(f"{s} a {i}", f"{s} b {i}", "" if i == 2 else str(rng.integers(0, 6))) for i in range(5)]
                 for s in subsets}
    senteval_year(tmp_path / "local", by_subset)
    labeled = [{"sentence1": a, "sentence2": b, "score": float(g)} for rows in by_subset.values() for a, b, g in rows if g]
    rng.shuffle(labeled)  # the order of the hub rows does not matter to one Spearman
    write_hub(hub_env, "sts12-sts", {"train": labeled[:3], "test": labeled})
    local = evaluate_sts(hashed_encoder, ["sts12"], root=tmp_path / "local")
    hub = evaluate_sts(hashed_encoder, ["sts12"])
    assert hub == pytest.approx(local)
    assert local.sources == {"sts12": f"local:{tmp_path / 'local'}"}
    assert hub.sources["sts12"].startswith(f"hub:{hub_env / 'sts12-sts'} (test; cached at ")
    folder = sts.hub_cache() / "STS12-en-test"
    assert sorted(p.name for p in folder.iterdir()) == ["STS.gs.all.txt", "STS.input.all.txt"]
    assert len(load_task("sts12")) == 20 == len(labeled)


def test_local_files_are_read_before_the_hub(hub_env, tmp_path, monkeypatch):
    root, _ = stsb_root(tmp_path / "data" / "sts")  # $SEMPA_DATA_DIR/sts
    write_hub(hub_env, "stsbenchmark-sts", {"test": hub_rows("hub", 3)})
    no_datasets(monkeypatch)
    pairs = load_task("stsb-test")
    assert pairs.source == f"local:{root}" and len(pairs) == 60
    assert sts.data_available()


def test_evaluate_sts_names_the_sources_and_stays_a_dict_of_floats(tmp_path):
    root, gold_of = stsb_root(tmp_path)
    got = evaluate_sts(fake_encoder(gold_of), ["stsb-test"], root=root)
    assert got.sources == {"stsb-test": f"local:{root}"}
    assert json.loads(json.dumps(got)) == dict(got) and all(isinstance(v, float) for v in got.values())
    assert load_task("stsb-test", root).subset(5).source == f"local:{root}"


def test_neither_local_nor_hub_names_both(hub_env, tmp_path):
    with pytest.raises(STSDataError) as err:
        load_task("sts13")
    msg = str(err.value)
    assert msg.startswith("sts13: not found locally")
    assert str(tmp_path / "data" / "sts" / "STS13-en-test") in msg
    assert f"hub:{hub_env / 'sts13-sts'}[test] could not be loaded" in msg
    assert "SEMPA_DATA_DIR" in msg and "raise SystemExit(main())' sts13" in msg
    assert not (sts.hub_cache() / "fetched").exists()


@pytest.mark.parametrize(("bad", "expected"), [
    ({"sentence1": "x", "sentence2": "y", "score": "high"}, "column 'score': gold score 'high' is not a number"),
    ({"sentence1": "x", "sentence2": "y", "score": None}, "column 'score': gold score None is not a number"),
    ({"sentence1": "  ", "sentence2": "y", "score": 1.0}, "column 'sentence1': not a sentence: '  '"),
    ({"sentence1": "x", "sentence2": None, "score": 1.0}, "column 'sentence2': not a sentence: None"),
])
def test_bad_hub_row_names_the_dataset_and_row(hub_env, bad, expected):
    good = {"sentence1": "a", "sentence2": "b", "score": 2.0}
    write_hub(hub_env, "sickr-sts", {"test": [good, bad, good]})
    with pytest.raises(STSDataError) as err:
        load_task("sickr-test")
    assert str(err.value) == f"hub:{hub_env / 'sickr-sts'}[test]:2: {expected}"
    assert not (sts.hub_cache() / "fetched").exists()  # nothing half-cached


def test_hub_dataset_without_the_columns(hub_env):
    write_hub(hub_env, "sts14-sts", {"test": [{"s1": "a", "s2": "b", "label": 1.0}]})
    with pytest.raises(STSDataError, match=r"sts14-sts\[test\]: missing column\(s\) \['sentence1', 'sentence2', 'score'\]"):
        load_task("sts14")


def test_fetch_command_prints_each_source(hub_env, capsys):
    write_hub(hub_env, "sts15-sts", {"test": hub_rows("y15", 4)})
    assert sts.main(["sts15"]) == 0
    out = capsys.readouterr()
    assert out.out.startswith(f"sts15: 4 pairs from hub:{hub_env / 'sts15-sts'} (test; cached at ")
    assert "fetched" in out.err
    assert sts.main(["sts16"]) == 2 and "sts16: not found locally" in capsys.readouterr().err
    assert sts.main(["sts99"]) == 2 and "unknown STS task" in capsys.readouterr().err
