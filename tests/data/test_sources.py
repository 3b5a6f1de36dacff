"""sempa_dist.data.sources: every source -> validated triplets with exactly K rejected, and clear errors."""

from __future__ import annotations

import csv
import dataclasses
import json
import re
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sempa_dist.config import DataConfig
from sempa_dist.data import DataError, data_dir, load_triplets, tokenize_triplets
from sempa_dist.data.sources import MAX_SENTENCE_CHARS
from sempa_dist.paths import BUNDLED_PREFERENCES

HEADER = ["sent0", "sent1", "hard_neg"]


def cfg(**kw) -> DataConfig:
    return DataConfig(**kw)


def file_cfg(path: Path, **kw) -> DataConfig:
    return DataConfig(source="file", path=str(path), **kw)


def write_csv(path: Path, rows: list[list[str]], header=HEADER, delimiter=",") -> Path:
    with open(path, "w", encoding="utf-8", newline="") as fh:
        w = csv.writer(fh, delimiter=delimiter)
        w.writerow(header)
        w.writerows(rows)
    return path


def write_jsonl(path: Path, rows: list) -> Path:
    with open(path, "w", encoding="utf-8") as fh:
        for r in rows:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")
    return path


def bundled_rows() -> list[dict]:
    with open(BUNDLED_PREFERENCES, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


GOOD = [
    ["A man is playing a guitar.", "Someone plays a guitar.", "A man is sleeping."],
    ["Two dogs run in a park.", "A pair of dogs is running outdoors.", "Two cats sit on a sofa."],
    ["The girl reads a book.", "A book is being read by a girl.", "The girl is swimming."],
    ["A chef cooks pasta.", "Pasta is being cooked by a chef.", "A chef washes dishes."],
]


# ----------------------------------------------------------------------------------------------
# Bundled set and K


def test_bundled_loads_320_rows_with_three_rejected():
    rows = bundled_rows()
    assert len(rows) == 320 and all(len(r["rejected"]) == 3 for r in rows)
    triplets, report = load_triplets(cfg(num_rejected=3), seed=0)
    assert len(triplets) == 320
    assert report.source == "bundled"
    assert (report.rows_read, report.kept, report.random_negatives) == (320, 320, 0)
    assert report.dropped == {} and report.first_bad == []
    for t, r in zip(triplets, rows, strict=True):
        assert t == {"anchor": r["anchor"], "chosen": r["chosen"], "rejected": r["rejected"]}


def test_bundled_k1_takes_the_first_rejected():
    triplets, report = load_triplets(cfg(num_rejected=1))
    assert [t["rejected"] for t in triplets] == [[r["rejected"][0]] for r in bundled_rows()]
    assert report.random_negatives == 0 and report.kept == 320


def test_bundled_k5_fills_with_other_examples_chosen():
    rows = bundled_rows()
    own_chosen = [r["chosen"] for r in rows]
    all_chosen = set(own_chosen)
    triplets, report = load_triplets(cfg(num_rejected=5), seed=7)
    assert report.random_negatives == 320 * 2
    for t, r in zip(triplets, rows, strict=True):
        assert len(t["rejected"]) == 5
        assert t["rejected"][:3] == r["rejected"]  # the example's own rejected come first
        fills = t["rejected"][3:]
        assert all(f in all_chosen for f in fills)  # other examples' chosen sentences ...
        assert t["chosen"] not in t["rejected"]  # ... never its own chosen
        assert len(set(t["rejected"])) == 5  # and no duplicates
    again, report2 = load_triplets(cfg(num_rejected=5), seed=7)
    assert again == triplets and report2.random_negatives == 640
    other, _ = load_triplets(cfg(num_rejected=5), seed=8)
    assert [t["rejected"] for t in other] != [t["rejected"] for t in triplets]
    assert [t["rejected"][:3] for t in other] == [t["rejected"][:3] for t in triplets]


def test_max_examples_cuts_before_filling():
    triplets, report = load_triplets(cfg(num_rejected=4, max_examples=10), seed=0)
    assert len(triplets) == 10 and report.kept == 10
    assert report.rows_read == 320
    assert report.random_negatives == 10
    chosen = {t["chosen"] for t in triplets}
    assert all(t["rejected"][3] in chosen - {t["chosen"]} for t in triplets)  # fills come from the kept 10


# ----------------------------------------------------------------------------------------------
# File formats


def test_csv_with_custom_column_names(tmp_path):
    path = write_csv(
        tmp_path / "pairs.csv",
        [[" A man, smiling, waves. ", "Someone waves.", "A man frowns.", "A woman waves."],
         ["Kids play football.", "Children play soccer.", "Kids sleep.", "Adults play football."],
         ["Rain falls on the city.", "It is raining in town.", "The sun shines.", "Snow falls on the city."]],
        header=["premise", "para", "neg1", "neg2"],
    )
    c = file_cfg(path, anchor_column="premise", chosen_column="para", rejected_columns=["neg1", "neg2"], num_rejected=2)
    triplets, report = load_triplets(c)
    assert triplets == [
        {"anchor": "A man, smiling, waves.", "chosen": "Someone waves.", "rejected": ["A man frowns.", "A woman waves."]},
        {"anchor": "Kids play football.", "chosen": "Children play soccer.", "rejected": ["Kids sleep.", "Adults play football."]},
        {"anchor": "Rain falls on the city.", "chosen": "It is raining in town.", "rejected": ["The sun shines.", "Snow falls on the city."]},
    ]
    assert (report.source, report.rows_read, report.kept, report.random_negatives) == (str(path), 3, 3, 0)


def test_csv_keeps_na_like_text_and_reports_empty_cells(tmp_path):
    # pandas would turn "NA"/"null"/"None" into missing values; they are sentences here.
    path = write_csv(tmp_path / "na.csv", [["NA", "null", "None"], ["x", "", "z"], *GOOD[:2]])
    with pytest.raises(DataError) as ei:
        load_triplets(file_cfg(path))
    assert str(ei.value).startswith(f"{path}:3: column 'sent1': empty sentence: ''")
    triplets, report = load_triplets(file_cfg(path, on_bad_row="skip"))
    assert triplets[0] == {"anchor": "NA", "chosen": "null", "rejected": ["None"]}
    assert len(triplets) == 3 and report.dropped == {"empty sentence": 1}


def test_tsv(tmp_path):
    path = write_csv(tmp_path / "pairs.tsv", [["a, with comma", "b", "c"], ["d", "e", "f"]], delimiter="\t")
    triplets, report = load_triplets(file_cfg(path))
    assert triplets == [{"anchor": "a, with comma", "chosen": "b", "rejected": ["c"]},
                        {"anchor": "d", "chosen": "e", "rejected": ["f"]}]
    assert report.kept == 2


def test_jsonl_with_list_valued_rejected_column(tmp_path):
    path = write_jsonl(tmp_path / "rows.jsonl", [
        {"q": "A cat sleeps.", "p": "A cat is asleep.", "negs": ["A cat runs.", "A dog sleeps.", "A cat eats."]},
        {"q": "It is hot.", "p": "The weather is warm.", "negs": ["It is cold.", "It was hot."]},
        {"q": "He sings.", "p": "He is singing.", "negs": ["He cries.", "She sings.", "He dances.", "They sing."]},
    ])
    c = file_cfg(path, anchor_column="q", chosen_column="p", rejected_columns=["negs"], num_rejected=3)
    triplets, report = load_triplets(c, seed=1)
    assert triplets[0]["rejected"] == ["A cat runs.", "A dog sleeps.", "A cat eats."]
    assert triplets[1]["rejected"][:2] == ["It is cold.", "It was hot."]
    assert triplets[1]["rejected"][2] in {"A cat is asleep.", "He is singing."}
    assert triplets[2]["rejected"] == ["He cries.", "She sings.", "He dances."]
    assert report.random_negatives == 1 and report.kept == 3


def test_jsonl_mixed_string_and_list_rejected(tmp_path):
    path = write_jsonl(tmp_path / "mixed.jsonl", [
        {"sent0": "a", "sent1": "b", "hard_neg": ["c", "d"]},
        {"sent0": "e", "sent1": "f", "hard_neg": "g"},
    ])
    triplets, _ = load_triplets(file_cfg(path, num_rejected=2), seed=0)
    assert triplets == [{"anchor": "a", "chosen": "b", "rejected": ["c", "d"]},
                        {"anchor": "e", "chosen": "f", "rejected": ["g", "b"]}]


def test_json_array_file(tmp_path):
    path = tmp_path / "rows.json"
    path.write_text(json.dumps([dict(zip(HEADER, r, strict=True)) for r in GOOD]), encoding="utf-8")
    triplets, report = load_triplets(file_cfg(path))
    assert [t["anchor"] for t in triplets] == [r[0] for r in GOOD]
    assert report.kept == 4


def test_json_lines_in_a_json_file(tmp_path):
    path = write_jsonl(tmp_path / "rows.json", [dict(zip(HEADER, r, strict=True)) for r in GOOD])
    triplets, _ = load_triplets(file_cfg(path))
    assert [t["rejected"] for t in triplets] == [[r[2]] for r in GOOD]


def test_parquet(tmp_path):
    pd = pytest.importorskip("pandas")
    pytest.importorskip("pyarrow")
    path = tmp_path / "rows.parquet"
    pd.DataFrame(GOOD, columns=HEADER).to_parquet(path)
    triplets, report = load_triplets(file_cfg(path))
    assert triplets == [{"anchor": a, "chosen": b, "rejected": [c]} for a, b, c in GOOD]
    assert report.rows_read == 4


def test_parquet_bad_row_reported_at_its_row(tmp_path):
    pd = pytest.importorskip("pandas")
    path = tmp_path / "rows.parquet"
    pd.DataFrame([*GOOD[:2], ["x", None, "z"]], columns=HEADER).to_parquet(path)
    with pytest.raises(DataError, match=f"^{path}:3: column 'sent1': not a string: None"):
        load_triplets(file_cfg(path))


# ----------------------------------------------------------------------------------------------
# File errors


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="data.path: file not found: .*nope.csv"):
        load_triplets(file_cfg(tmp_path / "nope.csv"))


