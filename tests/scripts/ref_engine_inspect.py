"""Run under torchrun (2 ranks): build the policy and the offloaded reference engine exactly as
train.py does (configs/tiny_cpu.yaml: all weights trained, ref.mode=engine, ref.offload=cpu), take
two training steps, then report what the reference engine holds.

A reference that reused the policy's DeepSpeed config (or its optimizer) would carry a ZeRO-3
optimizer with fp32 master partitions, Adam state and gradient buckets: as much memory again as
the policy's training state, a known out-of-memory cause. Prints one JSON line on rank 0; the
pytest wrapper (tests/test_resume_world_size.py) asserts on it.
"""

from __future__ import annotations

import sys

import torch
from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3

from sempa_dist.config import load_config
from sempa_dist.data.prepare import prepare_data
from sempa_dist.distributed import init_distributed
from sempa_dist.engines import EngineReference, build_policy, build_reference, training_dtype
from sempa_dist.kernel_choice import choose
from sempa_dist.packing import build_batch, epoch_order, example_tokens, plan_step
from sempa_dist.train import quiet_library_warnings
from tests.scripts.rank_exit import report_and_exit

# what DeepSpeedZeroOptimizer_Stage3 allocates for training (deepspeed/runtime/zero/stage3.py): the
# wrapped optimizer, fp32 master partitions, the partitioned bit16 groups it steps, the reduce
# (IPG) buckets and flat gradient partitions. The parameter-offload manager a frozen engine gets
# (DeepSpeedZeRoOffload, parameter_offload.py) has none of them.
TRAINING_STATE = ("optimizer", "fp32_partitioned_groups_flat", "fp16_partitioned_groups_flat", "fp16_groups",
                  "ipg_buckets", "grad_partitions_flat_buffer", "averaged_gradients")

quiet_library_warnings()
out_dir = sys.argv[1]
cfg = load_config("configs/tiny_cpu.yaml", [f"train.output_dir={out_dir}/run", "ref.mode=engine", "ref.offload=cpu",
                                            "tracking.enabled=false"])
dist = init_distributed(cfg.deepspeed.timeout_s)
tokenizer, examples, _, tok = prepare_data(cfg, dist)
dtype = training_dtype(cfg, dist.device.type)
attn = choose(cfg, examples, dist.device, dtype)  # as train.py decides it (on CPU: nothing to measure)
policy, _ = build_policy(cfg, dist, 10, attn, dtype)
reference = build_reference(cfg, dist, policy, examples, tok.fingerprint, attn, dtype)
assert isinstance(reference, EngineReference), type(reference)

# two steps of the training loop (train.py): gradients and optimizer state exist on the policy
# by now, so anything lazily allocated on the reference would exist too
shared = attn.sharing
B = cfg.train.global_batch_size
for step in range(2):
    ids = epoch_order(len(examples), cfg.train.seed, 0)[step * B : (step + 1) * B]
    plan = plan_step([example_tokens(examples[i], shared) for i in ids], dist.world_size, cfg.packing.max_tokens)[dist.rank]
    for m, micro in enumerate(plan):
        batch = build_batch([examples[ids[j]] for j in micro], cfg.packing.layout, tokenizer.pad_token_id, shared)
        policy.set_gradient_accumulation_boundary(m == len(plan) - 1)
        out = policy(batch)
        reference.logps(batch)  # the reference's forward, with the policy's, as in the loop
        loss = -out.sums.sum() * (dist.world_size / B) + out.anchor
        policy.backward(loss, scale_wrt_gas=False)
    policy.step()

eng = reference.engine
zero = eng.optimizer  # DeepSpeed's name for the ZeRO object, optimizer or not
ref_params = list(eng.module.parameters())
pol_params = list(policy.module.parameters())
ref_ptrs = {p.ds_tensor.data_ptr() for p in ref_params}
pol_ptrs = {p.ds_tensor.data_ptr() for p in pol_params}
result = {
    "zero_object": type(zero).__name__ if zero is not None else None,
    "is_torch_optimizer": isinstance(zero, torch.optim.Optimizer),
    "is_zero3_optimizer": isinstance(zero, DeepSpeedZeroOptimizer_Stage3),
    "client_optimizer": type(eng.client_optimizer).__name__ if eng.client_optimizer is not None else None,
    "basic_optimizer": type(eng.basic_optimizer).__name__ if eng.basic_optimizer is not None else None,
    "lr_scheduler": type(eng.lr_scheduler).__name__ if eng.lr_scheduler is not None else None,
    "ds_config_optimizer": "optimizer" in reference.ds_config,
    "training_state": [a for a in TRAINING_STATE if getattr(zero, a, None) is not None],
    # the probe names are right for this DeepSpeed: the policy's ZeRO-3 optimizer has every one
    "policy_training_state": [a for a in TRAINING_STATE if getattr(policy.optimizer, a, None) is not None],
    "requires_grad": sum(p.requires_grad for p in ref_params),
    "grads": sum(p.grad is not None or getattr(p.ds_tensor, "grad", None) is not None for p in ref_params),
    # DeepSpeedEngine.eval() switches its module only (the engine object keeps training=True)
    "training_mode": any(m.training for m in eng.module.modules()),
    "offload_device": str(getattr(zero, "offload_device", None)),
    "ref_partition_devices": sorted({str(p.ds_tensor.device) for p in ref_params}),
    "n_params": len(ref_params),
    "n_policy_params": len(pol_params),
    # a deep copy of the ZeRO-3 policy would copy its parameters' ds_id; a reference loaded on its
    # own under zero.Init gets fresh ids and its own storage
    "shared_ds_ids": len({p.ds_id for p in ref_params} & {p.ds_id for p in pol_params}),
    "shared_storage": len(ref_ptrs & pol_ptrs),
    "shared_modules": len({id(m) for m in eng.module.modules()} & {id(m) for m in policy.module.modules()}),
}
report_and_exit(result, dist.is_main)
