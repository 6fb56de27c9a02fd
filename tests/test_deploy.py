"""deploy.sh: the operator commands' dry runs, and their refusals before doing anything."""

from __future__ import annotations

import os
import subprocess

import psycopg
import pytest

from tests.conftest import ROOT, create_database

OPERATOR_VARS = (
    "DATABASE_URL",
    "STRIPE_SECRET_KEY",
    "GCP_PROJECT",
    "GCP_REGION",
    "WEBHOOK_URL",
    "STRIPE_API_BASE",
    "SUPABASE_URL",
    "WEBSITE_URL",
)


def deploy(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if k not in OPERATOR_VARS}
    return subprocess.run(
        [str(ROOT / "deploy.sh"), *args],
        cwd=ROOT,
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_unknown_command_is_refused_with_the_usage():
    run = deploy("publish")
    assert run.returncode == 2
    assert "unknown command: publish" in run.stderr
    assert "./deploy.sh local" in run.stderr


@pytest.mark.parametrize(
    ("command", "missing"),
    [
        ("migrate", "DATABASE_URL"),
        ("stripe-catalog", "STRIPE_SECRET_KEY"),
        ("functions", "GCP_PROJECT"),
        ("flush-usage", "STRIPE_SECRET_KEY"),
        ("all", "DATABASE_URL"),
    ],
)
def test_commands_stop_naming_the_missing_variable(command, missing):
    run = deploy(command)
    assert run.returncode != 0
    assert missing in run.stderr


def test_all_stops_before_doing_anything_without_gcloud(pg_server_url):
    url = create_database(pg_server_url)
    run = deploy(
        "all",
        DATABASE_URL=url,
        STRIPE_SECRET_KEY="sk_test_x",
        GCP_PROJECT="demo",
        GCLOUD="/nonexistent/gcloud",
    )
    assert run.returncode != 0 and "gcloud" in run.stderr
    with psycopg.connect(url) as conn:  # nothing was migrated
        assert conn.execute("select to_regclass('public.organisations')").fetchone() == (None,)


def test_migrate_dry_run_lists_pending_and_applies_nothing(pg_server_url):
    url = create_database(pg_server_url)
    run = deploy("migrate", "--dry-run", DATABASE_URL=url)
    assert run.returncode == 0, run.stderr
    assert "[ ] 0001_organisations.sql" in run.stdout
    assert "would apply the Supabase compatibility bootstrap" in run.stdout
    with psycopg.connect(url) as conn:
        assert conn.execute("select to_regclass('public.organisations')").fetchone() == (None,)


def test_catalog_dry_run_prints_every_price_without_stripe():
    run = deploy("stripe-catalog", "--dry-run")
    assert run.returncode == 0, run.stderr
    for key in ("mb_starter_monthly", "mb_growth_yearly", "mb_enterprise_metered", "mb_setup_fee"):
        assert f"price {key}" in run.stdout
    assert "would ensure meter voice_call_minutes" in run.stdout


def test_webhook_dry_run_names_events_and_api_version():
    run = deploy("webhook", "--dry-run", GCP_PROJECT="demo-project", GCP_REGION="europe-west3")
    assert run.returncode == 0, run.stderr
    assert (
        "https://europe-west3-demo-project.cloudfunctions.net/stripe-webhook-handler" in run.stdout
    )
    assert "invoice.payment_failed" in run.stdout and "2026-10-28.endive" in run.stdout


def test_functions_dry_run_prints_one_gcloud_deploy_per_function():
    run = deploy(
        "functions", "--dry-run", GCP_PROJECT="demo-project", WEBSITE_URL="https://app.example.com"
    )
    assert run.returncode == 0, run.stderr
    lines = [line for line in run.stdout.splitlines() if line.startswith("would run: gcloud")]
    assert {line.split()[5] for line in lines} >= {
        "create-checkout-session",
        "stripe-webhook-handler",
        "report-usage",
    }
    checkout = next(line for line in lines if " create-checkout-session " in line)
    assert "--entry-point=create_checkout_session" in checkout
    assert "STRIPE_SECRET_KEY=STRIPE_SECRET_KEY:latest" in checkout
    assert "WEBSITE_URL=https://app.example.com" in checkout
    assert "sk_" not in run.stdout
    bundle = ROOT / ".local" / "bundles" / "report-usage"
    assert (bundle / "main.py").exists() and (bundle / "shared" / "db.py").exists()
    assert "stripe" in (bundle / "requirements.txt").read_text()


@pytest.mark.parametrize("command", ["repair-events", "resync"])
def test_repair_commands_stop_naming_the_missing_variable(command):
    run = deploy(command)
    assert run.returncode != 0 and "DATABASE_URL" in run.stderr


def test_scheduled_commands_run_against_a_database_and_stripe(pg_server_url):
    from contextlib import redirect_stdout
    from io import StringIO

    from devtools.stripe_standin import serve_in_thread
    from ops.migrate import migrate

    url = create_database(pg_server_url)
    with redirect_stdout(StringIO()):
        migrate(url)
    base, stop = serve_in_thread(None, "whsec_unused")
    env = {"DATABASE_URL": url, "STRIPE_SECRET_KEY": "sk_test_ops", "STRIPE_API_BASE": base}
    try:
        flush = deploy("flush-usage", **env)
        assert flush.returncode == 0, flush.stderr
        assert "meter events: sent 0, kept pending 0, failed 0" in flush.stdout
        repair = deploy("repair-events", "--dry-run", **env)
        assert repair.returncode == 0, repair.stderr
        assert "no failed events" in repair.stdout
        resync = deploy("resync", **env)
        assert resync.returncode == 0, resync.stderr
    finally:
        stop()
