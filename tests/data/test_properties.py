"""Property tests: whatever a data file holds, the data pipeline fails only with DataError.

(a) random bytes as a .csv/.tsv/.jsonl/.json file -> load_triplets;
(b) random valid-or-invalid rows in every file format -> load_triplets -> tokenize_triplets ->
    example_tokens / plan_step / build_batch, called as sempa_dist/train.py calls them.
Any other exception fails the test; what does load must be well-formed and pack consistently.
"""

from __future__ import annotations

import csv
import io
import json
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from sempa_dist.config import DataConfig
from sempa_dist.data import DataError, TokenizedExample, load_triplets, tokenize_triplets
from sempa_dist.data.sources import MAX_SENTENCE_CHARS
from sempa_dist.packing import PackedBatch, build_batch, example_tokens, plan_step

HEADER = ["sent0", "sent1", "hard_neg"]
SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def check_triplets(triplets: list[dict[str, Any]], k: int) -> None:
    """What load_triplets returns: stripped, non-empty, bounded sentences, exactly K rejected each."""
    assert triplets
    for t in triplets:
        assert set(t) == {"anchor", "chosen", "rejected"} and len(t["rejected"]) == k
        for s in (t["anchor"], t["chosen"], *t["rejected"]):
            assert isinstance(s, str) and s == s.strip() and s and len(s) <= MAX_SENTENCE_CHARS
            s.encode("utf-8")  # no lone surrogate: the tokenizer and Arrow must be able to encode it


# ----------------------------------------------------------------------------------------------
# (a) random bytes

_SNIPPETS = [
    b'"', b",", b"\t", b"\n", b"\r\n", b"\r", b"\x00", b"\xff", b"\xc3", b"\xed\xa0\x80", b"\xef\xbb\xbf", b" ",
    b"{", b"}", b"[", b"]", b":", b"null", b"NaN", b"1e999", b"9" * 5000, b'"\\ud800"', b"[" * 3000,
    b'"sent0"', b'"sent1"', b'"hard_neg"', b"sent0,sent1,hard_neg\n", b"sent0\tsent1\thard_neg\n",
    b'{"sent0": "a b", "sent1": "c d", "hard_neg": "e f"}\n', b'{"sent0": "g", "sent1": "h", "hard_neg": ["i", ""]},',
    b'"a ""quoted"" cell",x,y\n', b'"an unclosed cell,x\n', b"x,y,z\n", b"x\ty\tz\n", b"]", b"]\n",
]
_chunk = st.one_of(
    st.sampled_from(_SNIPPETS),
    st.binary(max_size=24),
    st.text(max_size=24).map(lambda s: s.encode("utf-8")),
    st.integers(MAX_SENTENCE_CHARS - 1, 200_000).map(lambda n: b"w" * n),  # absurd lines, past csv's 128 KiB cell cap
)
_content = st.lists(_chunk, min_size=1, max_size=30).map(b"".join)
_ROW1, _ROW2 = ["A man runs.", "Someone runs.", "A man sits."], ["Two dogs bark.", "A pair of dogs barks.", "Two cats nap."]
_PREFIX = {  # a valid start, so that some files get past the header into row validation and filling to K
    ".csv": "".join(",".join(r) + "\n" for r in (["sent0", "sent1", "hard_neg"], _ROW1, _ROW2)).encode(),
    ".tsv": "".join("\t".join(r) + "\n" for r in (["sent0", "sent1", "hard_neg"], _ROW1, _ROW2)).encode(),
    ".jsonl": "".join(json.dumps(dict(zip(HEADER, r, strict=True))) + "\n" for r in (_ROW1, _ROW2)).encode(),
    ".json": ("[" + ",\n".join(json.dumps(dict(zip(HEADER, r, strict=True))) for r in (_ROW1, _ROW2))).encode(),
}


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".jsonl", ".json"])
@SETTINGS
@given(prefix=st.booleans(), content=_content, skip=st.booleans(), k=st.integers(1, 2))
def test_random_bytes_raise_only_data_error(suffix, prefix, content, skip, k):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / f"rows{suffix}"
        path.write_bytes(_PREFIX[suffix] * prefix + content)
        cfg = DataConfig(source="file", path=str(path), num_rejected=k, on_bad_row="skip" if skip else "error")
        try:
            triplets, report = load_triplets(cfg)
        except DataError as e:
            assert str(e).startswith(str(path)), str(e)  # every error names the file
            event("DataError")
            return
        event("loaded")
        check_triplets(triplets, k)
        assert report.kept == len(triplets) <= report.rows_read
        assert skip or not report.dropped


