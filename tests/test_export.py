"""The export of a run: its PEFT adapter (LoRA) and its use as a sentence-transformers model.

The slow tests share one real 2-process ZeRO-3 LoRA run (tiny-llama, 6 steps at lr 0.01, so the
adapter moves well away from its zero-initialised lora_B). Tolerances were measured on that run
(CPU, fp32) and are set a little above what was seen; see each test.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch

from sempa_dist.config import DEFAULT_EMBED_PROMPT
from sempa_dist.st_export import (
    PROBE_SENTENCES,
    _special_tokens_added,
    prompteol_template,
    template_mismatch,
    write_sentence_transformers_files,
)
from tests.distributed import run, sempa_train

CLI = [sys.executable, "-m", "sempa_dist.cli.export"]
# prompts that would break a template built by pasting text: Jinja syntax, quotes, a backslash, a
# newline, a tab, non-ASCII and a character outside the BMP, the sentence twice, nothing around it
ODD_PROMPTS = [
    DEFAULT_EMBED_PROMPT,
    "{sentence}",
    'Say {{ x }} {% raw %} \\ "q" \'s\'\n\té 😀: {sentence} / again: {sentence}"',
]


@pytest.mark.parametrize("prompt", ODD_PROMPTS)
@pytest.mark.parametrize("normalize", [True, False])
def test_template_gives_sempa_eval_tokens(tiny_tokenizer, prompt, normalize):
    """The Jinja template reproduces Encoder.tokenize (normalisation included) token for token."""
    assert template_mismatch(tiny_tokenizer, prompteol_template(prompt, normalize), prompt, normalize) is None


def test_template_adds_the_special_tokens_the_tokenizer_adds(tiny_tokenizer):
    """A tokenizer that adds BOS/EOS (Llama-2, Mistral do) gets them in the template, as text:
    apply_chat_template tokenises the rendered text without adding special tokens itself."""
    from tokenizers import processors

    tok = tiny_tokenizer.__class__.from_pretrained(tiny_tokenizer.name_or_path)
    start, end = "<|im_start|>", "<|endoftext|>"
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{start} $A {end}",
        special_tokens=[(start, tok.convert_tokens_to_ids(start)), (end, tok.convert_tokens_to_ids(end))],
    )
    assert _special_tokens_added(tok) == (start, end)
    template = prompteol_template(DEFAULT_EMBED_PROMPT, True, start, end)
    assert template_mismatch(tok, template, DEFAULT_EMBED_PROMPT, True) is None
    # and without them the check notices the difference
    assert "template gives" in template_mismatch(
        tok, prompteol_template(DEFAULT_EMBED_PROMPT, True), DEFAULT_EMBED_PROMPT, True
    )


def test_template_refuses_a_prompt_it_would_drop(tiny_tokenizer):
    """A sentence-transformers prompt arrives as a system message: an error, not silently ignored."""
    from jinja2 import TemplateError

    template = prompteol_template(DEFAULT_EMBED_PROMPT, True)
    with pytest.raises(TemplateError, match="PromptEOL"):
        tiny_tokenizer.apply_chat_template(
            [{"role": "system", "content": "query: "}, {"role": "user", "content": "x"}],
            chat_template=template,
            tokenize=False,
        )


def test_no_files_when_the_template_cannot_match(tiny_tokenizer, tmp_path, capsys):
    """A prompt no template can express (here: no {sentence}) leaves the directory without
    sentence-transformers files, and says so, instead of writing ones that embed something else."""
    assert not write_sentence_transformers_files(tmp_path, tiny_tokenizer, 64, "no placeholder", "last", True)
    assert list(tmp_path.iterdir()) == []
    assert "no sentence-transformers files" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# One real 2-process ZeRO-3 LoRA run


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("lora") / "run"
    sempa_train(
        "configs/tiny_cpu.yaml",
        f"train.output_dir={out}",
        "model.lora.enabled=true",
        "model.lora.r=8",
        "ref.mode=adapter",
        "train.max_steps=6",
        "train.save_every=0",
        "train.learning_rate=0.01",
        "tracking.enabled=false",
    )
    return out


def _probe_batch(run_dir):
    """The batch whose log-probs the run recorded in summary.json (its first 4 examples, packed)."""
    from sempa_dist.config import load_config
    from sempa_dist.data import load_triplets, tokenize_triplets
    from sempa_dist.models import load_tokenizer
    from sempa_dist.packing import build_batch

    cfg = load_config(run_dir / "config.yaml")
    tok = load_tokenizer(cfg.model.name)
    examples, _ = tokenize_triplets(load_triplets(cfg.data, cfg.train.seed)[0], tok, cfg.data)
    return build_batch(examples[:4], "packed", tok.pad_token_id)


@pytest.mark.slow
def test_lora_export_writes_a_trained_nonempty_adapter(lora_run):
    """export/ is the merged model and export/adapter/ the PEFT adapter: every LoRA tensor of the
    model present and non-empty, every lora_B moved off its zero start, the base named by path."""
    from safetensors.torch import load_file

    from sempa_dist.models import resolve_model

    export, adapter = lora_run / "export", lora_run / "export" / "adapter"
    assert (export / "config.json").is_file() and (export / "modules.json").is_file()
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(resolve_model("tiny-llama"))
    assert config["r"] == 8 and config["peft_type"] == "LORA"
    tensors = load_file(adapter / "adapter_model.safetensors")
    # all-linear on 2 layers: q k v o gate up down, an A and a B each
    assert len(tensors) == 2 * 7 * 2 and all(".lora_A." in k or ".lora_B." in k for k in tensors)
    assert all(t.numel() > 0 and torch.isfinite(t).all() for t in tensors.values())
    lora_b = {k: t for k, t in tensors.items() if ".lora_B." in k}
    assert all(t.abs().max() > 0 for t in lora_b.values()), [
        k for k, t in lora_b.items() if not t.abs().max()
    ]
    assert json.loads((lora_run / "summary.json").read_text())["export"] == str(export)


@pytest.mark.slow
def test_base_plus_adapter_gives_the_merged_model(lora_run):
    """PeftModel(base, export/adapter) and the merged export give the same logits (fp32; measured
    max |diff| 2.4e-7, logits up to 0.83 in size;
    asserted to 1e-5), and both reproduce the final policy's probe
    log-probs recorded by the run (the same 1e-4 as tests/test_train.py)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from sempa_dist.logprobs import SequenceScorer

    adapter = lora_run / "export" / "adapter"
    base_path = json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32, attn_implementation="sdpa")
    with_adapter = PeftModel.from_pretrained(base, adapter).eval()
    merged = AutoModelForCausalLM.from_pretrained(
        lora_run / "export", dtype=torch.float32, attn_implementation="sdpa"
    ).eval()
    batch = _probe_batch(lora_run)
    ids = batch.input_ids.reshape(1, -1)[:, :256]
    with torch.no_grad():
        a, b = with_adapter(input_ids=ids).logits, merged(input_ids=ids).logits
        plain = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)(input_ids=ids).logits
    diff, size = (a - b).abs().max().item(), b.abs().max().item()
    print(f"adapter vs merged logits: max |diff| {diff:.2e}, |logit| max {size:.2f}")
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert (plain - b).abs().max() > 1e-2  # the adapter changed the model: the comparison is not vacuous

    recorded = torch.tensor(json.loads((lora_run / "summary.json").read_text())["probe"]["sums"])
    with torch.no_grad():
        for model in (with_adapter, merged):
            sums = SequenceScorer(model, "sdpa", 64)(batch).sums
            torch.testing.assert_close(sums, recorded, atol=1e-4, rtol=1e-5)


