#!/usr/bin/env bash
# sbatch slurm/train_8x8.sh CONFIG [section.key=value ...]
#
# SemPA training on 8 nodes x 8 GPUs: one torchrun per node (started by srun), 8 ranks each.
# Preemptible: Slurm sends SIGUSR1 to this script 180 s before the time limit; it is forwarded to
# every rank, the trainer checkpoints at the next step boundary, writes <output_dir>/PREEMPTED and
# exits 75; this script then requeues the job, and the next start continues (`train.resume=auto`).
#
# Everything that differs between the 8x8 cluster and a smaller or CPU-only test is overridable:
#   sbatch options (they override the #SBATCH lines below): --nodes, --gpus-per-node, --cpus-per-task,
#     --time, --partition, --output, --signal ...
#   environment (sbatch exports the submitting shell's environment by default):
#     SEMPA_REPO            checkout to run from                 (default: the submit directory)
#     SEMPA_PYTHON          python with torch>=2.12, deepspeed   (default: python3 on PATH)
#     SEMPA_NPROC_PER_NODE  ranks per node                       (default: GPUs on the node, 1 without GPUs)
#     SEMPA_ACCELERATOR     cuda | cpu | auto                    (default auto: cpu when no GPUs allocated;
#                           the trainer then uses gloo instead of NCCL)
#     SEMPA_ENV_FILE        NCCL & co. settings (KEY=VALUE)      (default: $SEMPA_REPO/slurm/nccl.env)
#     SEMPA_MASTER_ADDR / SEMPA_MASTER_PORT  rendezvous address (default: first node, port from the job id)
#     SEMPA_SHUTDOWN_TIMEOUT seconds torchrun waits for ranks to checkpoint after a signal (default 170)
# Scaled-down example (2 CPU nodes, one rank each; what tests/test_slurm.py submits):
#   sbatch --nodes=2 --gpus-per-node=0 --cpus-per-task=1 --time=10 slurm/train_8x8.sh configs/tiny_cpu.yaml
#
#SBATCH --job-name=sempa-8x8
#SBATCH --nodes=8
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=24:00:00
#SBATCH --exclusive
#SBATCH --output=slurm-%x-%j.out
#SBATCH --open-mode=append
#SBATCH --requeue
#SBATCH --signal=B:USR1@180
# One log per job: %j is kept across requeues and --open-mode=append adds each restart to the same
# file (the default truncates it). --requeue makes the job requeue-able (scontrol requeue, and node
# failures). --signal=B:... sends USR1 to this batch shell only, not to the job steps: see forward().

set -euo pipefail

log() { echo "[$(date '+%F %T')] train_8x8: $*"; }

# --- preemption. USR1 reaches only this shell (--signal=B:); `kill -USR1 <srun>` makes srun forward
# it to the job step, and slurmstepd signals every process of the step: each torchrun and each rank.
# torchrun must not die of it (SIGUSR1's default action) while its ranks checkpoint:
# --signals_to_handle makes it pass USR1 on and wait up to --shutdown_timeout for them (torchrun has
# --signals_to_handle since torch 2.10, pytorch#160690, and --shutdown_timeout since torch 2.12,
# pytorch#172596; an older one rejects them: see the torch check below).
# TERM (scancel, the time limit, an external `scontrol requeue`) is sent by Slurm to every process
# itself; the trap only keeps this shell alive (bash would die of TERM) so srun is not torn down
# while the ranks checkpoint within KillWait.
usr1=0
term=0
srun_pid=
# shellcheck disable=SC2317  # called by the traps below
forward() {
  log "got SIG$1"
  if [[ $1 == USR1 ]]; then
    usr1=1
    if [[ -n $srun_pid ]]; then
      kill -s USR1 "$srun_pid" 2>/dev/null || true
    fi
  else
    term=1
  fi
}
trap 'forward USR1' USR1
trap 'forward TERM' TERM