# ----------------------------------------------------------------------------------------------
# (b) random rows through the whole pipeline

_good = st.one_of(
    st.from_regex(r"[A-Za-z][A-Za-z ,.'!?-]{0,30}", fullmatch=True),
    st.text(st.characters(codec="utf-8"), min_size=1, max_size=20),  # any character UTF-8 can hold
    st.integers(1, 60).map(lambda n: " ".join(["word"] * n)),  # long enough to be truncated or dropped
)
_special = st.sampled_from(["", "  \t ", "NA", "null", "0", 'say "hi"', "a,b\tc", "line\nbreak", "cr\rcr",
                            "nul\x00byte", "x\ud800y", "\ufeffbom", "<|im_end|>", "{sentence}"])
_odd = st.one_of(
    _special, _special, st.text(max_size=20),
    st.integers(MAX_SENTENCE_CHARS - 2, MAX_SENTENCE_CHARS + 2).map(lambda n: "s" * n),
    st.none(), st.integers(), st.floats(), st.booleans(),
)
_value = st.one_of(_good, _good, _odd)  # mostly usable, so that most files get to the packing
_row = st.fixed_dictionaries({"sent0": _value, "sent1": _value,
                              "hard_neg": st.one_of(_value, st.lists(_value, max_size=3))})


def _encodable(s: str) -> bool:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate
        return False
    return True


def _ok(v: Any) -> bool:
    """A usable sentence, stated independently of the loader: text, not blank, not too long, encodable."""
    return isinstance(v, str) and bool(v.strip()) and len(v) <= MAX_SENTENCE_CHARS and _encodable(v)


def _valid(row: dict[str, Any]) -> bool:
    rej = row["hard_neg"] if isinstance(row["hard_neg"], list) else [row["hard_neg"]]
    return _ok(row["sent0"]) and _ok(row["sent1"]) and bool(rej) and all(_ok(r) for r in rej)


def _as_text(v: Any) -> str:
    """A value as a CSV cell holds it (a cell is always text)."""
    return "" if v is None else v if isinstance(v, str) else json.dumps(v)


def write_rows(path: Path, rows: list[dict[str, Any]], indent: int | None) -> list[dict[str, Any]]:
    """Write `rows` in the file's format; returns the rows as the format can hold them."""
    suffix = path.suffix
    if suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="ascii")  # non-ASCII as \\uXXXX escapes
        return rows
    if suffix == ".json":
        path.write_text(json.dumps(rows, indent=indent), encoding="ascii")
        return rows
    if suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        # one string column each (Parquet columns are typed): other values as text, a lone surrogate
        # (which Arrow cannot store) as null
        held = [{c: None if r[c] is None or not _encodable(_as_text(r[c])) else _as_text(r[c]) for c in HEADER}
                for r in rows]
        pq.write_table(pa.table({c: pa.array([r[c] for r in held], pa.string()) for c in HEADER}), path)
        return held
    held = [{c: _as_text(r[c]) for c in HEADER} for r in rows]
    buf = io.StringIO()
    w = csv.writer(buf, delimiter="\t" if suffix == ".tsv" else ",")
    w.writerow(HEADER)
    w.writerows([[r[c] for c in HEADER] for r in held])
    path.write_bytes(buf.getvalue().encode("utf-8", "surrogatepass"))  # a lone surrogate: bytes that are not UTF-8
    return held


