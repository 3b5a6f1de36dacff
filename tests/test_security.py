"""Security: weights load weights-only, configs are data, environment secrets are never logged, and
a single-node run listens on loopback only.

Real processes and files. One tracked 2-process run (`tracked_run`) gives the checkpoint the weight
tests tamper with, the MLflow run and files searched for secrets, and the sockets its processes
listened on. A tampered file is a real ``torch.save`` archive whose pickle runs ``touch MARKER``
(`test_the_attack_files_are_live` shows it does under an unsafe load): the marker's absence is the
proof that nothing ran.
"""

from __future__ import annotations

import ast
import ipaddress
import json
import os
import pickle
import re
import shlex
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
import torch
import yaml

from sempa_dist import tracking
from sempa_dist.checkpoint import consolidated_state_dict, convert_to_universal
from sempa_dist.config import ConfigError, load_config
from sempa_dist.distributed import DistInfo
from sempa_dist.safe_load import UnsafeCheckpointError
from tests.distributed import REPO, sempa_train

RANK0 = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), backend="gloo")
# credentials as they sit in a job's environment (long enough to count as secrets, see redaction.py)
SECRETS = {"AWS_SECRET_ACCESS_KEY": "wJalrXUtnFEMI/K7MDENG/bPxRfiCYzSecretKey9", "MLFLOW_TRACKING_PASSWORD": "mlflow-pw-4f9c2e71b0",
           "WANDB_API_KEY": "3b1f0c9e8d7a6b5c4d3e2f1a0b9c8d7e6f5a4b3c"}
RUN_ARGS = ["configs/tiny_cpu.yaml", "train.max_steps=2", "train.save_every=0"]


# ----------------------------------------------------------------------------------------------
# Helpers


class Payload:
    """Unpickling this runs ``touch MARKER``: what a tampered checkpoint could do to whoever loads it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


def tamper(file: Path, marker: Path) -> Path:
    """Replace `file` by a torch.save archive under DeepSpeed's keys whose pickle runs a command."""
    torch.save({"module": Payload(marker), "optimizer_state_dict": Payload(marker)}, file)
    return file


class ListenWatcher(threading.Thread):
    """Samples the listening TCP sockets of every process under this process's `sempa_dist.cli.train`
    children until stopped: {(ip, port): process command}."""

    def __init__(self, period_s: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.period_s, self.seen, self._stop_event = period_s, {}, threading.Event()

    def _tree(self) -> list[psutil.Process]:
        procs = []
        for child in psutil.Process().children():
            try:
                if "sempa_dist.cli.train" in child.cmdline():
                    procs += [child, *child.children(recursive=True)]
            except psutil.Error:
                pass
        return procs

    def run(self) -> None:
        while not self._stop_event.is_set():
            for proc in self._tree():
                try:
                    for c in proc.net_connections(kind="inet"):
                        if c.status == psutil.CONN_LISTEN:
                            self.seen[(c.laddr.ip, c.laddr.port)] = " ".join(proc.cmdline()[1:4])
                except psutil.Error:  # the process ended between listing and reading
                    pass
            self._stop_event.wait(self.period_s)

    def stop(self) -> dict[tuple[str, int], str]:
        self._stop_event.set()
        self.join()
        return self.seen


def is_loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip.split("%")[0])
    return addr.is_loopback or bool(getattr(addr, "ipv4_mapped", None) and addr.ipv4_mapped.is_loopback)


@dataclass
class TrackedRun:
    root: Path  # holds the run directory, the sqlite store and its artifacts
    out: Path
    uri: str
    console: str
    listening: dict[tuple[str, int], str]

    @property
    def tag_dir(self) -> Path:
        ckpts = self.out / "checkpoints"
        return ckpts / (ckpts / "latest").read_text().strip()


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory) -> TrackedRun:
    """configs/tiny_cpu.yaml for 2 steps on 2 processes, tracked in a sqlite store, checkpoint and
    export at the end, with SECRETS in its environment; its listening sockets are sampled meanwhile."""
    root = tmp_path_factory.mktemp("security")
    out, uri = root / "run", f"sqlite:///{root}/mlflow.db"
    watcher = ListenWatcher()
    watcher.start()
    try:
        proc = sempa_train(*RUN_ARGS, f"train.output_dir={out}", f"tracking.uri={uri}", env=SECRETS)
    finally:
        listening = watcher.stop()
    return TrackedRun(root, out, uri, proc.stdout + proc.stderr, listening)


@pytest.fixture
def checkpoint_copy(tracked_run, tmp_path) -> Path:
    """A fresh run directory holding a copy of the tracked run's checkpoint as its `latest`."""
    ckpts = tmp_path / "run" / "checkpoints"
    ckpts.mkdir(parents=True)
    tag_dir = ckpts / tracked_run.tag_dir.name
    shutil.copytree(tracked_run.tag_dir, tag_dir, ignore=shutil.ignore_patterns("universal"))
    (ckpts / "latest").write_text(tag_dir.name + "\n")
    return tag_dir


