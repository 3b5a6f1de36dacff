"""Policy and reference engines.

- Policy: a DeepSpeed ZeRO-3 engine around ``SequenceScorer(causal LM [+ LoRA])``, built under
  ``deepspeed.zero.Init`` (through transformers' HfDeepSpeedConfig), so no rank ever holds the
  full model.
- Reference (``ref.mode``):
  - ``engine``: its own ZeRO-3 engine, loaded on its own (never a deep copy of the ZeRO-3
    policy), eval mode, no optimizer, no gradients, parameters offloaded;
  - ``adapter``: the policy with its LoRA adapters disabled (no second copy of the weights);
  - ``precomputed``: log-probs computed once by an ``engine`` reference and cached on disk.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from sempa_dist.config import Config, ConfigError
from sempa_dist.distributed import DistInfo
from sempa_dist.fileio import atomic_file
from sempa_dist.kernel_choice import AttentionChoice
from sempa_dist.logprobs import SequenceScorer
from sempa_dist.models import resolve_model
from sempa_dist.packing import PackedBatch
from sempa_dist.paths import REPO_ROOT


def training_dtype(cfg: Config, device_type: str) -> torch.dtype:
    """model.dtype resolved for this device: auto = bf16 on a GPU that supports it, else fp32."""
    if cfg.model.dtype == "bf16":
        return torch.bfloat16
    if cfg.model.dtype == "fp32":
        return torch.float32
    return torch.bfloat16 if device_type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32


def read_ds_config(path: str) -> tuple[dict[str, Any], Path]:
    """A DeepSpeed JSON config as written (its "auto" values unfilled) and the file it came from: `path`
    as given, else relative to the repository."""
    p = Path(path)
    if not p.is_absolute() and not p.is_file():
        p = REPO_ROOT / path
    if not p.is_file():
        raise ConfigError(f"deepspeed config not found: {path}")
    try:
        return json.loads(p.read_text()), p
    except json.JSONDecodeError as e:
        raise ConfigError(f"{p}:{e.lineno}: invalid JSON: {e.msg}") from None


def load_ds_config(path: str, values: dict[str, Any]) -> dict[str, Any]:
    """Read a DeepSpeed JSON config and fill its "auto" values; an unfillable "auto" is an error."""
    raw, p = read_ds_config(path)
    return fill_auto(raw, values, str(p))


def fill_auto(node: Any, values: dict[str, Any], where: str, key: str = "") -> Any:
    if isinstance(node, dict):
        return {k: fill_auto(v, values, where, f"{key}.{k}" if key else k) for k, v in node.items()}
    if node == "auto":
        if key not in values:
            raise ConfigError(f"{where}: {key} is 'auto' but sempa-dist has no value for it")
        return values[key]
    return node


def _auto_values(cfg: Config, hidden: int, dist: DistInfo, dtype: torch.dtype, reference: bool) -> dict[str, Any]:
    bf16, world = dtype == torch.bfloat16, dist.world_size
    cuda = dist.device.type == "cuda"
    offload = cfg.ref.offload
    return {
        "train_batch_size": world,  # one packed micro-batch per rank per micro-step; see train.py
        "gradient_clipping": cfg.train.max_grad_norm,
        "bf16.enabled": bf16,
        "zero_optimization.overlap_comm": cuda,
        "zero_optimization.reduce_bucket_size": hidden * hidden,
        "zero_optimization.allgather_bucket_size": hidden * hidden,
        "zero_optimization.stage3_prefetch_bucket_size": int(0.9 * hidden * hidden),
        "zero_optimization.stage3_param_persistence_threshold": 10 * hidden,
        "zero_optimization.offload_param.device": offload if reference else "none",
        "zero_optimization.offload_param.nvme_path": cfg.ref.nvme_path or "/local_nvme",
        "zero_optimization.offload_param.pin_memory": cuda,
    }


def _hidden_size(model_path: Path | str) -> int:
    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(model_path)
    return int(getattr(c, "hidden_size", None) or c.get_text_config().hidden_size)


def _load_causal_lm(cfg: Config, ds_config: dict[str, Any], attn: str, dtype: torch.dtype) -> torch.nn.Module:
    """from_pretrained under zero.Init: each rank materialises only its partition."""
    from transformers import AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    path = resolve_model(cfg.model.name)
    dschf = HfDeepSpeedConfig(ds_config)  # noqa: F841 - alive => from_pretrained uses zero.Init
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attn)
    del dschf  # later from_pretrained calls (export, eval tools) must not partition
    return model


def peft_lora_config(cfg: Config):
    """The peft LoraConfig of model.lora ('all-linear' = every linear layer but the LM head)."""
    from peft import LoraConfig

    lc = cfg.model.lora
    targets = lc.target_modules[0] if lc.target_modules == ["all-linear"] else lc.target_modules
    return LoraConfig(r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout, target_modules=targets, task_type="CAUSAL_LM")


def build_policy(cfg: Config, dist: DistInfo, total_steps: int, attn: AttentionChoice, dtype: torch.dtype,
                 load_universal: bool = False):
    """The trainable policy as a ZeRO-3 engine, with AdamW and a warmup + decay schedule, scoring with
    the attention kernel `attn.impl` in `dtype` (both decided at start, see kernel_choice).

    `load_universal`: the engine will resume from a universal checkpoint (one written on another
    world size); DeepSpeed reads that choice from the engine's config when it loads."""
    import deepspeed

    path = resolve_model(cfg.model.name)
    ds_config = load_ds_config(cfg.deepspeed.policy_config, _auto_values(cfg, _hidden_size(path), dist, dtype, False))
    if load_universal:
        ds_config["checkpoint"] = {**ds_config.get("checkpoint", {}), "load_universal": True}
    torch.manual_seed(cfg.train.seed)
    model = _load_causal_lm(cfg, ds_config, attn.impl, dtype)
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.model.lora.enabled:
        from peft import get_peft_model

        torch.manual_seed(cfg.train.seed)  # identical adapter init on every rank and world size
        model = get_peft_model(model, peft_lora_config(cfg))
        if cfg.model.gradient_checkpointing:
            model.enable_input_require_grads()
    scorer = SequenceScorer(model, attn.impl, cfg.loss.logprob_chunk_tokens)
    params = [p for p in scorer.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.train.learning_rate, weight_decay=cfg.train.weight_decay,
                                  fused=dist.device.type == "cuda")
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, total_steps))
    engine, optimizer, _, schedule = deepspeed.initialize(
        model=scorer, optimizer=optimizer, lr_scheduler=schedule, config=ds_config,
    )
    return engine, ds_config


