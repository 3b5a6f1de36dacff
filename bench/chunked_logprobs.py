"""Chunked vs full-logits response log-probs at a 49k vocabulary: peak memory and time, forward + backward.

    python bench/chunked_logprobs.py [--tokens 2048] [--vocab 49152] [--hidden 576] [--chunks 256 1024] [--repeats 3]

Both compute sum over response positions of log p(token) from hidden states [tokens, hidden] through an
LM head [vocab, hidden], then backward. "full" materialises [tokens, vocab] logits and log_softmax (the
textbook way); "chunked" is sempa_dist.logprobs. Two cases: a trainable head (full fine-tuning:
gradients for hidden states and head; the last chunk's softmax is kept for backward, the others are
recomputed there, each chunk's logit gradient is built in place and its weight gradient added into one
buffer) and a frozen head (LoRA, SemPA's usual setup: gradients for hidden states only; each chunk's
input gradient is taken in the forward). Each variant runs in a fresh subprocess;
its peak memory is the growth of the process's peak RSS over the baseline once the inputs exist.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

from cell import REPO  # also puts this checkout on sys.path for the sempa_dist import


def child(variant: str, tokens: int, vocab: int, hidden: int, chunk: int, repeats: int, frozen: bool) -> dict:
    import torch

    from sempa_dist.logprobs import chunked_token_logprobs

    torch.manual_seed(0)
    torch.set_num_threads(2)
    head = torch.nn.Linear(hidden, vocab, bias=False).requires_grad_(not frozen)
    h = torch.randn(tokens, hidden, requires_grad=True)
    ids = torch.randint(0, vocab, (tokens,))

    def full():
        logp = head(h).float().log_softmax(-1)
        return logp.gather(-1, ids[:, None]).sum()

    def chunked():
        return chunked_token_logprobs(h, ids, head, chunk).sum()

    fn = full if variant == "full" else chunked
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    times, value = [], 0.0
    for _ in range(repeats):
        h.grad = head.weight.grad = None  # each repeat is a step after zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        out = fn()
        out.backward()
        times.append(time.perf_counter() - t0)
        value = float(out)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    head_grad = float(head.weight.grad.norm()) if not frozen else 0.0
    return {"variant": variant, "frozen_head": frozen, "chunk": chunk if variant != "full" else None,
            "time_s": min(times), "peak_extra_mb": peak - base, "value": value,
            "grad_norm": float(h.grad.norm()), "head_grad_norm": head_grad}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--hidden", type=int, default=576)
    ap.add_argument("--chunks", type=int, nargs="+", default=[256, 1024])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=str(REPO / "bench" / "chunked_logprobs.json"))
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a.child[0], a.tokens, a.vocab, a.hidden, int(a.child[1]), a.repeats, a.child[2] == "1")))
        return
    results = []
    for frozen in ("0", "1"):
        for variant, chunk in [("full", 0), *[("chunked", c) for c in a.chunks]]:
            cmd = [sys.executable, __file__, "--child", variant, str(chunk), frozen, "--tokens", str(a.tokens),
                   "--vocab", str(a.vocab), "--hidden", str(a.hidden), "--repeats", str(a.repeats)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            results.append(json.loads(out.splitlines()[-1]))
            print(json.dumps(results[-1]), flush=True)
    print(f"\n{a.tokens} tokens, vocab {a.vocab}, hidden {a.hidden}, fp32, forward + backward (best of {a.repeats})\n")
    print("| head | variant | time (s) | time vs full | peak extra memory (MB) | memory vs full | same value & grads |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        full = next(x for x in results if x["variant"] == "full" and x["frozen_head"] == r["frozen_head"])
        same = (abs(r["value"] - full["value"]) <= 1e-3 * abs(full["value"])
                and abs(r["grad_norm"] - full["grad_norm"]) <= 1e-4 * full["grad_norm"]
                and abs(r["head_grad_norm"] - full["head_grad_norm"]) <= 1e-4 * max(full["head_grad_norm"], 1e-12))
        name = "full logits" if r["variant"] == "full" else f"chunked ({r['chunk']})"
        head = "frozen (LoRA)" if r["frozen_head"] else "trainable"
        print(f"| {head} | {name} | {r['time_s']:.3f} | {r['time_s'] / full['time_s']:.2f}x | {r['peak_extra_mb']:.0f} | "
              f"{r['peak_extra_mb'] / full['peak_extra_mb']:.2f}x | {same} |")
    Path(a.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
