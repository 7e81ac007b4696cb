#!/usr/bin/env bash
# Install the Debian packages of the real services the tests start (nothing is mocked): one
# apt-get call for every group named on the command line, idempotent (installed packages are
# skipped). Groups: slurm, postgres, chromium; no argument = all of them.
#
#   services/install.sh              # everything the test suite needs
#   services/install.sh chromium     # one group
set -euo pipefail

declare -A GROUPS_=(
  [slurm]="slurmctld slurmd slurm-client munge"
  [postgres]="postgresql"
  [chromium]="chromium chromium-driver"
)

groups=("$@")
[ ${#groups[@]} -gt 0 ] || groups=("${!GROUPS_[@]}")
wanted=()
for g in "${groups[@]}"; do
  [ -n "${GROUPS_[$g]+x}" ] || { echo "services/install.sh: unknown group '$g' (known: ${!GROUPS_[*]})" >&2; exit 2; }
  for p in ${GROUPS_[$g]}; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || wanted+=("$p")
  done
done
[ ${#wanted[@]} -gt 0 ] || exit 0
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -q >/dev/null
$SUDO apt-get install -y -q --no-install-recommends "${wanted[@]}" >/dev/null
echo "installed: ${wanted[*]}"