def test_unsupported_suffix(tmp_path):
    path = tmp_path / "rows.xlsx"
    path.write_text("x", encoding="utf-8")
    with pytest.raises(DataError, match=r"unsupported file type '\.xlsx'"):
        load_triplets(file_cfg(path))


def test_header_only_csv_has_no_usable_examples(tmp_path):
    path = write_csv(tmp_path / "header.csv", [])
    with pytest.raises(DataError, match=f"^{path}"):
        load_triplets(file_cfg(path))


def test_empty_sentence_in_csv_names_file_row_and_column(tmp_path):
    path = write_csv(tmp_path / "bad.csv", [GOOD[0], GOOD[1], [GOOD[2][0], GOOD[2][1], "   "], GOOD[3]])
    with pytest.raises(DataError) as ei:
        load_triplets(file_cfg(path))
    msg = str(ei.value)
    # header is line 1, so the third data row is line 4
    assert msg.startswith(f"{path}:4: column 'hard_neg': empty sentence: '   '")
    assert "data.on_bad_row=skip" in msg
    triplets, report = load_triplets(file_cfg(path, on_bad_row="skip"))
    assert [t["anchor"] for t in triplets] == [GOOD[0][0], GOOD[1][0], GOOD[3][0]]
    assert (report.rows_read, report.kept) == (4, 3)
    assert report.dropped == {"empty sentence": 1}
    assert report.first_bad == [f"{path}:4: column 'hard_neg': empty sentence: '   '"]


def test_null_in_jsonl_names_file_line_and_column(tmp_path):
    path = tmp_path / "nulls.jsonl"
    lines = [json.dumps(dict(zip(HEADER, GOOD[0], strict=True))), "", "   ",
             json.dumps({"sent0": GOOD[1][0], "sent1": None, "hard_neg": "x"}),
             json.dumps({"sent0": 17, "sent1": "y", "hard_neg": "x"}),
             json.dumps({"sent0": "a", "sent1": "b", "hard_neg": ["ok", None]}),
             json.dumps({"sent0": "a", "sent1": "b", "hard_neg": []}),
             json.dumps({"sent0": "a", "sent1": "b"}),
             json.dumps(dict(zip(HEADER, GOOD[1], strict=True)))]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(DataError) as ei:
        load_triplets(file_cfg(path))
    # blank lines count: the null is on line 4 of the file
    assert str(ei.value).startswith(f"{path}:4: column 'sent1': not a string: None")
    triplets, report = load_triplets(file_cfg(path, on_bad_row="skip"))
    assert [t["anchor"] for t in triplets] == [GOOD[0][0], GOOD[1][0]]
    assert (report.rows_read, report.kept) == (7, 2)
    assert report.dropped == {"not a string": 4, "no rejected sentence": 1}
    assert report.first_bad == [
        f"{path}:4: column 'sent1': not a string: None",
        f"{path}:5: column 'sent0': not a string: 17",
        f"{path}:6: column 'hard_neg': not a string: None",
        f"{path}:7: column 'hard_neg': no rejected sentence: []",
        f"{path}:8: column 'hard_neg': not a string: None",  # key missing
    ]


def test_first_bad_keeps_five(tmp_path):
    rows = [["", "b", "c"]] * 9 + GOOD
    path = write_csv(tmp_path / "many.csv", rows)
    triplets, report = load_triplets(file_cfg(path, on_bad_row="skip"))
    assert len(triplets) == 4 and report.dropped == {"empty sentence": 9}
    assert report.first_bad == [f"{path}:{n}: column 'sent0': empty sentence: ''" for n in range(2, 7)]


def test_jsonl_line_that_is_not_an_object_or_not_json(tmp_path):
    path = tmp_path / "odd.jsonl"
    path.write_text(json.dumps(dict(zip(HEADER, GOOD[0], strict=True))) + "\n[1, 2]\n" + json.dumps(dict(zip(HEADER, GOOD[1], strict=True))) + "\n")
    with pytest.raises(DataError, match=f"^{path}:2: not a JSON object: \\[1, 2\\]"):
        load_triplets(file_cfg(path))
    triplets, report = load_triplets(file_cfg(path, on_bad_row="skip"))
    assert len(triplets) == 2 and report.dropped == {"not a JSON object": 1} and report.rows_read == 3
    path.write_text(json.dumps(dict(zip(HEADER, GOOD[0], strict=True))) + "\n{broken\n")
    with pytest.raises(DataError, match=f"^{path}:2: invalid JSON"):
        load_triplets(file_cfg(path, on_bad_row="skip"))


