"""bf16 training (the GPU default, model.dtype=auto) against the same run in fp32: 2-process ZeRO-3 on
CPU (gloo), the reference on its own offloaded ZeRO-3 engine (ref.mode=engine), for a LoRA policy and
for full fine-tuning.

What bf16 changes here: the model's weights, activations and the reference are bf16 (LoRA adapters stay
fp32: peft keeps adapter weights in fp32 over a bf16 base), the optimizer keeps fp32 master weights, and
the LM head's log-softmax runs in fp32 on the bf16 logits (sempa_dist.logprobs).

Step 1 is policy == reference in both dtypes, so its loss is exactly log 2 in both: the first step's
precision shows in its log-probs and gradient norm, and the loss first differs at step 2. The tiny random
model's logits are small (std 0.16, |z| < 0.7), so bf16 rounding (relative 2^-8 per logit) moves its
summed log-probs by ~1e-5 relative; tests/test_logprobs_bf16.py checks the LM head at realistic logits.

Tolerances: a small multiple (2.5-3x) of the largest difference measured over train.seed 1, 2 and 42.
"""

import math

import pytest

from tests.distributed import metrics, sempa_train

pytestmark = pytest.mark.slow

STEPS = 12
COMMON = ["configs/tiny_cpu.yaml", f"train.max_steps={STEPS}", "train.save_every=0", "train.export=false",
          "tracking.enabled=false", "ref.mode=engine"]
POLICIES = {  # lr: a loss drop of >= 0.05 (LoRA) / 0.08 (full) over 12 steps on every seed measured
    "lora": ["model.lora.enabled=true", "train.learning_rate=0.01"],
    "full": ["model.lora.enabled=false", "train.learning_rate=1e-3"],
}
# |mean loss of the last 5 steps, bf16 - fp32|; measured max over seeds 1, 2, 42: LoRA 1.0e-3, full 6.2e-5
LAST5_TOL = {"lora": 3e-3, "full": 2e-4}


@pytest.fixture(scope="module", params=sorted(POLICIES))
def runs(request, tmp_path_factory):
    """(policy kind, {dtype: metrics rows}): each run once per module."""
    kind = request.param
    out = {}
    for dtype in ("fp32", "bf16"):
        run_dir = tmp_path_factory.mktemp(f"{kind}_{dtype}") / "run"
        sempa_train(*COMMON, *POLICIES[kind], f"model.dtype={dtype}", f"train.output_dir={run_dir}")
        out[dtype] = metrics(run_dir)
    return kind, out


def last5(rows: list[dict]) -> float:
    return sum(r["loss"] for r in rows[-5:]) / 5


def test_bf16_first_steps_match_fp32(runs):
    _, r = runs
    f, b = r["fp32"][0], r["bf16"][0]
    # policy == reference at step 1, in either dtype: both exactly log 2 (measured difference 0)
    assert f["loss"] == pytest.approx(math.log(2), abs=1e-6) and b["loss"] == pytest.approx(f["loss"], abs=1e-6)
    # mean summed log-probs (~ -150..-180): measured max |bf16 - fp32| 1.1e-3 (chosen), 1.95e-3 (rejected)
    assert b["logps/chosen"] == pytest.approx(f["logps/chosen"], abs=5e-3)
    assert b["logps/rejected"] == pytest.approx(f["logps/rejected"], abs=5e-3)
    # gradient norm (clipped at 1.0 after it is logged): measured max relative difference 1.6e-3 (LoRA), 1.9e-3 (full)
    assert b["grad_norm"] == pytest.approx(f["grad_norm"], rel=5e-3)
    # the bf16 run did run in bf16 (an ignored model.dtype would give fp32's numbers to the last bit)
    assert (b["logps/chosen"], b["logps/rejected"], b["grad_norm"]) != (f["logps/chosen"], f["logps/rejected"], f["grad_norm"])
    # step 2, after one update: measured max |bf16 - fp32| loss 1.8e-4 (LoRA), 1.4e-4 (full)
    assert r["bf16"][1]["loss"] == pytest.approx(r["fp32"][1]["loss"], abs=5e-4)


def test_bf16_losses_finite_and_falling(runs):
    _, r = runs
    for dtype, rows in r.items():
        assert [x["step"] for x in rows] == list(range(1, STEPS + 1)), dtype
        assert all(math.isfinite(x["loss"]) and math.isfinite(x["grad_norm"]) for x in rows), dtype
        assert rows[-1]["skipped_steps"] == 0, dtype  # no step was dropped as non-finite
        # measured drop (first - mean of last 5) over seeds 1, 2, 42: >= 0.052 (LoRA), >= 0.079 (full), both dtypes
        assert last5(rows) < rows[0]["loss"] - 0.02, (dtype, rows[0]["loss"], last5(rows))


def test_bf16_run_tracks_fp32(runs):
    kind, r = runs
    assert last5(r["bf16"]) == pytest.approx(last5(r["fp32"]), abs=LAST5_TOL[kind])
