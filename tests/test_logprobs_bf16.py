"""The chunked LM head in bf16 against log_softmax of fp32 full logits.

The reference is computed from the SAME bf16-rounded weight and hidden states, upcast to fp32, so only
the head's own bf16 arithmetic is measured. Expected error: bf16 keeps 8 significant bits, so each
bf16 logit is off by up to 2^-8 ~ 0.4 % of its value (round to nearest); logprobs.py upcasts the logits
to fp32 before the log-softmax, so a token's log-prob z_t - logsumexp(z) is off by about 2^-8 times the
size of the logits that matter (the target's and the high-probability ones): <= 2^-8 * 17 ~ 0.07 at the
largest logits here (|z| up to ~17, realistic for a trained LM); measured: max 0.031. A target the
model thinks unlikely has a small logit and the smallest error (mean 0.0049, against 0.014 for argmax
targets); that is where a log-softmax taken in bf16 (logits not upcast) shows, as its error grows with
|log-prob| (half an ulp of -12..-24 is 0.03-0.06): measured mean 0.026-0.031 on the same seeds.
Gradients come from (onehot - softmax) rounded to bf16 and bf16 matmuls: ~2^-8 relative.
"""

import pytest
import torch

from sempa_dist.logprobs import chunked_token_logprobs

VOCAB, HIDDEN, TOKENS, CHUNK = 32768, 576, 160, 64  # SmolLM2's hidden size; chunks of 64, 64, 32 rows
LOGIT_SCALE = 3.0  # logits ~ N(0, 3^2): log-probs from about -0.4 (argmax targets) to -24

# |lp - ref|, measured (worst of seeds 0-3): max 0.031 over all tokens; mean 0.0142 over argmax targets,
# 0.0049 over random targets. A bf16 log-softmax measured 0.019-0.022 and 0.026-0.031 means: it fails.
LP_ATOL, LP_MEAN_ARGMAX, LP_MEAN_RANDOM = 0.07, 0.03, 0.012
# ||g - g_ref|| / ||g_ref||, measured (worst of seeds 0-3): hidden 0.0040 (frozen head), 0.0036 (trainable),
# weight 0.0036. Largest element error / largest |g_ref|: hidden 0.0070, weight 0.0086.
GRAD_REL, GRAD_ELEM = 1e-2, 2e-2


def bf16_case(seed: int, trainable: bool):
    g = torch.Generator().manual_seed(seed)
    head = torch.nn.Linear(HIDDEN, VOCAB, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.randn(VOCAB, HIDDEN, generator=g) * (LOGIT_SCALE / HIDDEN**0.5))
    head = head.to(torch.bfloat16).requires_grad_(trainable)
    hidden = torch.randn(TOKENS, HIDDEN, generator=g).to(torch.bfloat16).requires_grad_(True)
    with torch.no_grad():
        logits = hidden.float() @ head.weight.float().T
    # half the targets the most likely token (as in a trained LM's data), half anywhere in the vocab
    ids = torch.where(torch.arange(TOKENS) % 2 == 0, logits.argmax(-1), torch.randint(0, VOCAB, (TOKENS,), generator=g))
    weights = torch.randn(TOKENS, generator=g)  # d loss / d lp, as the preference loss gives
    return head, hidden, ids, weights


def lp_errors(lp: torch.Tensor, ref: torch.Tensor) -> tuple[float, float, float]:
    """(max |lp - ref|, its mean over the argmax targets (even rows), its mean over the random ones)."""
    err = (lp.detach() - ref.detach()).abs()
    return err.max().item(), err[0::2].mean().item(), err[1::2].mean().item()


def lp_within_tolerance(errors: tuple[float, float, float]) -> bool:
    return all(e <= tol for e, tol in zip(errors, (LP_ATOL, LP_MEAN_ARGMAX, LP_MEAN_RANDOM), strict=True))


def fp32_reference(hidden: torch.Tensor, head: torch.nn.Linear, ids: torch.Tensor, trainable: bool):
    """(log_softmax of fp32 full logits at ids, fp32 hidden, fp32 weight), from the bf16 values upcast."""
    h32 = hidden.detach().float().requires_grad_(True)
    w32 = head.weight.detach().float().requires_grad_(trainable)
    return (h32 @ w32.T).log_softmax(-1).gather(-1, ids[:, None]).squeeze(-1), h32, w32


def rel_err(got: torch.Tensor, want: torch.Tensor) -> tuple[float, float]:
    diff = got.float() - want
    return (diff.norm() / want.norm()).item(), (diff.abs().max() / want.abs().max()).item()


@pytest.mark.parametrize("trainable", [False, True], ids=["frozen_head", "trainable_head"])
def test_bf16_chunked_logprobs_and_grads_match_fp32_full_logits(trainable):
    head, hidden, ids, weights = bf16_case(0, trainable)
    ref, h32, w32 = fp32_reference(hidden, head, ids, trainable)
    (ref * weights).sum().backward()

    lp = chunked_token_logprobs(hidden, ids, head, CHUNK)
    (lp * weights).sum().backward()

    assert lp.dtype == torch.float32
    errors = lp_errors(lp, ref)
    assert lp_within_tolerance(errors), errors
    assert ref.min() < -15 and ref.max() > -1  # the spread a trained LM's targets have
    grads = [("hidden", hidden.grad, h32.grad)]
    if trainable:
        grads.append(("weight", head.weight.grad, w32.grad))
    else:
        assert head.weight.grad is None
    for name, got, want in grads:
        assert got is not None and got.dtype == torch.bfloat16, name
        norm_err, elem_err = rel_err(got, want)
        assert norm_err <= GRAD_REL and elem_err <= GRAD_ELEM, (name, norm_err, elem_err)


def test_the_tolerance_catches_a_bf16_log_softmax(monkeypatch):
    """The log-prob tolerances are tight enough to see the head's one precision decision: with the
    logits left in bf16 (no upcast before the log-softmax) the same case fails them."""
    import torch.nn.functional as F

    from sempa_dist import logprobs

    def bf16_softmax_chunk(h, ids, weight, bias):
        probs = F.linear(h, weight, bias)  # bf16, not upcast
        return logprobs._logprobs_and_softmax_(probs, ids).float(), probs

    head, hidden, ids, _ = bf16_case(0, trainable=False)
    ref = fp32_reference(hidden, head, ids, trainable=False)[0]
    with torch.no_grad():
        assert lp_within_tolerance(lp_errors(chunked_token_logprobs(hidden, ids, head, CHUNK), ref))
        monkeypatch.setattr(logprobs, "_softmax_chunk", bf16_softmax_chunk)
        errors = lp_errors(chunked_token_logprobs(hidden, ids, head, CHUNK), ref)
    assert not lp_within_tolerance(errors), errors
    assert errors[2] > 2 * LP_MEAN_RANDOM, errors  # measured 0.026: not a near miss
