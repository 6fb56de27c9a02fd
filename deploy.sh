#!/usr/bin/env bash
# metered-billing: the operator's one entry point. Every step is idempotent and says what it did.
#
#   ./deploy.sh local            everything on this machine, no cloud account needed
#   ./deploy.sh test             lint, types, migrations lint and the whole test suite
#   ./deploy.sh migrate          apply pending SQL migrations to $DATABASE_URL
#   ./deploy.sh flush-usage      deliver pending meter events to Stripe (schedule it)
#   ./deploy.sh help             this text
#
# Options: --dry-run prints what would be done without doing it.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$ROOT"
VENV="$ROOT/.venv"
PY="$VENV/bin/python"
DRY_RUN=0

say() { printf '==> %s\n' "$*"; }
die() { printf 'deploy.sh: %s\n' "$*" >&2; exit 2; }

usage() { sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'; }

find_python() {
  local candidate
  for candidate in python3.13 python3.12 python3.11 python3; do
    if command -v "$candidate" >/dev/null 2>&1 &&
      "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
      echo "$candidate"
      return 0
    fi
  done
  return 1
}

# Create .venv when missing and (re)install when pyproject.toml changed since the last install.
ensure_venv() {
  if [ ! -x "$PY" ]; then
    local python
    python="$(find_python)" || die "Python 3.11 or newer is needed (python3 --version)."
    say "creating the virtualenv at .venv with $python"
    "$python" -m venv "$VENV"
  fi
  local stamp="$VENV/.installed-$(sha256sum pyproject.toml | cut -c1-16)"
  if [ ! -f "$stamp" ]; then
    say "installing metered-billing and its dev tools into .venv"
    "$PY" -m pip install --quiet --upgrade pip
    "$PY" -m pip install --quiet -e ".[dev]"
    rm -f "$VENV"/.installed-*
    touch "$stamp"
  fi
}

require_env() {
  local name
  for name in "$@"; do
    [ -n "${!name:-}" ] || die "$name is not set; export it first (see README, Configuration)."
  done
}

cmd_test() {
  ensure_venv
  say "ruff check";           "$VENV/bin/ruff" check .
  say "ruff format --check";  "$VENV/bin/ruff" format --check .
  say "mypy (strict on shared/)"; "$VENV/bin/mypy"
  say "squawk (sql/ migrations)"; "$VENV/bin/squawk" sql/0*.sql
  say "pytest";               "$PY" -m pytest "$@"
}

cmd_migrate() {
  ensure_venv
  require_env DATABASE_URL
  if [ "$DRY_RUN" = 1 ]; then "$PY" -m ops.migrate --dry-run; else "$PY" -m ops.migrate; fi
}

main() {
  local command="${1:-help}"
  [ $# -gt 0 ] && shift
  local args=()
  for arg in "$@"; do
    if [ "$arg" = "--dry-run" ]; then DRY_RUN=1; else args+=("$arg"); fi
  done
  case "$command" in
    test) cmd_test "${args[@]+"${args[@]}"}" ;;
    migrate) cmd_migrate ;;
    help|-h|--help) usage ;;
    *) usage >&2; die "unknown command: $command" ;;
  esac
}

main "$@"