def test_utf8_bom_csv_header_is_read(tmp_path):
    path = tmp_path / "bom.csv"
    path.write_bytes("\ufeffsent0,sent1,hard_neg\nä,ö,ü\n".encode())
    assert load_triplets(file_cfg(path))[0] == [{"anchor": "ä", "chosen": "ö", "rejected": ["ü"]}]


def test_utf8_bom_jsonl(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps({"sent0": "a", "sent1": "b", "hard_neg": "c"}).encode() + b"\n")
    assert load_triplets(file_cfg(path))[0] == [{"anchor": "a", "chosen": "b", "rejected": ["c"]}]


def test_absurdly_long_sentence(tmp_path):
    ok = "w" * MAX_SENTENCE_CHARS
    long = "w" * (MAX_SENTENCE_CHARS + 1)
    path = write_jsonl(tmp_path / "long.jsonl", [
        {"sent0": ok, "sent1": "b", "hard_neg": "c"},
        {"sent0": "a", "sent1": "b", "hard_neg": long},
        {"sent0": "d", "sent1": "e", "hard_neg": "f"},
    ])
    with pytest.raises(DataError) as ei:
        load_triplets(file_cfg(path))
    msg = str(ei.value)
    assert msg.startswith(f"{path}:2: column 'hard_neg': longer than {MAX_SENTENCE_CHARS} characters: 'www")
    assert len(msg) < 300  # the value is shortened in the message
    triplets, report = load_triplets(file_cfg(path, on_bad_row="skip"))
    assert [t["anchor"] for t in triplets] == [ok, "d"]
    assert report.dropped == {f"longer than {MAX_SENTENCE_CHARS} characters": 1}


def test_multiple_rejected_columns_are_named_together(tmp_path):
    path = write_csv(tmp_path / "two.csv", [["a", "b", "c", ""]], header=["sent0", "sent1", "n1", "n2"])
    with pytest.raises(DataError, match=f"^{path}:2: column 'n1,n2': empty sentence"):
        load_triplets(file_cfg(path, rejected_columns=["n1", "n2"], num_rejected=2))


def test_everything_skipped_is_an_error(tmp_path):
    path = write_csv(tmp_path / "allbad.csv", [["", "b", "c"], ["a", "", "c"]])
    with pytest.raises(DataError, match=r"no usable examples \(dropped: \{'empty sentence': 2\}\)"):
        load_triplets(file_cfg(path, on_bad_row="skip"))


# ----------------------------------------------------------------------------------------------
# Every bad-data case in every file format: one DataError naming file, row and column, or (skip)
# the row dropped and counted

FORMATS = ["csv", "tsv", "jsonl", "json", "json-lines", "parquet"]  # json: an array; json-lines: .json, one per line
SUFFIX = {"csv": ".csv", "tsv": ".tsv", "jsonl": ".jsonl", "json": ".json", "json-lines": ".json", "parquet": ".parquet"}
SKIP_HINT = "(set data.on_bad_row=skip to skip such rows)"


def error_then_skip(path, where: str):
    """The bad row fails the load with one message starting `where` (value shortened); skipping it, the
    load goes on: (triplets, report) of data.on_bad_row=skip."""
    with pytest.raises(DataError) as ei:
        load_triplets(file_cfg(path))
    msg = str(ei.value)
    assert msg.startswith(where) and msg.endswith(SKIP_HINT)
    assert len(msg) < len(where) + 150  # the value is shortened
    return load_triplets(file_cfg(path, on_bad_row="skip"))


def write_table(tmp_path: Path, fmt: str, rows: list[list], header: list[str] = HEADER) -> Path:
    """`rows` (cells: str or None) in `fmt`; JSON is pretty-printed (items span lines) and \\u-escaped."""
    path = tmp_path / f"rows{SUFFIX[fmt]}"
    if fmt in ("csv", "tsv"):
        return write_csv(path, rows, header=header, delimiter="\t" if fmt == "tsv" else ",")
    dicts = [dict(zip(header, r, strict=True)) for r in rows]
    if fmt == "json":
        path.write_text(json.dumps(dicts, indent=2), encoding="ascii")
    elif fmt == "parquet":
        pd = pytest.importorskip("pandas")
        pd.DataFrame(rows, columns=header).to_parquet(path)
    else:
        path.write_text("".join(json.dumps(d) + "\n" for d in dicts), encoding="ascii")
    return path


def loc(path: Path, fmt: str, i: int) -> str:
    """Where data row `i` (0-based) is, as the loader names it: its file line (Parquet: row)."""
    if fmt in ("csv", "tsv"):
        return str(i + 2)  # line 1 is the header
    if fmt == "json":
        starts = [n for n, line in enumerate(path.read_text().splitlines(), 1) if line.strip() == "{"]
        return f"{starts[i]}: item {i + 1}"
    return str(i + 1)


BAD_CELLS = {
    "empty": ("", "empty sentence"),
    "blank": (" \t ", "empty sentence"),
    "long": ("w" * (MAX_SENTENCE_CHARS + 1), f"longer than {MAX_SENTENCE_CHARS} characters"),
    "null": (None, "not a string"),
    "lone-surrogate": ("broken \ud83d emoji", "lone UTF-16 surrogate"),
}
# a CSV cell is always text (an empty cell is the "empty" case); Parquet cannot store a lone surrogate
_CANNOT_HOLD = {("csv", "null"), ("tsv", "null"), ("csv", "lone-surrogate"), ("tsv", "lone-surrogate"),
                ("parquet", "lone-surrogate")}


@pytest.mark.parametrize(("fmt", "case"), [(f, c) for f in FORMATS for c in BAD_CELLS if (f, c) not in _CANNOT_HOLD])
def test_bad_sentence_names_file_row_and_column_in_every_format(tmp_path, fmt, case):
    value, why = BAD_CELLS[case]
    rows = [list(r) for r in GOOD]
    rows[2][1] = value
    path = write_table(tmp_path, fmt, rows)
    where = f"{path}:{loc(path, fmt, 2)}: column 'sent1': {why}"
    triplets, report = error_then_skip(path, where)
    assert [t["anchor"] for t in triplets] == [GOOD[0][0], GOOD[1][0], GOOD[3][0]]
    assert (report.rows_read, report.kept) == (4, 3)
    assert list(report.dropped.values()) == [1] and next(iter(report.dropped)).startswith(why)
    assert len(report.first_bad) == 1 and report.first_bad[0].startswith(where)


