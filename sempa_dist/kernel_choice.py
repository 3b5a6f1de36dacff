"""The run's attention kernel and prefix sharing, decided once at start (`model.attn_implementation`,
`packing.prefix_sharing`), then passed explicitly to the engines and the scorer and recorded with the run.

Every kernel can share prompts (attention.py), but whether sharing pays depends on the kernel: a
flash kernel is fast enough that encoding each prompt 1 + K times may cost less than gathering the
prompt's keys per response, and flex or the reference kernel pull the other way. Which wins depends
on the GPU, the model and the data (K, prompt vs response length), so on a GPU it is measured, not
guessed: one decoder layer of the model's own shapes (random weights: time does not depend on values)
runs forward + backward on the run's first examples under each candidate (kernel, sharing), and the
cheapest is taken. Every decoder layer is the same, and the LM head sees the same scored tokens under
every candidate, so one layer orders the candidates as the whole model would. A candidate that fails
(a dtype error, a Triton compile error, out of memory) is reported and skipped. Rank 0 measures and
broadcasts the choice (or its error): every rank must pack the same way. Elsewhere nothing is
measured: the first usable kernel, with sharing unless it is off (on a CPU sharing always wins:
bench/RESULTS.md).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from sempa_dist.attention import attention_inputs, resolve_attn_implementation, usable_implementations
from sempa_dist.models import resolve_model
from sempa_dist.packing import build_batch, example_tokens

Candidate = tuple[str, bool]  # (attention implementation, prefix sharing)


@dataclass(frozen=True)
class AttentionChoice:
    """The attention kernel and prefix sharing this run uses (a value: decided once, never written
    back into the config), with what was measured to decide it."""

    impl: str
    sharing: bool
    seconds: dict[str, float] = field(default_factory=dict)  # per candidate label, one forward + backward
    failed: dict[str, str] = field(default_factory=dict)  # per candidate label, why it could not run

    @property
    def label(self) -> str:
        return label((self.impl, self.sharing))

    def describe(self) -> str:
        """One line for the log."""
        if not self.seconds and not self.failed:
            return f"attention: {self.label}"
        timed = ", ".join(f"{name} {1e3 * s:.1f} ms" for name, s in self.seconds.items())
        failed = "".join(f"; {name} failed ({why})" for name, why in self.failed.items())
        return f"attention: {self.label} (measured on one decoder layer, forward + backward: {timed}{failed})"

    def record(self) -> dict:
        """What the run records: the values, and the measurement behind them."""
        return {"attn_implementation": self.impl, "prefix_sharing": self.sharing,
                "measured_s": dict(self.seconds), "failed": dict(self.failed)}


def label(c: Candidate) -> str:
    return f"{c[0]} + prefix sharing" if c[1] else c[0]


def candidates(attn_implementation: str, prefix_sharing: str, device_type: str, dtype: torch.dtype) -> list[Candidate]:
    """What may run here, in order of preference. More than one only on a GPU (then measured)."""
    if attn_implementation == "auto":
        impls = usable_implementations(device_type, dtype)
    else:
        impls = [resolve_attn_implementation(attn_implementation, device_type, dtype)]
    sharing = [True, False] if prefix_sharing == "auto" else [prefix_sharing == "on"]
    found = [(impl, share) for impl in impls for share in sharing]
    return found if device_type == "cuda" else found[:1]


def measure(model_path, examples: Sequence, options: Sequence[Candidate], device: torch.device,
            dtype: torch.dtype, repeats: int = 3) -> tuple[dict[str, float], dict[str, str]]:
    """(seconds, failures): one forward + backward of one decoder layer over `examples` packed as each
    candidate packs them (the layout building included: a per-step cost too). A candidate that
    raises is recorded in failures with its error and skipped; the others still run."""
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.from_pretrained(model_path)
    config.num_hidden_layers = 1
    if getattr(config, "layer_types", None):
        config.layer_types = config.layer_types[:1]
    seconds: dict[str, float] = {}
    failed: dict[str, str] = {}
    for impl, sharing in options:
        model = None
        try:
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
        except Exception as e:  # noqa: BLE001 - any kernel failure disqualifies that candidate only
            first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
            failed[label((impl, sharing))] = f"{type(e).__name__}: {first}"
        finally:
            del model
            if device.type == "cuda":
                torch.cuda.empty_cache()  # an out-of-memory candidate must not starve the next
    return seconds, failed


def _forward_backward(model, batch, impl: str, emb: torch.Tensor) -> None:
    x = emb.detach().requires_grad_(True)
    kw = attention_inputs(batch, impl, emb.dtype)
    model(inputs_embeds=x, use_cache=False, **kw).last_hidden_state.float().square().mean().backward()


def choose(cfg, examples: Sequence, device: torch.device, dtype: torch.dtype) -> AttentionChoice:
    """This rank's choice for `cfg` (measured when there is more than one candidate). RuntimeError when
    every candidate failed."""
    options = candidates(cfg.model.attn_implementation, cfg.packing.prefix_sharing, device.type, dtype)
    if len(options) == 1:
        return AttentionChoice(*options[0])
    sample = probe_examples(examples, cfg.packing.max_tokens)
    seconds, failed = measure(resolve_model(cfg.model.name), sample, options, device, dtype)
    ran = [c for c in options if label(c) in seconds]
    if not ran:
        raise RuntimeError("model.attn_implementation: every candidate kernel failed on this machine: "
                           + "; ".join(f"{name}: {why}" for name, why in failed.items()))
    best = min(ran, key=lambda c: seconds[label(c)])
    return AttentionChoice(best[0], best[1], seconds, failed)


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


def choose_everywhere(cfg, examples: Sequence, device: torch.device, dtype: torch.dtype) -> AttentionChoice:
    """Rank 0 chooses, every rank gets its choice (the packing plan must agree across ranks). A failure
    on rank 0 is broadcast too, so every rank raises it instead of waiting in the broadcast."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return choose(cfg, examples, device, dtype)
    box: list = [None]
    error: Exception | None = None
    if dist.get_rank() == 0:
        try:
            box[0] = choose(cfg, examples, device, dtype)
        except Exception as e:  # noqa: BLE001 - its message goes to the peers, then it is raised here
            error, box[0] = e, f"{type(e).__name__}: {e}"
    dist.broadcast_object_list(box, src=0, device=device if device.type == "cuda" else None)
    if error is not None:
        raise error
    if isinstance(box[0], str):
        raise RuntimeError(f"rank 0 could not choose the attention kernel: {box[0]}")
    return box[0]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
