"""Checkpoint state a resumed run needs beyond the weights (sempa_dist/checkpoint.py)."""

import pytest
import torch

from sempa_dist.checkpoint import restore_rng, rng_state


def draws(device: torch.device) -> torch.Tensor:
    return torch.cat([torch.rand(4), torch.rand(4, device=device).cpu()])


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="the CUDA generator needs a GPU (bench/gpu_check.py checks it there)"))])
def test_rng_state_round_trip_continues_the_same_random_stream(device):
    device = torch.device(device)
    torch.manual_seed(3)
    state = rng_state(device)
    assert set(state) == ({"torch_rng", "cuda_rng"} if device.type == "cuda" else {"torch_rng"})
    expected = draws(device)
    torch.manual_seed(99)  # anything in between
    draws(device)
    restore_rng(state, device)
    assert torch.equal(draws(device), expected)


def test_a_gpu_checkpoint_resumes_on_cpu():
    """A state with a CUDA generator restores the CPU one on a CPU run and ignores the other."""
    torch.manual_seed(5)
    state = {**rng_state(torch.device("cpu")), "cuda_rng": [0] * 16}
    expected = torch.rand(3)
    restore_rng(state, torch.device("cpu"))
    assert torch.equal(torch.rand(3), expected)


# ----------------------------------------------------------------------------------------------
# eval.select_best, with real 2-process runs (tiny model, STS-B dev subset)


@pytest.mark.slow
def test_select_best_keeps_exports_and_resumes_the_best_checkpoint(tmp_path):
    """Scored at every scheduled save; the best survives pruning (keep_checkpoints=1), is exported to
    export/ (the last to export-last/), is named in summary.json, and a resumed run on another world
    size keeps it."""
    import json

    from sempa_dist.checkpoint import checkpoint_root
    from sempa_dist.eval.sts import data_available
    from tests.distributed import sempa_train

    if not data_available():
        pytest.skip("STS data not found (SEMPA_DATA_DIR)")
    out = tmp_path / "run"
    common = ["configs/tiny_cpu.yaml", f"train.output_dir={out}", "train.save_every=2", "train.keep_checkpoints=1",
              "eval.select_best=stsb-dev", "eval.max_pairs=40", "tracking.enabled=false", "train.learning_rate=3e-3"]
    sempa_train(*common, "train.max_steps=4")
    sempa_train(*common, "train.max_steps=8", "train.resume=auto", "train.nproc=1")  # resumed on 1 rank
    rows = [json.loads(line) for line in (out / "eval.jsonl").read_text().splitlines()]
    assert all("sts" not in r for r in rows)  # select_best's own scoring is not the eval.every average
    scores = {r["step"]: r["select_best"]["stsb-dev"] for r in rows}
    assert sorted(scores) == [2, 4, 6, 8]  # every scheduled save scored, once, across the restart
    best_step = max(scores, key=lambda s: scores[s])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["best"] == {"task": "stsb-dev", "step": best_step, "score": scores[best_step],
                               "checkpoint": f"step-{best_step:06d}"}
    kept = sorted(p.name for p in checkpoint_root(out).iterdir() if p.is_dir())
    assert kept == sorted({f"step-{best_step:06d}", "step-000008"})  # the best survives keep_checkpoints=1
    assert (out / "export-last" / "config.json").is_file() == (best_step != 8)
    from sempa_dist.eval import Encoder, evaluate_sts

    exported = evaluate_sts(Encoder.from_pretrained(out / "export").encode, ["stsb-dev"], max_pairs=40)["stsb-dev"]
    assert exported == pytest.approx(scores[best_step], abs=1e-3)  # export/ is the best checkpoint's model