@pytest.mark.parametrize("fmt", FORMATS)
def test_absurdly_long_line_in_every_format(tmp_path, fmt):
    rows = [list(r) for r in GOOD]
    rows[1][0] = "w" * 300_000  # one line longer than the csv module's 128 KiB cell limit
    path = write_table(tmp_path, fmt, rows)
    limit = csv.field_size_limit()
    why = f"longer than {MAX_SENTENCE_CHARS} characters"
    with pytest.raises(DataError) as ei:
        load_triplets(file_cfg(path))
    msg = str(ei.value)
    assert msg.startswith(f"{path}:{loc(path, fmt, 1)}: column 'sent0': {why}: 'www") and len(msg) < len(str(path)) + 200
    triplets, report = load_triplets(file_cfg(path, on_bad_row="skip"))
    assert [t["anchor"] for t in triplets] == [GOOD[0][0], GOOD[2][0], GOOD[3][0]]
    assert report.dropped == {why: 1}
    assert csv.field_size_limit() == limit  # raised only while reading


@pytest.mark.parametrize("fmt", [f for f in FORMATS if f != "parquet"])
@pytest.mark.parametrize("mode", ["error", "skip"])
def test_non_utf8_bytes_name_the_line_in_every_text_format(tmp_path, fmt, mode):
    path = write_table(tmp_path, fmt, GOOD)
    data = path.read_bytes()
    at = data.index(GOOD[2][1].encode())
    path.write_bytes(data[:at] + b"caf\xe9 " + data[at:])  # Latin-1, as a spreadsheet may save it
    line = data[:at].count(b"\n") + 1
    with pytest.raises(DataError, match=f"^{re.escape(str(path))}:{line}: not UTF-8 \\(byte 0xe9 at column "):
        load_triplets(file_cfg(path, on_bad_row=mode))


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("mode", ["error", "skip"])
def test_missing_column_lists_the_columns_in_every_format(tmp_path, fmt, mode):
    path = write_table(tmp_path, fmt, GOOD, header=["sentence1", "sentence2", "negative"])
    with pytest.raises(DataError) as ei:
        load_triplets(file_cfg(path, on_bad_row=mode))
    msg = str(ei.value)
    assert msg.startswith(f"{path}: missing column(s) ['sent0', 'sent1', 'hard_neg']")
    assert "['sentence1', 'sentence2', 'negative']" in msg


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".jsonl", ".json", ".parquet"])
@pytest.mark.parametrize("content", [b"", b"\n  \r\n\t\n"], ids=["empty", "blank-lines"])
def test_empty_file_in_every_format(tmp_path, suffix, content):
    path = tmp_path / f"rows{suffix}"
    path.write_bytes(content)
    if not content:
        expected = "file is empty"
    elif suffix == ".parquet":
        expected = "not a readable Parquet file"
    else:
        expected = "file is empty (only blank lines)"
    for mode in ("error", "skip"):
        with pytest.raises(DataError, match=f"^{re.escape(f'{path}: {expected}')}"):
            load_triplets(file_cfg(path, on_bad_row=mode))


@pytest.mark.parametrize("fmt", ["csv", "tsv", "json", "parquet"])
def test_file_with_no_rows(tmp_path, fmt):
    path = write_table(tmp_path, fmt, [])
    expected = "no rows after the header" if fmt in ("csv", "tsv") else "no rows"
    with pytest.raises(DataError, match=f"^{re.escape(f'{path}: {expected}')}$"):
        load_triplets(file_cfg(path, on_bad_row="skip"))


@pytest.mark.parametrize("delimiter", [",", "\t"])
def test_csv_row_with_the_wrong_number_of_cells(tmp_path, delimiter):
    path = write_csv(tmp_path / ("rows.tsv" if delimiter == "\t" else "rows.csv"),
                     [GOOD[0], ["a", "b", "c", "d"], ["e", "f"], GOOD[1]], delimiter=delimiter)
    with pytest.raises(DataError) as ei:
        load_triplets(file_cfg(path))
    assert str(ei.value) == f"{path}:3: 4 cell(s) where the header has 3 {SKIP_HINT}"
    triplets, report = load_triplets(file_cfg(path, on_bad_row="skip"))
    assert [t["anchor"] for t in triplets] == [GOOD[0][0], GOOD[1][0]]
    assert (report.rows_read, report.dropped) == (4, {"wrong number of cells": 2})
    assert report.first_bad == [f"{path}:3: 4 cell(s) where the header has 3", f"{path}:4: 2 cell(s) where the header has 3"]


def test_csv_unclosed_quote_names_the_line_it_starts_on(tmp_path):
    path = tmp_path / "quote.csv"
    path.write_text('sent0,sent1,hard_neg\na,b,c\n"never closed,x,y\nd,e,f\ng,h,i\n', encoding="utf-8")
    with pytest.raises(DataError, match=re.escape(
            f"{path}:3: 1 cell(s) where the header has 3 (the row runs over lines 3-5: an unclosed quote?)")):
        load_triplets(file_cfg(path))


def test_csv_rows_are_numbered_by_file_line_past_multiline_cells(tmp_path):
    path = write_csv(tmp_path / "multi.csv", [["an anchor\nover two lines", "b", "c"], GOOD[0], ["x", "", "z"]])
    with pytest.raises(DataError, match=f"^{re.escape(str(path))}:5: column 'sent1': empty sentence"):
        load_triplets(file_cfg(path))
    triplets, _ = load_triplets(file_cfg(path, on_bad_row="skip"))
    assert [t["anchor"] for t in triplets] == ["an anchor\nover two lines", GOOD[0][0]]


def test_csv_cells_stay_text(tmp_path):
    # pandas would read an all-number column as numbers ("not a string"); every CSV cell is text
    path = write_csv(tmp_path / "numbers.csv", [["1", "2", "3"], ["4.5", "NaN", "True"]])
    triplets, _ = load_triplets(file_cfg(path))
    assert triplets == [{"anchor": "1", "chosen": "2", "rejected": ["3"]},
                        {"anchor": "4.5", "chosen": "NaN", "rejected": ["True"]}]


def test_csv_column_named_twice(tmp_path):
    path = write_csv(tmp_path / "twice.csv", [["a", "b", "c", "d"]], header=["sent0", "sent1", "sent0", "hard_neg"])
    with pytest.raises(DataError, match=re.escape(f"{path}:1: column(s) ['sent0'] appear more than once in the header")):
        load_triplets(file_cfg(path))


