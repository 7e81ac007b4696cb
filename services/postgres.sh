#!/usr/bin/env bash
# A PostgreSQL cluster of its own in a folder, for an MLflow tracking server's backend store: the
# tests' throw-away database, and a way to try the README's recipe ("A shared tracking server") on
# one machine. Debian's PostgreSQL binaries (services/install.sh postgres), listening on
# 127.0.0.1 only; one role and database, both "mlflow", the role's password from $PGPASSWORD.
#
#   PGPASSWORD=... services/postgres.sh start DIR PORT   # creates DIR's cluster on first use; prints
#                                                        # the backend store URI (no password in it)
#   services/postgres.sh stop DIR                        # stops the cluster running from DIR
#
# As root the cluster runs as the user postgres (initdb refuses root): DIR is handed to that
# user, so make it somewhere postgres can reach (e.g. mktemp -d under /tmp). pg_ctl keeps the
# server's pid in DIR/data/postmaster.pid and stops exactly that process. Exits non-zero, with the
# tail of DIR/postgres.log, when the server cannot start.
set -euo pipefail

usage() { echo "usage: $0 start DIR PORT | stop DIR" >&2; exit 2; }
[ $# -ge 2 ] || usage
cmd=$1
dir=$(realpath -m "$2")
bin=${PG_BIN:-$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)}
[ -x "$bin/pg_ctl" ] || { echo "postgres.sh: no PostgreSQL binaries under /usr/lib/postgresql (run services/install.sh postgres)" >&2; exit 1; }
as=()
if [ "$(id -u)" -eq 0 ]; then
  as=(runuser -u postgres --)
fi

case $cmd in
  start)
    [ $# -eq 3 ] || usage
    port=$3
    [ -n "${PGPASSWORD:-}" ] || { echo "postgres.sh: set PGPASSWORD, the password of the role mlflow" >&2; exit 2; }
    mkdir -p "$dir"
    [ ${#as[@]} -eq 0 ] || chown postgres: "$dir"
    fresh=0
    if [ ! -f "$dir/data/PG_VERSION" ]; then
      "${as[@]}" "$bin/initdb" -D "$dir/data" -U postgres -E UTF8 --auth-local=trust \
        --auth-host=scram-sha-256 >"$dir/initdb.log" 2>&1 || { tail -n 20 "$dir/initdb.log" >&2; exit 1; }
      fresh=1
    fi
    if ! "${as[@]}" "$bin/pg_ctl" -D "$dir/data" -l "$dir/postgres.log" -w -t 120 \
        -o "-p $port -k $dir -c listen_addresses=127.0.0.1" start >/dev/null; then
      tail -n 20 "$dir/postgres.log" >&2
      exit 1
    fi
    if [ $fresh -eq 1 ]; then
      # The password goes through psql's standard input, never its command line.
      q="'"
      password=${PGPASSWORD//$q/$q$q}
      "${as[@]}" "$bin/psql" -h "$dir" -p "$port" -U postgres -d postgres -q -v ON_ERROR_STOP=1 >/dev/null <<SQL
CREATE ROLE mlflow LOGIN PASSWORD '$password';
CREATE DATABASE mlflow OWNER mlflow;
SQL
    fi
    echo "postgresql+psycopg2://mlflow@127.0.0.1:$port/mlflow"
    ;;
  stop)
    [ -f "$dir/data/postmaster.pid" ] || exit 0
    "${as[@]}" "$bin/pg_ctl" -D "$dir/data" -m fast -w -t 60 stop >/dev/null
    ;;
  *) usage ;;
esac
