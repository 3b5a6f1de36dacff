"""Run under torchrun (2 ranks): the three reference modes agree, and the reference never moves.

Prints one JSON line on rank 0 with the measured differences; the pytest wrapper asserts on it.
"""

import copy
import sys

import torch

from sempa_dist.attention import SDPA_VARLEN
from sempa_dist.config import load_config
from sempa_dist.data.prepare import prepare_data
from sempa_dist.distributed import init_distributed
from sempa_dist.engines import AdapterReference, EngineReference, build_policy, precompute_reference
from sempa_dist.kernel_choice import AttentionChoice
from sempa_dist.packing import build_batch, plan_step
from sempa_dist.train import quiet_library_warnings
from tests.scripts.rank_exit import report_and_exit

quiet_library_warnings()
out_dir = sys.argv[1]
cfg = load_config(None, [
    "model.name=tiny-llama", "model.dtype=fp32", "model.lora.enabled=true", "model.lora.r=4",
    "data.max_examples=24", "data.max_length=96", "packing.max_tokens=512",
    f"train.output_dir={out_dir}/run", "train.learning_rate=0.05", "train.global_batch_size=8",
])
dist = init_distributed(cfg.deepspeed.timeout_s)
tokenizer, examples, _, tok = prepare_data(cfg, dist)
attn, dtype = AttentionChoice(SDPA_VARLEN, False), torch.float32  # the batches below share no prompt
policy, _ = build_policy(cfg, dist, 10, attn, dtype)
engine_ref = EngineReference(cfg, dist, attn.impl, dtype)
replicated_cfg = copy.deepcopy(cfg)
replicated_cfg.deepspeed.ref_config = "ds_configs/zero3_ref_replicated.json"
replicated_ref = EngineReference(replicated_cfg, dist, attn.impl, dtype)
adapter_ref = AdapterReference(policy)
pre_ref = precompute_reference(cfg, dist, examples, tok.fingerprint, attn, dtype)

plan = plan_step([e.num_tokens for e in examples[:8]], dist.world_size, 512)[dist.rank]
batches = [build_batch([examples[i] for i in m], "packed", tokenizer.pad_token_id) for m in plan]


def all_refs():
    return [torch.cat([r.logps(b)[0] for b in batches]) for r in (engine_ref, adapter_ref, pre_ref, replicated_ref)]


before = all_refs()
policy_before = torch.cat([policy(b).sums.detach() for b in batches])
for _ in range(3):  # a few optimizer steps on the policy
    for m, b in enumerate(batches):
        policy.set_gradient_accumulation_boundary(m == len(batches) - 1)
        out = policy(b)
        policy.backward(-out.sums.mean() + out.anchor, scale_wrt_gas=False)
    policy.step()
after = all_refs()
policy_after = torch.cat([policy(b).sums.detach() for b in batches])

opt = engine_ref.engine.optimizer
grad_params = [n for n, p in engine_ref.engine.module.named_parameters() if p.requires_grad or p.grad is not None]
result = {
    "engine_vs_adapter": float((before[0] - before[1]).abs().max()),
    "engine_vs_precomputed": float((before[0] - before[2]).abs().max()),
    "engine_vs_replicated": float((before[0] - before[3]).abs().max()),
    # between forwards the replicated reference still holds every weight whole on each rank (nothing to
    # gather); the offloaded one has released its partitioned weights (only its shard is kept)
    "replicated_whole": all(p.ds_persist and p.data.numel() == p.ds_numel
                            for p in replicated_ref.engine.module.parameters()),
    "offloaded_sharded": any(not p.ds_persist and p.data.numel() < p.ds_numel
                             for p in engine_ref.engine.module.parameters()),
    "ref_moved": max(float((a - b).abs().max()) for a, b in zip(before, after, strict=True)),
    "policy_moved": float((policy_before - policy_after).abs().max()),
    "ref_optimizer": type(opt).__name__ if opt is not None else None,
    "ref_grad_params": len(grad_params),
    "ref_offload": engine_ref.ds_config["zero_optimization"]["offload_param"]["device"],
    "n_seq": int(before[0].numel()),
}
report_and_exit(result, dist.is_main)
