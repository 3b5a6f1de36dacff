"""sempa-train CONFIG.yaml [section.key=value ...]

Under a launcher (torchrun, deepspeed, srun) it trains in this process. Started alone with
``train.nproc > 1`` it validates the config, then starts that many local ranks itself
(sempa_dist/local_launch.py: a loopback-only rendezvous store, signals passed on, the whole job
stopped fast when one rank dies).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from sempa_dist.config import ConfigError, describe, load_config
from sempa_dist.data import DataError, load_triplets
from sempa_dist.distributed import launched_by_launcher
from sempa_dist.local_launch import run_ranks
from sempa_dist.preemption import PREEMPTED_EXIT_CODE
from sempa_dist.preflight import PreflightError, preflight


def parse(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="sempa-train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config", nargs="?", help="YAML config (see configs/)")
    ap.add_argument("overrides", nargs="*", help="section.key=value overrides")
    ap.add_argument("--help-config", action="store_true", help="print every config key with its default and meaning")
    ap.add_argument("--check", action="store_true", help="everything short of training: config, data, tokenizer, step "
                    "plan, kernel and dtype, memory per GPU (sempa_dist/check.py); nothing is trained or written")
    ap.add_argument("--world-size", type=int, default=None, help="with --check: the world size the job will run on "
                    "(default: train.nproc)")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    if args.help_config:
        print("\n".join(describe()))
        return 0
    config, overrides = args.config, list(args.overrides)
    if config and "=" in config:
        config, overrides = None, [config, *overrides]
    try:
        cfg = load_config(config, overrides)
        nproc = cfg.train.nproc
        world = int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", nproc if not launched_by_launcher() else 1)))
        if args.check:
            from sempa_dist.check import check_run, format_report

            print(format_report(check_run(cfg, args.world_size or world)))
            return 0
        cfg.validate(world_size=world)
        preflight(cfg)  # one clear line here, rather than a traceback from every rank
        load_triplets(cfg.data, seed=cfg.train.seed)  # bad data too, before any rank starts
    except (ConfigError, PreflightError, DataError) as e:
        print(f"sempa-train: {'config error: ' if isinstance(e, ConfigError) else ''}{e}", file=sys.stderr)
        return 2
    if launched_by_launcher() or nproc == 1:
        from sempa_dist.train import exit_code

        return exit_code(cfg)
    # the ranks are started and watched here, not by torchrun: its rendezvous store would listen on
    # every interface (sempa_dist/local_launch.py)
    cmd = [sys.executable, "-m", "sempa_dist.train", *([config] if config else []), *overrides]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc))))
    rc, failure = run_ranks(cmd, nproc, env, store_timeout_s=cfg.deepspeed.timeout_s)
    marker = Path(cfg.train.output_dir) / "PREEMPTED"
    if rc != 0 and marker.is_file():
        return PREEMPTED_EXIT_CODE
    if rc != 0:
        from sempa_dist.checkpoint import resume_hint

        print(f"sempa-train: training failed ({failure or f'exit {rc}'}); {resume_hint(cfg.train.output_dir)}",
              file=sys.stderr, flush=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
