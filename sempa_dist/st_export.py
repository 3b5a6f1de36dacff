"""The sentence-transformers files of an export: `SentenceTransformer(export_dir)` computes the
embeddings of `sempa-eval` (PromptEOL), with no code of ours and no trust_remote_code.

PromptEOL wraps the sentence (``This sentence : "{sentence}" means in one word:"``), so a
sentence-transformers *prompt* (a prefix) cannot express it. What can: sentence-transformers >= 5.4
turns text into a one-message conversation when its Transformer module declares the ``message``
modality, renders it with ``apply_chat_template``, and forwards ``processing_kwargs["chat_template"]``
to that call; ``chat_template`` is one of apply_chat_template's own arguments (a template string
that overrides the tokenizer's). So the export's ``sentence_bert_config.json`` carries a Jinja
template that normalises the sentence exactly as `sempa_dist.eval.encode.normalize_sentence` does,
wraps it in the prompt and adds the special tokens the tokenizer adds; the tokenizer's own chat
template (for generation) stays untouched. A Pooling module then takes the last token's final
hidden state (``lasttoken``: the last position the attention mask keeps, so either padding side
works) or the mean over the tokens.

Written as plain JSON, in the layout sentence-transformers 6.3 itself saves (modules.json,
sentence_bert_config.json, config_sentence_transformers.json, 1_Pooling/config.json): training
does not need sentence-transformers installed. The module types are those of >= 5.4
(``sentence_transformers.base.modules...``): an older version fails to import them instead of
silently encoding the bare sentence. Before writing, the template is rendered through the
tokenizer and compared, token for token, with `Encoder.tokenize` (sempa-eval's tokenisation) on
sentences that take every branch of the normalisation; a tokenizer it cannot reproduce gets no
sentence-transformers files (a warning says so) rather than ones that embed something else.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from sempa_dist.eval.encode import Encoder

# The sentences the template is checked on: every branch of normalize_sentence (quotes, a final
# '?', a final '.', '!' and "'", surrounding whitespace, nothing at all) and a non-ASCII one.
PROBE_SENTENCES = (
    'A man says "hi" to a dog?',
    "Two kids play outside.",
    "wow !",
    "  padded with spaces  ",
    "it's 'quoted'",
    "",
    "Grüße, café ☕",
    "ends in a question mark ?",
)

TRANSFORMER_TYPE = "sentence_transformers.base.modules.transformer.Transformer"
POOLING_TYPE = "sentence_transformers.sentence_transformer.modules.pooling.Pooling"
POOLING_MODES = {"last": "lasttoken", "mean": "mean"}  # sempa-eval's --pooling -> Pooling's pooling_mode


def _literal(text: str) -> str:
    """`text` as a Jinja expression that renders it verbatim. JSON's escapes are a subset of the
    ones Jinja's string literals decode; ensure_ascii=False keeps characters outside the BMP whole
    (JSON would write them as surrogate pairs, which Jinja's decoder leaves split)."""
    return "{{ " + json.dumps(text, ensure_ascii=False) + " }}" if text else ""


def prompteol_template(prompt: str, normalize: bool, prefix: str = "", suffix: str = "") -> str:
    """A chat template rendering a one-message conversation as `prompt` around its content.

    `normalize` repeats normalize_sentence in Jinja (Python's own str methods run in it); `prefix`
    and `suffix` are the special tokens, as text, that the tokenizer adds with add_special_tokens
    (apply_chat_template tokenises the rendered text without adding any). Anything but exactly
    one user message raises: a sentence-transformers prompt would arrive as a system message, and
    PromptEOL has no place for it, so it must not be dropped silently.
    """
    if "{sentence}" not in prompt:
        raise ValueError(f"embedding prompt must contain '{{sentence}}', got {prompt!r}")
    check = (
        "{%- if messages | length != 1 or messages[0]['role'] != 'user'"
        " or messages[0]['content'] is not string -%}"
        "{{ raise_exception('this model embeds one plain-text sentence in its PromptEOL template; "
        "sentence-transformers prompts (prompt=, prompt_name=) and structured messages are not supported') }}"
        "{%- endif -%}"
    )
    sentence = "{%- set s = messages[0]['content'] -%}"
    if normalize:  # normalize_sentence, line for line
        sentence += (
            "{%- set s = s.strip().replace('\"', \"'\") -%}"
            "{%- if s.endswith('?') -%}{%- set s = s[:-1] + '.' -%}{%- endif -%}"
            "{%- if s and s[-1] not in ['.', '?', '\"', \"'\"] -%}{%- set s = s + '.' -%}{%- endif -%}"
        )
    body = "{{ s }}".join(_literal(part) for part in prompt.split("{sentence}"))
    return check + sentence + _literal(prefix) + body + _literal(suffix)


def _special_tokens_added(tokenizer) -> tuple[str, str]:
    """The special tokens (as text) that `tokenizer(..., add_special_tokens=True)` puts before and
    after a text, e.g. ('<s>', '') for Llama-2, ('', '') for SmolLM2 and the tiny models."""
    probe = "probe text"
    bare = tokenizer(probe, add_special_tokens=False)["input_ids"]
    full = tokenizer(probe, add_special_tokens=True)["input_ids"]
    start = next((i for i in range(len(full) - len(bare) + 1) if full[i : i + len(bare)] == bare), None)
    if start is None:  # the special tokens change the text's own tokens: no template can match it
        raise ValueError("the tokenizer's special tokens change the tokens of the text itself")

    def as_text(ids: list[int]) -> str:
        return "".join(tokenizer.convert_ids_to_tokens(ids))

    return as_text(full[:start]), as_text(full[start + len(bare) :])


def template_mismatch(tokenizer, template: str, prompt: str, normalize: bool) -> str | None:
    """None when `template` gives sempa-eval's token ids on every probe sentence, else the first
    difference (what the export's warning shows)."""
    reference = Encoder(None, tokenizer, prompt=prompt, normalize=normalize).tokenize(list(PROBE_SENTENCES))
    for sentence, want in zip(PROBE_SENTENCES, reference, strict=True):
        try:
            got = tokenizer.apply_chat_template(
                [{"role": "user", "content": sentence}],
                chat_template=template,
                tokenize=True,
                add_generation_prompt=False,
                return_dict=True,
            )["input_ids"]
        except Exception as e:  # a template the tokenizer's Jinja rejects: no files, and say why
            return f"{sentence!r}: the template does not render ({type(e).__name__}: {e})"
        if list(got) != list(want):
            got_text, want_text = tokenizer.decode(got), tokenizer.decode(want)
            return f"{sentence!r}: template gives {got_text!r}, sempa-eval {want_text!r}"
    return None


def write_sentence_transformers_files(
    out_dir: Path, tokenizer, hidden_size: int, prompt: str, pooling: str, normalize: bool
) -> bool:
    """Make the HF model directory `out_dir` (weights and `tokenizer` already there) loadable by
    `SentenceTransformer(out_dir)` with sempa-eval's embeddings for `prompt`, `pooling`, `normalize`
    (the run's eval.* settings). Returns False, writing nothing, when the tokenizer cannot be
    reproduced by a template (see the module docstring)."""
    try:
        prefix, suffix = _special_tokens_added(tokenizer)
        template = prompteol_template(prompt, normalize, prefix, suffix)
        problem = template_mismatch(tokenizer, template, prompt, normalize)
    except ValueError as e:
        problem = str(e)
    if problem is not None:
        print(
            f"export: no sentence-transformers files in {out_dir} (use sempa_dist.eval.Encoder): {problem}",
            file=sys.stderr,
        )
        return False
    out_dir = Path(out_dir)
    text_params = {"method": "forward", "method_output_name": "last_hidden_state"}
    transformer = {
        "transformer_task": "feature-extraction",  # AutoModel: the final hidden states, after the final norm
        # text is accepted, then turned into a one-message conversation ("flat": content stays a string)
        "modality_config": {"text": text_params, "message": {**text_params, "format": "flat"}},
        "module_output_name": "token_embeddings",
        "processing_kwargs": {"chat_template": {"chat_template": template, "add_generation_prompt": False}},
    }
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": TRANSFORMER_TYPE},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": POOLING_TYPE},
    ]
    st_config = {
        "model_type": "SentenceTransformer",
        # empty prompts: encode_query/encode_document (what MTEB calls) add nothing the template would refuse
        "prompts": {"query": "", "document": ""},
        "default_prompt_name": None,
        "similarity_fn_name": "cosine",  # sempa-eval scores cosine similarity
    }
    pooling_config = {
        "embedding_dimension": hidden_size,
        "pooling_mode": POOLING_MODES[pooling],
        "include_prompt": True,
    }
    (out_dir / "1_Pooling").mkdir(exist_ok=True)
    for name, content in [
        ("sentence_bert_config.json", transformer),
        ("modules.json", modules),
        ("config_sentence_transformers.json", st_config),
        ("1_Pooling/config.json", pooling_config),
    ]:
        (out_dir / name).write_text(
            json.dumps(content, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
        )
    return True