@pytest.mark.parametrize(("body", "expected"), [
    ('[\n  {"sent0": "a", "sent1": "b", "hard_neg": "c"},\n  {"sent0": "d" "sent1": "e"}\n]',
     ":3: invalid JSON: Expecting ',' delimiter (column 17)"),
    ('[{"sent0": "a", "sent1": "b", "hard_neg": "c"},]', ":1: invalid JSON: Expecting value (column 48)"),
    ('[{"sent0": "a", "sent1": "b", "hard_neg": "c"}', ":1: invalid JSON: expected ',' or ']' after item 1"),
    ('[{"sent0": "a", "sent1": "b", "hard_neg": "c"}]\n[]', ":2: invalid JSON: more data after the array's closing ']'"),
    ('{"sent0": "a",\n "sent1": "b", "hard_neg": "c"}', ":1: invalid JSON: Expecting property name enclosed in double "
     "quotes (column 15) (a .json file holds an array of row objects, or one row object per line)"),
])
def test_malformed_json_file_names_the_line(tmp_path, body, expected):
    path = tmp_path / "rows.json"
    path.write_text(body, encoding="utf-8")
    with pytest.raises(DataError) as ei:
        load_triplets(file_cfg(path, on_bad_row="skip"))
    assert str(ei.value) == f"{path}{expected}"


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
@pytest.mark.parametrize("value", ["[" * 100_000, "9" * 5000], ids=["nested-too-deep", "5000-digit-number"])
def test_pathological_json_is_a_data_error(tmp_path, suffix, value):
    # json raises RecursionError / a plain ValueError (int digit limit) for these, not JSONDecodeError
    good = json.dumps(dict(zip(HEADER, GOOD[0], strict=True)))
    path = tmp_path / f"rows{suffix}"
    bad = '{"sent0": ' + value + "}"
    path.write_text(f"[\n{good},\n{bad}\n]" if suffix == ".json" else f"{good}\n{bad}\n", encoding="utf-8")
    with pytest.raises(DataError, match=f"^{re.escape(str(path))}:[23]: invalid JSON"):
        load_triplets(file_cfg(path, on_bad_row="skip"))


@pytest.mark.parametrize("fmt", ["jsonl", "json"])
def test_json_rows_that_are_not_objects(tmp_path, fmt):
    path = tmp_path / f"rows{SUFFIX[fmt]}"
    items = [dict(zip(HEADER, GOOD[0], strict=True)), "just text", dict(zip(HEADER, GOOD[1], strict=True))]
    path.write_text(json.dumps(items) if fmt == "json" else "".join(json.dumps(i) + "\n" for i in items))
    where = f"{path}:1: item 2" if fmt == "json" else f"{path}:2"
    with pytest.raises(DataError, match=re.escape(f"{where}: not a JSON object: 'just text' {SKIP_HINT}")):
        load_triplets(file_cfg(path))
    triplets, report = load_triplets(file_cfg(path, on_bad_row="skip"))
    assert len(triplets) == 2 and report.dropped == {"not a JSON object": 1} and report.rows_read == 3
    path.write_text(json.dumps([1, 2]) if fmt == "json" else "1\n2\n")
    with pytest.raises(DataError, match="not a JSON object: 1 \\(and no other row is one\\)"):
        load_triplets(file_cfg(path, on_bad_row="skip"))


def test_lone_surrogate_is_dropped_before_it_reaches_the_tokenizer(tmp_path, tiny_tokenizer):
    # "\ud83d" without its low half is valid JSON, but no UTF-8 encoder (Arrow, the tokenizer) takes it
    rows = [list(r) for r in GOOD]
    rows[1][2] = "broken \ud83d emoji"
    path = write_table(tmp_path, "jsonl", rows)
    triplets, report = load_triplets(file_cfg(path, on_bad_row="skip"))
    assert len(triplets) == 3 and sum(report.dropped.values()) == 1
    examples, _ = tokenize_triplets(triplets, tiny_tokenizer, DataConfig(cache_dir=str(tmp_path / "cache")))
    assert len(examples) == 3


@pytest.mark.parametrize("body", [b"PAR1 but no parquet", None], ids=["not-parquet", "truncated"])
def test_unreadable_parquet(tmp_path, body):
    path = write_table(tmp_path, "parquet", GOOD)
    path.write_bytes(body if body is not None else path.read_bytes()[:-30])
    with pytest.raises(DataError, match=f"^{re.escape(str(path))}: not a readable Parquet file \\(Arrow"):
        load_triplets(file_cfg(path, on_bad_row="skip"))


# ----------------------------------------------------------------------------------------------
# Filling to K when sentences run out


@pytest.mark.timeout(30)
def test_too_few_distinct_sentences_for_k_is_an_error_not_a_hang(tmp_path):
    path = write_csv(tmp_path / "three.csv", [r for r in GOOD[:3]])
    # 1 own rejected + 2 other chosen sentences = 3 < 5
    with pytest.raises(DataError, match="fewer than data.num_rejected=5"):
        load_triplets(file_cfg(path, num_rejected=5))
    triplets, report = load_triplets(file_cfg(path, num_rejected=3), seed=3)
    chosen = [r[1] for r in GOOD[:3]]
    for t, r in zip(triplets, GOOD[:3], strict=True):
        assert t["rejected"][0] == r[2]
        assert sorted(t["rejected"][1:]) == sorted(set(chosen) - {r[1]})
    assert report.random_negatives == 6


@pytest.mark.timeout(30)
def test_duplicate_chosen_sentences_limit_the_pool(tmp_path):
    rows = [[f"anchor {i}", f"chosen {i % 3}", f"neg {i}"] for i in range(30)]
    path = write_csv(tmp_path / "dups.csv", rows)
    with pytest.raises(DataError, match="fewer than data.num_rejected=4"):
        load_triplets(file_cfg(path, num_rejected=4))
    triplets, report = load_triplets(file_cfg(path, num_rejected=3), seed=0)
    for i, t in enumerate(triplets):
        assert t["rejected"][0] == f"neg {i}"
        assert sorted(t["rejected"][1:]) == sorted({"chosen 0", "chosen 1", "chosen 2"} - {f"chosen {i % 3}"})
    assert report.random_negatives == 60


def test_single_example_cannot_be_filled(tmp_path):
    path = write_csv(tmp_path / "one.csv", [GOOD[0]])
    assert load_triplets(file_cfg(path))[0] == [{"anchor": GOOD[0][0], "chosen": GOOD[0][1], "rejected": [GOOD[0][2]]}]
    with pytest.raises(DataError, match="single example"):
        load_triplets(file_cfg(path, num_rejected=2))


# ----------------------------------------------------------------------------------------------
# ms-swift preference files (the authors' run_dpo.sh data): messages + rejected_response, as they are

SWIFT_SYSTEM = "You are a helpful assistant"


def swift_row(anchor: str, chosen: str, rejected, system: str | None = SWIFT_SYSTEM) -> dict:
    user = f'Keep the same meaning of this sentence: "{anchor}", while making some changes.'
    turns = ([{"role": "system", "content": system}] if system is not None else [])
    turns += [{"role": "user", "content": user}, {"role": "assistant", "content": chosen}]
    return {"messages": turns, "rejected_response": rejected}


SWIFT_GOOD = [swift_row(*r) for r in GOOD[:2]] + [swift_row(*GOOD[2], system=None), swift_row(*GOOD[3])]


def write_swift(tmp_path: Path, fmt: str, rows: list) -> Path:
    """ms-swift rows as JSON lines, a pretty-printed JSON array, or Parquet (pandas, the `messages` column a list of structs)."""
    path = tmp_path / f"swift{SUFFIX[fmt]}"
    if fmt == "json":
        path.write_text(json.dumps(rows, indent=2), encoding="utf-8")
    elif fmt == "parquet":
        pd = pytest.importorskip("pandas")
        pd.DataFrame(rows).to_parquet(path)
    else:
        write_jsonl(path, rows)
    return path


