#!/usr/bin/env bash
# metered-billing: the operator's one entry point. Every step is idempotent and says what it did.
#
#   ./deploy.sh local            everything on this machine, no cloud account needed
#   ./deploy.sh test             lint, types, migrations lint and the whole test suite
#   ./deploy.sh migrate          apply pending SQL migrations to $DATABASE_URL
#   ./deploy.sh stripe-catalog [--plans FILE]
#                                meter, products, prices from plans.toml (or FILE); ids into
#                                billing_plans; a plan no longer listed becomes inactive
#   ./deploy.sh webhook          the Stripe webhook endpoint ($WEBHOOK_URL) for the handled events,
#                                and the thin-event destination for the meter error reports
#   ./deploy.sh functions        each function to Cloud Run functions ($GCP_PROJECT, gcloud)
#   ./deploy.sh all              migrate, stripe-catalog, functions, webhook
#   ./deploy.sh flush-usage [--limit N]
#                                deliver pending meter events to Stripe (schedule it)
#   ./deploy.sh requeue-usage [--org ID] [--since YYYY-MM-DD]
#                                failed usage back to pending once its cause is fixed
#   ./deploy.sh reconcile [--org ID] [--since YYYY-MM-DD] [--repair]
#                                each cycle's usage rows, totals, Stripe's meter summaries and
#                                invoice compared: one line per cycle, exit 1 on any drift;
#                                --repair mends what can be mended and reports what to credit
#   ./deploy.sh repair-events    re-process failed Stripe events from the ledger
#   ./deploy.sh resync [sub_...] re-sync one subscription, or all, from Stripe
#   ./deploy.sh check [--plans FILE]
#                                verify the deployment against Stripe: meter, prices, webhook
#                                endpoint, thin-event destination, portal, flush schedule;
#                                one line per check, exit 1 when any fails (changes nothing)
#   ./deploy.sh help             this text
#
# Options: a step takes only its own (above) and refuses any other. --dry-run prints what would
# be done without doing it; every step but local, test, flush-usage and check takes it.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CALLER_DIR="$PWD" # a relative --plans FILE is the operator's, not the project's
cd "$ROOT"
VENV="$ROOT/.venv"
PY="$VENV/bin/python"
DRY_RUN=0
STEP_ARGS=() # the step's own options, for its python module
SUBSCRIPTION=""

say() { printf '==> %s\n' "$*"; }
die() { printf 'deploy.sh: %s\n' "$*" >&2; exit 2; }

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }

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

# The browser tests drive Debian's Chromium (never a browser download): installed when missing
# and this user can (root with apt-get, as on CI); elsewhere they skip, saying how to install it.
ensure_chromium() {
  command -v chromium >/dev/null 2>&1 && return 0
  if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    say "Chromium is missing: the browser tests skip (sudo apt-get install chromium)"
    return 0
  fi
  say "installing Chromium from Debian's chromium package (for the browser tests)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium fonts-liberation >/dev/null ||
    say "apt-get could not install chromium: the browser tests skip (and fail under CI)"
}

cmd_test() {
  ensure_venv
  ensure_chromium
  say "ruff check";           "$VENV/bin/ruff" check .
  say "ruff format --check";  "$VENV/bin/ruff" format --check .
  say "mypy (strict on shared/)"; "$VENV/bin/mypy"
  say "squawk (sql/ migrations)"; "$VENV/bin/squawk" sql/0*.sql
  say "pytest";               "$PY" -m pytest "$@"
}

cmd_migrate() {
  require_env DATABASE_URL
  ensure_venv
  if [ "$DRY_RUN" = 1 ]; then "$PY" -m ops.migrate --dry-run; else "$PY" -m ops.migrate; fi
}

cmd_catalog() {
  [ "$DRY_RUN" = 1 ] || require_env STRIPE_SECRET_KEY DATABASE_URL
  ensure_venv
  "$PY" -m ops.catalog "${STEP_ARGS[@]+"${STEP_ARGS[@]}"}" $( [ "$DRY_RUN" = 1 ] && echo --dry-run )
}

webhook_url() {
  if [ -n "${WEBHOOK_URL:-}" ]; then echo "$WEBHOOK_URL"; return; fi
  [ -n "${GCP_PROJECT:-}" ] || die "WEBHOOK_URL is not set (nor GCP_PROJECT to derive it from)."
  echo "https://${GCP_REGION:-europe-west1}-${GCP_PROJECT}.cloudfunctions.net/stripe-webhook-handler"
}

cmd_webhook() {
  local url
  url="$(webhook_url)"
  [ "$DRY_RUN" = 1 ] || require_env STRIPE_SECRET_KEY
  ensure_venv
  "$PY" -m ops.webhook --url "$url" $( [ "$DRY_RUN" = 1 ] && echo --dry-run )
}

cmd_check() {
  local url
  url="$(webhook_url)"
  require_env STRIPE_SECRET_KEY DATABASE_URL
  ensure_venv
  "$PY" -m ops.check --url "$url" "${STEP_ARGS[@]+"${STEP_ARGS[@]}"}"
}

cmd_functions() {
  require_env GCP_PROJECT
  [ "$DRY_RUN" = 1 ] || command -v "${GCLOUD:-gcloud}" >/dev/null 2>&1 ||
    die "gcloud is not installed or not on PATH: https://cloud.google.com/sdk/docs/install"
  ensure_venv
  "$PY" -m ops.cloud_functions $( [ "$DRY_RUN" = 1 ] && echo --dry-run )
}

