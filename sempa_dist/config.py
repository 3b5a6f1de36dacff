"""One typed configuration for a SemPA run.

Loaded from YAML, then `section.key=value` overrides from the command line, then validated
before any process group, model or dataset is touched. Every error names the offending key and,
when it came from a file, the file and line.

Each field carries a one-line help text in its metadata; `sempa-train --help-config` prints them.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml

from sempa_dist.sts_tasks import resolve_tasks

DEFAULT_TEMPLATE = 'Keep the same meaning of this sentence: "{sentence}", while making some changes.'
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant"


PYTHON_TAG = "tag:yaml.org,2002:python/"  # PyYAML's !!python/... tags (object/apply, name, module ...)


class ConfigError(ValueError):
    """A configuration problem, raised before any work starts. The message names the key."""


def _f(default: Any, help: str, **kw: Any) -> Any:
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help}, **kw)
    if dataclasses.is_dataclass(default) and isinstance(default, type):
        return field(default_factory=default, metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


@dataclass
class LoraConfig:
    enabled: bool = _f(False, "Train LoRA adapters (peft) instead of all weights.")
    r: int = _f(8, "LoRA rank.")
    alpha: int = _f(32, "LoRA alpha (scaling = alpha / r).")
    dropout: float = _f(0.0, "Dropout on the LoRA path.")
    target_modules: list[str] = _f(["all-linear"], "Modules that get adapters; 'all-linear' = every linear but the LM head.")


@dataclass
class ModelConfig:
    name: str = _f("tiny-llama", "Registered name (tiny-llama, tiny-qwen2, smollm2-135m-instruct), a local HF directory or a hub id.")
    dtype: Literal["auto", "fp32", "bf16"] = _f("auto", "Training precision; auto = bf16 on GPUs that support it, else fp32.")
    attn_implementation: Literal["auto", "fa2_varlen", "torch_varlen", "sdpa_varlen", "flex_varlen", "sdpa", "eager"] = _f(
        "auto", "Attention kernel for packed segments. fa2_varlen: flash-attn's varlen kernel; torch_varlen: "
        "torch's own varlen_attn (torch >= 2.10) - both GPU, bf16/fp16 only; sdpa_varlen: SDPA per segment "
        "(any device, the reference); flex_varlen: flex attention with a block mask (GPU for training); "
        "sdpa/eager: one masked [row, row] attention. auto = the usable kernels measured against each other "
        "at start on a GPU (one decoder layer), else the first usable of fa2_varlen, torch_varlen, "
        "flex_varlen, sdpa_varlen. The choice is recorded with the run (resolved.yaml, summary.json, MLflow).")
    gradient_checkpointing: bool = _f(False, "Recompute decoder activations in backward (saves memory).")
    lora: LoraConfig = _f(LoraConfig, "LoRA settings.")


@dataclass
class DataConfig:
    source: Literal["bundled", "snli", "file", "hub"] = _f(
        "bundled", "bundled: the project's own set; snli: SentEval SNLI layout; file: CSV/JSONL/Parquet; hub: a HF hub dataset."
    )
    path: str | None = _f(None, "File (source=file), SNLI directory (source=snli, default $SEMPA_DATA_DIR/nli/snli) or hub id (source=hub).")
    hub_file: str | None = _f(None, "data_files inside the hub dataset, e.g. nli_for_simcse.csv.")
    split: str = _f("train", "Split to read; for snli the file suffix (dev or test).")
    anchor_column: str = _f("sent0", "Column holding the anchor sentence (file/hub).")
    chosen_column: str = _f("sent1", "Column holding the chosen (equivalent) sentence (file/hub).")
    rejected_columns: list[str] = _f(["hard_neg"], "Columns holding rejected sentences, or one column holding a list (file/hub).")
    num_rejected: int = _f(1, "K: rejected responses per anchor (K > 1 needs loss.type plackett_luce or dpo's pairwise mean).")
    template: str = _f(DEFAULT_TEMPLATE, "Paraphrase instruction; {sentence} is replaced by the anchor.")
    system_prompt: str | None = _f(DEFAULT_SYSTEM_PROMPT, "System turn for chat templates (null: none).")
    use_chat_template: bool = _f(True, "Render the prompt with the tokenizer's chat template when it has one.")
    max_length: int = _f(256, "Tokens per prompt+response sequence; longer ones are truncated or dropped (see overlong).")
    overlong: Literal["truncate", "drop"] = _f("truncate", "What to do with sequences over max_length.")
    on_bad_row: Literal["error", "skip"] = _f("error", "Bad rows (missing/empty/non-string sentence): fail naming file/row/column, or skip and count.")
    max_examples: int | None = _f(None, "Use only the first N examples (after loading).")
    cache_dir: str | None = _f(None, "Tokenisation cache (default ~/.cache/sempa-dist/datasets).")


@dataclass
class PackingConfig:
    layout: Literal["packed", "padded"] = _f("packed", "packed: sequences concatenated into rows, no padding; padded: one padded row per sequence.")
    max_tokens: int = _f(2048, "Token budget of one micro-batch (one packed row).")
    prefix_sharing: Literal["auto", "on", "off"] = _f(
        "auto", "Encode each prompt once for its 1 + K responses (sibling responses masked apart; every kernel "
        "can). auto = on, except on a GPU, where sharing and not sharing are measured with each usable kernel "
        "at start and the faster is taken.")


@dataclass
class LossConfig:
    type: Literal["dpo", "ipo", "plackett_luce"] = _f("dpo", "dpo (sigmoid), ipo, or plackett_luce (1 chosen vs K rejected).")
    beta: float = _f(0.1, "Temperature of the implicit reward beta * (log pi - log pi_ref).")
    label_smoothing: float = _f(0.0, "Conservative-DPO label smoothing in [0, 0.5) (dpo only).")
    logprob_chunk_tokens: int = _f(512, "Response positions per LM-head chunk: bounds the logits tensor to chunk x vocab.")


@dataclass
class RefConfig:
    mode: Literal["engine", "adapter", "precomputed"] = _f(
        "engine", "engine: separate offloaded ZeRO-3 engine; adapter: LoRA base with adapters off; precomputed: cached once."
    )
    offload: Literal["cpu", "nvme", "none"] = _f("cpu", "Where the reference engine keeps its parameters.")
    nvme_path: str | None = _f(None, "NVMe directory for offload=nvme.")
    cache_dir: str | None = _f(None, "Store for precomputed reference log-probs (default <output_dir>/../ref_cache).")


@dataclass
class TrainConfig:
    output_dir: str = _f("runs/default", "Run directory: checkpoints, summary.json, export.")
    seed: int = _f(42, "Seed for data order, dropout and model init.")
    global_batch_size: int = _f(32, "Examples per optimizer step over all ranks.")
    num_epochs: float = _f(1.0, "Passes over the data (used when max_steps is null).")
    max_steps: int | None = _f(None, "Optimizer steps to run (overrides num_epochs).")
    learning_rate: float = _f(1e-4, "Peak learning rate.")
    weight_decay: float = _f(0.0, "AdamW weight decay.")
    warmup_ratio: float = _f(0.05, "Fraction of steps with linear warmup.")
    lr_schedule: Literal["cosine", "linear", "constant"] = _f("cosine", "Decay after warmup.")
    max_grad_norm: float = _f(1.0, "Gradient clipping norm (0 = off).")
    log_every: int = _f(1, "Log metrics every N optimizer steps.")
    save_every: int = _f(0, "Checkpoint every N optimizer steps (0 = only at the end).")
    keep_checkpoints: int = _f(2, "Complete checkpoints kept on disk.")
    resume: str = _f("never", "never, auto (latest complete checkpoint in output_dir) or a checkpoint path.")
    export: bool = _f(True, "Write a consolidated HF model to <output_dir>/export at the end.")
    merge_lora: bool = _f(True, "Export LoRA merged into the weights (else as an adapter).")
    nproc: int = _f(1, "Processes sempa-train spawns on this machine when not started by a launcher.")
    on_nonfinite: Literal["skip", "stop"] = _f(
        "skip", "A step whose loss or gradient norm is NaN/inf is never applied: skip it and go on, or stop "
        "(the last checkpoint stays the last good one).")
    max_consecutive_skips: int = _f(10, "Under on_nonfinite=skip, stop after this many non-finite steps in a row.")
    phase_times: Literal["auto", "on", "off"] = _f(
        "auto", "Log the seconds of each step's phases (policy forward, reference, backward, optimizer) as "
        "time/*_s metrics; auto = on a CPU only (on a GPU each phase boundary synchronises the device).")


@dataclass
class DeepSpeedConfig:
    policy_config: str = _f("ds_configs/zero3_policy.json", "DeepSpeed config of the trainable policy (ZeRO-3).")
    ref_config: str = _f("ds_configs/zero3_ref_offload.json", "DeepSpeed config of the reference engine (no optimizer).")
    timeout_s: int = _f(1800, "Collective timeout: a dead rank fails the job after this long instead of hanging.")


DEFAULT_EMBED_PROMPT = 'This sentence : "{sentence}" means in one word:"'


@dataclass
class EvalConfig:
    every: int = _f(0, "Evaluate STS every N optimizer steps during training (0 = off).")
    tasks: list[str] = _f(["stsb-dev"], "STS sets evaluated during training (sts12..sts16, stsb-dev, stsb-test, sickr-test).")
    final_tasks: list[str] = _f([], "STS sets evaluated once after training (same names; 'all' = the seven standard sets).")
    max_pairs: int | None = _f(None, "Evaluate on at most N pairs per set (a fixed, seeded subset): cheap checks mid-run.")
    pooling: Literal["last", "mean"] = _f("last", "last: PromptEOL last-token hidden state; mean: mean over the prompt's tokens.")
    prompt: str = _f(DEFAULT_EMBED_PROMPT, "Embedding prompt; {sentence} is replaced by the sentence.")
    normalize: bool = _f(True, "Normalise sentences first (\" -> ', final ? -> ., add a final .), as SemPA's code does.")
    batch_size: int = _f(64, "Sentences per forward pass when encoding.")
    generation: bool = _f(True, "After training: held-out NLL and KL of policy vs reference, and greedy paraphrases.")
    select_best: str | None = _f(
        None, "An STS set (e.g. stsb-dev) evaluated at every scheduled checkpoint: the best-scoring checkpoint "
        "is kept from pruning and exported to export/ (the last one to export-last/); its step and score go to "
        "summary.json and MLflow. null: the last checkpoint is the export.")


@dataclass
class TrackingConfig:
    enabled: bool = _f(True, "Track the run in MLflow (rank 0 only).")
    uri: str | None = _f(None, "Tracking URI; null: $MLFLOW_TRACKING_URI, else sqlite:///<output_dir>/../mlflow.db.")
    experiment: str = _f("sempa", "MLflow experiment name.")
    run_name: str | None = _f(None, "MLflow run name (default: the output directory's name).")
    tags: list[str] = _f([], "Extra run tags as key=value.")
    parent_run_id: str | None = _f(None, "Nest this run under that MLflow run (a sweep; see sempa-tracking parent).")
    flush_every_s: float = _f(10.0, "Send buffered metrics every N seconds (0: at every logged step), in batches, off the training thread.")


@dataclass
class Config:
    model: ModelConfig = _f(ModelConfig, "Policy and reference model.")
    data: DataConfig = _f(DataConfig, "Preference data.")
    packing: PackingConfig = _f(PackingConfig, "How sequences become micro-batches.")
    loss: LossConfig = _f(LossConfig, "Preference loss.")
    ref: RefConfig = _f(RefConfig, "Reference model.")
    train: TrainConfig = _f(TrainConfig, "Optimisation and run directory.")
    deepspeed: DeepSpeedConfig = _f(DeepSpeedConfig, "DeepSpeed configs.")
    eval: EvalConfig = _f(EvalConfig, "STS evaluation and generation check.")
    tracking: TrackingConfig = _f(TrackingConfig, "MLflow tracking.")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self, world_size: int | None = None) -> Config:
        """Check combinations no single field can check. Raises ConfigError naming the key."""
        d, p, lo, t, r = self.data, self.packing, self.loss, self.train, self.ref
        _positive(("data.num_rejected", d.num_rejected), ("data.max_length", d.max_length),
                  ("packing.max_tokens", p.max_tokens), ("loss.logprob_chunk_tokens", lo.logprob_chunk_tokens),
                  ("train.global_batch_size", t.global_batch_size), ("train.log_every", t.log_every),
                  ("train.nproc", t.nproc), ("train.max_consecutive_skips", t.max_consecutive_skips),
                  ("deepspeed.timeout_s", self.deepspeed.timeout_s),
                  ("model.lora.r", self.model.lora.r))
        if lo.beta <= 0:
            raise ConfigError(f"loss.beta: must be > 0, got {lo.beta}")
        if not 0 <= lo.label_smoothing < 0.5:
            raise ConfigError(f"loss.label_smoothing: must be in [0, 0.5), got {lo.label_smoothing}")
        if lo.label_smoothing and lo.type != "dpo":
            raise ConfigError(f"loss.label_smoothing: only defined for loss.type=dpo, not {lo.type!r}")
        if t.learning_rate <= 0:
            raise ConfigError(f"train.learning_rate: must be > 0, got {t.learning_rate}")
        if not 0 <= t.warmup_ratio < 1:
            raise ConfigError(f"train.warmup_ratio: must be in [0, 1), got {t.warmup_ratio}")
        if t.max_steps is not None and t.max_steps <= 0:
            raise ConfigError(f"train.max_steps: must be > 0 or null, got {t.max_steps}")
        if t.save_every < 0:
            raise ConfigError(f"train.save_every: must be >= 0, got {t.save_every}")
        if t.keep_checkpoints < 1:
            raise ConfigError(f"train.keep_checkpoints: must be >= 1, got {t.keep_checkpoints}")
        if "{sentence}" not in d.template:
            raise ConfigError(f"data.template: must contain '{{sentence}}', got {d.template!r}")
        if r.mode == "adapter" and not self.model.lora.enabled:
            raise ConfigError("ref.mode: 'adapter' needs model.lora.enabled=true (the reference is the LoRA base with adapters off)")
        if self.model.lora.enabled and {"lm_head", "embed_tokens"} & set(self.model.lora.target_modules):
            raise ConfigError(f"model.lora.target_modules: {self.model.lora.target_modules} adapts the LM head or the "
                              "(possibly tied) embedding; sempa-dist scores tokens through the head's plain weight, chunked")
        if r.offload == "nvme" and not r.nvme_path:
            raise ConfigError("ref.nvme_path: required when ref.offload=nvme")
        if d.source in ("file", "hub") and not d.path:
            raise ConfigError(f"data.path: required when data.source={d.source}")
        if self.model.attn_implementation in ("fa2_varlen", "torch_varlen") and self.model.dtype == "fp32":
            raise ConfigError(f"model.attn_implementation: {self.model.attn_implementation} takes bf16/fp16 only, and "
                              "model.dtype is fp32; set model.dtype to bf16 (or auto), or model.attn_implementation to "
                              "sdpa_varlen or auto")
        if d.max_length * (1 + d.num_rejected) > p.max_tokens:  # the step planner budgets both layouts alike
            raise ConfigError(
                f"packing.max_tokens: {p.max_tokens} cannot hold one example (1 + data.num_rejected={d.num_rejected} "
                f"sequences of up to data.max_length={d.max_length} tokens); raise it or lower data.max_length"
            )
        if t.max_steps is None and t.num_epochs <= 0:
            raise ConfigError(f"train.num_epochs: must be > 0 when train.max_steps is null, got {t.num_epochs}")
        if d.max_examples is not None and d.max_examples <= 0:
            raise ConfigError(f"data.max_examples: must be > 0 or null, got {d.max_examples}")
        e = self.eval
        if e.every < 0:
            raise ConfigError(f"eval.every: must be >= 0, got {e.every}")
        _positive(("eval.batch_size", e.batch_size))
        if e.max_pairs is not None and e.max_pairs <= 0:
            raise ConfigError(f"eval.max_pairs: must be > 0 or null, got {e.max_pairs}")
        for key in ("tasks", "final_tasks"):
            try:
                resolve_tasks(getattr(e, key))
            except ValueError as err:
                raise ConfigError(f"eval.{key}: {err}") from None
        if e.select_best is not None:
            try:
                chosen = resolve_tasks([e.select_best])
            except ValueError as err:
                raise ConfigError(f"eval.select_best: {err}") from None
            if len(chosen) != 1:
                raise ConfigError(f"eval.select_best: one STS set, got {e.select_best!r} ({len(chosen)} sets)")
        if e.every and not e.tasks:
            raise ConfigError("eval.tasks: empty while eval.every > 0")
        if "{sentence}" not in e.prompt:
            raise ConfigError(f"eval.prompt: must contain '{{sentence}}', got {e.prompt!r}")
        if self.tracking.flush_every_s < 0:
            raise ConfigError(f"tracking.flush_every_s: must be >= 0, got {self.tracking.flush_every_s}")
        if self.tracking.uri and not re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:", self.tracking.uri):
            raise ConfigError(f"tracking.uri: expected a URI (http://host:5000, sqlite:///abs/path/mlflow.db), got {self.tracking.uri!r}")
        for i, tag in enumerate(self.tracking.tags):
            if "=" not in tag or not tag.partition("=")[0].strip():
                raise ConfigError(f"tracking.tags[{i}]: expected key=value, got {tag!r}")
        if world_size is not None and world_size < 1:
            raise ConfigError(f"world size must be >= 1, got {world_size}")
        if world_size is not None and t.global_batch_size % world_size:
            raise ConfigError(
                f"train.global_batch_size: {t.global_batch_size} is not divisible by the world size {world_size}"
            )
        return self


def _positive(*pairs: tuple[str, int]) -> None:
    for key, value in pairs:
        if value <= 0:
            raise ConfigError(f"{key}: must be > 0, got {value}")


# ----------------------------------------------------------------------------------------------
# Loading: YAML (with line numbers) + dotted overrides -> dataclasses, strictly typed.


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Build a Config from an optional YAML file and `a.b=value` overrides (values parsed as YAML)."""
    raw: dict[str, Any] = {}
    lines: dict[str, str] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        text = path.read_text(encoding="utf-8")
        try:
            node = yaml.compose(text, Loader=yaml.SafeLoader)  # SafeLoader: configs are data, never code
            raw = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: invalid YAML: {e}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: top level must be a mapping of sections, got {type(raw).__name__}")
        _record_lines(node, "", f"{path}", lines)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected key.sub=value")
        try:
            parsed = yaml.safe_load(value) if value != "" else ""
        except yaml.YAMLError as e:
            if PYTHON_TAG in str(e):  # a request to run code: refused, as in a file, never kept as text
                raise ConfigError(f"command line ({item}): python tags are not allowed, configs are data: "
                                  f"{getattr(e, 'problem', e)}") from None
            parsed = value
        if _is_str_field(key.strip()) and parsed is not None and not isinstance(parsed, str):
            parsed = value  # text fields take the text as typed: `data.template=Say: "{sentence}"` is no YAML mapping
        _set_dotted(raw, key.strip(), parsed, item)
        parts = key.strip().split(".")
        for n in range(1, len(parts)):  # sections an override creates point at it too
            lines.setdefault(".".join(parts[:n]), f"command line ({item})")
        lines[key.strip()] = f"command line ({item})"
    return _build(Config, raw, "", lines)