@pytest.mark.parametrize("fmt", ["jsonl", "json", "json-lines", "parquet"])
def test_swift_preference_file_loads_as_written(tmp_path, fmt):
    path = write_swift(tmp_path, fmt, SWIFT_GOOD)
    triplets, report = load_triplets(file_cfg(path))  # the default columns (sent0, ...) are not needed
    assert (report.rows_read, report.kept, report.random_negatives, report.dropped) == (4, 4, 0, {})
    for t, row, (anchor, chosen, rejected) in zip(triplets, SWIFT_GOOD, GOOD, strict=True):
        assert t["prompt"] == row["messages"][:-1]  # system (when given) and user turns, as written
        assert t["chosen"] == chosen and t["rejected"] == [rejected]
        assert t["anchor"] == row["messages"][-2]["content"] and anchor in t["anchor"]
    assert [m["role"] for m in triplets[2]["prompt"]] == ["user"]  # the system turn is optional


def test_swift_multi_turn_prompt_and_k_fill(tmp_path):
    rows = [dict(r) for r in SWIFT_GOOD]
    rows[0] = {"messages": [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hello."},
                            *SWIFT_GOOD[0]["messages"][1:]], "rejected_response": " A man is sleeping. "}
    path = write_swift(tmp_path, "jsonl", rows)
    triplets, report = load_triplets(file_cfg(path, num_rejected=3), seed=1)
    assert [m["role"] for m in triplets[0]["prompt"]] == ["user", "assistant", "user"]
    assert triplets[0]["rejected"][0] == "A man is sleeping."  # responses are stripped like every sentence
    # ms-swift's DPO has one rejected response: K=3 takes two other rows' chosen sentences
    assert report.random_negatives == 4 * 2
    chosen = {t["chosen"] for t in triplets}
    assert all(len(t["rejected"]) == 3 and set(t["rejected"][1:]) <= chosen - {t["chosen"]} for t in triplets)


def test_swift_fields_beside_the_configured_columns_are_an_ordinary_file(tmp_path):
    rows = [{**dict(zip(HEADER, r, strict=True)), **swift_row(*r)} for r in GOOD]
    triplets, _ = load_triplets(file_cfg(write_jsonl(tmp_path / "both.jsonl", rows)))
    assert triplets == [{"anchor": a, "chosen": b, "rejected": [c]} for a, b, c in GOOD]


def _turns(*roles: str) -> list[dict]:
    return [{"role": r, "content": f"{r} text ."} for r in roles]


SWIFT_BAD = {  # case -> (row, column named, why)
    "no-messages": ({"rejected_response": "x"}, "messages", "not a list of turns"),
    "messages-string": ({"messages": "hello", "rejected_response": "x"}, "messages", "not a list of turns"),
    "turn-not-object": ({"messages": ["hi", *_turns("assistant")], "rejected_response": "x"}, "messages[0]",
                        "not a turn object"),
    "tool-role": ({"messages": _turns("user", "tool", "assistant"), "rejected_response": "x"}, "messages[1].role",
                  "role is not one of system, user, assistant"),
    "late-system": ({"messages": _turns("user", "system", "assistant"), "rejected_response": "x"},
                    "messages[1].role", "a system turn after the first turn"),
    "ends-with-user": ({"messages": _turns("system", "user"), "rejected_response": "x"}, "messages",
                       "does not end with a user turn and the assistant's chosen response"),
    "no-user": ({"messages": _turns("system", "assistant"), "rejected_response": "x"}, "messages",
                "does not end with a user turn and the assistant's chosen response"),
    "not-alternating": ({"messages": _turns("user", "user", "assistant"), "rejected_response": "x"}, "messages",
                        "user and assistant turns do not alternate"),
    "empty-user": ({"messages": [{"role": "user", "content": "  "}, *_turns("assistant")], "rejected_response": "x"},
                   "messages[0].content", "empty sentence"),
    "null-chosen": ({"messages": [*_turns("user"), {"role": "assistant", "content": None}], "rejected_response": "x"},
                    "messages[1].content", "not a string"),
    "long-chosen": ({"messages": [*_turns("user"), {"role": "assistant", "content": "w" * (MAX_SENTENCE_CHARS + 1)}],
                     "rejected_response": "x"}, "messages[1].content", f"longer than {MAX_SENTENCE_CHARS} characters"),
    "no-rejected": ({"messages": _turns("user", "assistant")}, "rejected_response", "not a string"),
    "empty-rejected": ({"messages": _turns("user", "assistant"), "rejected_response": ""}, "rejected_response",
                       "empty sentence"),
    "list-rejected": ({"messages": _turns("user", "assistant"), "rejected_response": ["a", "b"]}, "rejected_response",
                      "a list (ms-swift's DPO rejected_response is one string)"),
    "rejected-messages": ({"messages": _turns("user", "assistant"), "rejected_messages": _turns("user", "assistant")},
                          "rejected_response", "missing (rejected_messages is not read: give rejected_response)"),
}


@pytest.mark.parametrize("fmt", ["jsonl", "json"])
@pytest.mark.parametrize("case", list(SWIFT_BAD))
def test_swift_bad_row_names_file_row_and_field(tmp_path, fmt, case):
    bad, col, why = SWIFT_BAD[case]
    rows = [SWIFT_GOOD[0], SWIFT_GOOD[1], bad, SWIFT_GOOD[3]]
    path = write_swift(tmp_path, fmt, rows)
    if fmt == "json":  # an item of the array opens at indentation 2 (its turns deeper)
        starts = [n for n, line in enumerate(path.read_text().splitlines(), 1) if line == "  {"]
        where = f"{path}:{starts[2]}: item 3: column {col!r}: {why}"
    else:
        where = f"{path}:3: column {col!r}: {why}"
    triplets, report = error_then_skip(path, where)
    assert [t["chosen"] for t in triplets] == [GOOD[0][1], GOOD[1][1], GOOD[3][1]]
    assert (report.rows_read, report.kept) == (4, 3)
    assert report.dropped == {why: 1}
    assert len(report.first_bad) == 1 and report.first_bad[0].startswith(where)


def test_swift_empty_system_turn_is_kept_as_written(tmp_path):
    rows = [swift_row(*r, system="") for r in GOOD]
    triplets, _ = load_triplets(file_cfg(write_swift(tmp_path, "jsonl", rows)))
    assert all(t["prompt"][0] == {"role": "system", "content": ""} for t in triplets)


def test_swift_row_that_is_not_an_object(tmp_path):
    path = write_swift(tmp_path, "jsonl", [SWIFT_GOOD[0], [1, 2], SWIFT_GOOD[1]])
    with pytest.raises(DataError, match=f"^{re.escape(str(path))}:2: not a JSON object: \\[1, 2\\]"):
        load_triplets(file_cfg(path))
    triplets, report = load_triplets(file_cfg(path, on_bad_row="skip"))
    assert len(triplets) == 2 and report.dropped == {"not a JSON object": 1} and report.rows_read == 3


