#!/usr/bin/env bash
# Entrypoint of the PostgreSQL stand-in image: the official image's documented behaviour
# (https://hub.docker.com/_/postgres), written for this project.
#   POSTGRES_PASSWORD (required for a new database unless POSTGRES_HOST_AUTH_METHOD=trust),
#   POSTGRES_USER (default postgres), POSTGRES_DB (default: the user's name),
#   POSTGRES_INITDB_ARGS, POSTGRES_HOST_AUTH_METHOD (default scram-sha-256), and a _FILE
#   variant of each (read from a file, e.g. a mounted Secret).
# Started as root it prepares the directories and drops to the postgres user; started as
# any other UID (a pod's runAsUser) it runs as that UID, with nss_wrapper giving initdb a
# passwd entry when the UID has none. A data directory without PG_VERSION is initialised
# (initdb, the database, /docker-entrypoint-initdb.d/*), then the server is exec'd.
set -Eeo pipefail

# file_env VAR [DEFAULT]: VAR from itself or from the file named by VAR_FILE.
file_env() {
  local var=$1 file_var="${1}_FILE" default=${2:-} value
  if [[ -n "${!var:-}" && -n "${!file_var:-}" ]]; then
    echo "error: both $var and $file_var are set (they are exclusive)" >&2
    exit 1
  fi
  value=$default
  if [[ -n "${!var:-}" ]]; then
    value=${!var}
  elif [[ -n "${!file_var:-}" ]]; then
    value=$(<"${!file_var}")
  fi
  export "$var"="$value"
  unset "$file_var"
}

setup_env() {
  file_env POSTGRES_PASSWORD
  file_env POSTGRES_USER postgres
  file_env POSTGRES_DB "$POSTGRES_USER"
  file_env POSTGRES_INITDB_ARGS
  : "${POSTGRES_HOST_AUTH_METHOD:=}"
  DATABASE_ALREADY_EXISTS=
  if [[ -s "$PGDATA/PG_VERSION" ]]; then DATABASE_ALREADY_EXISTS=true; fi
}

# As root: directories owned by postgres, then the same script again as postgres.
create_directories() {
  local user
  user=$(id -u)
  mkdir -p "$PGDATA"
  chmod 00700 "$PGDATA" 2>/dev/null || true
  mkdir -p /var/run/postgresql
  chmod 03775 /var/run/postgresql 2>/dev/null || true
  if [[ "$user" == 0 ]]; then
    find "$PGDATA" \! -user postgres -exec chown postgres '{}' +
    find /var/run/postgresql \! -user postgres -exec chown postgres '{}' +
  fi
}

