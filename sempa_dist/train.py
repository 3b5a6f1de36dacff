"""The SemPA training recipe. `train` reads top to bottom:

    run = setup(...)                   config -> data -> runtime choices -> resume point -> engines
    for step in ...:
        row = train_step(run, step)    packing plan -> log-probs -> loss -> backward -> optimizer step
        after_step(run, row)           log -> non-finite stop -> evaluate -> best -> checkpoint -> preemption
    finish(run)                        probe -> final evaluation -> export -> summary

Run with a launcher (torchrun, deepspeed, srun) as ``python -m sempa_dist.train CONFIG [k=v ...]``
or through ``sempa-train``, which also spawns the processes itself on one machine.
"""

from __future__ import annotations

import json
import logging
import math
import os
import resource
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import torch
import yaml

from sempa_dist import checkpoint, tracking
from sempa_dist.config import Config, ConfigError, load_config
from sempa_dist.data import DataError
from sempa_dist.data.prepare import prepare_data
from sempa_dist.distributed import DistInfo, all_reduce_sum, barrier, init_distributed, shutdown_distributed
from sempa_dist.engines import build_policy, build_reference, training_dtype
from sempa_dist.export import export_model
from sempa_dist.fileio import write_atomic
from sempa_dist.kernel_choice import AttentionChoice, choose_everywhere
from sempa_dist.loss import preference_loss
from sempa_dist.packing import build_batch, epoch_order, example_tokens, plan_step, step_counts
from sempa_dist.phase_times import PhaseTimer, phase_timing_enabled
from sempa_dist.preemption import Preempted, PreemptionFlag
from sempa_dist.preflight import preflight
from sempa_dist.sts_tasks import resolve_tasks
from sempa_dist.watchdog import Heartbeat, describe_silent, silent_ranks


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
            keep = [ln for ln in path.read_text().splitlines() if (n := _step_of(ln)) is not None and n <= step]
            write_atomic(path, "".join(ln + "\n" for ln in keep))


def _step_of(line: str) -> int | None:
    """The step of a metrics/eval row, None for a line that is not one (a row torn by a kill)."""
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None


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
        sources = getattr(scores, "sources", {})  # which files were scored (local SentEval or the hub's)
        with open(out_dir / "eval.jsonl", "a") as fh:
            fh.write(json.dumps({"step": step, prefix: dict(scores), "sources": sources}) + "\n")
        tracker.log_metrics({f"{prefix}/{k}": v for k, v in scores.items()}, step=step)


class Totals:
    """Named sums a step accumulates over its micro-steps: tensors stay on the device and numbers on
    the host (no host-device sync per micro-step), all-reduced once at the end of the step, in name
    order, so every rank sums the same slots."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._tensors: dict[str, torch.Tensor] = {}
        self._numbers: dict[str, float] = {}

    def add(self, name: str, value: torch.Tensor | float) -> None:
        """Add `value` (a tensor on the device, or a number) to the sum called `name`."""
        if isinstance(value, torch.Tensor):
            v = value.detach().to(torch.float64)
            self._tensors[name] = self._tensors[name] + v if name in self._tensors else v
        else:
            self._numbers[name] = self._numbers.get(name, 0.0) + float(value)

    def all_reduce(self) -> dict[str, float]:
        """Every rank's sums added up (one collective); every rank must have added the same names."""
        names = sorted({*self._tensors, *self._numbers})
        numbers = torch.tensor([self._numbers.get(n, 0.0) for n in names], dtype=torch.float64).to(self.device)
        values = torch.stack([self._tensors[n] if n in self._tensors else numbers[i] for i, n in enumerate(names)])
        return dict(zip(names, all_reduce_sum(values).tolist(), strict=True))


@dataclass
class Run:
    """What the loop needs, set up once by `setup`. The runtime choices are values here (`attn`,
    `resolved`): nothing decided at run time is read back from the config."""

    cfg: Config
    dist: DistInfo
    tracker: tracking.NullTracker
    out_dir: Path
    tokenizer: Any
    examples: list
    sizes: list[int]  # tokens of each example under the run's layout (prefix sharing or not)
    data_report: dict[str, Any]
    attn: AttentionChoice
    resolved: dict[str, Any]  # the runtime choices as recorded (resolved.yaml, summary.json, MLflow)
    policy: Any
    reference: Any
    steps_per_epoch: int
    total_steps: int
    start_step: int
    skips: NonFiniteSteps
    heartbeat: Heartbeat
    preemption: PreemptionFlag
    timer: PhaseTimer
    bar: Any
    t_start: float
    history: list[dict[str, Any]] = field(default_factory=list)
    last_checkpoint: Path | None = None
    best: dict[str, Any] | None = None  # eval.select_best: {task, step, score, checkpoint} of the best so far


