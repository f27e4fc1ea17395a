#!/usr/bin/env bash
# Gateway benchmark on a fresh machine: installs nginx, wrk and Go if missing, builds the
# release binaries, then runs bench/gateway.py (our gateway vs nginx vs the seed's Go
# gateway). Arguments are passed to gateway.py, e.g. --reps 3 --duration 8.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v nginx >/dev/null || need+=(nginx)
command -v wrk >/dev/null || need+=(wrk)
command -v taskset >/dev/null || need+=(util-linux)
command -v go >/dev/null || need+=(golang-go)
if [ ${#need[@]} -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
# The Debian package starts a default nginx on :80; the benchmark runs its own.
systemctl stop nginx 2>/dev/null || true

cargo build --release --locked -p shop-product -p shop-gateway
exec python3 bench/gateway.py "$@"
