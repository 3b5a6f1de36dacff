"""The SemPA training loop. Reads top to bottom:

config -> data -> packing plan -> engines -> log-probs -> loss -> step -> checkpoint -> export.

Run with a launcher (torchrun, deepspeed, srun) as ``python -m sempa_dist.train CONFIG [k=v ...]``
or through ``sempa-train``, which also spawns the processes itself on one machine.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import resource
import sys
import time
import warnings
from pathlib import Path
from typing import Any, NoReturn

import torch
import yaml

from sempa_dist import checkpoint, tracking
from sempa_dist.config import Config, ConfigError, load_config
from sempa_dist.data import DataError, load_triplets, tokenize_triplets
from sempa_dist.distributed import DistInfo, all_reduce_sum, barrier, init_distributed, shutdown_distributed
from sempa_dist.engines import build_policy, build_reference, training_dtype
from sempa_dist.fileio import write_atomic
from sempa_dist.kernel_choice import choose_everywhere
from sempa_dist.loss import preference_loss
from sempa_dist.models import load_tokenizer
from sempa_dist.packing import build_batch, example_tokens, plan_step
from sempa_dist.phase_times import PhaseTimer, phase_timing_enabled
from sempa_dist.preemption import Preempted, PreemptionFlag
from sempa_dist.preflight import preflight
from sempa_dist.watchdog import Heartbeat, describe_silent, silent_ranks

METRICS = ["loss", "rewards/chosen", "rewards/rejected", "rewards/margin", "rewards/accuracy", "logps/chosen", "logps/rejected"]
# slots after the metric sums in the per-step all-reduce
REAL_TOKENS, TOTAL_TOKENS, EXAMPLES, PREEMPT = range(len(METRICS), len(METRICS) + 4)


def prepare_data(cfg: Config, dist: DistInfo):
    """Triplets -> tokenised examples. Rank 0 goes first so the others reuse its tokenisation cache."""
    tokenizer = load_tokenizer(cfg.model.name) if dist.is_main else None
    if not dist.is_main:
        barrier()
        tokenizer = load_tokenizer(cfg.model.name)
    triplets, load_report = load_triplets(cfg.data, seed=cfg.train.seed)
    examples, tok_report = tokenize_triplets(triplets, tokenizer, cfg.data)
    if dist.is_main:
        barrier()
    return tokenizer, examples, load_report, tok_report


class NonFiniteError(RuntimeError):
    """Training stopped on a non-finite loss or gradient norm (train.on_nonfinite)."""


class NonFiniteSteps:
    """Steps whose loss or gradient norm was NaN/inf. DeepSpeed never applies such a step (its global
    gradient-norm check skips it; the loop turns a non-finite loss into NaN gradients so it does): this
    counts them, says so, and decides whether training goes on."""

    def __init__(self, policy: str, max_consecutive: int, total: int = 0, log=None) -> None:
        self.policy, self.max_consecutive, self.total, self.log = policy, max_consecutive, total, log
        self.streak, self.must_stop, self.last = 0, False, ""

    def record(self, step: int, nonfinite: bool, applied: bool, loss: float, grad_norm: float) -> None:
        if not nonfinite:
            self.streak = 0
            return
        if applied:  # the weights took a NaN/inf update: nothing later can be trusted
            raise NonFiniteError(f"step {step}: DeepSpeed applied an update with loss {loss} and gradient norm "
                                 f"{grad_norm}; this DeepSpeed version does not skip non-finite steps")
        self.total += 1
        self.streak += 1
        self.last = f"step {step}: loss {loss}, gradient norm {grad_norm}: update not applied"
        self.must_stop = self.policy == "stop" or self.streak >= self.max_consecutive
        if self.log and not self.must_stop:
            self.log(f"warning: {self.last} (train.on_nonfinite=skip; {self.total} skipped so far)", flush=True)

    def reason(self, out_dir: Path) -> str:
        why = ("train.on_nonfinite=stop" if self.policy == "stop"
               else f"{self.streak} non-finite steps in a row (train.max_consecutive_skips)")
        return f"{self.last}; stopping ({why}); {checkpoint.resume_hint(out_dir)}"


@functools.lru_cache(maxsize=2)  # called every step; the permutation changes only once per epoch
def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """Example order of one epoch: a function of seed and epoch only, never of the world size."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def quiet_library_warnings() -> None:
    """DeepSpeed calls torch collectives torch has renamed: one FutureWarning per call floods the log."""
    warnings.filterwarnings("ignore", message=r".*is deprecated\. Please use `torch\.distributed", category=FutureWarning)


