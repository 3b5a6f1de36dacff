"""Multi-node launch on plain (cloud) nodes with the DeepSpeed launcher: the pieces `sempa-launch` uses.

The DeepSpeed launcher (pdsh by default) ssh-es into every host of a hostfile and starts
``deepspeed.launcher.launch`` there, which starts one rank per slot. What it needs, and what this
module builds without side effects beyond the files it is asked to write:

- the hostfile (``host slots=N`` per line);
- the ``.deepspeed_env`` file: ssh does not carry the environment, so every variable the ranks
  need (PYTHONPATH, HF caches, MLflow URI, NCCL settings) goes there; DeepSpeed turns each line into
  an ``export`` in the remote command. Secrets are never copied implicitly;
- a reachability check of every host with the same ssh options pdsh will use, failing in seconds;
- the launcher command line.

DeepSpeed facts this relies on (0.19): `.deepspeed_env` is read from ``$DS_ENV_FILE`` (a path) or
``~/.deepspeed_env`` / ``./.deepspeed_env``, one ``KEY=VALUE`` per line and nothing else (a comment
or a blank line breaks its parser); a hostfile with a single host launches locally, without pdsh and
without that file, unless ``--force_multi``; its own ssh check is a plain ``ssh host hostname``
that ignores ``PDSH_SSH_ARGS_APPEND``; and it appends ``--local_rank=N`` to the script's arguments
unless ``--no_local_rank``.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from sempa_dist.redaction import is_secret_name

# Variables copied to the remote ranks when set here: exact names and prefixes.
ENV_NAMES = ("PYTHONPATH", "OMP_NUM_THREADS", "DS_ACCELERATOR", "SEMPA_DEVICE", "CUDA_DEVICE_MAX_CONNECTIONS",
             "PYTORCH_CUDA_ALLOC_CONF", "TOKENIZERS_PARALLELISM")
ENV_PREFIXES = ("NCCL_", "TORCH_NCCL_", "GLOO_", "FI_", "HF_", "HUGGINGFACE_", "TRANSFORMERS_", "MLFLOW_", "SEMPA_")
# Names that look like credentials (redaction.is_secret_name) are never copied unless asked for by
# name (--env NAME).
_HOST_RE = re.compile(r"^[A-Za-z0-9_.@-]+$")
_ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# DeepSpeed puts values into a remote shell command inside double quotes: these would be
# expanded or end the quoting there
_UNSAFE_VALUE = re.compile(r'["$`\\\n]')
# what DeepSpeed's runner exports to the remote command on its own, from its own environment
DEEPSPEED_EXPORTED_PREFIXES = ("MLFLOW", "PYTHON", "MV2", "UCX", "NCCL")


class LaunchError(ValueError):
    """A host list, environment or option that cannot be launched; the message says which."""


def parse_hosts(hosts: str | None = None, hostfile: str | Path | None = None,
                gpus_per_host: int | None = None) -> dict[str, int]:
    """Hosts from a comma list or a file -> {host: slots}, in order.

    File lines: ``host`` or ``host slots=N`` (a DeepSpeed/MPI hostfile works as is); ``#`` starts a
    comment. A host without ``slots=`` gets `gpus_per_host`; `gpus_per_host`, when given, is also the
    default for every host of a comma list.
    """
    if (hosts is None) == (hostfile is None):
        raise LaunchError("give exactly one of a comma list of hosts or a host file")
    entries: list[tuple[str, int | None, str]] = []  # host, slots, where (for messages)
    if hosts is not None:
        for i, name in enumerate(h.strip() for h in hosts.split(",")):
            if name:
                entries.append((name, None, f"--hosts item {i + 1}"))
    else:
        path = Path(hostfile)  # type: ignore[arg-type]
        if not path.is_file():
            raise LaunchError(f"host file not found: {path}")
        for n, raw in enumerate(path.read_text().splitlines(), 1):
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            name, *fields = line.split()
            slots = None
            for f in fields:
                m = re.fullmatch(r"slots=(\d+)", f)
                if not m:
                    raise LaunchError(f"{path}:{n}: expected 'host' or 'host slots=N', got {raw.strip()!r}")
                slots = int(m.group(1))
            entries.append((name, slots, f"{path}:{n}"))
    if not entries:
        raise LaunchError("no hosts given")
    out: dict[str, int] = {}
    for name, slots, where in entries:
        if not _HOST_RE.match(name):
            raise LaunchError(f"{where}: {name!r} is not a host name")
        if name in out:
            raise LaunchError(f"{where}: host {name} listed twice")
        slots = slots if slots is not None else gpus_per_host
        if slots is None:
            raise LaunchError(f"{where}: no slots for {name}: pass --gpus-per-host or write '{name} slots=N'")
        if slots < 1:
            raise LaunchError(f"{where}: {name} needs at least 1 slot, got {slots}")
        out[name] = slots
    return out


def hostfile_text(hosts: Mapping[str, int]) -> str:
    """The DeepSpeed hostfile: one ``host slots=N`` line per host."""
    return "".join(f"{host} slots={slots}\n" for host, slots in hosts.items())


def write_hostfile(path: str | Path, hosts: Mapping[str, int]) -> Path:
    """Write the hostfile at `path` (parents created); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(hostfile_text(hosts))
    return path


