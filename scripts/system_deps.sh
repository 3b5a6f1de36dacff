#!/usr/bin/env bash
# System packages the multi-node tests use: a Slurm cluster on this one machine (tests/test_slurm.py)
# and pdsh over ssh to localhost (tests/test_launch.py). Called by `make test` before pytest.
#
# Installs only what is missing, only as root with apt-get, quietly and without recommends (the
# recommends pull in mail servers and docs). Anywhere else it says why and exits 0: those tests then
# skip with a reason, the rest of the suite runs.
set -euo pipefail

PACKAGES=(slurmctld slurmd slurm-client munge openssh-server openssh-client pdsh)

if ! command -v apt-get >/dev/null 2>&1 || ! command -v dpkg-query >/dev/null 2>&1; then
  echo "system_deps: no apt-get/dpkg here; not installing ${PACKAGES[*]} (slurm/pdsh tests will skip)"
  exit 0
fi
if [[ $(id -u) -ne 0 ]]; then
  echo "system_deps: not root; not installing ${PACKAGES[*]} (slurm/pdsh tests will skip)"
  exit 0
fi

missing=()
for pkg in "${PACKAGES[@]}"; do
  # "install ok installed" is dpkg's status of a fully installed package; anything else counts as missing
  if [[ $(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null || true) != "install ok installed" ]]; then
    missing+=("$pkg")
  fi
done
if [[ ${#missing[@]} -eq 0 ]]; then
  echo "system_deps: ${PACKAGES[*]} already installed"
  exit 0
fi

echo "system_deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
# a failed install must not stop `make test`: the tests that need these packages skip with the reason
if ! { apt-get update -qq && apt-get install -y -qq --no-install-recommends "${missing[@]}"; } >/tmp/system_deps.log 2>&1; then
  echo "system_deps: apt-get failed (log: /tmp/system_deps.log, tail below); continuing without ${missing[*]}"
  tail -n 5 /tmp/system_deps.log || true
  exit 0
fi
echo "system_deps: done"
