#!/usr/bin/env bash
# A shared MLflow tracking server, as the README's recipe starts it ("A shared tracking server"):
# MLflow's basic authentication (--app-name basic-auth, the mlflow[auth] extra), a database
# backend store (PostgreSQL), and proxied artifact storage (--artifacts-destination), so jobs on
# other hosts log artifacts through the server and need no shared folder.
#
#   services/mlflow-server.sh start DIR PORT BACKEND_URI   # returns once /health answers
#   services/mlflow-server.sh stop DIR                     # SIGTERM to what start started
#
# DIR keeps the server's pid file, its log (mlflow-server.log), basic_auth.ini (the user store
# lives in BACKEND_URI's database too) and, unless ARTIFACTS names another place, the artifacts.
# Secrets come from the environment only, never from arguments or files written here:
#   MLFLOW_AUTH_ADMIN_PASSWORD      the admin's password (12+ characters), needed on first start
#   MLFLOW_FLASK_SERVER_SECRET_KEY  any random string, the same on every start
#   PGPASSWORD                      the database role's password (or use ~/.pgpass)
# Other settings (environment):
#   HOST                127.0.0.1; 0.0.0.0 serves other hosts (then set ALLOWED_HOSTS)
#   ALLOWED_HOSTS       Host headers accepted (MLflow's default: localhost, private addresses)
#   WORKERS             2 server processes
#   DEFAULT_PERMISSION  READ: what a user may do with experiments of others
#   AUTH_CACHE_SECONDS  60: a checked password is remembered this long (checking one costs tens
#                       of milliseconds of CPU, on every request without the cache); a changed
#                       password reaches the other workers after it
#   START_TIMEOUT       300 s to answer /health (a busy 2-core machine took 35 s)
#   MLFLOW, PYTHON      the mlflow executable (default: on PATH), python3 for the health probe
#
# The server runs in a session of its own; stop signals that whole process group (the server and
# its workers), by the pid the start wrote. Exits non-zero, with the tail of the log, when the
# server dies or does not answer in time (and then stops what it started).
set -euo pipefail

usage() { echo "usage: $0 start DIR PORT BACKEND_URI | stop DIR" >&2; exit 2; }
[ $# -ge 2 ] || usage
cmd=$1
dir=$(realpath -m "$2")
pidfile=$dir/mlflow-server.pid
logfile=$dir/mlflow-server.log
PYTHON=${PYTHON:-python3}
MLFLOW=${MLFLOW:-$(command -v mlflow || true)}

stop_group() {  # stop_group PID SIGNAL: signal the process group, wait up to 30 s, then SIGKILL
  local pid=$1
  kill -"$2" -- "-$pid" 2>/dev/null || return 0
  for _ in $(seq 1 150); do
    kill -0 -- "-$pid" 2>/dev/null || return 0
    sleep 0.2
  done
  kill -KILL -- "-$pid" 2>/dev/null || true
}

case $cmd in
  start)
    [ $# -eq 4 ] || usage
    port=$3
    backend=$4
    [ -n "$MLFLOW" ] || { echo "mlflow-server.sh: no mlflow executable (set MLFLOW)" >&2; exit 1; }
    [ -n "${MLFLOW_FLASK_SERVER_SECRET_KEY:-}" ] || {
      echo "mlflow-server.sh: set MLFLOW_FLASK_SERVER_SECRET_KEY (basic auth needs it)" >&2; exit 2; }
    if [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then
      echo "mlflow-server.sh: already running from $dir (pid $(cat "$pidfile"))" >&2; exit 1
    fi
    mkdir -p "$dir"
    artifacts=${ARTIFACTS:-$dir/artifacts}
    cat >"$dir/basic_auth.ini" <<INI
[mlflow]
default_permission = ${DEFAULT_PERMISSION:-READ}
database_uri = $backend
admin_username = ${MLFLOW_AUTH_ADMIN_USERNAME:-admin}
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
auth_cache_ttl_seconds = ${AUTH_CACHE_SECONDS:-60}
INI
    export MLFLOW_AUTH_CONFIG_PATH=$dir/basic_auth.ini
    # The server's background job runner serves GenAI features allfuse does not use.
    export MLFLOW_SERVER_ENABLE_JOB_EXECUTION=${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}
    extra=()
    [ -z "${ALLOWED_HOSTS:-}" ] || extra+=(--allowed-hosts "$ALLOWED_HOSTS")
    host=${HOST:-127.0.0.1}
    setsid "$MLFLOW" server --app-name basic-auth --backend-store-uri "$backend" \
      --artifacts-destination "$artifacts" --host "$host" --port "$port" \
      --workers "${WORKERS:-2}" "${extra[@]}" >>"$logfile" 2>&1 </dev/null &
    pid=$!
    echo "$pid" >"$pidfile"
    probe=$host
    [ "$probe" != "0.0.0.0" ] || probe=127.0.0.1
    deadline=$((SECONDS + ${START_TIMEOUT:-300}))
    until "$PYTHON" -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=5)" \
        "http://$probe:$port/health" 2>/dev/null; do
      if ! kill -0 "$pid" 2>/dev/null || [ $SECONDS -ge $deadline ]; then
        echo "mlflow-server.sh: the server did not start (log $logfile):" >&2
        tail -n 30 "$logfile" >&2
        stop_group "$pid" TERM
        rm -f "$pidfile"
        exit 1
      fi
      sleep 0.5
    done
    echo "http://$probe:$port"
    ;;
  stop)
    [ -f "$pidfile" ] || exit 0
    stop_group "$(cat "$pidfile")" TERM
    rm -f "$pidfile"
    ;;
  *) usage ;;
esac
