#!/usr/bin/env bash
# Gateway benchmark on a fresh machine: installs nginx, wrk and Go if missing, builds the
# release binaries, then runs bench/gateway.py (our gateway vs nginx vs the seed's Go
# gateway). Arguments are passed to gateway.py, e.g. --reps 3 --duration 8.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=bench/tools.sh
source bench/tools.sh

build_release_binaries
exec python3 bench/gateway.py "$@"
