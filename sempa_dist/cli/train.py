"""sempa-train CONFIG.yaml [section.key=value ...]

Under a launcher (torchrun, deepspeed, srun) it trains in this process. Started alone with
``train.nproc > 1`` it validates the config, then starts that many local ranks through torchrun's
elastic agent (which fails the whole job fast when one rank dies).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

from sempa_dist.config import ConfigError, describe, load_config
from sempa_dist.distributed import free_port, launched_by_launcher


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
    except ConfigError as e:
        print(f"sempa-train: config error: {e}", file=sys.stderr)
        return 2
    if launched_by_launcher() or nproc == 1:
        from sempa_dist.train import train

        train(cfg)
        return 0
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--nnodes=1",
           f"--master_port={free_port()}", "--max_restarts=0", "-m", "sempa_dist.train"]
    cmd += ([config] if config else []) + overrides
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc))))
    return subprocess.call(cmd, env=env)


if __name__ == "__main__":
    sys.exit(main())
