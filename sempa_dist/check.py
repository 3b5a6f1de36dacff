"""`sempa-train --check`: everything short of training, on any machine, so a user learns on a laptop
that a cluster job is sound: the config for the world size it will run on, the data read and counted,
the tokenizer applied, the step plan (steps, examples and tokens per step, packing efficiency, what
prefix sharing saves), the kernel and dtype that will run, and a memory estimate per GPU for each
reference mode.

The memory estimate is arithmetic on the model's shapes (no weights are loaded: the model is built on
the meta device), for the DeepSpeed stage of the policy's config:
- weights (bf16 unless model.dtype is fp32): ZeRO-3 keeps 1/W of them per rank plus the layers gathered
  for the current module (about two decoder layers with prefetch); ZeRO-2 keeps them whole;
- gradients and AdamW state of what trains (all weights, or the LoRA adapters): 1/W per rank; fp32
  master weights and both moments, 12 bytes per trained parameter (8 in fp32 training) + gradients;
- activations of one micro-batch (packing.max_tokens tokens): about 34 * hidden bytes per token and
  decoder layer in bf16 without recomputation (Korthikanti et al. 2022, "Reducing Activation
  Recomputation in Large Transformer Models", section 4, with flash attention's score term gone; a
  Llama MLP is somewhat wider than the 4h it assumes), twice that in fp32, 2 * hidden with gradient
  checkpointing plus one layer's full set; plus the LM head's chunk of fp32 logits and its softmax;
- the reference: `engine` holds 1/W of its weights in CPU memory (offload cpu; on the GPU with offload
  none) and two gathered layers on the GPU; `adapter` (LoRA only) adds one forward's activations (the
  policy's base); `precomputed` adds nothing on the GPU.
The trained parameter count of LoRA assumes adapters on every linear layer of the decoder.
It is an estimate to catch an order-of-magnitude mistake, not an allocator's figure.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any

from sempa_dist.config import Config

GIB = 2**30
# Shapes of the models the shipped presets name, from their public config.json: --check on a laptop
# with no network (or no access to a gated repository) still estimates memory for them.
KNOWN_SHAPES: dict[str, dict[str, int]] = {
    "meta-llama/Meta-Llama-3-8B-Instruct": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                                num_attention_heads=32, num_key_value_heads=8, vocab_size=128256),
    "meta-llama/Meta-Llama-3-8B": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                       num_attention_heads=32, num_key_value_heads=8, vocab_size=128256),
    "meta-llama/Llama-2-7b-hf": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                     num_attention_heads=32, num_key_value_heads=32, vocab_size=32000),
    "meta-llama/Llama-2-7b-chat-hf": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                          num_attention_heads=32, num_key_value_heads=32, vocab_size=32000),
}


@dataclass
class Shapes:
    """What the memory estimate needs of a model."""

    params: int
    layer_params: int  # one decoder layer
    hidden: int
    layers: int
    vocab: int
    lora_params: int  # adapters on every linear layer of the decoder (model.lora.target_modules: all-linear)
    source: str


def model_shapes(cfg: Config) -> Shapes:
    """Parameter counts from the model's config, built on the meta device (nothing allocated)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig

    from sempa_dist.models import resolve_model

    name = cfg.model.name
    try:
        config = AutoConfig.from_pretrained(resolve_model(name))
        source = "the model's config.json"
    except Exception as e:  # noqa: BLE001 - offline, gated, or not a model: fall back to the table
        if name not in KNOWN_SHAPES:
            raise RuntimeError(f"model.name: {name}: no config.json reachable here ({type(e).__name__}) and not in "
                               "sempa-dist's table of known shapes") from None
        config = LlamaConfig(**KNOWN_SHAPES[name], tie_word_embeddings=False)
        source = "sempa-dist's table (config.json not reachable here)"
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    params = sum(p.numel() for p in model.parameters())
    layer = model.get_decoder().layers[0]
    r = cfg.model.lora.r
    lora = sum(r * (m.in_features + m.out_features) for m in model.get_decoder().layers.modules()
               if isinstance(m, torch.nn.Linear))
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return Shapes(params, sum(p.numel() for p in layer.parameters()), text.hidden_size, text.num_hidden_layers,
                  text.vocab_size, lora, source)