cmd_all() {
  # Check everything first: stop before doing anything when a tool or variable is missing.
  require_env DATABASE_URL STRIPE_SECRET_KEY GCP_PROJECT
  [ "$DRY_RUN" = 1 ] || command -v "${GCLOUD:-gcloud}" >/dev/null 2>&1 ||
    die "gcloud is not installed or not on PATH: https://cloud.google.com/sdk/docs/install"
  webhook_url >/dev/null
  cmd_migrate
  cmd_catalog
  cmd_functions
  cmd_webhook
}

cmd_python() {
  require_env DATABASE_URL STRIPE_SECRET_KEY
  ensure_venv
  "$PY" -m "$@" $( [ "$DRY_RUN" = 1 ] && echo --dry-run )
}

cmd_flush_usage() {
  require_env STRIPE_SECRET_KEY
  ensure_venv
  "$PY" -m ops.flush_usage "${STEP_ARGS[@]+"${STEP_ARGS[@]}"}"
}

cmd_requeue_usage() {
  require_env DATABASE_URL
  ensure_venv
  "$PY" -m ops.requeue_usage "${STEP_ARGS[@]+"${STEP_ARGS[@]}"}" $( [ "$DRY_RUN" = 1 ] && echo --dry-run )
}

cmd_reconcile() {
  require_env DATABASE_URL STRIPE_SECRET_KEY
  ensure_venv
  "$PY" -m ops.reconcile "${STEP_ARGS[@]+"${STEP_ARGS[@]}"}" $( [ "$DRY_RUN" = 1 ] && echo --dry-run )
}

# The options each step takes: --flag, or --name=WHAT for one that takes a value.
step_options() {
  case "$1" in
    migrate|webhook|functions|all|repair-events) echo "--dry-run" ;;
    stripe-catalog) echo "--plans=FILE --dry-run" ;;
    check) echo "--plans=FILE" ;;
    flush-usage) echo "--limit=N" ;;
    requeue-usage) echo "--org=ID --since=YYYY-MM-DD --dry-run" ;;
    reconcile) echo "--org=ID --since=YYYY-MM-DD --repair --dry-run" ;;
    resync) echo "sub_... --dry-run" ;;
  esac
}

# WHAT when the step takes the option NAME with a value (--name=WHAT), else nothing.
value_of_option() {
  local option
  for option in $(step_options "$1"); do
    if [ "${option%%=*}" = "$2" ] && [ "$option" != "$2" ]; then echo "${option#*=}"; fi
  done
}

options_text() {
  local option text=""
  for option in $(step_options "$1"); do text+="${text:+, }${option/=/ }"; done
  echo "${text:-no options}"
}

# Sort a step's arguments into DRY_RUN, STEP_ARGS and SUBSCRIPTION. Anything else is refused
# here, before anything is done, naming the step and the option (never a value: it may be a key).
parse_step_args() {
  local command="$1" arg name value what
  shift
  while [ $# -gt 0 ]; do
    arg="$1"
    shift
    name="${arg%%=*}"
    what="$(value_of_option "$command" "$name")"
    if [ "$arg" = --dry-run ] && [[ " $(step_options "$command") " == *" --dry-run "* ]]; then
      DRY_RUN=1
    elif [[ "$name" == --* ]] && [ -n "$what" ]; then
      if [ "$arg" = "$name" ]; then
        [ $# -gt 0 ] && [[ "$1" != --* ]] || die "$command: $name needs a value ($what)"
        value="$1"
        shift
      else
        value="${arg#*=}"
      fi
      [ -n "$value" ] || die "$command: $name needs a value ($what)"
      if [ "$name" = --plans ] && [[ "$value" != /* ]]; then value="$CALLER_DIR/$value"; fi
      STEP_ARGS+=("$name" "$value")
    elif [ "$arg" = "$name" ] && [[ "$arg" == --* ]] &&
      [[ " $(step_options "$command") " == *" $arg "* ]]; then
      STEP_ARGS+=("$arg") # a flag of the step's own (reconcile --repair)
    elif [ "$command" = resync ] && [[ "$arg" != -* ]] && [ -z "$SUBSCRIPTION" ]; then
      SUBSCRIPTION="$arg"
    elif [ "$arg" != "$name" ] && [[ " $(step_options "$command") " == *" $name "* ]]; then
      die "$command: $name takes no value"
    elif [[ "$arg" == -* ]]; then
      die "$command does not take the option $name (it takes: $(options_text "$command"))"
    else
      die "$command does not take the argument $arg (it takes: $(options_text "$command"))"
    fi
  done
}

main() {
  local command="${1:-help}"
  [ $# -gt 0 ] && shift
  case "$command" in
    # Their own tools read these arguments (pytest, devtools.local) and refuse what they do not know.
    test) cmd_test "$@"; return ;;
    local) ensure_venv; exec "$PY" -m devtools.local "$@" ;;
    migrate|stripe-catalog|webhook|functions|all|flush-usage|requeue-usage|reconcile|repair-events|resync|check) ;;
    help|-h|--help) ;;
    *) usage >&2; die "unknown command: $command" ;;
  esac
  parse_step_args "$command" "$@"
  case "$command" in
    migrate) cmd_migrate ;;
    stripe-catalog) cmd_catalog ;;
    webhook) cmd_webhook ;;
    check) cmd_check ;;
    functions) cmd_functions ;;
    all) cmd_all ;;
    flush-usage) cmd_flush_usage ;;
    requeue-usage) cmd_requeue_usage ;;
    reconcile) cmd_reconcile ;;
    repair-events) cmd_python ops.repair failed-events ;;
    resync)
      if [ -n "$SUBSCRIPTION" ]; then cmd_python ops.repair resync --subscription "$SUBSCRIPTION"
      else cmd_python ops.repair resync --all; fi ;;
    help|-h|--help) usage ;;
  esac
}

main "$@"
