#!/usr/bin/env bash
# A throwaway PostgreSQL cluster for the integration tests, on 127.0.0.1 in a temporary folder.
#
#   source .ci/postgres.sh && postgres_start   # exports MEDTRANSFER_TEST_POSTGRES_URL (the admin database)
#   postgres_stop                              # stops the server and removes the folder
#
# Installs the Debian package when no PostgreSQL is found and this runs as root. initdb refuses to run as root,
# so as root the cluster belongs to the 'postgres' user (created by the package) or to a system user made here.
# Without PostgreSQL the function says so in one line and returns 1 under CI=true (the tests need it there);
# elsewhere it returns 0 and the tests that need it skip with that reason.

_pg_bin() { ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1; }

postgres_start() {
  local bin owner port
  bin=$(_pg_bin)
  if [[ -z "$bin" && $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; then
    echo "ci: installing PostgreSQL from the Debian packages"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null \
      && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postgresql >/dev/null \
      || echo "ci: could not install PostgreSQL"
    bin=$(_pg_bin)
  fi
  if [[ -z "$bin" ]]; then
    if [[ "${CI:-}" == "true" ]]; then
      echo "ci: no PostgreSQL and it could not be installed; CI=true requires it (apt-get install postgresql)" >&2
      return 1
    fi
    echo "ci: no PostgreSQL; the PostgreSQL integration tests will skip"
    return 0
  fi
  PG_CI_DIR=$(mktemp -d /tmp/medtransfer-pg.XXXXXX)
  PG_CI_RUN=()
  if [[ $(id -u) -eq 0 ]]; then
    owner=postgres
    id "$owner" >/dev/null 2>&1 || { owner=medtransfer-pg; id "$owner" >/dev/null 2>&1 || useradd --system "$owner"; }
    chown "$owner" "$PG_CI_DIR"
    chmod 755 "$PG_CI_DIR"
    PG_CI_RUN=(runuser -u "$owner" --)
  fi
  port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  "${PG_CI_RUN[@]}" "$bin/initdb" -D "$PG_CI_DIR/data" -U medtransfer --auth=trust -E UTF8 --no-sync >/dev/null
  # fsync off: a throwaway cluster for tests; many workers and the MLflow server need more than 100 connections.
  "${PG_CI_RUN[@]}" "$bin/pg_ctl" -D "$PG_CI_DIR/data" -l "$PG_CI_DIR/server.log" -w -t 60 \
    -o "-h 127.0.0.1 -p $port -k $PG_CI_DIR -c fsync=off -c max_connections=300" start >/dev/null
  PG_CI_BIN=$bin
  export MEDTRANSFER_TEST_POSTGRES_URL="postgresql://medtransfer@127.0.0.1:$port/postgres"
  echo "ci: PostgreSQL $("$bin/postgres" --version | awk '{print $3}') on 127.0.0.1:$port (data in $PG_CI_DIR)"
}

postgres_stop() {
  if [[ -n "${PG_CI_DIR:-}" && -d "$PG_CI_DIR" ]]; then
    "${PG_CI_RUN[@]}" "$PG_CI_BIN/pg_ctl" -D "$PG_CI_DIR/data" -m immediate -w stop >/dev/null 2>&1 || true
    rm -rf "$PG_CI_DIR"
  fi
  unset MEDTRANSFER_TEST_POSTGRES_URL PG_CI_DIR
}