def _record_lines(node: Any, prefix: str, where: str, out: dict[str, str]) -> None:
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            key = f"{prefix}{k.value}"
            out[key] = f"{where}:{k.start_mark.line + 1}"
            _record_lines(v, key + ".", where, out)


def _set_dotted(raw: dict[str, Any], key: str, value: Any, item: str) -> None:
    parts = key.split(".")
    cur = raw
    for part in parts[:-1]:
        nxt = cur.setdefault(part, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"override {item!r}: {part} is not a section")
        cur = nxt
    cur[parts[-1]] = value


def _is_str_field(key: str) -> bool:
    """Whether dotted `key` names a str (or str | None) field of Config."""
    cls: Any = Config
    parts = key.split(".")
    for i, part in enumerate(parts):
        if not (dataclasses.is_dataclass(cls) and isinstance(cls, type)):
            return False
        tp = typing.get_type_hints(cls).get(part)
        if tp is None:
            return False
        if i == len(parts) - 1:
            return tp is str or (get_origin(tp) in (Union, types.UnionType) and set(get_args(tp)) == {str, type(None)})
        cls = tp
    return False


def _where(lines: dict[str, str], key: str) -> str:
    key = re.sub(r"(\[\d+\])+$", "", key)  # a list item is reported at its list's line
    return f"{lines[key]}: " if key in lines else ""


