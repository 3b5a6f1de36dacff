"""SemPA preference losses on implicit rewards r(y) = beta * (log pi(y|x) - log pi_ref(y|x)).

Inputs are per-example summed response log-probs of shape [E, 1 + K] (column 0 the chosen
response, columns 1..K the rejected ones) and, for IPO, the responses' token counts.

- ``plackett_luce``: -log softmax([r+, r1, ..., rK])[0], the probability that the chosen one is
  ranked first (Plackett-Luce with the chosen response first: Rafailov et al. 2023, appendix A.3;
  an InfoNCE loss whose similarity is the implicit reward). For K = 1 this is exactly DPO's
  -log sigmoid(r+ - r1).
- ``dpo``: -log sigmoid(r+ - r_k), with conservative label smoothing eps:
  -(1 - eps) log sigmoid(m) - eps log sigmoid(-m)   (Rafailov et al. 2023; cDPO). For K > 1 the
  K pairwise losses are averaged.
- ``ipo``: (h - 1 / (2 beta))^2 with h = (log pi+ - log pi_k) - (log pi_ref+ - log pi_ref_k)
  (Azar et al. 2023, eq. 17), averaged over k. As in the IPO paper's practice (and TRL), the
  log-probs are length-normalised: divided by their response's token count, here.

The metrics come back by name, one value per example; the training loop sums and logs whatever is
returned, so a metric added here reaches metrics.jsonl and MLflow with no other change.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def preference_loss(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    beta: float,
    loss_type: str = "dpo",
    label_smoothing: float = 0.0,
    counts: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-example losses [E] and per-example metrics by name (each [E]) for chosen-vs-K-rejected.

    `policy_logps`, `ref_logps`: summed response log-probs [E, 1 + K]; `counts`: the responses' token
    counts [E, 1 + K], required by ipo (which scores length-normalised log-probs; the metrics then
    report those too)."""
    if policy_logps.shape != ref_logps.shape or policy_logps.dim() != 2 or policy_logps.shape[1] < 2:
        raise ValueError(f"expected [examples, 1 + K] log-probs, got {tuple(policy_logps.shape)} and {tuple(ref_logps.shape)}")
    if loss_type == "ipo":
        if counts is None or counts.shape != policy_logps.shape:
            raise ValueError(f"ipo needs the responses' token counts of shape {tuple(policy_logps.shape)}, got "
                             f"{None if counts is None else tuple(counts.shape)}")
        lengths = counts.to(policy_logps).clamp(min=1)
        policy_logps, ref_logps = policy_logps / lengths, ref_logps / lengths
    logratios = policy_logps - ref_logps.detach()  # [E, 1+K]
    rewards = beta * logratios
    if loss_type == "plackett_luce":
        losses = -torch.log_softmax(rewards, dim=1)[:, 0]
    elif loss_type == "dpo":
        margin = rewards[:, :1] - rewards[:, 1:]  # [E, K]
        losses = (-(1 - label_smoothing) * F.logsigmoid(margin) - label_smoothing * F.logsigmoid(-margin)).mean(1)
    elif loss_type == "ipo":
        h = logratios[:, :1] - logratios[:, 1:]
        losses = ((h - 1 / (2 * beta)) ** 2).mean(1)
    else:
        raise ValueError(f"unknown loss type {loss_type!r}")
    r = rewards.detach()
    chosen, rejected = r[:, 0], r[:, 1:]
    metrics = {
        "rewards/chosen": chosen,
        "rewards/rejected": rejected.mean(1),
        "rewards/margin": chosen - rejected.mean(1),
        "rewards/accuracy": (chosen[:, None] > rejected).all(1).float(),
        "logps/chosen": policy_logps.detach()[:, 0],
        "logps/rejected": policy_logps.detach()[:, 1:].mean(1),
    }
    return losses, metrics