def memory_estimate(cfg: Config, shapes: Shapes, world_size: int, stage: int, bf16: bool) -> dict[str, dict[str, float]]:
    """GiB per rank, GPU and CPU, for each reference mode (see the module docstring)."""
    w = 2 if bf16 else 4
    trained = shapes.lora_params if cfg.model.lora.enabled else shapes.params
    weights = shapes.params * w / world_size + 2 * shapes.layer_params * w if stage == 3 else shapes.params * w
    optimizer = trained * ((12 if bf16 else 8) + w) / world_size
    tokens = cfg.packing.max_tokens
    full_layer = 34 * shapes.hidden * tokens * w / 2  # the 34 h bytes per token are for 2-byte activations
    per_layer = 2 * shapes.hidden * tokens * w / 2 if cfg.model.gradient_checkpointing else full_layer
    activations = per_layer * shapes.layers + (full_layer if cfg.model.gradient_checkpointing else 0)
    logits = 2 * min(cfg.loss.logprob_chunk_tokens, tokens) * shapes.vocab * 4
    policy_gpu = weights + optimizer + activations + logits
    forward_only = full_layer + logits  # a no-grad pass keeps one layer's activations
    ref_shard = shapes.params * w / world_size
    ref = {
        "engine": {"gpu": 2 * shapes.layer_params * w + forward_only + (ref_shard if cfg.ref.offload == "none" else 0.0),
                   "cpu": ref_shard if cfg.ref.offload == "cpu" else 0.0},
        "adapter": {"gpu": forward_only, "cpu": 0.0},
        "precomputed": {"gpu": 0.0, "cpu": 0.0},
    }
    if not cfg.model.lora.enabled:
        del ref["adapter"]  # the adapter-disabled base exists only for a LoRA policy
    return {mode: {"gpu_gib": (policy_gpu + extra["gpu"]) / GIB, "cpu_gib": extra["cpu"] / GIB}
            for mode, extra in ref.items()}


def step_plan(cfg: Config, examples: list, world_size: int, sharing: bool, max_steps: int = 200) -> dict[str, Any]:
    """The first steps' plan, as training will make it: examples and tokens per step, micro-steps per
    rank, packing efficiency (real tokens / micro-steps x packing.max_tokens) and prefix sharing's saving."""
    from sempa_dist.packing import epoch_order, example_tokens, plan_step, step_counts

    B = cfg.train.global_batch_size
    steps_per_epoch, total = step_counts(cfg, len(examples))
    order = epoch_order(len(examples), cfg.train.seed, 0)
    shared = [example_tokens(ex, True) for ex in examples]
    plain = [example_tokens(ex, False) for ex in examples]
    sizes = shared if sharing else plain
    micro, tokens, efficiency = [], [], []
    for step in range(min(steps_per_epoch, max_steps)):
        ids = order[step * B:(step + 1) * B]
        plan = plan_step([sizes[i] for i in ids], world_size, cfg.packing.max_tokens)
        used = sum(sizes[i] for i in ids)
        micro.append(len(plan[0]))
        tokens.append(used)
        efficiency.append(used / (world_size * len(plan[0]) * cfg.packing.max_tokens))
    return {
        "steps_per_epoch": steps_per_epoch, "total_steps": total, "examples_per_step": B,
        "tokens_per_step": statistics.mean(tokens) if tokens else 0.0,
        "micro_steps_per_rank": max(micro) if micro else 0, "packing_efficiency": statistics.mean(efficiency) if efficiency else 0.0,
        "sharing_saves": 1 - sum(shared) / max(1, sum(plain)), "prefix_sharing": sharing,
        "sharing_setting": cfg.packing.prefix_sharing + (" (on a GPU measured at start)" if cfg.packing.prefix_sharing == "auto" else ""),
    }


def policy_stage(cfg: Config) -> int:
    """The ZeRO stage of the policy's DeepSpeed config."""
    from sempa_dist.engines import read_ds_config

    raw, _ = read_ds_config(cfg.deepspeed.policy_config)
    return int(raw.get("zero_optimization", {}).get("stage", 0))