def read_env_file(path: str | Path) -> dict[str, str]:
    """KEY=VALUE lines (``#`` comments, blank lines, an optional ``export``, quotes around the value);
    no shell expansion, so the file means the same here and to ``source`` in slurm/train_8x8.sh."""
    out: dict[str, str] = {}
    for n, raw in enumerate(Path(path).read_text().splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        line = line.removeprefix("export ").strip()
        key, sep, value = line.partition("=")
        if not sep or not _ENV_NAME_RE.match(key):
            raise LaunchError(f"{path}:{n}: expected KEY=VALUE, got {raw.strip()!r}")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        out[key] = value
    return out


def select_env(environ: Mapping[str, str], explicit: Mapping[str, str] | None = None,
               names: Iterable[str] = ENV_NAMES, prefixes: Iterable[str] = ENV_PREFIXES) -> dict[str, str]:
    """The variables the remote ranks get: those of `environ` named in `names` or starting with one of
    `prefixes`, minus anything that looks like a secret; then `explicit` (the user asked for those
    by name or value, secrets included) on top. Sorted by name."""
    names, prefixes = tuple(names), tuple(prefixes)
    chosen = {k: v for k, v in environ.items()
              if (k in names or k.startswith(prefixes)) and not is_secret_name(k)}
    chosen.update(explicit or {})
    return dict(sorted(chosen.items()))


def deepspeed_env_text(env: Mapping[str, str]) -> str:
    """`.deepspeed_env` contents: strictly ``KEY=VALUE`` lines (DeepSpeed's parser takes nothing else)."""
    lines = []
    for key, value in env.items():
        if not _ENV_NAME_RE.match(key):
            raise LaunchError(f"environment variable name {key!r} is not valid")
        if _UNSAFE_VALUE.search(value):
            raise LaunchError(f"{key}: the value contains a quote, $, backtick, backslash or newline, which "
                              "DeepSpeed would pass to the remote shell unescaped")
        lines.append(f"{key}={value}\n")
    return "".join(lines)


def write_deepspeed_env(path: str | Path, env: Mapping[str, str]) -> Path:
    """Write `.deepspeed_env` at `path`, readable by the owner only (it may hold what --env passed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = deepspeed_env_text(env)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    return path


def ssh_command(host: str, ssh_port: int | None = None, extra_args: Iterable[str] = (), timeout_s: int = 5) -> list[str]:
    """`ssh ... host true` that fails fast instead of asking for a password or hanging."""
    cmd = ["ssh", "-o", "BatchMode=yes", "-o", f"ConnectTimeout={timeout_s}", *extra_args]
    if ssh_port is not None:
        cmd += ["-p", str(ssh_port)]
    return [*cmd, host, "true"]


def check_ssh(hosts: Iterable[str], ssh_port: int | None = None, extra_args: Iterable[str] = (),
              timeout_s: int = 5) -> dict[str, str | None]:
    """Try every host in parallel: {host: None if reachable, else why not}. `extra_args` should be what
    pdsh appends (PDSH_SSH_ARGS_APPEND), so the check sees the hosts as the launch will."""
    extra = list(extra_args)

    def probe(host: str) -> str | None:
        cmd = ssh_command(host, ssh_port, extra, timeout_s)
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s + 5, stdin=subprocess.DEVNULL)
        except FileNotFoundError:
            return "ssh is not installed"
        except subprocess.TimeoutExpired:
            return f"no answer in {timeout_s + 5} s"
        if proc.returncode != 0:
            return (proc.stderr.strip().splitlines() or [f"ssh exited {proc.returncode}"])[-1]
        return None

    hosts = list(hosts)
    with ThreadPoolExecutor(max_workers=min(32, max(1, len(hosts)))) as pool:
        return dict(zip(hosts, pool.map(probe, hosts), strict=True))


def deepspeed_command(hostfile: str | Path, config: str, overrides: Iterable[str] = (), *, master_addr: str,
                      master_port: int = 29500, launcher: str = "pdsh", ssh_port: int | None = None,
                      python: str = sys.executable) -> list[str]:
    """`deepspeed --hostfile ... --module sempa_dist.train CONFIG overrides` (as ``python -m
    deepspeed.launcher.runner``, the `deepspeed` script, so the launcher is this interpreter's)."""
    cmd = [python, "-m", "deepspeed.launcher.runner", "--hostfile", str(hostfile), "--launcher", launcher,
           "--master_addr", master_addr, "--master_port", str(master_port),
           # every host through the launcher, a single one too: else DeepSpeed starts it locally,
           # on this machine, without .deepspeed_env
           "--force_multi",
           # checked already by check_ssh, with pdsh's ssh options (DeepSpeed's check ignores them)
           "--no_ssh_check",
           # sempa_dist.train takes CONFIG and overrides only, no --local_rank (LOCAL_RANK is in the env)
           "--no_local_rank"]
    if ssh_port is not None:
        cmd += ["--ssh_port", str(ssh_port)]
    return [*cmd, "--module", "sempa_dist.train", config, *overrides]


def launcher_environ(environ: Mapping[str, str], explicit: Mapping[str, str], env_file: str | Path) -> dict[str, str]:
    """The environment for the DeepSpeed launcher process itself: DS_ENV_FILE pointing at our file, and
    none of the secrets DeepSpeed would export to the remote command line on its own (it copies every
    MLFLOW*/PYTHON*/NCCL*... variable it sees), unless asked for by name."""
    env = {k: v for k, v in environ.items()
           if not (k.startswith(DEEPSPEED_EXPORTED_PREFIXES) and is_secret_name(k)) or k in explicit}
    env["DS_ENV_FILE"] = str(Path(env_file).resolve())
    return env


def format_command(cmd: Iterable[str]) -> str:
    return " ".join(shlex.quote(c) for c in cmd)