def train(cfg: Config) -> dict[str, Any]:
    """Train as configured; every rank calls it. Returns the run summary."""
    quiet_library_warnings()
    dist = init_distributed(cfg.deepspeed.timeout_s)
    cfg.validate(world_size=dist.world_size)
    preflight(cfg)  # every rank: under a launcher, sempa-train's own check may not have run
    # the resume point, found once: the tracker continues that checkpoint's MLflow run, setup loads it
    resume_from = checkpoint.find_resume(cfg.train.resume, cfg.train.output_dir)
    # MLflow run on rank 0 (a no-op elsewhere): leaving the block ends it FINISHED or FAILED, or, when
    # preempted, leaves it RUNNING for the requeued job to continue
    with tracking.start(cfg, dist, kind="train", resume_from=resume_from) as tracker:
        run = None
        try:
            run = setup(cfg, dist, tracker, resume_from)
            for index in range(run.start_step, run.total_steps):
                row = train_step(run, index)
                after_step(run, row)
            summary = finish(run)
        except (Preempted, NonFiniteError):
            if run is not None:  # every rank stops at the same step: to the watchers, a clean stop
                run.heartbeat.close()
            raise
        except Exception as e:
            # bad data or config are this rank's doing; any other error may be a dead or frozen peer
            # (gloo and NCCL word a peer's failure many ways): read the heartbeats
            if dist.world_size > 1 and not isinstance(e, ConfigError | DataError):
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


