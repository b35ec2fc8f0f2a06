#!/usr/bin/env bash
# Make sure PostgreSQL server binaries (initdb, pg_ctl, postgres) are installed, as needed by the
# real-Postgres test harness (tests/pgcluster.py). Idempotent: does nothing when they are present.
# Installs Debian/Ubuntu's `postgresql` package otherwise. It never starts, stops or depends on a
# system cluster (Debian may create and start one on 5432; the tests use private clusters).
set -euo pipefail

log() { echo "ensure-postgres: $*"; }

has_server() { [ -n "$1" ] && [ -x "$1/initdb" ] && [ -x "$1/pg_ctl" ] && [ -x "$1/postgres" ]; }

# Same search order as tests/pgcluster.py:find_bindir.
find_bindir() {
  local d
  if [ -n "${PGCLUSTER_BINDIR:-}" ] && has_server "$PGCLUSTER_BINDIR"; then
    echo "$PGCLUSTER_BINDIR"; return 0
  fi
  if command -v pg_config >/dev/null 2>&1; then
    d=$(pg_config --bindir 2>/dev/null || true)
    if has_server "$d"; then echo "$d"; return 0; fi
  fi
  for d in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -t/ -k5,5 -V -r); do
    if has_server "$d"; then echo "$d"; return 0; fi
  done
  if d=$(command -v initdb 2>/dev/null); then
    d=$(dirname "$(readlink -f "$d")")
    if has_server "$d"; then echo "$d"; return 0; fi
  fi
  return 1
}

describe() { # "PostgreSQL 15.x in /usr/lib/postgresql/15/bin"
  local v
  v=$("$1/postgres" --version 2>/dev/null | sed -E 's/^postgres \(PostgreSQL\) //; s/ .*//') || true
  echo "PostgreSQL ${v:-?} in $1"
}

if bindir=$(find_bindir); then
  log "found $(describe "$bindir"); nothing to do"
  exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
  log "PostgreSQL server binaries not found and apt-get is not available;" \
      "install PostgreSQL (initdb, pg_ctl, postgres) and/or set PGCLUSTER_BINDIR" >&2
  exit 1
fi

SUDO=()
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then
    SUDO=(sudo)
  else
    log "PostgreSQL server binaries not found; need root (or sudo) to apt-get install postgresql" >&2
    exit 1
  fi
fi

aptlog=$(mktemp -t ensure-postgres.XXXXXX.log)
trap 'rm -f "$aptlog"' EXIT
apt() { "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get "$@" >>"$aptlog" 2>&1; }

if ! apt update -q || ! apt install -y -q --no-install-recommends postgresql; then
  log "apt-get failed installing postgresql; output:" >&2
  tail -n 40 "$aptlog" >&2
  exit 1
fi

if bindir=$(find_bindir); then
  log "installed postgresql with apt-get: $(describe "$bindir")"
else
  log "apt-get installed postgresql but initdb/pg_ctl/postgres are still not found" >&2
  tail -n 20 "$aptlog" >&2
  exit 1
fi