# ----------------------------------------------------------------------------------------------
# Weights: every checkpoint file is loaded weights-only


def test_the_attack_files_are_live(tmp_path):
    """Control: the tampered files used below do run their command under an unsafe load."""
    marker = tmp_path / "MARKER"
    file = tamper(tmp_path / "x.pt", marker)
    torch.load(file, weights_only=False)
    assert marker.is_file()
    marker.unlink()
    yaml.unsafe_load(f'!!python/object/apply:os.system ["touch {marker}"]')
    assert marker.is_file()


@pytest.mark.slow
def test_export_of_a_real_checkpoint_loads_weights_only(tracked_run, checkpoint_copy):
    """Our own checkpoints need nothing beyond the allowlist: the run exported at its end, and the
    shards reassemble (weights-only) to the exported weights."""
    from safetensors.torch import load_file

    exported = load_file(tracked_run.out / "export" / "model.safetensors")
    forced = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    sd = consolidated_state_dict(checkpoint_copy)
    assert sd.keys() >= exported.keys() and len(exported) > 5
    for k, v in exported.items():
        torch.testing.assert_close(sd[k], v, rtol=0, atol=0)
    assert os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD") == forced  # forced only while loading


@pytest.mark.slow
@pytest.mark.parametrize("shard", ["zero_pp_rank_1_mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"])
def test_export_refuses_a_tampered_shard(checkpoint_copy, tmp_path, shard):
    marker = tmp_path / "MARKER"
    bad = tamper(checkpoint_copy / shard, marker)
    with pytest.raises(UnsafeCheckpointError, match=re.escape(str(bad))) as e:
        consolidated_state_dict(checkpoint_copy)
    assert "posix.system" in str(e.value)
    assert not marker.exists()


@pytest.mark.slow
def test_resume_refuses_a_tampered_shard(checkpoint_copy, tmp_path):
    """The optimizer shard (which needs the allowlisted DeepSpeed classes) of rank 0, on 2 ranks."""
    marker = tmp_path / "MARKER"
    bad = tamper(checkpoint_copy / "zero_pp_rank_0_mp_rank_00_optim_states.pt", marker)
    run_dir = checkpoint_copy.parent.parent
    proc = sempa_train(*RUN_ARGS, f"train.output_dir={run_dir}", "train.max_steps=3", "train.resume=auto",
                       "train.export=false", "tracking.enabled=false", check=False)
    assert proc.returncode != 0
    assert "UnsafeCheckpointError" in proc.stderr and f"refusing to load {bad}" in proc.stderr
    assert not marker.exists()
    assert not (run_dir / "metrics.jsonl").exists()  # no step ran


@pytest.mark.slow
def test_resume_on_another_world_size_refuses_a_tampered_universal_file(checkpoint_copy, tmp_path):
    """The universal conversion's files, which ZeRO-3 reads with its own torch.load calls (not the
    checkpoint engine), on 1 rank from a 2-rank checkpoint."""
    universal = convert_to_universal(checkpoint_copy)  # clean; cached for the resume below
    marker = tmp_path / "MARKER"
    bad = tamper(universal / "zero" / "model.lm_head.weight" / "fp32.pt", marker)
    run_dir = checkpoint_copy.parent.parent
    proc = sempa_train(*RUN_ARGS, f"train.output_dir={run_dir}", "train.max_steps=3", "train.resume=auto",
                       "train.nproc=1", "train.export=false", "tracking.enabled=false", check=False)
    assert proc.returncode != 0
    assert "UnsafeCheckpointError" in proc.stderr and f"refusing to load {bad}" in proc.stderr
    assert not marker.exists()


@pytest.mark.slow
def test_universal_conversion_refuses_a_tampered_shard(checkpoint_copy, tmp_path):
    marker = tmp_path / "MARKER"
    bad = tamper(checkpoint_copy / "zero_pp_rank_0_mp_rank_00_optim_states.pt", marker)
    with pytest.raises(RuntimeError, match=re.escape(f"refusing to load {bad}")):
        convert_to_universal(checkpoint_copy)
    assert not marker.exists()


def test_precomputed_reference_table_loads_weights_only(tmp_path):
    from sempa_dist.engines import precompute_reference, reference_fingerprint
    from sempa_dist.kernel_choice import AttentionChoice

    cfg = load_config(REPO / "configs/tiny_cpu.yaml", ["ref.mode=precomputed", f"ref.cache_dir={tmp_path}",
                                                       f"train.output_dir={tmp_path / 'run'}"])
    marker = tmp_path / "MARKER"
    attn = AttentionChoice("sdpa_varlen", True)
    tamper(tmp_path / f"ref-{reference_fingerprint(cfg, 'data-fp', attn.impl, torch.float32)}.pt", marker)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        precompute_reference(cfg, RANK0, [], "data-fp", attn, torch.float32)
    assert not marker.exists()


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return node.id if isinstance(node, ast.Name) else "?"


