"""One rank's compute for a layout, without DeepSpeed or a second process (used by bench/layouts.py).

A trainer cell's step = the compute of its rank's micro-batches + what the distributed setup adds
(ZeRO-3 weight gathers and hooks, collectives, a peer on the other core). This runs the same rank-0
micro-batches of the same steps through plain models (LoRA policy, frozen reference) in this process
with one thread, as a rank has, and times the same phases: what a layout saves in compute alone.
"""

from __future__ import annotations

import statistics

import torch


def compute_cell(config: str, overrides: list[str], steps: int, warmup: int, world: int) -> dict:
    """Median seconds per phase (policy_forward, reference, backward) and in all, over steps after `warmup`."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from sempa_dist.attention import resolve_attn_implementation
    from sempa_dist.config import load_config
    from sempa_dist.data.prepare import prepare_data
    from sempa_dist.distributed import DistInfo
    from sempa_dist.engines import peft_lora_config
    from sempa_dist.logprobs import SequenceScorer
    from sempa_dist.models import resolve_model
    from sempa_dist.packing import build_batch, epoch_order, example_tokens, plan_step
    from sempa_dist.phase_times import PhaseTimer, metric_name

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a rank's share of this 2-core machine
    try:
        cfg = load_config(config, overrides)
        cpu = torch.device("cpu")
        tokenizer, examples, _, _ = prepare_data(cfg, DistInfo(0, 1, 0, cpu, "none"))
        shared = cfg.packing.prefix_sharing == "on"
        impl = resolve_attn_implementation(cfg.model.attn_implementation, "cpu", torch.float32)
        path = resolve_model(cfg.model.name)

        def load():
            return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation=impl)

        torch.manual_seed(cfg.train.seed)
        policy = SequenceScorer(get_peft_model(load(), peft_lora_config(cfg)).train(), impl, cfg.loss.logprob_chunk_tokens)
        reference = SequenceScorer(load().eval().requires_grad_(False), impl, cfg.loss.logprob_chunk_tokens)
        sizes = [example_tokens(ex, shared) for ex in examples]
        order = epoch_order(len(examples), cfg.train.seed, 0)  # the cells run steps x batch examples: one epoch
        B = cfg.train.global_batch_size
        timer = PhaseTimer(True, cpu)
        rows = []
        for step in range(steps):
            ids = order[step * B : (step + 1) * B]
            timer.start()
            for micro in plan_step([sizes[i] for i in ids], world, cfg.packing.max_tokens)[0]:
                batch = build_batch([examples[ids[j]] for j in micro], cfg.packing.layout, tokenizer.pad_token_id, shared)
                timer.resume()
                out = policy(batch)
                timer.mark("policy_forward")
                with torch.no_grad():
                    reference(batch)
                timer.mark("reference")
                (out.sums.sum() + out.anchor).backward()
                timer.mark("backward")
            policy.zero_grad(set_to_none=True)
            seconds = timer.seconds()
            rows.append({p: seconds[metric_name(p)] for p in ("policy_forward", "reference", "backward")})
        timed = rows[warmup:] or rows
        phases = {k: statistics.median(r[k] for r in timed) for k in rows[0]}
        return {"phases": phases, "step_time_s": statistics.median(sum(r.values()) for r in timed)}
    finally:
        torch.set_num_threads(threads)
