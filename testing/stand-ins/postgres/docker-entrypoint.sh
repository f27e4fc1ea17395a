#!/usr/bin/env bash
# Entrypoint of the PostgreSQL stand-in image (see Containerfile): the documented behaviour
# of the official image's entrypoint (https://hub.docker.com/_/postgres, "Environment
# Variables", "Initialization scripts", "Arbitrary --user Notes"), written for this project.
#
#   POSTGRES_PASSWORD       superuser password; required to initialise a new data directory
#                           unless POSTGRES_HOST_AUTH_METHOD=trust
#   POSTGRES_USER           superuser name (default postgres)
#   POSTGRES_DB             database created at initialisation (default: POSTGRES_USER)
#   POSTGRES_INITDB_ARGS    extra initdb arguments, shell-quoted ("--data-checksums ...")
#   POSTGRES_INITDB_WALDIR  a separate WAL directory for initdb --waldir
#   POSTGRES_HOST_AUTH_METHOD  method of the "host all all all" line appended to pg_hba.conf
#                           (default: the server's password_encryption, scram-sha-256)
#   NAME_FILE               for each of the first four: read NAME from this file (a mounted
#                           Secret); setting both NAME and NAME_FILE is an error.
#
# Started as root, it prepares $PGDATA and /var/run/postgresql for the postgres user and runs
# itself again as that user (setpriv stands in for gosu). Started as any other UID (a pod's
# runAsUser), it runs as that UID; when the UID has no passwd entry, initdb (the one program
# here that insists on one) gets a "postgres" entry from nss_wrapper. A data directory
# without PG_VERSION is initialised: initdb, a temporary server on the Unix socket only, the
# database, /docker-entrypoint-initdb.d/*, stop. Then the server is exec'd as PID 1 (it
# listens on '*' from the sample configuration). Only $PGDATA, /var/run/postgresql and /tmp
# are written, so a read-only root file system is fine.
#
# Sourcing this file defines the functions without running anything.
set -Eeo pipefail

log() { printf '%s: %s\n' "$(basename "$0")" "$*"; }
die() { printf '%s: error: %s\n' "$(basename "$0")" "$*" >&2; exit 1; }

# from_env_or_file NAME [DEFAULT]: export NAME, taken from NAME, else from the file named by
# NAME_FILE, else DEFAULT; NAME_FILE is removed from the environment either way.
from_env_or_file() {
  local name=$1 default=${2:-}
  local file_name="${name}_FILE"
  local direct=${!name:-} file=${!file_name:-}
  if [[ -n "$direct" && -n "$file" ]]; then
    die "both $name and $file_name are set, they are exclusive"
  fi
  local value=$default
  if [[ -n "$direct" ]]; then
    value=$direct
  elif [[ -n "$file" ]]; then
    value=$(<"$file")
  fi
  export "$name=$value"
  unset "$file_name"
}

load_settings() {
  from_env_or_file POSTGRES_PASSWORD
  from_env_or_file POSTGRES_USER postgres
  from_env_or_file POSTGRES_DB "$POSTGRES_USER"
  from_env_or_file POSTGRES_INITDB_ARGS
  POSTGRES_HOST_AUTH_METHOD=${POSTGRES_HOST_AUTH_METHOD:-}
  # PG_VERSION is the marker initdb leaves in every data directory.
  PGDATA_INITIALISED=
  if [[ -s "$PGDATA/PG_VERSION" ]]; then
    PGDATA_INITIALISED=yes
  fi
}

# The directories the server writes to. Modes may not be changeable (a volume owned by
# someone else, a non-root UID): PostgreSQL itself complains later if that matters.
prepare_directories() {
  local uid
  uid=$(id -u)
  mkdir -p "$PGDATA"
  chmod 0700 "$PGDATA" 2>/dev/null || true
  mkdir -p /var/run/postgresql 2>/dev/null || true
  chmod 3775 /var/run/postgresql 2>/dev/null || true
  if [[ -n "${POSTGRES_INITDB_WALDIR:-}" ]]; then
    mkdir -p "$POSTGRES_INITDB_WALDIR"
    [[ "$uid" != 0 ]] || chown_to_postgres "$POSTGRES_INITDB_WALDIR"
    chmod 0700 "$POSTGRES_INITDB_WALDIR"
  fi
  if [[ "$uid" == 0 ]]; then
    chown_to_postgres "$PGDATA"
    chown_to_postgres /var/run/postgresql
  fi
}