if [[ $# -lt 1 ]]; then
  echo "usage: sbatch slurm/train_8x8.sh CONFIG [section.key=value ...]" >&2
  exit 2
fi
CONFIG=$1
shift
: "${SLURM_JOB_ID:?run this with sbatch (or inside an salloc allocation)}"

# --- where the code is: sbatch runs a copy of this script from the spool directory, so $0 says
# nothing about the checkout; the submit directory does (submit from the repo root).
SEMPA_REPO=${SEMPA_REPO:-${SLURM_SUBMIT_DIR:-$PWD}}
PY=${SEMPA_PYTHON:-python3}
cd "$SEMPA_REPO"
# the ranks import this checkout, whatever is installed in the environment
export PYTHONPATH="$SEMPA_REPO${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

# --- torch new enough for the launch below: torchrun has --signals_to_handle since torch 2.10 and
# --shutdown_timeout since 2.12. `make setup` keeps a cluster's preinstalled torch, and an older
# torchrun would reject the flags only after srun started it on every node. Asked of the same $PY the
# ranks run (a path all nodes share), compared by major.minor (2.12.0+cu128 and 2.13.0a0+git... pass).
# Stop, not launch without the flags: torchrun would then die of the time limit's USR1 (before 2.10)
# or SIGKILL its ranks 30 s after the signal whatever SEMPA_SHUTDOWN_TIMEOUT says (before 2.12), and
# every preemption would lose the steps since the last periodic checkpoint: a warning line in a
# day-long log does not prevent that, failing here costs seconds and says what to install.
TORCH_MIN=2.12
major_minor() {  # "2.12.0+cu128" -> 2012; 0 when it is not a version
  if [[ $1 =~ ^([0-9]+)\.([0-9]+) ]]; then
    echo $((10#${BASH_REMATCH[1]} * 1000 + 10#${BASH_REMATCH[2]}))
  else
    echo 0
  fi
}
if ! torch_version=$("$PY" -c 'import torch; print(torch.__version__)'); then
  echo "train_8x8: $PY cannot import torch (SEMPA_PYTHON: the python with torch and deepspeed)" >&2
  exit 2
fi
if (( $(major_minor "$torch_version") < $(major_minor "$TORCH_MIN") )); then
  echo "train_8x8: torch $torch_version in $PY is too old: this launch needs torch >= $TORCH_MIN" \
    "(torchrun --signals_to_handle/--shutdown_timeout, for preemption checkpoints);" \
    "install it (pip install 'torch>=$TORCH_MIN') or set SEMPA_PYTHON to a python that has it" >&2
  exit 2
fi

# --- GPUs, ranks per node, accelerator. SLURM_GPUS_ON_NODE counts the GPUs however they were asked
# for (--gpus-per-node, --gres=gpu:N); SLURM_GPUS_PER_NODE is "8" or "h100:8"; unset or 0: none.
gpus=${SLURM_GPUS_ON_NODE:-${SLURM_GPUS_PER_NODE:-0}}
gpus=${gpus##*:}
NPROC_PER_NODE=${SEMPA_NPROC_PER_NODE:-$((gpus > 0 ? gpus : 1))}
ACCELERATOR=${SEMPA_ACCELERATOR:-auto}
if [[ $ACCELERATOR == auto ]]; then
  ACCELERATOR=$([[ $gpus -gt 0 ]] && echo cuda || echo cpu)
fi
case $ACCELERATOR in
  cuda) export DS_ACCELERATOR=cuda ;;
  # hide any GPU from the ranks: the trainer then picks the CPU device and the gloo backend
  cpu) export DS_ACCELERATOR=cpu CUDA_VISIBLE_DEVICES="" ;;
  *) echo "SEMPA_ACCELERATOR must be cuda, cpu or auto, got '$ACCELERATOR'" >&2; exit 2 ;;
esac
# one intra-op thread pool per rank that shares the node's CPUs instead of oversubscribing them
cpus_per_node=${SLURM_CPUS_PER_TASK:-${SLURM_CPUS_ON_NODE:-1}}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$((cpus_per_node / NPROC_PER_NODE > 0 ? cpus_per_node / NPROC_PER_NODE : 1))}

# --- NCCL and other fabric settings: one file, exported to every rank (srun passes the environment
# on). Read line by line, not `source`d: the same KEY=VALUE text sempa-launch reads, no code run, and
# a variable already set in the submitting environment wins (NCCL_DEBUG=INFO sbatch ... for one run).
ENV_FILE=${SEMPA_ENV_FILE:-$SEMPA_REPO/slurm/nccl.env}
if [[ -f $ENV_FILE ]]; then
  while IFS= read -r line || [[ -n $line ]]; do
    line=${line#"${line%%[![:space:]]*}"}  # leading blanks
    [[ -z $line || $line == \#* ]] && continue
    line=${line#export }
    key=${line%%=*}
    value=${line#*=}
    value=${value%"${value##*[![:space:]]}"}  # trailing blanks
    if [[ $line != *=* || ! $key =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]]; then
      echo "$ENV_FILE: expected KEY=VALUE, got '$line'" >&2
      exit 2
    fi
    if [[ $value =~ ^\"(.*)\"$ || $value =~ ^\'(.*)\'$ ]]; then
      value=${BASH_REMATCH[1]}
    fi
    [[ -n ${!key+set} ]] || export "$key=$value"
  done <"$ENV_FILE"
fi

# --- rendezvous: rank 0's node. mapfile instead of `| head -n1`: with pipefail, head closing the
# pipe early could fail the script with SIGPIPE on a long node list.
mapfile -t job_nodes < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
first_node=${job_nodes[0]}
if [[ -n ${SEMPA_MASTER_ADDR:-} ]]; then
  MASTER_ADDR=$SEMPA_MASTER_ADDR
elif getent hosts "$first_node" >/dev/null; then
  MASTER_ADDR=$first_node
else
  # node names that are not in DNS (or /etc/hosts): the address slurmd itself is reached at
  MASTER_ADDR=$(scontrol show node "$first_node" | grep -o 'NodeAddr=[^ ]*' | cut -d= -f2)
fi
# a port per job, so two jobs sharing a node never collide; shifted on every restart, so a
# requeued run never meets the previous run's socket in TIME_WAIT
MASTER_PORT=${SEMPA_MASTER_PORT:-$((20000 + (SLURM_JOB_ID % 10000) * 4 + ${SLURM_RESTART_COUNT:-0} % 4))}
export MASTER_ADDR MASTER_PORT

# --- the run: resume from the latest complete checkpoint, so a requeued job continues. A user's
# train.resume (e.g. a checkpoint to fine-tune from) wins on the first start only.
overrides=(train.resume=auto "$@")
if [[ ${SLURM_RESTART_COUNT:-0} -gt 0 ]]; then
  overrides+=(train.resume=auto)
fi
# Check the config (and that the global batch divides the world size) before 64 GPUs start, and
# learn the output directory: the preemption marker is written there.
WORLD_SIZE=$((SLURM_NNODES * NPROC_PER_NODE))
OUTPUT_DIR=$("$PY" - "$CONFIG" "$WORLD_SIZE" "${overrides[@]}" <<'EOF'
import os, sys
from sempa_dist.config import ConfigError, load_config
try:
    cfg = load_config(sys.argv[1], sys.argv[3:]).validate(world_size=int(sys.argv[2]))
except ConfigError as e:
    sys.exit(f"config error: {e}")
print(os.path.abspath(cfg.train.output_dir))
EOF
)
mkdir -p "$OUTPUT_DIR"
rm -f "$OUTPUT_DIR/PREEMPTED"  # a marker left by the previous (preempted) run is not this run's
if [[ $usr1 -eq 1 ]]; then  # preempted before any rank started: nothing to save, come back later
  log "preempted before the start: requeueing job $SLURM_JOB_ID"
  scontrol requeue "$SLURM_JOB_ID"
  exit 0
fi

log "job $SLURM_JOB_ID restart ${SLURM_RESTART_COUNT:-0}: ${SLURM_NNODES} nodes (${job_nodes[*]}) x $NPROC_PER_NODE ranks," \
  "$ACCELERATOR, rendezvous $MASTER_ADDR:$MASTER_PORT, output $OUTPUT_DIR"

# One torchrun per node (srun, 1 task per node). Static rendezvous (--master_addr/--node_rank) and
# not c10d: the world is fixed, and node_rank = SLURM_NODEID puts global rank 0 on the first node,
# where MASTER_ADDR points (its lines carry the prefix "0:" in the log); a lost node fails the whole
# step (--kill-on-bad-exit) instead of leaving the others hanging in a collective, and the job is
# resubmitted or requeued (it resumes) rather than shrunk.
# torchrun and not `deepspeed --launcher slurm`: the latter runs one srun task per GPU with no
# per-node agent, and the trainer's signal handling is the same either way; torchrun also reports
# every rank's exit code and kills the node's other ranks when one dies.
# shellcheck disable=SC2054  # the commas are torchrun's list syntax
torchrun_args=(
  --nnodes="$SLURM_NNODES" --nproc_per_node="$NPROC_PER_NODE"
  --master_addr="$MASTER_ADDR" --master_port="$MASTER_PORT" --max_restarts=0
  --signals_to_handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1
  --shutdown_timeout="${SEMPA_SHUTDOWN_TIMEOUT:-170}"
  -m sempa_dist.train "$CONFIG" "${overrides[@]}"
)
srun_args=(--nodes="$SLURM_NNODES" --ntasks-per-node=1 --kill-on-bad-exit=1 --label)
# srun (22.05+) does not inherit the job's --cpus-per-task: pass it on, or each torchrun gets one CPU
[[ -n ${SLURM_CPUS_PER_TASK:-} ]] && srun_args+=(--cpus-per-task="$SLURM_CPUS_PER_TASK")

# In the background: bash runs traps only between commands, and `wait` returns as soon as one fires.
# shellcheck disable=SC2016  # $SLURM_NODEID must expand in each task, not here
srun "${srun_args[@]}" bash -c 'exec "$0" -m torch.distributed.run --node_rank="$SLURM_NODEID" "$@"' \
  "$PY" "${torchrun_args[@]}" &
srun_pid=$!
while true; do
  rc=0
  wait "$srun_pid" || rc=$?
  kill -0 "$srun_pid" 2>/dev/null || break  # srun ended (not just a trap interrupting `wait`)
done
log "srun exited $rc"

# The ranks exit 75 after a preemption checkpoint; torchrun reports that as 1, so the marker (or our
# own USR1 with a failed step) is what says "preempted" here.
if [[ $rc -ne 0 && $term -eq 0 && ( -f $OUTPUT_DIR/PREEMPTED || $usr1 -eq 1 ) ]]; then
  log "preempted ($(cat "$OUTPUT_DIR/PREEMPTED" 2>/dev/null || echo 'no marker')): requeueing job $SLURM_JOB_ID"
  scontrol requeue "$SLURM_JOB_ID"
  exit 0  # Slurm is already ending this run; the requeued one resumes from the checkpoint
fi
if [[ $term -eq 1 && -f $OUTPUT_DIR/PREEMPTED ]]; then
  log "stopped by SIGTERM after a checkpoint; Slurm decides whether this job comes back"
  exit 75
fi
exit "$rc"