init_database_dir() {
  local uid gid wrapper=
  uid=$(id -u)
  gid=$(id -g)
  # initdb looks its user up; a UID with no passwd entry gets one from nss_wrapper.
  if ! getent passwd "$uid" >/dev/null; then
    for lib in /usr/lib/libnss_wrapper.so /usr/lib/*/libnss_wrapper.so; do
      [[ -s "$lib" ]] && { wrapper=$lib; break; }
    done
  fi
  if [[ -n "$wrapper" ]]; then
    NSS_WRAPPER_PASSWD=$(mktemp /tmp/nss_wrapper.passwd.XXXXXX)
    NSS_WRAPPER_GROUP=$(mktemp /tmp/nss_wrapper.group.XXXXXX)
    printf 'postgres:x:%s:%s:PostgreSQL:%s:/bin/false\n' "$uid" "$gid" "$PGDATA" >"$NSS_WRAPPER_PASSWD"
    printf 'postgres:x:%s:\n' "$gid" >"$NSS_WRAPPER_GROUP"
    export LD_PRELOAD=$wrapper NSS_WRAPPER_PASSWD NSS_WRAPPER_GROUP
  fi
  # shellcheck disable=SC2086 # POSTGRES_INITDB_ARGS is a list of arguments
  initdb --username="$POSTGRES_USER" --pwfile=<(printf '%s\n' "$POSTGRES_PASSWORD") \
    $POSTGRES_INITDB_ARGS
  if [[ -n "$wrapper" ]]; then
    rm -f "$NSS_WRAPPER_PASSWD" "$NSS_WRAPPER_GROUP"
    unset LD_PRELOAD NSS_WRAPPER_PASSWD NSS_WRAPPER_GROUP
  fi
}

verify_minimum_env() {
  if [[ -z "$POSTGRES_PASSWORD" && "$POSTGRES_HOST_AUTH_METHOD" != trust ]]; then
    cat >&2 <<'MSG'
error: the database is uninitialized and no superuser password is set.
       Set POSTGRES_PASSWORD (or POSTGRES_PASSWORD_FILE) to a non-empty value, or
       POSTGRES_HOST_AUTH_METHOD=trust to allow every connection without a password.
MSG
    exit 1
  fi
}

pg_setup_hba_conf() {
  local method=${POSTGRES_HOST_AUTH_METHOD:-scram-sha-256}
  printf '\nhost all all all %s\n' "$method" >>"$PGDATA/pg_hba.conf"
}

# A server for initialisation only: Unix socket, no TCP.
temp_server_start() {
  PGUSER=$POSTGRES_USER PGPASSWORD=$POSTGRES_PASSWORD \
    pg_ctl -D "$PGDATA" -o "-c listen_addresses='' -p ${PGPORT:-5432}" -w start
}
temp_server_stop() { pg_ctl -D "$PGDATA" -m fast -w stop; }

psql_init() {
  PGPASSWORD=$POSTGRES_PASSWORD psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" \
    --no-password --no-psqlrc "$@"
}

setup_db() {
  if [[ "$POSTGRES_DB" == postgres ]]; then return 0; fi
  local exists
  exists=$(psql_init --dbname postgres --set db="$POSTGRES_DB" --tuples-only \
    <<<"SELECT 1 FROM pg_database WHERE datname = :'db';")
  if [[ -z "${exists//[[:space:]]/}" ]]; then
    psql_init --dbname postgres --set db="$POSTGRES_DB" <<<'CREATE DATABASE :"db";'
  fi
}

process_init_files() {
  local f
  for f in /docker-entrypoint-initdb.d/*; do
    [[ -e "$f" ]] || continue
    case "$f" in
      *.sh)
        if [[ -x "$f" ]]; then echo "$0: running $f"; "$f"; else echo "$0: sourcing $f"; # shellcheck disable=SC1090
          . "$f"; fi ;;
      *.sql) echo "$0: running $f"; psql_init --dbname "$POSTGRES_DB" -f "$f" ;;
      *.sql.gz) echo "$0: running $f"; gunzip -c "$f" | psql_init --dbname "$POSTGRES_DB" ;;
      *) echo "$0: ignoring $f" ;;
    esac
  done
}

main() {
  # `docker-entrypoint.sh -c x=y` means postgres with options.
  if [[ "${1:0:1}" == - ]]; then set -- postgres "$@"; fi
  if [[ "$1" != postgres ]]; then exec "$@"; fi

  setup_env
  create_directories
  if [[ "$(id -u)" == 0 ]]; then
    exec setpriv --reuid=postgres --regid=postgres --init-groups "${BASH_SOURCE[0]}" "$@"
  fi
  if [[ -z "$DATABASE_ALREADY_EXISTS" ]]; then
    verify_minimum_env
    init_database_dir
    pg_setup_hba_conf
    export PGPASSWORD=$POSTGRES_PASSWORD
    temp_server_start
    setup_db
    process_init_files
    temp_server_stop
    unset PGPASSWORD
    echo "$0: PostgreSQL init process complete; ready for start up."
  else
    echo "$0: PostgreSQL database directory appears to contain a database; skipping initialization"
  fi
  exec "$@"
}

main "$@"