def lr_lambda(cfg: Config, total_steps: int) -> Callable[[int], float]:
    warmup = int(math.ceil(cfg.train.warmup_ratio * total_steps))
    kind = cfg.train.lr_schedule

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if kind == "constant" or total_steps <= warmup:
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return 0.5 * (1 + math.cos(math.pi * progress)) if kind == "cosine" else 1.0 - progress

    return factor


# ----------------------------------------------------------------------------------------------
# References: one interface, logps(batch) -> (sums [S], counts [S])


class EngineReference:
    """A separate frozen ZeRO-3 engine: no optimizer, no grads, eval mode, parameters offloaded."""

    def __init__(self, cfg: Config, dist: DistInfo, attn: str, dtype: torch.dtype):
        import deepspeed

        path = resolve_model(cfg.model.name)
        self.ds_config = load_ds_config(cfg.deepspeed.ref_config, _auto_values(cfg, _hidden_size(path), dist, dtype, True))
        if "optimizer" in self.ds_config or "scheduler" in self.ds_config:
            raise ConfigError(f"{cfg.deepspeed.ref_config}: the reference config must have no optimizer or scheduler")
        model = _load_causal_lm(cfg, self.ds_config, attn, dtype)
        model.requires_grad_(False)
        scorer = SequenceScorer(model, attn, cfg.loss.logprob_chunk_tokens)
        self.engine, *_ = deepspeed.initialize(model=scorer, config=self.ds_config)
        self.engine.eval()

    @torch.no_grad()
    def logps(self, batch: PackedBatch) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.engine(batch)
        return out.sums, out.counts


class AdapterReference:
    """The LoRA policy with adapters switched off: the base weights are the reference."""

    def __init__(self, policy_engine):
        self.policy = policy_engine

    @torch.no_grad()
    def logps(self, batch: PackedBatch) -> tuple[torch.Tensor, torch.Tensor]:
        was_training = self.policy.module.training
        self.policy.module.eval()  # no dropout in the reference pass
        try:
            out = self.policy(batch, disable_adapter=True)
        finally:
            self.policy.module.train(was_training)
        return out.sums, out.counts


