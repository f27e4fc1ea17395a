# shellcheck shell=bash
# Sourced by the bench/*.sh entry points: installs what the benchmarks run (wrk, nginx,
# taskset, Go, PostgreSQL) when missing, and stops the nginx Debian starts on :80 (each
# benchmark runs its own).
need=()
command -v nginx >/dev/null || need+=(nginx)
command -v wrk >/dev/null || need+=(wrk)
command -v taskset >/dev/null || need+=(util-linux)
command -v go >/dev/null || need+=(golang-go)
command -v psql >/dev/null || need+=(postgresql-client)
compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null || need+=(postgresql)
[ -x /usr/lib/rabbitmq/bin/rabbitmq-server ] || need+=(rabbitmq-server)
if [ ${#need[@]} -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
systemctl stop nginx 2>/dev/null || true

# The Dockerfile's build command: the same packages and features, so the benchmarks measure
# the binaries the images ship.
build_release_binaries() {
  cargo build --release --locked --workspace --bin gateway --bin product --bin order --bin user
}