# Only what is not already the postgres user's: a large existing data directory is not
# walked through chown again on every start.
chown_to_postgres() { find "$1" ! -user postgres -exec chown postgres {} +; }

# Runs initdb, giving the current UID a passwd entry through nss_wrapper when it has none
# (initdb looks its own user up and stops if that fails). The fake passwd and group files
# live in a private directory under /tmp and only for as long as initdb runs.
run_initdb() {
  local uid gid lib wrapper='' fake_dir=''
  uid=$(id -u)
  gid=$(id -g)
  if ! getent passwd "$uid" >/dev/null 2>&1; then
    for lib in /usr/lib/*/libnss_wrapper.so /usr/lib/libnss_wrapper.so /lib/*/libnss_wrapper.so /lib/libnss_wrapper.so; do
      if [[ -s "$lib" ]]; then
        wrapper=$lib
        break
      fi
    done
    [[ -n "$wrapper" ]] || log "UID $uid has no passwd entry and libnss_wrapper.so is missing; initdb may fail"
  fi

  local -a args=(--username="$POSTGRES_USER")
  if [[ -n "${POSTGRES_INITDB_WALDIR:-}" ]]; then
    args+=(--waldir="$POSTGRES_INITDB_WALDIR")
  fi
  # POSTGRES_INITDB_ARGS is shell syntax (it may quote values with spaces), as upstream.
  local -a extra=()
  eval "extra=( ${POSTGRES_INITDB_ARGS:-} )"

  # The password goes through a pipe, never a file or the command line. An empty file makes
  # initdb fail, hence the newline (a "trust" setup may have no password).
  if [[ -n "$wrapper" ]]; then
    fake_dir=$(mktemp -d "${TMPDIR:-/tmp}/nss_wrapper.XXXXXXXX")
    printf 'postgres:x:%s:%s:PostgreSQL:%s:/bin/false\n' "$uid" "$gid" "$PGDATA" >"$fake_dir/passwd"
    printf 'postgres:x:%s:\n' "$gid" >"$fake_dir/group"
    LD_PRELOAD=$wrapper NSS_WRAPPER_PASSWD=$fake_dir/passwd NSS_WRAPPER_GROUP=$fake_dir/group \
      initdb "${args[@]}" --pwfile=<(printf '%s\n' "$POSTGRES_PASSWORD") "${extra[@]}" ||
      { rm -rf "$fake_dir"; return 1; }
    rm -rf "$fake_dir"
  else
    initdb "${args[@]}" --pwfile=<(printf '%s\n' "$POSTGRES_PASSWORD") "${extra[@]}"
  fi
}

