"""`sempa-train --check` (sempa_dist/check.py): everything short of training, on any machine, for every
shipped config; and bad data stops `sempa-train` with one line before any rank starts."""

from __future__ import annotations

import csv
import random
import sys
from pathlib import Path

import pytest

from sempa_dist.check import KNOWN_SHAPES, Shapes, memory_estimate
from sempa_dist.config import load_config
from tests.distributed import REPO, run

CONFIGS = sorted(p.name for p in (REPO / "configs").glob("*.yaml"))
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}  # as a laptop with no hub access


def check(*args: str, ok: bool = True):
    proc = run([sys.executable, "-m", "sempa_dist.cli.train", "--check", *args], timeout=300, env=OFFLINE, check=False)
    assert (proc.returncode == 0) == ok, proc.stdout + proc.stderr
    return proc


def simcse_csv(path: Path, rows: int, bad_row: int | None = None) -> Path:
    """SimCSE's nli_for_simcse.csv layout (sent0, sent1, hard_neg) with made-up sentences."""
    rng = random.Random(0)
    words = ["a", "man", "woman", "child", "dog", "plays", "runs", "sits", "reads", "in", "the", "park", "on", "a", "bench", "with", "friends"]
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["sent0", "sent1", "hard_neg"])
        for i in range(rows):
            row = [" ".join(rng.choices(words, k=rng.randint(4, 12))) + "." for _ in range(3)]
            w.writerow(row[:2] if i + 2 == bad_row else row)  # the file's line i + 2 (line 1: the header)
    return path


@pytest.mark.parametrize("name", CONFIGS)
def test_check_runs_on_every_shipped_config(name):
    cfg = load_config(REPO / "configs" / name)
    world = 64 if "8x8" in name else cfg.train.nproc
    out = check(f"configs/{name}", "--world-size", str(world)).stdout
    assert f"on {world} rank(s)" in out and "| ref.mode | GPU GiB | CPU GiB |" in out
    assert "runtime   here:" in out and "on GPUs:" in out
    if cfg.data.source in ("bundled", "snli"):  # data this machine has: read, tokenised, planned
        assert "data      " in out and "steps     " in out and "packing   " in out
    else:  # the hub from a laptop with no network: said, not a failure
        assert "note      data not read here" in out


def test_check_plans_the_paper_recipe_on_a_local_simcse_file(tmp_path):
    """The paper preset with its data as a local file and a tiny stand-in model (its tokenizer is
    reachable here): steps, tokens and micro-steps per rank for 4 ranks, the batch of 256."""
    data = simcse_csv(tmp_path / "nli_for_simcse.csv", 600)
    out = check("configs/paper_llama3_8b.yaml", "data.source=file", f"data.path={data}", "model.name=tiny-llama",
                "--world-size", "4").stdout
    assert "600 rows read, 600 kept" in out
    assert "steps     2 (2 per epoch), 256 examples and" in out
    assert "ZeRO-2 policy" in out


def test_check_refuses_a_world_size_the_batch_does_not_divide():
    proc = check("configs/paper_llama3_8b.yaml", "--world-size", "6", ok=False)
    assert "train.global_batch_size: 256 is not divisible by the world size 6" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("how", ["--check", "train"])
def test_a_bad_row_is_one_line_before_any_rank_starts(tmp_path, how):
    """A CSV row with a missing cell: the file and line, once, not a traceback from every rank."""
    data = simcse_csv(tmp_path / "bad.csv", 40, bad_row=3)
    args = ["configs/tiny_cpu.yaml", "data.source=file", f"data.path={data}", f"train.output_dir={tmp_path / 'run'}"]
    cmd = [sys.executable, "-m", "sempa_dist.cli.train", *(["--check"] if how == "--check" else []), *args]
    proc = run(cmd, timeout=300, env=OFFLINE, check=False)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if "bad.csv" in ln]
    assert len(lines) == 1 and lines[0].startswith("sempa-train: ") and "bad.csv:3:" in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "run" / "metrics.jsonl").exists()


def test_memory_estimate_moves_the_way_the_settings_say():
    """Properties, not the formula restated: ZeRO-2 keeps the weights whole (more than ZeRO-3 on many
    ranks), more ranks shard more, checkpointing trades activations away, LoRA trains less."""
    shape = KNOWN_SHAPES["meta-llama/Meta-Llama-3-8B-Instruct"]
    shapes = Shapes(params=8_030_261_248, layer_params=218_112_000, hidden=shape["hidden_size"],
                    layers=shape["num_hidden_layers"], vocab=shape["vocab_size"], lora_params=20_971_520, source="test")
    cfg = load_config(REPO / "configs" / "llama3_8b_8x8.yaml")

    def gpu(cfg, world=64, stage=3, mode="engine"):
        return memory_estimate(cfg, shapes, world, stage, bf16=True)[mode]["gpu_gib"]

    assert gpu(cfg, stage=2) > gpu(cfg, stage=3) and gpu(cfg, world=8) > gpu(cfg, world=64)
    ckpt = load_config(REPO / "configs" / "llama3_8b_8x8.yaml", ["model.gradient_checkpointing=true"])
    lora = load_config(REPO / "configs" / "llama3_8b_8x8.yaml", ["model.lora.enabled=true"])
    assert gpu(ckpt) < gpu(cfg) and gpu(lora) < gpu(cfg)
    assert gpu(lora, mode="engine") > gpu(lora, mode="adapter") > gpu(lora, mode="precomputed")
    assert "adapter" not in memory_estimate(cfg, shapes, 64, 3, bf16=True)  # no adapter to disable: no row
    on_gpu = load_config(REPO / "configs" / "llama3_8b_8x8.yaml", ["ref.offload=none"])
    assert gpu(on_gpu) > gpu(cfg)  # the reference's shard on the GPU instead of the host
    full = memory_estimate(cfg, shapes, 64, 3, bf16=True)["engine"]
    assert full["cpu_gib"] == pytest.approx(shapes.params * 2 / 64 / 2**30)  # the reference's shard, offloaded
    assert 5 < full["gpu_gib"] < 40  # an 8B full fine-tune on 64 GPUs: bench/SCALING.md's "room to spare"
