#!/usr/bin/env bash
# Runs INSIDE the VM that tests/vm/test_vm.py boots (virtme-ng, this machine's filesystem shared
# read-only): the kernel-backend tests under tests/vm/guest, with the project's own virtualenv.
#
#   in_guest.sh REPO SCRATCH [PYTEST ARGS...]
#
# REPO is the checkout (read-only here). SCRATCH is a host directory shared read-write (--rwdir):
# the results go there — kernel-release, junit.xml, exit-status — for the host to check.
# Everything else that must be written (pytest's tmp, namespaces' /etc/netns) lands on the
# guest's own tmpfs overlays and vanishes with the VM.
set -uo pipefail
repo=$1 scratch=$2
shift 2

uname -r >"$scratch/kernel-release"
echo "in_guest: kernel $(uname -r), $(nproc) CPUs, $(awk '/MemTotal/ {print $2 " kB"}' /proc/meminfo)"
# wireguard-go needs /dev/net/tun; nothing in the VM loads tun by itself. (WireGuard is not
# loaded here on purpose: `ip link add type wireguard` must autoload it, as on a real host.)
modprobe tun

export PATH="$repo/.venv/bin:$PATH" VMTEST_GUEST=1 PYTHONDONTWRITEBYTECODE=1
cd "$repo"
status=0
# No cache and no hypothesis plugin: both want to write into the read-only checkout, and the
# guest tests use neither.
python -m pytest tests/vm/guest -p no:cacheprovider -p no:hypothesispytest \
    --basetemp=/tmp/tunneld-vm-tests -v -ra --durations=0 --junitxml="$scratch/junit.xml" "$@" \
    || status=$?
echo "$status" >"$scratch/exit-status"
exit "$status"