def test_swift_rows_tokenise_with_their_own_prompt(tmp_path, tiny_tokenizer):
    path = write_swift(tmp_path, "jsonl", SWIFT_GOOD)
    dcfg = file_cfg(path, cache_dir=str(tmp_path / "cache"))
    triplets, _ = load_triplets(dcfg)
    examples, report = tokenize_triplets(triplets, tiny_tokenizer, dcfg)
    assert report.kept == 4
    for ex, row in zip(examples, SWIFT_GOOD, strict=True):
        # the turns through the chat template only: not wrapped in data.template a second time
        expected = tiny_tokenizer.apply_chat_template(row["messages"][:-1], tokenize=False, add_generation_prompt=True)
        assert tiny_tokenizer.decode(ex.prompt_ids) == expected
        assert tiny_tokenizer.decode(ex.responses[0][:-1]) == row["messages"][-1]["content"]
        assert tiny_tokenizer.decode(ex.responses[1][:-1]) == row["rejected_response"]


# ----------------------------------------------------------------------------------------------
# SNLI layout


def snli_cfg(root: Path, **kw) -> DataConfig:
    return DataConfig(source="snli", path=str(root), **{"split": "dev", **kw})


def write_snli(root: Path, pairs: list[tuple[str, str, str]], split: str = "dev") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name, col in (("s1", 0), ("s2", 1), ("labels", 2)):
        (root / f"{name}.{split}").write_text("".join(p[col] + "\n" for p in pairs), encoding="utf-8")
    return root


SNLI_PAIRS = [
    ("P1 a man rides a horse .", "P1 entail", "entailment"),
    ("P1 a man rides a horse .", "P1 neutral", "neutral"),
    ("P1 a man rides a horse .", "P1 contra", "contradiction"),
    ("P2 only entailment and neutral .", "P2 entail", "entailment"),
    ("P2 only entailment and neutral .", "P2 neutral", "neutral"),
    ("P3 a child sings .", "P3 contra", "contradiction"),
    ("P3 a child sings .", "P3 entail", "entailment"),
    ("P3 a child sings .", "P3 neutral", "neutral"),
    ("P4 only contradiction .", "P4 contra", "contradiction"),
    ("P5 a cook fries eggs .", "P5 entail", "entailment"),
    ("P5 a cook fries eggs .", "P5 contra", "contradiction"),
]


def test_snli_layout_triplets_and_drops(tmp_path):
    root = write_snli(tmp_path / "snli", SNLI_PAIRS)
    triplets, report = load_triplets(snli_cfg(root, split="dev"))
    assert triplets == [
        {"anchor": "P1 a man rides a horse .", "chosen": "P1 entail", "rejected": ["P1 contra"]},
        {"anchor": "P3 a child sings .", "chosen": "P3 entail", "rejected": ["P3 contra"]},
        {"anchor": "P5 a cook fries eggs .", "chosen": "P5 entail", "rejected": ["P5 contra"]},
    ]
    assert report.source == str(root)
    assert (report.rows_read, report.kept, report.random_negatives) == (11, 3, 0)
    assert report.dropped == {"premise lacks an entailment or a contradiction": 2}


def test_snli_k2_takes_contradiction_then_neutral(tmp_path):
    root = write_snli(tmp_path / "snli", SNLI_PAIRS)
    triplets, report = load_triplets(snli_cfg(root, num_rejected=2), seed=0)
    assert triplets[0]["rejected"] == ["P1 contra", "P1 neutral"]
    assert triplets[1]["rejected"] == ["P3 contra", "P3 neutral"]
    # P5 has no neutral: one random fill from the other premises' chosen sentences
    assert triplets[2]["rejected"][0] == "P5 contra"
    assert triplets[2]["rejected"][1] in {"P1 entail", "P3 entail"}
    assert report.random_negatives == 1


def test_snli_split_suffix_and_crlf(tmp_path):
    root = tmp_path / "snli"
    root.mkdir()
    (root / "s1.test").write_bytes(b"\xef\xbb\xbfA premise .\r\nA premise .\r\n")  # BOM: not part of the premise
    (root / "s2.test").write_bytes(b"yes .\r\nno .\r\n")
    (root / "labels.test").write_bytes(b"entailment\r\ncontradiction\r\n")
    triplets, _ = load_triplets(snli_cfg(root, split="test"))
    assert triplets == [{"anchor": "A premise .", "chosen": "yes .", "rejected": ["no ."]}]
    with pytest.raises(DataError, match=r"s1\.dev: SNLI file not found"):
        load_triplets(snli_cfg(root, split="dev"))


def test_snli_unknown_label(tmp_path):
    pairs = [*SNLI_PAIRS[:3], ("P9 x .", "P9 y", "hidden"), *SNLI_PAIRS[9:]]
    root = write_snli(tmp_path / "snli", pairs)
    with pytest.raises(DataError) as ei:
        load_triplets(snli_cfg(root))
    assert str(ei.value) == f"{root / 'labels.dev'}:4: unknown label 'hidden' (set data.on_bad_row=skip to skip such rows)"
    triplets, report = load_triplets(snli_cfg(root, on_bad_row="skip"))
    assert [t["anchor"] for t in triplets] == ["P1 a man rides a horse .", "P5 a cook fries eggs ."]
    assert report.dropped == {"unknown label": 1}
    assert report.first_bad == [f"{root / 'labels.dev'}:4: unknown label 'hidden'"]


def test_snli_empty_sentence_and_line_count_mismatch(tmp_path):
    pairs = [*SNLI_PAIRS[:2], ("P1 a man rides a horse .", "  ", "contradiction"), *SNLI_PAIRS[9:]]
    root = write_snli(tmp_path / "snli", pairs)
    with pytest.raises(DataError, match=rf"^{root / 's2.dev'}:3: empty sentence \(set data.on_bad_row=skip"):
        load_triplets(snli_cfg(root))
    triplets, report = load_triplets(snli_cfg(root, on_bad_row="skip"))
    assert [t["anchor"] for t in triplets] == ["P5 a cook fries eggs ."]
    assert report.dropped == {"empty sentence": 1, "premise lacks an entailment or a contradiction": 1}
    with open(root / "labels.dev", "a", encoding="utf-8") as fh:
        fh.write("neutral\n")
    with pytest.raises(DataError, match=r"different line counts 5/5/6"):
        load_triplets(snli_cfg(root))


@pytest.mark.parametrize("name", ["s1", "s2", "labels"])
def test_snli_non_utf8_in_any_file(tmp_path, name):
    root = write_snli(tmp_path / "snli", SNLI_PAIRS)
    f = root / f"{name}.dev"
    lines = f.read_bytes().split(b"\n")
    lines[5] = lines[5][:2] + b"\xe9" + lines[5][2:]
    f.write_bytes(b"\n".join(lines))
    for mode in ("error", "skip"):
        with pytest.raises(DataError, match=f"^{re.escape(str(f))}:6: not UTF-8 \\(byte 0xe9 at column 3\\)"):
            load_triplets(snli_cfg(root, on_bad_row=mode))


@pytest.mark.parametrize("name", ["s1", "s2", "labels"])
def test_snli_empty_file(tmp_path, name):
    root = write_snli(tmp_path / "snli", SNLI_PAIRS)
    (root / f"{name}.dev").write_bytes(b"")
    with pytest.raises(DataError, match=f"^{re.escape(str(root / f'{name}.dev'))}: file is empty$"):
        load_triplets(snli_cfg(root, on_bad_row="skip"))


