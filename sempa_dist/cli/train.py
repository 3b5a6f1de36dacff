"""sempa-train CONFIG.yaml [section.key=value ...]

Under a launcher (torchrun, deepspeed, srun) it trains in this process. Started alone with
``train.nproc > 1`` it validates the config, then starts that many local ranks through torchrun's
elastic agent (which fails the whole job fast when one rank dies).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

from sempa_dist.config import ConfigError, describe, load_config
from sempa_dist.distributed import free_port, launched_by_launcher
from sempa_dist.preemption import PREEMPTED_EXIT_CODE
from sempa_dist.preflight import PreflightError, preflight


def parse(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="sempa-train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config", nargs="?", help="YAML config (see configs/)")
    ap.add_argument("overrides", nargs="*", help="section.key=value overrides")
    ap.add_argument("--help-config", action="store_true", help="print every config key with its default and meaning")
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
        cfg.validate(world_size=world)
        preflight(cfg)  # one clear line here, rather than a traceback from every rank
    except (ConfigError, PreflightError) as e:
        print(f"sempa-train: {'config error: ' if isinstance(e, ConfigError) else ''}{e}", file=sys.stderr)
        return 2
    if launched_by_launcher() or nproc == 1:
        from sempa_dist.train import run

        return run(cfg)
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--nnodes=1",
           f"--master_port={free_port()}", "--max_restarts=0", *forward_preemption_flags(), "-m", "sempa_dist.train"]
    cmd += ([config] if config else []) + overrides
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc))),
               # how long torchrun waits, after a signal or a rank's failure, before it SIGKILLs the ranks:
               # the time they have to save a preemption checkpoint (as in slurm/train_8x8.sh)
               TORCH_ELASTIC_SHUTDOWN_TIMEOUT=os.environ.get("SEMPA_SHUTDOWN_TIMEOUT", "170"))
    marker = Path(cfg.train.output_dir) / "PREEMPTED"
    # torchrun forwards TERM/USR1 to the ranks (which checkpoint and exit 75) but dies itself with
    # code 1: ignore them here, wait for it, and report the preemption with the ranks' own code
    with _ignoring(signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        proc = subprocess.Popen(cmd, env=env)
        rc = proc.wait()
    if rc != 0 and marker.is_file():
        return PREEMPTED_EXIT_CODE
    if rc != 0:
        from sempa_dist.checkpoint import find_resume

        last_good = find_resume("auto", cfg.train.output_dir)
        where = f"last complete checkpoint: {last_good} (train.resume=auto continues from it)" if last_good else "no checkpoint was completed"
        print(f"sempa-train: training failed (exit {rc}; the ranks' and torchrun's reports above name the failed rank); {where}",
              file=sys.stderr, flush=True)
    return rc


def forward_preemption_flags() -> list[str]:
    """torchrun >= 2.9 can forward SIGUSR1 (Slurm's preemption warning) to its ranks; by default it
    handles only TERM/INT/HUP/QUIT and dies on USR1, leaving the ranks without their checkpoint."""
    import torch

    major, minor = (int(x) for x in torch.__version__.split(".")[:2])
    if (major, minor) < (2, 9):
        return []
    return ["--signals_to_handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"]


@contextlib.contextmanager
def _ignoring(*signals: signal.Signals):
    """Let the child (torchrun, same process group) receive these signals while this parent waits."""
    previous = {s: signal.signal(s, lambda *_: None) for s in signals}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


if __name__ == "__main__":
    sys.exit(main())
