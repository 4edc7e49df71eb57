#!/usr/bin/env bash
# The one test command (README and .ci/run): installs what the tests need, starts
# PostgreSQL for the store tests, then runs ruff and pytest. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
SUDO=""
if [ "$(id -u)" != 0 ] && command -v sudo >/dev/null; then SUDO="sudo -n"; fi

# 1. Peers from Debian: DCMTK for the DICOM tests, PostgreSQL for the store tests.
need_apt=()
[ -x /usr/bin/storescu ] || need_apt+=(dcmtk)
command -v pg_ctlcluster >/dev/null || need_apt+=(postgresql)
[ -x /usr/bin/chromium ] || need_apt+=(chromium)  # the console's browser tests (Playwright drives it)
[ -x /usr/sbin/slapd ] || need_apt+=(slapd ldap-utils)  # the console's LDAP tests start their own slapd
[ -x /usr/sbin/sshd ] || need_apt+=(openssh-server)  # the file source's SFTP tests start their own sshd
command -v haproxy >/dev/null || [ -x /usr/sbin/haproxy ] || need_apt+=(haproxy)  # PROXY protocol tests put HAProxy in front
{ [ -x /usr/sbin/nginx ] && [ -f /usr/lib/nginx/modules/ngx_stream_module.so ]; } \
  || need_apt+=(nginx libnginx-mod-stream)  # and nginx's stream proxy (with systemd, Debian also starts its port-80 site)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "installing ${need_apt[*]} (apt-get)"
  $SUDO apt-get update -qq || true
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

# 2. PostgreSQL: start the cluster, make a throwaway role and database for the tests.
if command -v pg_lsclusters >/dev/null; then
  ver=$(pg_lsclusters -h | awk 'NR==1{print $1}')
  name=$(pg_lsclusters -h | awk 'NR==1{print $2}')
  if [ -n "${ver:-}" ]; then
    $SUDO pg_ctlcluster "$ver" "$name" start 2>/dev/null || true
    port=$(pg_lsclusters -h | awk 'NR==1{print $3}')
    for _ in $(seq 1 30); do pg_isready -q -h 127.0.0.1 -p "$port" && break; sleep 0.5; done
    pw=$($PY -c 'import secrets; print(secrets.token_hex(12))')
    if $SUDO su postgres -c "psql -q -p $port -v ON_ERROR_STOP=1" >/dev/null <<SQL
DO \$\$ BEGIN
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'medrelay_test') THEN
    CREATE ROLE medrelay_test LOGIN PASSWORD '$pw';
  ELSE
    ALTER ROLE medrelay_test PASSWORD '$pw';
  END IF;
END \$\$;
DROP DATABASE IF EXISTS medrelay_test;
CREATE DATABASE medrelay_test OWNER medrelay_test;
SQL
    then
      export MEDRELAY_TEST_PG_URL="postgresql+psycopg://medrelay_test:$pw@127.0.0.1:$port/medrelay_test"
    else
      echo "warning: could not prepare PostgreSQL (needs root or sudo): its tests will skip, or fail under CI=true"
    fi
  fi
fi

# 3. Python environment.
[ -x .venv/bin/python ] || $PY -m venv .venv
.venv/bin/pip install -q --disable-pip-version-check -e ".[test]"

# 4. Checks.
.venv/bin/ruff check .
exec .venv/bin/python -m pytest "$@"