@pytest.mark.parametrize("name", ["s1", "s2"])
def test_snli_absurdly_long_or_empty_sentence(tmp_path, name):
    why = f"longer than {MAX_SENTENCE_CHARS} characters"
    for text, reason, shown in (("w" * 300_000, why, f"{why}: 'www"), ("   ", "empty sentence", "empty sentence")):
        pairs = list(SNLI_PAIRS)
        p, h, lab = pairs[9]  # P5's entailment
        pairs[9] = (text, h, lab) if name == "s1" else (p, text, lab)
        root = write_snli(tmp_path / f"snli-{reason[:5]}", pairs)
        with pytest.raises(DataError) as ei:
            load_triplets(snli_cfg(root))
        msg = str(ei.value)
        assert msg.startswith(f"{root / f'{name}.dev'}:10: {shown}") and msg.endswith(SKIP_HINT) and len(msg) < 300
        triplets, report = load_triplets(snli_cfg(root, on_bad_row="skip"))
        assert [t["anchor"] for t in triplets] == ["P1 a man rides a horse .", "P3 a child sings ."]
        assert report.dropped == {reason: 1, "premise lacks an entailment or a contradiction": 3}


def test_snli_absurd_label_is_shortened(tmp_path):
    pairs = [*SNLI_PAIRS[:3], ("P9 x .", "P9 y", "x" * 300_000), *SNLI_PAIRS[9:]]
    root = write_snli(tmp_path / "snli", pairs)
    with pytest.raises(DataError) as ei:
        load_triplets(snli_cfg(root))
    assert str(ei.value).startswith(f"{root / 'labels.dev'}:4: unknown label 'xxx") and len(str(ei.value)) < 300


def test_snli_default_dir_comes_from_sempa_data_dir(tmp_path, monkeypatch):
    write_snli(tmp_path / "nli" / "snli", SNLI_PAIRS)
    monkeypatch.setenv("SEMPA_DATA_DIR", str(tmp_path))
    assert data_dir() == tmp_path
    triplets, report = load_triplets(cfg(source="snli", split="dev"))
    assert len(triplets) == 3 and report.source == str(tmp_path / "nli" / "snli")


def test_real_snli_dev_has_2943_triplets():
    base = data_dir()
    if base is None or not (base / "nli" / "snli" / "s1.dev").is_file():
        pytest.skip(f"real SNLI data not found (SEMPA_DATA_DIR / ../shared/data -> {base}); see SOURCES.md")
    triplets, report = load_triplets(cfg(source="snli", split="dev"))
    assert len(triplets) == 2943 and report.kept == 2943
    assert report.rows_read == 9842
    assert report.random_negatives == 0
    assert all(len(t["rejected"]) == 1 and t["anchor"] and t["chosen"] for t in triplets)
    assert len({t["anchor"] for t in triplets}) == 2943


# ----------------------------------------------------------------------------------------------
# Hub


@pytest.mark.timeout(60)
def test_unreachable_hub_dataset_is_a_data_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    # the libraries read the variables at import time; set their flags too when already imported
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True, raising=False)
    c = cfg(source="hub", path="sempa-test-nonexistent/no-such-dataset", hub_file="nli.csv")
    with pytest.raises(DataError) as ei:
        load_triplets(c)
    msg = str(ei.value)
    assert "data.path: hub dataset 'sempa-test-nonexistent/no-such-dataset' (file 'nli.csv') could not be loaded" in msg
    assert "data.source=file" in msg


def test_hub_rows_are_validated_with_their_real_column_names(monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(path, data_files=None, split=None, **kw):
        calls.append((path, data_files, split))
        return datasets.Dataset.from_list([
            {"premise": "a", "hypo": "b", "negs": ["c", "d"]},
            {"premise": "e", "hypo": "f", "negs": ["g", None]},
        ])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    c = cfg(source="hub", path="org/set", hub_file="train.csv", split="train", anchor_column="premise",
            chosen_column="hypo", rejected_columns=["negs"], num_rejected=2)
    with pytest.raises(DataError) as ei:
        load_triplets(c)
    assert str(ei.value).startswith("hub:org/set:2: column 'negs': not a string: None")
    assert calls == [("org/set", "train.csv", "train")]
    triplets, report = load_triplets(dataclasses.replace(c, on_bad_row="skip"))
    assert triplets == [{"anchor": "a", "chosen": "b", "rejected": ["c", "d"]}]
    assert report.source == "hub:org/set" and report.dropped == {"not a string": 1}


def test_hub_dataset_without_the_columns(monkeypatch):
    import datasets

    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **kw: datasets.Dataset.from_list([{"premise": "a", "hypo": "b"}]))
    with pytest.raises(DataError, match=re.escape("hub:org/set: missing column(s) ['sent0', 'sent1', 'hard_neg']; "
                                                  "the file has ['premise', 'hypo']")):
        load_triplets(cfg(source="hub", path="org/set", hub_file="train.csv"))


# ----------------------------------------------------------------------------------------------
# Property: random JSONL rows fail only with DataError; with skip, exactly the valid rows survive

_long = st.integers(MAX_SENTENCE_CHARS - 2, MAX_SENTENCE_CHARS + 50).map(lambda n: "s" * n)
_value = st.one_of(
    st.text(max_size=12), st.none(), st.integers(), st.just(""), st.just("  \t "), _long,
    st.booleans(), st.floats(allow_nan=False),
)
_rejected = st.one_of(_value, st.lists(_value, max_size=3))
_row = st.fixed_dictionaries({"sent0": _value, "sent1": _value, "hard_neg": _rejected})


def _ok(v) -> bool:
    return isinstance(v, str) and bool(v.strip()) and len(v) <= MAX_SENTENCE_CHARS


def _valid(row: dict) -> bool:
    rej = row["hard_neg"] if isinstance(row["hard_neg"], list) else [row["hard_neg"]]
    return _ok(row["sent0"]) and _ok(row["sent1"]) and bool(rej) and all(_ok(r) for r in rej)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=st.lists(_row, min_size=1, max_size=8))
def test_random_jsonl_rows_raise_only_data_error(rows):
    expected = [r for r in rows if _valid(r)]
    with tempfile.TemporaryDirectory() as d:
        path = write_jsonl(Path(d) / "rows.jsonl", rows)
        try:
            triplets, report = load_triplets(file_cfg(path, on_bad_row="error"))
        except DataError as e:
            assert len(expected) < len(rows)
            assert str(e).startswith(f"{path}:")
        else:
            assert len(expected) == len(rows) and len(triplets) == len(rows)

        if not expected:
            with pytest.raises(DataError, match="no usable examples"):
                load_triplets(file_cfg(path, on_bad_row="skip"))
            return
        triplets, report = load_triplets(file_cfg(path, on_bad_row="skip"))
        assert [t["anchor"] for t in triplets] == [r["sent0"].strip() for r in expected]
        assert all(len(t["rejected"]) == 1 for t in triplets)
        assert report.rows_read == len(rows)
        assert sum(report.dropped.values()) == len(rows) - len(expected)
        assert len(report.first_bad) == min(5, len(rows) - len(expected))
