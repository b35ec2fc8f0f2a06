#!/usr/bin/env bash
# Set up a development/test environment: .venv (Python >= 3.11) with `pip install -e '.[test]'`,
# plus PostgreSQL server binaries for the real-Postgres tests (scripts/ensure-postgres.sh).
# Idempotent: the pip install is skipped while pyproject.toml (and the venv's Python) are unchanged
# since the last successful install (hash in .venv/.bootstrap-hash).
#
# Environment: PYTHON=python3.12 to pick the interpreter; VENV=path for another venv location;
#              BOOTSTRAP_FORCE=1 to reinstall regardless of the hash.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${VENV:-$ROOT/.venv}
HASH_FILE=$VENV/.bootstrap-hash

TMP=$(mktemp -d -t bootstrap.XXXXXX)
trap 'rm -rf "$TMP"' EXIT

log() { echo "bootstrap: $*"; }
die() { echo "bootstrap: ERROR: $*" >&2; exit 1; }

py_ok() { "$1" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' >/dev/null 2>&1; }
py_version() { "$1" -c 'import sys; print("%d.%d.%d" % sys.version_info[:3])' 2>/dev/null || echo "?"; }

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"
  elif command -v sudo >/dev/null 2>&1; then sudo "$@"
  else return 1
  fi
}

# --- 1. a Python >= 3.11 -----------------------------------------------------------------------
if [ -n "${PYTHON:-}" ]; then
  command -v "$PYTHON" >/dev/null 2>&1 || die "PYTHON=$PYTHON not found"
  py_ok "$PYTHON" || die "Python >= 3.11 required; PYTHON=$PYTHON is $(py_version "$PYTHON")"
else
  PYTHON=
  for cand in python3 python3.13 python3.12 python3.11; do
    if command -v "$cand" >/dev/null 2>&1 && py_ok "$cand"; then PYTHON=$cand; break; fi
  done
  if [ -z "$PYTHON" ]; then
    found=$(command -v python3 >/dev/null 2>&1 && echo "python3 is $(py_version python3)" || echo "no python3 on PATH")
    die "Python >= 3.11 required ($found); install python3.11+ or set PYTHON=/path/to/python3.11"
  fi
fi
PYTHON=$(command -v "$PYTHON")

# --- 2. the virtualenv -------------------------------------------------------------------------
venv_ok() { [ -x "$VENV/bin/python" ] && py_ok "$VENV/bin/python" && "$VENV/bin/python" -m pip --version >/dev/null 2>&1; }

make_venv() { "$PYTHON" -m venv "$VENV" >"$TMP/venv.log" 2>&1; }

if [ -x "$VENV/bin/python" ] && ! py_ok "$VENV/bin/python"; then
  die "$VENV uses Python $(py_version "$VENV/bin/python") (< 3.11); remove it (rm -rf $VENV) and rerun"
fi

if ! venv_ok; then
  log "creating $VENV with $PYTHON ($(py_version "$PYTHON"))"
  if ! make_venv; then
    # Debian/Ubuntu ship venv/ensurepip separately (python3-venv, python3.X-venv).
    if command -v apt-get >/dev/null 2>&1 && grep -qiE 'ensurepip|python3.*-venv' "$TMP/venv.log"; then
      ver=$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
      pkgs=(python3-venv)
      if apt-cache show "python$ver-venv" >/dev/null 2>&1; then pkgs+=("python$ver-venv"); fi
      log "venv creation failed (no ensurepip); installing ${pkgs[*]} with apt-get"
      as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${pkgs[@]}" >"$TMP/apt.log" 2>&1 \
        || { as_root env DEBIAN_FRONTEND=noninteractive apt-get update -q >>"$TMP/apt.log" 2>&1 \
             && as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${pkgs[@]}" >>"$TMP/apt.log" 2>&1; } \
        || { tail -n 30 "$TMP/apt.log" >&2;
             die "could not install ${pkgs[*]} (need root or sudo)"; }
      make_venv || { cat "$TMP/venv.log" >&2; die "python -m venv $VENV failed"; }
    else
      cat "$TMP/venv.log" >&2; rm -f "$TMP/venv.log"
      die "python -m venv $VENV failed"
    fi
  fi
  venv_ok || die "$VENV was created but its pip does not work"
fi
VPY=$VENV/bin/python

# --- 3. the package and its test dependencies --------------------------------------------------
want_hash=$( { cat "$ROOT/pyproject.toml"; "$VPY" -c 'import sys; print(sys.version)'; } | sha256sum | cut -d' ' -f1)
have_hash=$(cat "$HASH_FILE" 2>/dev/null || true)

if [ -z "${BOOTSTRAP_FORCE:-}" ] && [ "$want_hash" = "$have_hash" ]; then
  log "$VENV up to date (pyproject.toml unchanged since last install)"
else
  log "installing -e '.[test]' into $VENV"
  rm -f "$HASH_FILE"
  # Quiet on success; on failure show pip's output (minus index-location noise) and stop.
  pip_quiet() {
    if ! (cd "$ROOT" && "$VPY" -m pip "$@" -q --disable-pip-version-check) >"$TMP/pip.log" 2>&1; then
      grep -v "^WARNING: Location '.*' is ignored" "$TMP/pip.log" | tail -n 80 >&2
      die "pip $* failed (output above)"
    fi
  }
  pip_quiet install --upgrade pip
  pip_quiet install -e ".[test]"
  echo "$want_hash" >"$HASH_FILE"
  log "installed $(cd "$ROOT" && "$VPY" -c 'import importlib.metadata as m; print("onesignal-bridge", m.version("onesignal-bridge"))')"
fi

# --- 4. PostgreSQL server binaries for the real-Postgres tests ----------------------------------
"$ROOT/scripts/ensure-postgres.sh"

log "done; run tests with: $VPY -m pytest -q"