# A new data directory needs a password, or an explicit decision for "trust".
check_settings_for_init() {
  if [[ -z "$POSTGRES_PASSWORD" && "$POSTGRES_HOST_AUTH_METHOD" != trust ]]; then
    cat >&2 <<'EOF'
Error: the database is uninitialized and no superuser password is given.
       Set POSTGRES_PASSWORD (or POSTGRES_PASSWORD_FILE) to a non-empty value, or
       POSTGRES_HOST_AUTH_METHOD=trust to accept every connection without a password
       (not recommended; https://www.postgresql.org/docs/current/auth-trust.html).
EOF
    exit 1
  fi
  if [[ "$POSTGRES_HOST_AUTH_METHOD" == trust ]]; then
    cat >&2 <<'EOF'
WARNING: POSTGRES_HOST_AUTH_METHOD=trust: every client that reaches the port can connect
         as any role without a password, whatever POSTGRES_PASSWORD says.
EOF
  fi
}

# Remote connections: one line for all hosts, with the method the password is stored for
# (password_encryption, scram-sha-256 unless the server arguments say otherwise).
append_host_rule() {
  [[ "${1:-}" != postgres ]] || shift
  if [[ -z "$POSTGRES_HOST_AUTH_METHOD" ]]; then
    POSTGRES_HOST_AUTH_METHOD=$(postgres -C password_encryption "$@")
  fi
  {
    printf '\n'
    if [[ "$POSTGRES_HOST_AUTH_METHOD" == trust ]]; then
      printf '# trust: any host may connect as any role without a password\n'
    fi
    printf 'host all all all %s\n' "$POSTGRES_HOST_AUTH_METHOD"
  } >>"$PGDATA/pg_hba.conf"
}

# The server for initialisation: the given server arguments, but no TCP listener, so
# nothing outside the container sees a half-initialised database.
start_init_server() {
  [[ "${1:-}" != postgres ]] || shift
  local options
  options=$(printf '%q ' "$@" -c "listen_addresses=" -p "${PGPORT:-5432}")
  NOTIFY_SOCKET='' PGUSER="${PGUSER:-$POSTGRES_USER}" pg_ctl -D "$PGDATA" -o "$options" -w start
}

stop_init_server() {
  PGUSER="${PGUSER:-$POSTGRES_USER}" pg_ctl -D "$PGDATA" -m fast -w stop
}

# psql on the init server's Unix socket as the superuser, stopping at the first error;
# connects to POSTGRES_DB unless a --dbname follows.
run_sql() {
  local -a cmd=(psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --no-password --no-psqlrc)
  if [[ -n "$POSTGRES_DB" ]]; then
    cmd+=(--dbname "$POSTGRES_DB")
  fi
  PGHOST='' PGHOSTADDR='' "${cmd[@]}" "$@"
}

create_database() {
  local found
  found=$(run_sql --dbname postgres --set db="$POSTGRES_DB" --tuples-only --no-align \
    <<<"SELECT 1 FROM pg_database WHERE datname = :'db';")
  if [[ -z "$found" ]]; then
    run_sql --dbname postgres --set db="$POSTGRES_DB" <<<'CREATE DATABASE :"db";'
  fi
}

# Init files in name order: *.sh run (executable) or sourced (so they can use run_sql and
# the settings above), SQL files fed to psql, plain or compressed; anything else ignored.
run_init_files() {
  local f
  for f in "$@"; do
    [[ -e "$f" ]] || continue # an empty directory's unexpanded glob
    case "$f" in
      *.sh)
        if [[ -x "$f" ]]; then
          log "running $f"
          "$f"
        else
          log "sourcing $f"
          # shellcheck disable=SC1090 # whatever the user mounted
          . "$f"
        fi
        ;;
      *.sql) log "running $f"; run_sql -f "$f" ;;
      *.sql.gz) log "running $f"; gzip -dc "$f" | run_sql ;;
      *.sql.xz) log "running $f"; xz -dc "$f" | run_sql ;;
      *.sql.zst) log "running $f"; zstd -dc "$f" | run_sql ;;
      *) log "ignoring $f" ;;
    esac
  done
}

# Server options that print something and exit need neither a data directory nor a user.
only_asks_for_help() {
  local arg
  for arg; do
    case "$arg" in
      '-?' | --help | --describe-config | -V | --version) return 0 ;;
    esac
  done
  return 1
}

main() {
  # "docker-entrypoint.sh -c x=y" is the server with options.
  if [[ "${1:-}" == -* ]]; then
    set -- postgres "$@"
  fi
  if [[ "${1:-}" != postgres ]] || only_asks_for_help "$@"; then
    exec "$@"
  fi

  load_settings
  prepare_directories
  if [[ "$(id -u)" == 0 ]]; then
    local home
    home=$(getent passwd postgres | cut -d: -f6)
    HOME=${home:-/var/lib/postgresql} exec setpriv --reuid=postgres --regid=postgres --init-groups \
      "${BASH_SOURCE[0]}" "$@"
  fi

  if [[ -n "$PGDATA_INITIALISED" ]]; then
    log "$PGDATA already holds a database; skipping initialization"
  else
    check_settings_for_init
    # Fail before initdb if the init directory cannot be read: no half-initialised data.
    ls /docker-entrypoint-initdb.d/ >/dev/null
    run_initdb
    append_host_rule "$@"
    # Needed by psql if POSTGRES_INITDB_ARGS asked for password authentication locally.
    export PGPASSWORD="${PGPASSWORD:-$POSTGRES_PASSWORD}"
    start_init_server "$@"
    if [[ "$POSTGRES_DB" != postgres ]]; then
      create_database
    fi
    run_init_files /docker-entrypoint-initdb.d/*
    stop_init_server
    unset PGPASSWORD
    log "PostgreSQL init process complete; ready for start up."
  fi

  exec "$@"
}

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
  main "$@"
fi
