#!/usr/bin/env bash
# Service benchmark on a fresh machine: installs wrk, nginx, Go and PostgreSQL if missing,
# builds the release binaries, then runs bench/services.py (catalogue reads against the
# seed's Go product service and nginx, orders through the gateway on SQLite and
# PostgreSQL). Arguments are passed to services.py, e.g. --reps 3 --duration 8.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=bench/tools.sh
source bench/tools.sh

build_release_binaries
exec python3 bench/services.py "$@"
