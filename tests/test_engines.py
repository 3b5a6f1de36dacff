"""The engines (sempa_dist/engines.py), with real processes: 2-rank ZeRO-3 on CPU (gloo).

- every reference mode (offloaded engine, adapter-disabled base, precomputed table, replicated engine)
  gives the same log-probs, and the reference never moves while the policy trains;
- the reference engine has no optimizer, no training state, and shares nothing with the policy;
- ZeRO-2 for a LoRA policy (ds_configs/zero2_lora.json: the base whole on every rank) trains as
  ZeRO-3 does and exports the same way.
"""

from __future__ import annotations

import ast
import json
import sys

import pytest

from sempa_dist.distributed import free_port
from tests.distributed import REPO, assert_export_reproduces_probe, metrics, run, sempa_train

pytestmark = pytest.mark.slow


def test_reference_modes_agree_and_reference_is_frozen(tmp_path):
    proc = run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
                "tests/scripts/ref_modes.py", str(tmp_path)])
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))
    r = json.loads(line[len("RESULT "):])
    assert r["n_seq"] > 0
    assert r["engine_vs_adapter"] <= 1e-5 and r["engine_vs_precomputed"] <= 1e-5 and r["engine_vs_replicated"] <= 1e-5
    assert r["replicated_whole"] and r["offloaded_sharded"]
    assert r["ref_moved"] == 0.0 and r["policy_moved"] > 1e-3
    assert r["ref_grad_params"] == 0 and r["ref_offload"] == "cpu"
    assert r["ref_optimizer"] in (None, "DeepSpeedZeRoOffload")  # parameter offload manager, not an optimizer


def test_reference_engine_has_no_optimizer_and_is_not_a_copy(tmp_path):
    proc = run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
                "tests/scripts/ref_engine_inspect.py", str(tmp_path)], timeout=300)
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))
    r = json.loads(line[len("RESULT "):])
    # no optimizer: DeepSpeed gives a frozen ZeRO-3 engine its parameter-offload manager only
    assert r["zero_object"] == "DeepSpeedZeRoOffload"
    assert not r["is_torch_optimizer"] and not r["is_zero3_optimizer"]
    assert r["client_optimizer"] is None and r["basic_optimizer"] is None and r["lr_scheduler"] is None
    assert not r["ds_config_optimizer"]
    # no gradient buffers, master copies or optimizer state (the probes do find them on the policy)
    assert r["training_state"] == []
    assert set(r["policy_training_state"]) == {"optimizer", "fp32_partitioned_groups_flat",
                                               "fp16_partitioned_groups_flat", "fp16_groups", "ipg_buckets",
                                               "grad_partitions_flat_buffer", "averaged_gradients"}
    assert r["requires_grad"] == 0 and r["grads"] == 0 and not r["training_mode"]
    assert r["offload_device"].endswith("cpu") and r["ref_partition_devices"] == ["cpu"]
    # loaded on its own: same architecture, nothing shared with the policy
    assert r["n_params"] == r["n_policy_params"] > 0
    assert r["shared_ds_ids"] == 0 and r["shared_storage"] == 0 and r["shared_modules"] == 0


def test_engines_never_deep_copy_a_model():
    """deepcopy of a ZeRO-3 model copies partitioned parameters' handles, not the weights: engines.py
    makes no deep copy at all (the reference is loaded on its own)."""
    tree = ast.parse((REPO / "sempa_dist" / "engines.py").read_text())
    copied = [ast.unparse(node.args[0]) for node in ast.walk(tree)
              if isinstance(node, ast.Call) and ast.unparse(node.func).endswith("deepcopy")]
    assert copied == []


def test_zero2_lora_trains_like_zero3_and_exports(tmp_path):
    """The same LoRA run (adapter-disabled reference) under ZeRO-2 and ZeRO-3: the same losses (only
    fp32 reduction order differs), and ZeRO-2's export reproduces its engine's probe log-probs."""
    args = ["configs/tiny_cpu.yaml", "train.max_steps=6", "train.save_every=0", "tracking.enabled=false",
            "model.lora.enabled=true", "ref.mode=adapter", "train.learning_rate=5e-3"]
    z2, z3 = tmp_path / "zero2", tmp_path / "zero3"
    sempa_train(*args, f"train.output_dir={z2}", "deepspeed.policy_config=ds_configs/zero2_lora.json")
    sempa_train(*args, f"train.output_dir={z3}", "train.export=false")
    a, b = metrics(z2), metrics(z3)
    assert a[0]["loss"] == pytest.approx(0.6931, abs=1e-3) and a[-1]["loss"] < a[0]["loss"] - 0.02
    for x, y in zip(a, b, strict=True):
        assert x["loss"] == pytest.approx(y["loss"], abs=1e-5), x["step"]
    assert_export_reproduces_probe(z2)
