"""Measured choice of attention kernel and prefix sharing (`model.attn_implementation: auto` with
`packing.prefix_sharing: auto`).

On a GPU the candidates pull two ways: flash-attn varlen is the fastest attention kernel but cannot
hide sibling responses, so it runs without prefix sharing (the prompt computed 1 + K times); flex
attention (or sdpa_varlen) masks siblings, so each prompt is computed once, on a slower kernel.
Which wins depends on the GPU, the model and the data (K, prompt vs response length), so it is
measured, not guessed: one decoder layer of the model's own shapes (random weights: time does not
depend on values) runs forward + backward on the run's first examples under each candidate, the
cheapest per example is taken. Every decoder layer is the same, and the LM head sees the same scored
tokens under every candidate, so one layer orders the candidates as the whole model would. Rank 0
measures and broadcasts: every rank must pack the same way. Where only one candidate exists (CPU:
sdpa_varlen with sharing, as flex has no CPU backward) nothing is measured.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from sempa_dist.attention import (
    FLEX_VARLEN,
    SDPA_VARLEN,
    attention_inputs,
    flash_attn_available,
    flex_backward_supported,
    resolve_attn_implementation,
)
from sempa_dist.models import resolve_model
from sempa_dist.packing import build_batch, example_tokens, resolve_prefix_sharing

Candidate = tuple[str, bool]  # (attention implementation, prefix sharing)


@dataclass
class Choice:
    impl: str
    sharing: bool
    seconds: dict[str, float] = field(default_factory=dict)  # per candidate label, one forward + backward

    def describe(self) -> str:
        chosen = label((self.impl, self.sharing))
        if not self.seconds:
            return f"attention: {chosen}"
        timed = ", ".join(f"{name} {1e3 * s:.1f} ms" for name, s in self.seconds.items())
        return f"attention: {chosen} (measured on one decoder layer, forward + backward: {timed})"


def label(c: Candidate) -> str:
    return f"{c[0]} + prefix sharing" if c[1] else c[0]


def candidates(attn_implementation: str, prefix_sharing: str, device_type: str) -> list[Candidate]:
    """What may run here. Anything but auto/auto on a GPU is decided by the config alone."""
    if attn_implementation != "auto" or prefix_sharing != "auto" or device_type != "cuda":
        impl = resolve_attn_implementation(attn_implementation)
        return [(impl, resolve_prefix_sharing(prefix_sharing, impl))]
    found = [("flash_attention_2", False)] if flash_attn_available() else []
    if flex_backward_supported("cuda"):
        found.append((FLEX_VARLEN, True))
    return [*found, (SDPA_VARLEN, True)]


def measure(model_path, examples: Sequence, options: Sequence[Candidate], device: torch.device,
            dtype: torch.dtype, repeats: int = 3) -> dict[str, float]:
    """Seconds of one forward + backward of one decoder layer over `examples` packed as each candidate
    packs them (the block mask / segment gathering included: they are per-step costs too)."""
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.from_pretrained(model_path)
    config.num_hidden_layers = 1
    if getattr(config, "layer_types", None):
        config.layer_types = config.layer_types[:1]
    seconds = {}
    for impl, sharing in options:
        torch.manual_seed(0)
        model = AutoModel.from_config(config, attn_implementation=impl, dtype=dtype).to(device).train()
        batch = build_batch(examples, "packed", prefix_sharing=sharing).to(device)
        emb = torch.randn(*batch.input_ids.shape, config.hidden_size, device=device, dtype=dtype)
        _forward_backward(model, batch, impl, emb)  # warm-up: kernels chosen, flex compiled
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(repeats):
            _forward_backward(model, batch, impl, emb)
        _sync(device)
        seconds[label((impl, sharing))] = (time.perf_counter() - t0) / repeats
        del model
    return seconds


def _forward_backward(model, batch, impl: str, emb: torch.Tensor) -> None:
    x = emb.detach().requires_grad_(True)
    kw = attention_inputs(batch, impl, emb.dtype)
    model(inputs_embeds=x, use_cache=False, **kw).last_hidden_state.float().square().mean().backward()


def choose(cfg, examples: Sequence, device: torch.device, dtype: torch.dtype) -> Choice:
    """This rank's choice for `cfg` (measured when there is more than one candidate)."""
    options = candidates(cfg.model.attn_implementation, cfg.packing.prefix_sharing, device.type)
    if len(options) == 1:
        return Choice(*options[0])
    sample = probe_examples(examples, cfg.packing.max_tokens)
    seconds = measure(resolve_model(cfg.model.name), sample, options, device, dtype)
    best = min(options, key=lambda c: seconds[label(c)])
    return Choice(best[0], best[1], seconds)


def probe_examples(examples: Sequence, max_tokens: int) -> list:
    """The run's first examples, as many as one micro-batch holds without sharing (the larger layout)."""
    taken, used = [], 0
    for ex in examples:
        n = example_tokens(ex, False)
        if taken and used + n > max_tokens:
            break
        taken.append(ex)
        used += n
    return taken


def choose_everywhere(cfg, examples: Sequence, device: torch.device, dtype: torch.dtype) -> Choice:
    """Rank 0 chooses, every rank gets its choice (the packing plan must agree across ranks)."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return choose(cfg, examples, device, dtype)
    box = [choose(cfg, examples, device, dtype) if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0, device=device if device.type == "cuda" else None)
    return box[0]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