def check_batch(batch: PackedBatch, examples: list[TokenizedExample], layout: str, shared: bool, capacity: int) -> None:
    """Shapes and the scoring map of one micro-batch agree with the examples in it."""
    k1 = len(examples[0].responses) if examples else 1
    rows, length = batch.input_ids.shape
    assert batch.position_ids.shape == batch.branch.shape == (rows, length)
    segments = len(examples) * (1 if shared else k1) or 1  # no example: one dummy segment
    assert rows == (1 if layout == "packed" else segments)
    lens = [n for r in batch.seq_lens for n in r]
    assert len(batch.seq_lens) == rows and len(lens) == segments
    assert all(sum(r) <= length for r in batch.seq_lens)
    assert batch.cu_seqlens.tolist() == [sum(lens[:i]) for i in range(len(lens) + 1)]
    if examples:
        assert batch.real_tokens == sum(example_tokens(ex, shared) for ex in examples)
        if layout == "packed":
            assert length == batch.real_tokens <= capacity
    n = sum(len(r) for ex in examples for r in ex.responses)
    assert batch.score_pos.shape == batch.score_ids.shape == batch.score_seq.shape == (n,)
    assert batch.example_ids == [ex.index for ex in examples] and batch.responses_per_example == k1
    if n:
        assert int(batch.score_pos.min()) >= 0 and int(batch.score_pos.max()) < rows * length
        flat = batch.input_ids.flatten()
        for e, ex in enumerate(examples):
            for r, resp in enumerate(ex.responses):
                mask = batch.score_seq == e * k1 + r
                assert batch.score_ids[mask].tolist() == resp
                if not shared:  # position p predicts the token at p + 1 of the same row
                    assert flat[batch.score_pos[mask] + 1].tolist() == resp


@settings(SETTINGS, max_examples=60)
@given(
    rows=st.lists(_row, min_size=3, max_size=8),
    suffix=st.sampled_from([".csv", ".tsv", ".jsonl", ".json", ".parquet"]),
    indent=st.sampled_from([None, 2]),
    k=st.integers(1, 2),
    room=st.integers(-10, 120),
    overlong=st.sampled_from(["truncate", "drop"]),
    chat=st.booleans(),
    layout=st.sampled_from(["packed", "padded"]),
    shared=st.booleans(),
    world_size=st.integers(1, 3),
)
def test_random_rows_through_the_whole_pipeline(tiny_tokenizer, rows, suffix, indent, k, room, overlong,
                                                chat, layout, shared, world_size):
    max_length = (75 if chat else 40) + room  # the prompt takes about 75 / 40 tokens: some room, none, or less
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / f"rows{suffix}"
        held = write_rows(path, rows, indent)
        valid = [r for r in held if _valid(r)]
        base = dict(source="file", path=str(path), num_rejected=k, max_length=max_length, overlong=overlong,
                    use_chat_template=chat, cache_dir=str(Path(d) / "cache"))
        bad_bytes = suffix in (".csv", ".tsv") and not all(_encodable(r[c]) for r in held for c in HEADER)

        # on_bad_row=error: loads exactly when every row is usable (K=1 needs nothing else)
        try:
            load_triplets(DataConfig(**base, on_bad_row="error"))
            assert len(valid) == len(held) and not bad_bytes
        except DataError as e:
            assert str(e).startswith(str(path))
            assert len(valid) < len(held) or bad_bytes or k > 1, str(e)

        # on_bad_row=skip: exactly the usable rows survive, the others are counted
        try:
            triplets, report = load_triplets(DataConfig(**base, on_bad_row="skip"))
        except DataError as e:
            assert str(e).startswith(str(path))
            assert bad_bytes or not valid or k > 1, str(e)
            event("DataError")
            return
        assert not bad_bytes
        check_triplets(triplets, k)
        assert [t["anchor"] for t in triplets] == [r["sent0"].strip() for r in valid]
        assert report.rows_read == len(held) and sum(report.dropped.values()) == len(held) - len(valid)

        cfg = DataConfig(**base)
        examples, tok_report = tokenize_triplets(triplets, tiny_tokenizer, cfg)
        event("tokenized" if examples else "every example overlong")
        assert tok_report.kept == len(examples) == len(triplets) - tok_report.dropped_overlong
        for ex in examples:
            assert len(ex.responses) == 1 + k and all(ex.responses)
            assert all(len(ex.prompt_ids) + len(r) <= max_length for r in ex.responses)

        # as train.py: sizes, one step's plan per rank, a batch per micro-step; the budget is the
        # smallest config.validate() accepts: (1 + K) sequences of max_length tokens
        capacity = max_length * (1 + k)
        sizes = [example_tokens(ex, shared) for ex in examples]
        plan = plan_step(sizes, world_size, capacity)
        assert len(plan) == world_size and len({len(p) for p in plan}) <= 1
        assert sorted(i for p in plan for micro in p for i in micro) == list(range(len(examples)))
        pad = tiny_tokenizer.pad_token_id
        for rank in plan:
            for micro in rank:
                chosen = [examples[i] for i in micro]
                check_batch(build_batch(chosen, layout, pad, shared), chosen, layout, shared, capacity)
