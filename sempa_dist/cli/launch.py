"""sempa-launch (--hosts H1,H2 | --hostfile-in FILE) [--gpus-per-host N] CONFIG [section.key=value ...]

Multi-node training on plain (cloud) nodes through the DeepSpeed launcher: writes the DeepSpeed
hostfile and .deepspeed_env (PYTHONPATH, HF caches, MLflow URI, NCCL variables; never a secret unless
named with --env) under <output_dir>/launch/, checks that every host answers ssh, then runs
`deepspeed --hostfile ... --module sempa_dist.train CONFIG ...` (pdsh by default).

Every host needs the same image (python at the same path, this checkout at the same path: the
launcher cd's there on each host) and the same view of the output directory (shared or synced).
The first host is rank 0's and the rendezvous address unless --master-addr says otherwise.
Exit status: the launcher's; 2 for a bad host list or config, 3 when a host does not answer ssh.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path

from sempa_dist.config import ConfigError, load_config
from sempa_dist.launch import (
    LaunchError,
    check_ssh,
    deepspeed_command,
    format_command,
    launcher_environ,
    parse_hosts,
    read_env_file,
    select_env,
    write_deepspeed_env,
    write_hostfile,
)


def parse(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="sempa-launch", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    hosts = ap.add_mutually_exclusive_group(required=True)
    hosts.add_argument("--hosts", help="comma list of hosts, e.g. node1,node2")
    hosts.add_argument("--hostfile-in", type=Path, help="file with one 'host' or 'host slots=N' per line")
    ap.add_argument("--gpus-per-host", type=int, help="ranks per host (required unless every file line has slots=)")
    ap.add_argument("--master-addr", help="rendezvous address as the other hosts reach it (default: the first host)")
    ap.add_argument("--master-port", type=int, default=29500, help="rendezvous port on the first host (default 29500)")
    ap.add_argument("--launcher", default="pdsh", help="DeepSpeed multi-node launcher: pdsh (default), openmpi, mpich, ...")
    ap.add_argument("--ssh-port", type=int, help="sshd port on the hosts (default: ssh's own, 22)")
    ap.add_argument("--ssh-timeout", type=int, default=5, help="seconds per host for the ssh check (default 5)")
    ap.add_argument("--env", action="append", default=[], metavar="NAME[=VALUE]",
                    help="also pass this variable (its value here, or VALUE); the way to pass a secret on purpose")
    ap.add_argument("--env-file", action="append", default=[], type=Path, metavar="FILE",
                    help="KEY=VALUE lines passed to every rank, e.g. slurm/nccl.env")
    ap.add_argument("--launch-dir", type=Path, help="where the hostfile and .deepspeed_env go (default <output_dir>/launch)")
    ap.add_argument("--dry-run", action="store_true", help="write the files and print the command; no ssh, no launch")
    ap.add_argument("config", help="YAML config (see configs/)")
    ap.add_argument("overrides", nargs="*", help="section.key=value overrides")
    return ap.parse_args(argv)


def explicit_env(args: argparse.Namespace, environ: dict[str, str]) -> dict[str, str]:
    """Variables asked for on the command line: --env-file entries (a variable set in this environment
    wins over the file, as in slurm/train_8x8.sh), then --env NAME[=VALUE]."""
    out: dict[str, str] = {}
    for path in args.env_file:
        if not path.is_file():
            raise LaunchError(f"--env-file {path}: not found")
        out.update({k: environ.get(k, v) for k, v in read_env_file(path).items()})
    for item in args.env:
        name, sep, value = item.partition("=")
        if not sep:
            if name not in environ:
                raise LaunchError(f"--env {name}: not set in this environment (use --env {name}=VALUE)")
            value = environ[name]
        out[name] = value
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    environ = dict(os.environ)
    try:
        hosts = parse_hosts(args.hosts, args.hostfile_in, args.gpus_per_host)
        world = sum(hosts.values())
        cfg = load_config(args.config, args.overrides).validate(world_size=world)
        explicit = explicit_env(args, environ)
    except (LaunchError, ConfigError) as e:
        print(f"sempa-launch: {e}", file=sys.stderr)
        return 2
    launch_dir = (args.launch_dir or Path(cfg.train.output_dir) / "launch").resolve()
    # the launcher runs `cd <this directory>` on every host: the checkout there comes first on the path
    cwd = os.getcwd()
    pythonpath = [cwd, *(p for p in environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != cwd)]
    remote_env = select_env({**environ, "PYTHONPATH": os.pathsep.join(pythonpath)}, explicit)
    try:
        hostfile = write_hostfile(launch_dir / "hostfile", hosts)
        env_file = write_deepspeed_env(launch_dir / ".deepspeed_env", remote_env)
    except LaunchError as e:
        print(f"sempa-launch: {e}", file=sys.stderr)
        return 2
    master_addr = args.master_addr or next(iter(hosts))
    cmd = deepspeed_command(hostfile, args.config, args.overrides, master_addr=master_addr,
                            master_port=args.master_port, launcher=args.launcher, ssh_port=args.ssh_port)
    (launch_dir / "command.sh").write_text(f"DS_ENV_FILE={shlex.quote(str(env_file))} {format_command(cmd)}\n")
    print(f"sempa-launch: {len(hosts)} hosts x {'/'.join(map(str, sorted(set(hosts.values()))))} ranks = world {world}, "
          f"rendezvous {master_addr}:{args.master_port}")
    print(f"sempa-launch: hostfile {hostfile}, environment {env_file} ({', '.join(remote_env)})")
    print(f"sempa-launch: {format_command(cmd)}", flush=True)
    if args.dry_run:
        return 0

    if args.launcher != "slurm":  # every other launcher reaches the hosts over ssh
        # pdsh runs ssh with PDSH_SSH_ARGS_APPEND: check with the same options
        extra = shlex.split(environ.get("PDSH_SSH_ARGS_APPEND", ""))
        failed = {h: why for h, why in check_ssh(hosts, args.ssh_port, extra, args.ssh_timeout).items() if why}
        if failed:
            for host, why in failed.items():
                print(f"sempa-launch: ssh {host}: {why}", file=sys.stderr)
            print("sempa-launch: every host must accept ssh without a password (BatchMode) from here", file=sys.stderr)
            return 3

    proc = subprocess.Popen(cmd, env=launcher_environ(environ, explicit, env_file))
    # SIGTERM: pass it on, so DeepSpeed stops the remote ranks (it pkills them over pdsh) instead of
    # this process dying alone. SIGINT (Ctrl-C) reaches the launcher directly (same process group).
    signal.signal(signal.SIGTERM, lambda signum, frame: proc.send_signal(signal.SIGTERM))
    while True:
        try:
            return proc.wait()
        except KeyboardInterrupt:
            continue  # the launcher got the same SIGINT and is stopping the ranks: wait for it


if __name__ == "__main__":
    sys.exit(main())