def truncate_metrics(out_dir: Path, step: int) -> None:
    """Drop metrics.jsonl / eval.jsonl rows past `step`, where this run (re)starts: a resumed run
    redoes them, and a fresh run (step 0) in an old run directory must not append to its history."""
    for name in ("metrics.jsonl", "eval.jsonl"):
        path = out_dir / name
        if path.is_file():
            keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= step]
            path.write_text("".join(ln + "\n" for ln in keep))


@torch.no_grad()
def evaluate_policy(policy, tokenizer, cfg: Config, dist: DistInfo, tasks: list[str]) -> dict[str, float]:
    """STS Spearman of the policy as it is now, on the ZeRO-3 engine itself. Collective: sentences
    are sharded over ranks and every rank runs the same forwards, so the parameter gathers line up."""
    from sempa_dist.eval import Encoder, evaluate_sts

    was_training = policy.training
    policy.eval()
    e = cfg.eval
    encoder = Encoder(policy.module.hidden_states, tokenizer, e.prompt, e.pooling, e.normalize, e.batch_size,
                      dist.device, show_progress=dist.is_main)
    scores = evaluate_sts(encoder.encode, tasks, max_pairs=e.max_pairs)
    policy.train(was_training)
    return scores


def log_eval(out_dir: Path, dist: DistInfo, tracker, step: int, scores: dict[str, float], prefix: str = "sts") -> None:
    if dist.is_main:
        with open(out_dir / "eval.jsonl", "a") as fh:
            fh.write(json.dumps({"step": step, prefix: scores}) + "\n")
        tracker.log_metrics({f"{prefix}/{k}": v for k, v in scores.items()}, step=step)


def train(cfg: Config) -> dict[str, Any]:
    """Train as configured; every rank calls it. Returns the run summary."""
    quiet_library_warnings()
    dist = init_distributed(cfg.deepspeed.timeout_s)
    cfg.validate(world_size=dist.world_size)
    # MLflow run on rank 0 (a no-op elsewhere): leaving the block ends it FINISHED or FAILED, or, when
    # preempted, leaves it RUNNING for the requeued job to continue
    with tracking.start(cfg, dist, kind="train") as tracker:
        try:
            summary = run_training(cfg, dist, tracker)
        except Exception as e:
            # bad data or config and our own stop are this rank's doing; any other error may be a dead or
            # frozen peer (gloo and NCCL word a peer's failure many ways): read the heartbeats
            if dist.world_size > 1 and not isinstance(e, ConfigError | DataError | NonFiniteError):
                report_failure(e, cfg, dist)
            raise
    shutdown_distributed()
    return summary


def report_failure(e: Exception, cfg: Config, dist: DistInfo) -> None:
    """This rank failed, perhaps because a peer died or froze (a collective error or timeout): name
    the ranks whose heartbeat stopped, and where to resume."""
    out_dir = Path(cfg.train.output_dir)
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    print(f"rank {dist.rank} failed ({type(e).__name__}: {first}); {describe_silent(silent_ranks(out_dir, dist.world_size))}; "
          f"{checkpoint.resume_hint(out_dir)}", file=sys.stderr, flush=True)