def setup(cfg: Config, dist: DistInfo, tracker: tracking.NullTracker, resume_from: Path | None) -> Run:
    """Everything before the first step: data, the runtime choices, the engines, the state of the
    checkpoint `resume_from` (None: a fresh start)."""
    out_dir = Path(cfg.train.output_dir)
    heartbeat = Heartbeat(out_dir, dist.rank, dist.world_size, timeout_s=cfg.deepspeed.timeout_s,  # watchdog.py:
                          hint=lambda: checkpoint.resume_hint(out_dir))  # names a rank that dies or freezes
    if dist.is_main:
        write_atomic(out_dir / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    t_start = time.time()

    # data
    tokenizer, examples, load_report, tok_report = prepare_data(cfg, dist)
    tracker.log_dataset(load_report, tok_report)
    steps_per_epoch, total_steps = step_counts(cfg, len(examples), load_report.source, tok_report.dropped_overlong)

    # values decided at run time, once: the training dtype, the attention kernel and prefix sharing
    # (each prompt encoded once for its 1 + K responses; on a GPU measured). They are passed to the
    # engines and the scorer explicitly and recorded with the run; the config keeps what was asked.
    dtype = training_dtype(cfg, dist.device.type)
    attn = choose_everywhere(cfg, examples, dist.device, dtype)
    if dist.device.type == "cuda":  # peak_device_mb counts training, not the kernel measurement
        torch.cuda.reset_peak_memory_stats(dist.device)
    resolved = {"device": dist.device.type, "dtype": str(dtype).removeprefix("torch."), **attn.record()}
    if dist.is_main:
        print(attn.describe(), flush=True)
        write_atomic(out_dir / "resolved.yaml", yaml.safe_dump(resolved, sort_keys=False))
    tracker.set_tags({"attention": attn.label})
    tracker.log_params({f"resolved.{k}": resolved[k] for k in ("device", "dtype", "attn_implementation", "prefix_sharing")})

    # a checkpoint written on another world size is loaded through DeepSpeed's universal format
    # (converted once by rank 0), which the policy's DeepSpeed config must enable when it is built
    universal = checkpoint.needs_universal(resume_from, dist.world_size)
    if universal:
        checkpoint.prepare_universal(resume_from, dist)

    # engines
    policy, ds_config = build_policy(cfg, dist, total_steps, attn, dtype, load_universal=universal)
    reference = build_reference(cfg, dist, policy, examples, tok_report.fingerprint, attn, dtype)
    tracker.log_dict("deepspeed.json", {"policy": ds_config, "reference": getattr(reference, "ds_config", None)})

    # resume
    resumed: dict[str, Any] = {}
    if resume_from is not None:
        resumed = checkpoint.load(policy, resume_from, universal=universal)
        checkpoint.restore_rng(resumed, dist.device)
        if dist.is_main:
            how = f" (written by {resumed.get('world_size', '?')} ranks: loaded through its universal conversion)" if universal else ""
            print(f"resumed from {resume_from} at step {resumed['step']}{how}", flush=True)
    start_step = resumed.get("step", 0)
    if dist.is_main:
        truncate_metrics(out_dir, start_step)
    # the best checkpoint so far (eval.select_best) survives a restart, on any world size
    best = checkpoint.read_best(out_dir, start_step) if cfg.eval.select_best and resume_from is not None else None

    from tqdm import tqdm

    policy.train()
    return Run(
        cfg=cfg, dist=dist, tracker=tracker, out_dir=out_dir, tokenizer=tokenizer, examples=examples,
        sizes=[example_tokens(ex, attn.sharing) for ex in examples],
        data_report={"load": load_report.__dict__, "tokenize": tok_report.__dict__},
        attn=attn, resolved=resolved, policy=policy, reference=reference,
        steps_per_epoch=steps_per_epoch, total_steps=total_steps, start_step=start_step,
        skips=NonFiniteSteps(cfg.train.on_nonfinite, cfg.train.max_consecutive_skips, resumed.get("skipped_steps", 0),
                             log=print if dist.is_main else None),
        heartbeat=heartbeat, preemption=PreemptionFlag(),
        timer=PhaseTimer(phase_timing_enabled(cfg.train.phase_times, dist.device), dist.device),
        bar=tqdm(total=total_steps, initial=start_step, disable=not dist.is_main, desc="train", dynamic_ncols=True),
        t_start=t_start, best=best,
        last_checkpoint=resume_from,  # until this run saves: a run resumed at its end still exports it
    )


def train_step(run: Run, index: int) -> dict[str, Any]:
    """The optimizer step after `index` done ones: this rank's micro-batches of the step's examples
    through policy and reference, the loss, backward, the update. Returns the step's metrics row
    (its "step" is index + 1, as every row, checkpoint and log counts steps), summed over every rank."""
    cfg, dist, policy, timer = run.cfg, run.dist, run.policy, run.timer
    run.heartbeat.step = index + 1
    t0 = time.time()
    B = cfg.train.global_batch_size
    epoch, pos = divmod(index, run.steps_per_epoch)
    ids = epoch_order(len(run.examples), cfg.train.seed, epoch)[pos * B : (pos + 1) * B]
    plan = plan_step([run.sizes[i] for i in ids], dist.world_size, cfg.packing.max_tokens)[dist.rank]
    totals = Totals(dist.device)
    timer.start()
    for m, micro in enumerate(plan):
        batch = build_batch([run.examples[ids[j]] for j in micro], cfg.packing.layout, run.tokenizer.pad_token_id,
                            run.attn.sharing).to(dist.device)
        policy.set_gradient_accumulation_boundary(m == len(plan) - 1)
        timer.resume()
        out = policy(batch)
        timer.mark("policy_forward")
        ref_sums, _ = run.reference.logps(batch)
        timer.mark("reference")
        k1 = 1 + cfg.data.num_rejected  # also for a dummy micro-batch (no example: [0, 1 + K] log-probs)
        losses, metrics = preference_loss(out.sums.view(-1, k1), ref_sums.to(out.sums).view(-1, k1), cfg.loss.beta,
                                          cfg.loss.type, cfg.loss.label_smoothing, counts=out.counts.view(-1, k1))
        # mean over the GLOBAL batch: DeepSpeed averages gradients over ranks, so scale by world / B
        loss = losses.sum() * (dist.world_size / B) + out.anchor
        # an inf loss can have finite gradients (e.g. a -inf reference log-prob): make them NaN so
        # DeepSpeed's non-finite gradient-norm check, global over ranks, drops the step everywhere
        # (a multiplier, not an `if`: no host sync to read the loss)
        loss = loss * torch.where(torch.isfinite(loss.detach()), 1.0, float("nan"))
        policy.backward(loss, scale_wrt_gas=False)
        timer.mark("backward")
        totals.add("loss", losses.sum())
        for name, values in metrics.items():  # whatever the loss reports, by name
            totals.add(name, values.sum())
        totals.add("real_tokens", batch.real_tokens if micro else 0)
        totals.add("total_tokens", batch.total_tokens)
        totals.add("examples", batch.num_examples)
    timer.resume()
    policy.step()
    timer.mark("optimizer")
    applied = policy.was_step_applied()
    grad_norm = policy.get_global_grad_norm()
    grad_norm = float("nan") if grad_norm is None else float(grad_norm)
    totals.add("preempt", float(run.preemption.requested is not None))
    sums = totals.all_reduce()
    dt = time.time() - t0
    examples, real, total = sums.pop("examples"), sums.pop("real_tokens"), sums.pop("total_tokens")
    preempted = sums.pop("preempt") > 0  # every rank sees the same sum, so all stop at this step
    row: dict[str, Any] = {name: v / examples for name, v in sums.items()}
    row.update({
        "step": index + 1, "lr": policy.get_lr()[0], "grad_norm": grad_norm,
        "tokens_per_s": real / dt, "pad_fraction": 1 - real / total,
        "step_time_s": dt, "micro_steps": len(plan), "peak_rss_mb": peak_rss_mb(),
        **({"peak_device_mb": torch.cuda.max_memory_allocated(dist.device) / 2**20} if dist.device.type == "cuda" else {}),
        **timer.seconds(),  # rank 0's
    })
    nonfinite = not (math.isfinite(row["loss"]) and math.isfinite(grad_norm))
    run.skips.record(index + 1, nonfinite, applied, row["loss"], grad_norm)
    row["skipped_steps"] = run.skips.total
    row["preempted"] = preempted
    return row


def after_step(run: Run, row: dict[str, Any]) -> None:
    """Log the step, then evaluate, checkpoint and stop for preemption as due (collectives: every
    rank calls it). Raises NonFiniteError or Preempted to stop."""
    cfg, dist, step = run.cfg, run.dist, row["step"]
    preempted = row.pop("preempted")
    run.history.append(row)
    run.bar.set_postfix(loss=f"{row['loss']:.4f}", acc=f"{row['rewards/accuracy']:.2f}", tok_s=f"{row['tokens_per_s']:.0f}")
    run.bar.update(1)
    if dist.is_main and step % cfg.train.log_every == 0:
        with open(run.out_dir / "metrics.jsonl", "a") as fh:
            fh.write(json.dumps(row) + "\n")
        run.tracker.log_metrics(row, step=step)
    if run.skips.must_stop:  # logged first: the failing step is in metrics.jsonl and MLflow
        raise NonFiniteError(run.skips.reason(run.out_dir))
    last = step == run.total_steps
    stopping = preempted and not last  # the preemption's checkpoint must be quick: no evaluation first
    if cfg.eval.every and (step % cfg.eval.every == 0 or last) and not stopping:
        scores = evaluate_policy(run.policy, run.tokenizer, cfg, dist, cfg.eval.tasks)
        log_eval(run.out_dir, dist, run.tracker, step, scores)
        row.update({f"sts/{k}": v for k, v in scores.items()})
    scheduled = last or bool(cfg.train.save_every and step % cfg.train.save_every == 0)
    if scheduled and cfg.eval.select_best and not stopping:
        update_best(run, row)
    if scheduled or preempted:
        saved = {"step": step, "epoch": (step - 1) // run.steps_per_epoch, "world_size": dist.world_size,
                 "examples_seen": step * cfg.train.global_batch_size, **checkpoint.rng_state(dist.device),
                 "mlflow_run_id": run.tracker.run_id, "skipped_steps": run.skips.total}
        protect = (run.best["checkpoint"],) if run.best else ()
        run.last_checkpoint = checkpoint.save(run.policy, run.out_dir, step, saved, dist, cfg.train.keep_checkpoints,
                                              protect)
        if run.best and dist.is_main:
            checkpoint.write_best(run.out_dir, run.best)
    if stopping:
        run.bar.close()
        if dist.is_main:
            print(f"preemption signal: checkpoint at step {step} saved, exiting for requeue", flush=True)
            (run.out_dir / "PREEMPTED").write_text(json.dumps({"step": step, "time": time.time()}) + "\n")
        raise Preempted(step)


def update_best(run: Run, row: dict[str, Any]) -> None:
    """Score this step's policy on eval.select_best (reusing this step's evaluation when it had one) and
    make it the best when it beats the best so far."""
    cfg, step = run.cfg, row["step"]
    (task,) = resolve_tasks([cfg.eval.select_best])
    score = row.get(f"sts/{task}")
    if score is None:
        scores = evaluate_policy(run.policy, run.tokenizer, cfg, run.dist, [task])
        log_eval(run.out_dir, run.dist, run.tracker, step, scores, prefix="select_best")  # not sts/avg: one set
        score = scores[task]
    if run.best is None or score > run.best["score"]:
        run.best = {"task": task, "step": step, "score": score, "checkpoint": checkpoint.tag_of(step)}
    run.tracker.log_metrics({f"best/{task}": run.best["score"], "best/step": run.best["step"]}, step=step)


def finish(run: Run) -> dict[str, Any]:
    """After the last step: the probe log-probs, the final evaluation, the export and the summary."""
    cfg, dist, policy = run.cfg, run.dist, run.policy
    run.bar.close()
    run.preemption.restore()
    if dist.is_main:
        (run.out_dir / "PREEMPTED").unlink(missing_ok=True)  # this run went to its end

    # log-probs of a fixed probe batch under the final policy: `sempa-export` output must reproduce them
    policy.eval()
    probe = build_batch(run.examples[:4], cfg.packing.layout, run.tokenizer.pad_token_id, run.attn.sharing).to(dist.device)
    with torch.no_grad():
        probe_sums = policy(probe).sums.float().cpu().tolist()

    final_sts = evaluate_policy(policy, run.tokenizer, cfg, dist, cfg.eval.final_tasks) if cfg.eval.final_tasks else {}
    if final_sts:
        log_eval(run.out_dir, dist, run.tracker, run.total_steps, final_sts, prefix="final_sts")

    summary: dict[str, Any] = {
        "final": run.history[-1] if run.history else {},
        "steps": run.total_steps, "start_step": run.start_step, "world_size": dist.world_size,
        "examples": len(run.examples), "data": run.data_report,
        "time_s": time.time() - run.t_start, "config": cfg.to_dict(), "resolved": run.resolved,
        "probe": {"example_ids": probe.example_ids, "sums": probe_sums}, "mlflow_run_id": run.tracker.run_id,
        "final_sts": final_sts, "best": run.best,
    }
    barrier()  # the last collective: rank 0 exports alone, no peer waits on it against the timeout
    if dist.is_main and cfg.train.export and run.last_checkpoint is not None:
        # export/ is the model a user takes: the best checkpoint under eval.select_best (the last one
        # beside it in export-last/), else the last
        best = checkpoint.checkpoint_root(run.out_dir) / run.best["checkpoint"] if run.best else None
        if best is not None and best != run.last_checkpoint:
            summary["export_last"] = str(export_model(run.last_checkpoint, run.out_dir / "export-last", cfg,
                                                      cfg.train.merge_lora))
        summary.update(export_model(best or run.last_checkpoint, run.out_dir / "export", cfg, cfg.train.merge_lora).summary())
    if dist.is_main:
        write_atomic(run.out_dir / "summary.json", json.dumps(summary, indent=2, default=str))
        run.tracker.log_summary(summary)
    run.heartbeat.close()
    return summary


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # the deepspeed launcher inserts --local_rank=N (LOCAL_RANK is in the environment anyway)
    argv = [a for a in argv if not a.startswith("--local_rank")]
    path = argv[0] if argv and "=" not in argv[0] else None
    overrides = argv[1:] if path else argv
    cfg = load_config(path, overrides).validate(world_size=int(os.environ["WORLD_SIZE"]) if "WORLD_SIZE" in os.environ else None)
    return exit_code(cfg)


def exit_code(cfg: Config) -> int:
    """`train(cfg)` as a process exit code: 0; 75 after a preemption checkpoint (the Slurm script
    requeues on it); 2 for bad config or data (one line); or 1 after a non-finite stop (one line from rank 0 instead of the same traceback
    from every rank; the Slurm script does not requeue on it)."""
    try:
        train(cfg)
    except Preempted as e:
        return e.code
    except (ConfigError, DataError) as e:  # the same on every rank: one line from rank 0, not a traceback each
        if os.environ.get("RANK", "0") == "0":
            print(f"sempa-train: {e}", file=sys.stderr, flush=True)
        return 2
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