UNSAFE_CALLS = {"pickle.load", "pickle.loads", "yaml.load", "yaml.unsafe_load", "yaml.full_load", "marshal.load",
                "marshal.loads", "torch.jit.load", "eval", "exec"}


def test_package_has_no_unsafe_loader():
    """Every torch.load in sempa_dist says weights_only=True; no pickle, unsafe YAML, eval/exec,
    remote code or non-safetensors opt-out anywhere (DeepSpeed's own loads: sempa_dist.safe_load)."""
    problems = []
    for path in sorted((REPO / "sempa_dist").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.Call):
                continue
            name, where = _dotted(node.func), f"{path.relative_to(REPO)}:{node.lineno}"
            kw = {k.arg: k.value for k in node.keywords}
            if name in UNSAFE_CALLS:
                problems.append(f"{where}: {name}()")
            if name == "torch.load" and not (isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True):
                problems.append(f"{where}: torch.load without weights_only=True")
            for arg, unsafe in (("trust_remote_code", True), ("use_safetensors", False), ("weights_only", False)):
                if arg in kw and not (isinstance(kw[arg], ast.Constant) and kw[arg].value is not unsafe):
                    problems.append(f"{where}: {arg}={ast.unparse(kw[arg])}")
    assert not problems, problems


# ----------------------------------------------------------------------------------------------
# Configs are data, never code

PYTHON_TAGS = ['!!python/object/apply:os.system ["touch {m}"]', '!!python/object/new:os.system ["touch {m}"]',
               "!!python/name:os.system", "!!python/module:os"]


@pytest.mark.parametrize("tag", PYTHON_TAGS)
def test_python_tags_in_a_config_file_are_refused(tmp_path, tag):
    marker = tmp_path / "MARKER"
    path = tmp_path / "evil.yaml"
    path.write_text(f"model:\n  name: tiny-llama\ntrain:\n  output_dir: {tag.format(m=marker)}\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(path) in str(e.value) and "line 4" in str(e.value) and "python/" in str(e.value)
    assert not marker.exists()


@pytest.mark.parametrize("key", ["train.output_dir", "data.template", "train.max_steps", "loss"])
@pytest.mark.parametrize("tag", PYTHON_TAGS)
def test_python_tags_in_an_override_are_refused(tmp_path, key, tag):
    """Text fields too: the value is refused, not kept as a directory name or template."""
    marker = tmp_path / "MARKER"
    item = f"{key}={tag.format(m=marker)}"
    with pytest.raises(ConfigError, match="python tags are not allowed") as e:
        load_config(REPO / "configs/tiny_cpu.yaml", [item])
    assert f"command line ({item})" in str(e.value)
    assert not marker.exists()


# ----------------------------------------------------------------------------------------------
# Secrets in the environment are never logged


@pytest.mark.slow
def test_environment_secrets_are_never_logged(tracked_run, tmp_path):
    """Nowhere: MLflow params, tags, metric names, artifacts, the store and run directory's files
    (checkpoints and export included), nor the run's console output."""
    run_id = json.loads((tracked_run.out / tracking.STATE).read_text())["run_id"]
    client = tracking.open_client(tracked_run.uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and "loss" in run.data.metrics and "loss.beta" in run.data.params
    artifacts = Path(client.download_artifacts(run_id, "", str(tmp_path / "artifacts")))
    names = {p.name for p in artifacts.rglob("*") if p.is_file()}
    assert {"config.yaml", "summary.json", "deepspeed.json"} <= names, names
    texts = {"params": json.dumps(run.data.params), "tags": json.dumps(run.data.tags),
             "metric names": json.dumps(sorted(run.data.metrics)), "console": tracked_run.console}
    files = [p for p in [*artifacts.rglob("*"), *tracked_run.root.rglob("*")] if p.is_file()]
    assert any(p.suffix == ".pt" for p in files) and any(p.name == "mlflow.db" for p in files)
    for name, secret in SECRETS.items():
        for what, text in texts.items():
            assert secret not in text, (name, what)
        leaked = [str(p) for p in files if secret.encode() in p.read_bytes()]
        assert not leaked, (name, leaked)


# ----------------------------------------------------------------------------------------------
# Servers: a single-node run listens on loopback only


@pytest.mark.slow
def test_single_node_run_listens_on_loopback_only(tracked_run):
    """Every socket the processes of `sempa-train train.nproc=2` listened on is 127.0.0.1 or ::1
    (the rendezvous store sempa-train serves, and the ranks' gloo sockets)."""
    listening = tracked_run.listening
    whos = " ".join(listening.values())
    # the sampler saw both the store (served by sempa-train) and the ranks' sockets
    assert "sempa_dist.cli.train" in whos and "sempa_dist.train" in whos, listening
    outside = sorted(f"{ip}:{port} ({who})" for (ip, port), who in listening.items() if not is_loopback(ip))
    assert not outside, outside