def check_run(cfg: Config, world_size: int) -> dict[str, Any]:
    """The --check report (a dict; `format_report` prints it). Raises DataError/ConfigError as training would."""
    from sempa_dist.data import DataError, load_triplets, tokenize_triplets
    from sempa_dist.distributed import device_type
    from sempa_dist.engines import training_dtype
    from sempa_dist.kernel_choice import candidates, label
    from sempa_dist.models import load_tokenizer
    from sempa_dist.packing import step_counts

    cfg.validate(world_size=world_size)
    report: dict[str, Any] = {"world_size": world_size, "model": cfg.model.name, "ref_mode": cfg.ref.mode, "notes": []}
    try:
        triplets, load_report = load_triplets(cfg.data, seed=cfg.train.seed)
        report["data"] = dict(load_report.__dict__)
    except DataError as e:
        if cfg.data.source != "hub":  # a bad file is what --check is for
            raise
        triplets, report["data"] = None, None  # the hub unreachable from here (a laptop offline)
        report["notes"].append(f"data not read here: {e}")
    here = device_type()
    dtype_here = training_dtype(cfg, here)
    gpu_bf16 = cfg.model.dtype != "fp32"
    try:
        attention_here = label(candidates(cfg.model.attn_implementation, cfg.packing.prefix_sharing, here, dtype_here)[0])
    except RuntimeError as e:  # a GPU kernel asked for on a laptop: fine if the job runs on GPUs
        attention_here = "-"
        report["notes"].append(f"here: {e} (fine if the job runs on GPUs)")
    report["runtime"] = {
        "here": f"{here}, {str(dtype_here).removeprefix('torch.')}: {attention_here}",
        "gpu": f"{'bf16' if gpu_bf16 else 'fp32'}; attention "
               + (f"{cfg.model.attn_implementation} (as configured)" if cfg.model.attn_implementation != "auto" else
                  "measured at start among the GPU's usable kernels (fa2_varlen where flash-attn is built, "
                  "torch_varlen on torch >= 2.10, flex_varlen, sdpa_varlen" + ("" if gpu_bf16 else "; no flash kernel in fp32") + ")")
               + f", prefix sharing {cfg.packing.prefix_sharing}",
    }
    try:
        tokenizer = load_tokenizer(cfg.model.name)
    except Exception as e:  # noqa: BLE001 - offline or gated: the rest of the check still runs
        tokenizer = None
        report["notes"].append(f"tokenizer of {cfg.model.name} not available here ({type(e).__name__}): "
                               "token counts and the step plan skipped; run --check where the model is reachable")
    if tokenizer is not None and triplets is not None:
        examples, tok_report = tokenize_triplets(triplets, tokenizer, cfg.data)
        report["tokenize"] = {k: v for k, v in tok_report.__dict__.items() if k != "extra"}
        step_counts(cfg, len(examples), load_report.source, tok_report.dropped_overlong)  # as training refuses
        sharing = cfg.packing.prefix_sharing != "off"
        report["plan"] = step_plan(cfg, examples, world_size, sharing)
    stage = policy_stage(cfg)
    try:
        shapes = model_shapes(cfg)
        report["memory"] = {"params": shapes.params, "trained": shapes.lora_params if cfg.model.lora.enabled else shapes.params,
                            "shapes_from": shapes.source, "zero_stage": stage,
                            "per_rank": memory_estimate(cfg, shapes, world_size, stage, gpu_bf16)}
    except RuntimeError as e:
        report["notes"].append(str(e))
    return report


def format_report(report: dict[str, Any]) -> str:
    """The report as a newcomer reads it."""
    d = report["data"]
    lines = [f"sempa-train --check: {report['model']} on {report['world_size']} rank(s)", ""]
    if d is not None:
        lines.append(f"data      {d['source']}: {d['rows_read']} rows read, {d['kept']} kept"
                     + "".join(f", {n} dropped ({why})" for why, n in d["dropped"].items())
                     + (f", {d['random_negatives']} random negatives added" if d["random_negatives"] else ""))
    if "tokenize" in report:
        t = report["tokenize"]
        lines.append(f"tokenise  {t['kept']} examples, {t['truncated']} truncated, {t['dropped_overlong']} dropped as overlong")
    if "plan" in report:
        p = report["plan"]
        lines += [f"steps     {p['total_steps']} ({p['steps_per_epoch']} per epoch), {p['examples_per_step']} examples "
                  f"and {p['tokens_per_step']:.0f} tokens per step, {p['micro_steps_per_rank']} micro-steps per rank",
                  f"packing   {100 * p['packing_efficiency']:.1f} % of each micro-batch's token budget used, prefix sharing "
                  f"{p['sharing_setting']} (it saves {100 * p['sharing_saves']:.1f} % of the tokens; the plan assumes it "
                  f"{'on' if p['prefix_sharing'] else 'off'})"]
    r = report["runtime"]
    lines += [f"runtime   here: {r['here']}", f"          on GPUs: {r['gpu']}"]
    if "memory" in report:
        m = report["memory"]
        lines += [f"memory    {_count(m['params'])} parameters ({_count(m['trained'])} trained), ZeRO-{m['zero_stage']} "
                  f"policy, shapes from {m['shapes_from']}; estimate per rank:",
                  "          | ref.mode | GPU GiB | CPU GiB |", "          |---|---|---|"]
        lines += [f"          | {mode}{' (configured)' if mode == report['ref_mode'] else ''} | {v['gpu_gib']:.2f} | "
                  f"{v['cpu_gib']:.2f} |" for mode, v in m["per_rank"].items()]
    lines += [f"note      {n}" for n in report["notes"]]
    return "\n".join(lines)


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"