def _build(cls: type, raw: Any, prefix: str, lines: dict[str, str]) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        key = prefix.rstrip(".")
        raise ConfigError(f"{_where(lines, key)}{key}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for k in raw:
        if k not in names:
            key = f"{prefix}{k}"
            close = difflib.get_close_matches(str(k), names, n=1)
            hint = f" (did you mean {prefix}{close[0]}?)" if close else f" (known: {', '.join(names)})"
            raise ConfigError(f"{_where(lines, key)}{key}: unknown key{hint}")
    kwargs = {}
    for name in names:
        if name not in raw:
            continue
        key = f"{prefix}{name}"
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, raw[name], key + ".", lines)
        else:
            kwargs[name] = _coerce(tp, raw[name], key, lines)
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, key: str, lines: dict[str, str]) -> Any:
    origin, args = get_origin(tp), get_args(tp)
    bad = ConfigError(f"{_where(lines, key)}{key}: expected {_type_name(tp)}, got {value!r}")
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, key, lines)
    if origin is Literal:
        if isinstance(value, bool) and {"on", "off"} <= set(args):
            value = "on" if value else "off"  # YAML 1.1 reads a bare on/off as a boolean
        if value not in args:
            raise ConfigError(f"{_where(lines, key)}{key}: must be one of {', '.join(map(str, args))}; got {value!r}")
        return value
    if origin is list:
        if isinstance(value, str):  # a comma list from the command line
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise bad
        return [_coerce(args[0], v, f"{key}[{i}]", lines) for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise bad
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _FLOAT_RE.fullmatch(value.strip()):
            return float(value)  # YAML 1.1 (PyYAML) reads 1e-4 (no dot) as a string
        raise bad
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise bad
    raise bad


_FLOAT_RE = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _type_name(tp: Any) -> str:
    origin, args = get_origin(tp), get_args(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args)
    if origin is Literal:
        return "one of " + ", ".join(map(str, args))
    if origin is list:
        return f"list of {_type_name(args[0])}"
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}: for tracking params and for diffs between runs."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def describe(cls: type = Config, prefix: str = "") -> list[str]:
    """One line per field: key, type, default, help (for --help-config)."""
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out.append(f"[{key}]  {f.metadata.get('help', '')}")
            out.extend(describe(tp, key + "."))
        else:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            out.append(f"  {key} ({_type_name(tp)}, default {default!r}): {f.metadata.get('help', '')}")
    return out