def _sentences() -> list[str]:
    """The probe sentences (every normalisation branch) and 40 of the bundled set, of mixed lengths."""
    from sempa_dist.paths import BUNDLED_PREFERENCES

    rows = [json.loads(line) for line in BUNDLED_PREFERENCES.read_text(encoding="utf-8").splitlines()[:20]]
    return [*PROBE_SENTENCES, *(r["anchor"] for r in rows), *(r["chosen"] for r in rows)]


@pytest.mark.slow
def test_sentence_transformer_gives_sempa_eval_embeddings(lora_run):
    """SentenceTransformer(export) == sempa-eval's Encoder on the exported model: measured max |diff|
    4.8e-7 to 7.2e-7 on embedding entries up to 3.3 in size (batches padded differently: float noise
    only), asserted to 1e-5; cosine similarities too. A sentence-transformers prompt is refused,
    not silently dropped."""
    from sentence_transformers import SentenceTransformer

    from sempa_dist.eval import Encoder

    export = lora_run / "export"
    sentences = _sentences()
    model = SentenceTransformer(str(export), device="cpu")
    ours = Encoder.from_pretrained(export, show_progress=False, batch_size=8).encode(sentences)
    theirs = model.encode(sentences, batch_size=8, convert_to_numpy=True)
    print(
        f"SentenceTransformer vs Encoder: max |diff| {np.abs(theirs - ours).max():.2e}, "
        f"|embedding| max {np.abs(ours).max():.2f}"
    )
    np.testing.assert_allclose(theirs, ours, atol=1e-5, rtol=1e-5)
    cos = model.similarity(theirs, theirs).numpy()
    unit = ours / np.linalg.norm(ours, axis=1, keepdims=True)
    np.testing.assert_allclose(cos, unit @ unit.T, atol=1e-5)
    # what MTEB calls for a model without prompts
    np.testing.assert_allclose(model.encode_query(sentences[:4]), ours[:4], atol=1e-5, rtol=1e-5)
    with pytest.raises(Exception, match="PromptEOL"):
        model.encode(sentences[:2], prompt="query: ")


@pytest.mark.slow
def test_sempa_export_cli_writes_both_and_keep_adapter_only_the_adapter(lora_run, tmp_path):
    """`sempa-export RUN OUT`: the merged model, its adapter and the sentence-transformers files,
    as train.export wrote them; `--keep-adapter`: OUT is the adapter alone."""
    from safetensors.torch import load_file

    merged, adapter_only = tmp_path / "merged", tmp_path / "adapter_only"
    out = run([*CLI, str(lora_run), str(merged)]).stdout
    assert "peft adapter" in out and "SentenceTransformer(" in out
    assert {p.name for p in (lora_run / "export").iterdir()} == {p.name for p in merged.iterdir()}
    run([*CLI, str(lora_run), str(adapter_only), "--keep-adapter"])
    assert (adapter_only / "adapter_config.json").is_file() and not (adapter_only / "config.json").exists()
    assert not (adapter_only / "modules.json").exists()
    first, second = (load_file(d / "adapter_model.safetensors") for d in (merged / "adapter", adapter_only))
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