def run_training(cfg: Config, dist: DistInfo, tracker: tracking.NullTracker) -> dict[str, Any]:
    out_dir = Path(cfg.train.output_dir)
    preflight(cfg)  # every rank: under a launcher, sempa-train's own check may not have run
    heartbeat = Heartbeat(out_dir, dist.rank, dist.world_size, timeout_s=cfg.deepspeed.timeout_s,  # watchdog.py:
                          hint=lambda: checkpoint.resume_hint(out_dir))  # names a rank that dies or freezes
    if dist.is_main:
        (out_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    t_start = time.time()

    # data
    tokenizer, examples, load_report, tok_report = prepare_data(cfg, dist)
    tracker.log_dataset(load_report, tok_report)
    B = cfg.train.global_batch_size
    steps_per_epoch = len(examples) // B
    if not examples:  # every row dropped while tokenising (e.g. data.max_length shorter than the prompt)
        raise DataError(f"{load_report.source}: all {tok_report.dropped_overlong} examples are longer than "
                        f"data.max_length={cfg.data.max_length} tokens and were dropped (data.overlong=drop): "
                        "raise data.max_length or use data.overlong=truncate")
    if steps_per_epoch == 0:
        raise ValueError(f"train.global_batch_size: {B} is larger than the dataset ({len(examples)} examples)")
    total_steps = cfg.train.max_steps or max(1, math.ceil(cfg.train.num_epochs * steps_per_epoch))
    # values decided at run time, once: the training dtype, the attention kernel and prefix sharing
    # (each prompt encoded once for its 1 + K responses; on a GPU measured). They are passed to the
    # engines and the scorer explicitly and recorded with the run; the config keeps what was asked.
    dtype = training_dtype(cfg, dist.device.type)
    attn = choose_everywhere(cfg, examples, dist.device, dtype)
    resolved = {"device": dist.device.type, "dtype": str(dtype).removeprefix("torch."), **attn.record()}
    if dist.is_main:
        print(attn.describe(), flush=True)
        write_atomic(out_dir / "resolved.yaml", yaml.safe_dump(resolved, sort_keys=False))
    tracker.set_tags({"attention": attn.label})
    tracker.log_params({f"resolved.{k}": v for k, v in resolved.items() if k in ("device", "dtype", "attn_implementation",
                                                                             "prefix_sharing")})
    shared = attn.sharing
    sizes = [example_tokens(ex, shared) for ex in examples]

    # resume point, chosen before the engines: a checkpoint written on another world size is loaded
    # through DeepSpeed's universal format (converted once by rank 0), which the policy's DeepSpeed
    # config must enable when the engine is built
    resume_from = checkpoint.find_resume(cfg.train.resume, out_dir)
    universal = checkpoint.needs_universal(resume_from, dist.world_size)
    if universal:
        checkpoint.prepare_universal(resume_from, dist)

    # engines
    policy, ds_config = build_policy(cfg, dist, total_steps, attn, dtype, load_universal=universal)
    reference = build_reference(cfg, dist, policy, examples, tok_report.fingerprint, attn, dtype)
    tracker.log_dict("deepspeed.json", {"policy": ds_config, "reference": getattr(reference, "ds_config", None)})

    # resume
    start_step, state = 0, {}
    if resume_from is not None:
        state = checkpoint.load(policy, resume_from, universal=universal)
        start_step = state["step"]
        checkpoint.restore_rng(state, dist.device)
        if dist.is_main:
            how = f" (written by {state.get('world_size', '?')} ranks: loaded through its universal conversion)" if universal else ""
            print(f"resumed from {resume_from} at step {start_step}{how}", flush=True)
    if dist.is_main:
        truncate_metrics(out_dir, start_step)
    skips = NonFiniteSteps(cfg.train.on_nonfinite, cfg.train.max_consecutive_skips, state.get("skipped_steps", 0),
                           log=print if dist.is_main else None)

    from tqdm import tqdm

    preemption = PreemptionFlag()
    timer = PhaseTimer(phase_timing_enabled(cfg.train.phase_times, dist.device), dist.device)
    bar = tqdm(total=total_steps, initial=start_step, disable=not dist.is_main, desc="train", dynamic_ncols=True)
    history: list[dict[str, float]] = []
    policy.train()
    for step in range(start_step, total_steps):
        heartbeat.step = step + 1
        t0 = time.time()
        epoch, pos = divmod(step, steps_per_epoch)
        ids = epoch_order(len(examples), cfg.train.seed, epoch)[pos * B : (pos + 1) * B]
        plan = plan_step([sizes[i] for i in ids], dist.world_size, cfg.packing.max_tokens)[dist.rank]
        sums = torch.zeros(len(METRICS) + 4, dtype=torch.float64)
        timer.start()
        for m, micro in enumerate(plan):
            batch = build_batch([examples[ids[j]] for j in micro], cfg.packing.layout, tokenizer.pad_token_id, shared)
            batch = batch.to(dist.device)
            policy.set_gradient_accumulation_boundary(m == len(plan) - 1)
            timer.resume()
            out = policy(batch)
            timer.mark("policy_forward")
            ref_sums, ref_counts = reference.logps(batch)
            timer.mark("reference")
            k1 = batch.responses_per_example
            pol, ref = out.sums.view(-1, k1), ref_sums.to(out.sums).view(-1, k1)
            if cfg.loss.type == "ipo":  # IPO scores length-normalised log-probs
                pol = pol / out.counts.view(-1, k1).clamp(min=1)
                ref = ref / ref_counts.to(ref).view(-1, k1).clamp(min=1)
            losses, metrics = preference_loss(pol, ref, cfg.loss.beta, cfg.loss.type, cfg.loss.label_smoothing)
            # mean over the GLOBAL batch: DeepSpeed averages gradients over ranks, so scale by world / B
            loss = losses.sum() * (dist.world_size / B) + out.anchor
            if not torch.isfinite(loss):
                # an inf loss can have finite gradients (e.g. a -inf reference log-prob): make them NaN so
                # DeepSpeed's non-finite gradient-norm check, global over ranks, drops the step everywhere
                loss = loss * float("nan")
            policy.backward(loss, scale_wrt_gas=False)
            timer.mark("backward")
            with torch.no_grad():
                sums[0] += losses.sum().item()
                for j, name in enumerate(METRICS[1:], 1):
                    sums[j] += metrics[name].sum().item()
                sums[REAL_TOKENS] += batch.real_tokens if micro else 0
                sums[TOTAL_TOKENS] += batch.total_tokens
                sums[EXAMPLES] += batch.num_examples
        timer.resume()
        policy.step()
        timer.mark("optimizer")
        applied = policy.was_step_applied()
        grad_norm = policy.get_global_grad_norm()
        grad_norm = float("nan") if grad_norm is None else float(grad_norm)
        sums[PREEMPT] = float(preemption.requested is not None)
        totals = all_reduce_sum(sums.to(dist.device)).cpu()
        dt = time.time() - t0
        row = {name: float(totals[j] / totals[EXAMPLES]) for j, name in enumerate(METRICS)}
        row.update({
            "step": step + 1, "lr": policy.get_lr()[0], "grad_norm": grad_norm,
            "tokens_per_s": float(totals[REAL_TOKENS] / dt),
            "pad_fraction": float(1 - totals[REAL_TOKENS] / totals[TOTAL_TOKENS]),
            "step_time_s": dt, "micro_steps": len(plan), "peak_rss_mb": peak_rss_mb(),
            **({"peak_device_mb": torch.cuda.max_memory_allocated(dist.device) / 2**20} if dist.device.type == "cuda" else {}),
            **timer.seconds(),  # rank 0's
        })
        nonfinite = not (math.isfinite(row["loss"]) and math.isfinite(grad_norm))
        skips.record(step + 1, nonfinite, applied, row["loss"], grad_norm)
        row["skipped_steps"] = skips.total
        history.append(row)
        bar.set_postfix(loss=f"{row['loss']:.4f}", acc=f"{row['rewards/accuracy']:.2f}", tok_s=f"{row['tokens_per_s']:.0f}")
        bar.update(1)
        if dist.is_main and (step + 1) % cfg.train.log_every == 0:
            with open(out_dir / "metrics.jsonl", "a") as fh:
                fh.write(json.dumps(row) + "\n")
            tracker.log_metrics(row, step=step + 1)
        if skips.must_stop:  # logged first: the failing step is in metrics.jsonl and MLflow
            raise NonFiniteError(skips.reason(out_dir))
        last = step + 1 == total_steps
        if cfg.eval.every and ((step + 1) % cfg.eval.every == 0 or last):
            scores = evaluate_policy(policy, tokenizer, cfg, dist, cfg.eval.tasks)
            log_eval(out_dir, dist, tracker, step + 1, scores)
            row.update({f"sts/{k}": v for k, v in scores.items()})
        preempted = totals[PREEMPT] > 0  # every rank sees the same sum, so all stop at this step
        if last or preempted or (cfg.train.save_every and (step + 1) % cfg.train.save_every == 0):
            state = {"step": step + 1, "epoch": epoch, "world_size": dist.world_size,
                     "examples_seen": (step + 1) * B, **checkpoint.rng_state(dist.device),
                     "mlflow_run_id": tracker.run_id, "skipped_steps": skips.total}
            tag_dir = checkpoint.save(policy, out_dir, step + 1, state, dist, cfg.train.keep_checkpoints)
        if preempted and not last:
            bar.close()
            if dist.is_main:
                print(f"preemption signal: checkpoint at step {step + 1} saved, exiting for requeue", flush=True)
                (out_dir / "PREEMPTED").write_text(json.dumps({"step": step + 1, "time": time.time()}) + "\n")
            raise Preempted(step + 1)
    bar.close()
    preemption.restore()
    if dist.is_main:
        (out_dir / "PREEMPTED").unlink(missing_ok=True)  # this run went to its end

    # log-probs of a fixed probe batch under the final policy: `sempa-export` output must reproduce them
    policy.eval()
    probe = build_batch(examples[:4], cfg.packing.layout, tokenizer.pad_token_id, shared).to(dist.device)
    with torch.no_grad():
        probe_sums = policy(probe).sums.float().cpu().tolist()

    final_sts = evaluate_policy(policy, tokenizer, cfg, dist, cfg.eval.final_tasks) if cfg.eval.final_tasks else {}
    if final_sts:
        log_eval(out_dir, dist, tracker, total_steps, final_sts, prefix="final_sts")

    summary: dict[str, Any] = {
        "final": history[-1] if history else {},
        "steps": total_steps, "start_step": start_step, "world_size": dist.world_size,
        "examples": len(examples), "data": {"load": load_report.__dict__, "tokenize": tok_report.__dict__},
        "time_s": time.time() - t_start, "config": cfg.to_dict(), "resolved": resolved,
        "probe": {"example_ids": probe.example_ids, "sums": probe_sums}, "mlflow_run_id": tracker.run_id,
        "final_sts": final_sts,
    }
    if dist.is_main and cfg.train.export and history:
        summary["export"] = str(checkpoint.export(tag_dir, out_dir / "export", cfg, cfg.train.merge_lora))
    barrier()
    if dist.is_main:
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
        tracker.log_summary(summary)
    heartbeat.close()
    return summary


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # the deepspeed launcher inserts --local_rank=N (LOCAL_RANK is in the environment anyway)
    argv = [a for a in argv if not a.startswith("--local_rank")]
    path = argv[0] if argv and "=" not in argv[0] else None
    overrides = argv[1:] if path else argv
    cfg = load_config(path, overrides).validate(world_size=int(os.environ["WORLD_SIZE"]) if "WORLD_SIZE" in os.environ else None)
    return run(cfg)


def run(cfg: Config) -> int:
    """`train(cfg)` as a process exit code: 0; 75 after a preemption checkpoint (the Slurm script
    requeues on it); or 1 after a non-finite stop (one line from rank 0 instead of the same traceback
    from every rank; the Slurm script does not requeue on it)."""
    try:
        train(cfg)
    except Preempted as e:
        return e.code
    except NonFiniteError as e:
        if os.environ.get("RANK", "0") == "0":
            print(f"sempa-train: {e}", file=sys.stderr, flush=True)
        return 1
    return 0


def exit_rank(code: int) -> NoReturn:
    """Leave a rank process without the interpreter's teardown. There, a native thread of the
    torch.distributed / gloo stack now and then aborts the process ("terminate called without an
    active exception", SIGABRT) after all the work is done and saved: seen in CI after a preemption
    checkpoint, which turned a clean requeue (75) into a failed job. Everything of the run is on disk
    and the MLflow run closed by now; stdio and logging are flushed here."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    exit_rank(main())
