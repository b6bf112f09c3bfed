#!/usr/bin/env bash
# Install Debian's slurm-wlm + munge for the one-node SLURM tests (tests/e2e/).
# Idempotent: does nothing when slurmctld is already on PATH.
# Always exits 0: when the install fails it says why, and the tests that need SLURM skip with a reason.
set -u

if command -v slurmctld >/dev/null 2>&1 && command -v munged >/dev/null 2>&1; then
    echo "install_slurm: slurmctld and munged already installed"
    exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then
        SUDO="sudo -n"
    else
        echo "install_slurm: not root and no sudo; SLURM tests will skip"
        exit 0
    fi
fi

if ! command -v apt-get >/dev/null 2>&1; then
    echo "install_slurm: no apt-get on this machine; SLURM tests will skip"
    exit 0
fi

export DEBIAN_FRONTEND=noninteractive
log="$(mktemp)"
if ! $SUDO apt-get update -q >"$log" 2>&1; then
    echo "install_slurm: apt-get update failed; SLURM tests will skip:"
    tail -n 5 "$log"
    rm -f "$log"
    exit 0
fi
if ! $SUDO apt-get install -y -q --no-install-recommends slurm-wlm munge >"$log" 2>&1; then
    echo "install_slurm: apt-get install slurm-wlm munge failed; SLURM tests will skip:"
    tail -n 10 "$log"
    rm -f "$log"
    exit 0
fi
rm -f "$log"
if command -v slurmctld >/dev/null 2>&1; then
    echo "install_slurm: installed $(slurmctld -V 2>/dev/null || echo slurm-wlm)"
else
    echo "install_slurm: apt-get reported success but slurmctld is not on PATH; SLURM tests will skip"
fi
exit 0
