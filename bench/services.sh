#!/usr/bin/env bash
# Service benchmark on a fresh machine: installs wrk, nginx, Go and PostgreSQL if missing,
# builds the release binaries, then runs bench/services.py (catalogue reads against the
# seed's Go product service and nginx, orders through the gateway on SQLite and
# PostgreSQL). Arguments are passed to services.py, e.g. --reps 3 --duration 8.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v nginx >/dev/null || need+=(nginx)
command -v wrk >/dev/null || need+=(wrk)
command -v go >/dev/null || need+=(golang-go)
command -v psql >/dev/null || need+=(postgresql-client)
compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null || need+=(postgresql)
if [ ${#need[@]} -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
# The Debian package starts a default nginx on :80; the benchmark runs its own.
systemctl stop nginx 2>/dev/null || true

cargo build --release --locked -p shop-product -p shop-order -p shop-user -p shop-gateway
exec python3 bench/services.py "$@"