class PrecomputedReference:
    """Reference log-probs looked up by dataset index from a table computed once."""

    def __init__(self, sums: torch.Tensor, counts: torch.Tensor):
        self.sums, self.counts = sums, counts  # [N, 1 + K]

    @torch.no_grad()
    def logps(self, batch: PackedBatch) -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.tensor(batch.example_ids, dtype=torch.long)
        return self.sums[ids].reshape(-1), self.counts[ids].reshape(-1)


def reference_fingerprint(cfg: Config, data_fp: str, attn: str, dtype: torch.dtype) -> str:
    """Data (rows + tokenizer + template + length policy) + model + precision identify the table."""
    import hashlib

    path = resolve_model(cfg.model.name)
    weights = sorted(Path(path).glob("*.safetensors")) if Path(str(path)).is_dir() else []
    stamp = [str(path), attn, str(dtype), cfg.data.num_rejected] + [(w.name, w.stat().st_size, w.stat().st_mtime_ns) for w in weights]
    return hashlib.sha256(json.dumps([data_fp, stamp]).encode()).hexdigest()[:20]


def precompute_reference(cfg: Config, dist: DistInfo, examples, data_fp: str, attn: AttentionChoice,
                         dtype: torch.dtype) -> PrecomputedReference:
    """Score every example once with an offloaded reference engine, sharded over ranks, and cache it.

    Ranks split the examples with the same planner as training (equal micro-step counts, so the
    ZeRO-3 gathers line up), then an all-reduce assembles the full table on every rank.
    """
    from tqdm import tqdm

    from sempa_dist.distributed import all_reduce_sum, barrier
    from sempa_dist.packing import build_batch, example_tokens, plan_step

    cache_dir = Path(cfg.ref.cache_dir) if cfg.ref.cache_dir else Path(cfg.train.output_dir).parent / "ref_cache"
    path = cache_dir / f"ref-{reference_fingerprint(cfg, data_fp, attn.impl, dtype)}.pt"
    if path.is_file():
        table = torch.load(path, weights_only=True)
        return PrecomputedReference(table["sums"], table["counts"])
    k1 = 1 + cfg.data.num_rejected
    n = max(ex.index for ex in examples) + 1  # indexed by dataset position (dropped rows leave gaps)
    sums = torch.zeros(n, k1, dtype=torch.float64)
    counts = torch.zeros(n, k1, dtype=torch.float64)
    ref = EngineReference(cfg, dist, attn.impl, dtype)
    by_pos = {i: ex for i, ex in enumerate(examples)}
    shared = attn.sharing
    sizes = [example_tokens(ex, shared) for ex in examples]
    plan = plan_step(sizes, dist.world_size, cfg.packing.max_tokens)[dist.rank]
    for micro in tqdm(plan, desc="reference log-probs", disable=not dist.is_main):
        batch = build_batch([by_pos[i] for i in micro], cfg.packing.layout, prefix_sharing=shared).to(dist.device)
        s, c = ref.logps(batch)
        if micro:
            rows = torch.tensor([by_pos[i].index for i in micro])
            sums[rows] = s.view(-1, k1).double().cpu()
            counts[rows] = c.view(-1, k1).double().cpu()
    del ref
    sums = all_reduce_sum(sums.to(dist.device)).cpu().float()
    counts = all_reduce_sum(counts.to(dist.device)).cpu().long()
    if dist.is_main:
        cache_dir.mkdir(parents=True, exist_ok=True)
        with atomic_file(path) as tmp:  # a crash never leaves a half-written table behind
            torch.save({"sums": sums, "counts": counts}, tmp)
    barrier()
    return PrecomputedReference(sums, counts)


def build_reference(cfg: Config, dist: DistInfo, policy_engine, examples, data_fp: str, attn: AttentionChoice,
                    dtype: torch.dtype):
    """The reference of `ref.mode`, scoring with the run's attention kernel and dtype."""
    if cfg.ref.mode == "adapter":
        return AdapterReference(policy_engine)
    if cfg.ref.mode == "precomputed":
        return precompute_reference(cfg, dist, examples, data_fp, attn, dtype)
    return EngineReference(cfg, dist, attn.impl, dtype)
