"""deploy.sh: the operator commands' dry runs, and their refusals before doing anything."""

from __future__ import annotations

import os
import subprocess
import uuid
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import psycopg
import pytest

from ops.requeue_usage import report_lines
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


def deploy(*args: str, cwd: Path = ROOT, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if k not in OPERATOR_VARS}
    return subprocess.run(
        [str(ROOT / "deploy.sh"), *args],
        cwd=cwd,
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


# -- each step takes its own options and refuses any other ---------------------------------------

REFUSED = [
    ("migrate", ["--force"], "the option --force"),
    ("migrate", ["now"], "the argument now"),
    ("stripe-catalog", ["--plan", "other.toml"], "the option --plan"),  # a typo of --plans
    ("stripe-catalog", ["--plan=other.toml"], "the option --plan"),
    ("webhook", ["--url", "https://x.example"], "the option --url"),
    ("functions", ["--region", "us-east1"], "the option --region"),
    ("all", ["--plans", "other.toml"], "the option --plans"),
    ("flush-usage", ["--dry-run"], "the option --dry-run"),  # it used to flush for real
    ("flush-usage", ["--batch", "5"], "the option --batch"),
    ("requeue-usage", ["--organisation", "x"], "the option --organisation"),
    ("repair-events", ["--all"], "the option --all"),
    ("resync", ["--all"], "the option --all"),
    ("resync", ["sub_1", "sub_2"], "the argument sub_2"),
    ("help", ["--verbose"], "the option --verbose"),
]


@pytest.fixture(scope="module")
def empty_database(pg_server_url: str) -> str:
    return create_database(pg_server_url)


@pytest.mark.parametrize(("command", "args", "named"), REFUSED, ids=lambda v: str(v))
def test_an_option_a_step_does_not_know_is_refused_before_anything(
    command, args, named, empty_database
):
    run = deploy(
        command,
        *args,
        DATABASE_URL=empty_database,
        STRIPE_SECRET_KEY="sk_test_refused",
        STRIPE_API_BASE="http://127.0.0.1:9",
        GCP_PROJECT="demo",
        WEBHOOK_URL="https://billing.example.com/stripe-webhook-handler",
    )
    assert run.returncode == 2
    assert run.stdout == ""
    assert run.stderr.count("\n") == 1, run.stderr
    assert f"deploy.sh: {command} does not take {named} (it takes: " in run.stderr
    assert "other.toml" not in run.stderr  # the option is named, never its value
    with psycopg.connect(empty_database) as conn:  # nothing was migrated or written
        assert conn.execute("select to_regclass('public.organisations')").fetchone() == (None,)


@pytest.mark.parametrize(
    "args", [["--plans"], ["--plans="], ["--plans", "--dry-run"], ["--dry-run=yes"]]
)
def test_an_option_without_its_value_is_refused(args):
    run = deploy("stripe-catalog", *args)
    assert run.returncode == 2 and run.stdout == ""
    assert run.stderr.startswith("deploy.sh: stripe-catalog: --") and run.stderr.count("\n") == 1


OTHER_PLANS = """
currency = "eur"
meter_event_name = "voice_call_minutes"

[[plans]]
key = "solo"
name = "Solo"
included_minutes = 100
monthly_price_cents = 4900
overage_rate_cents = 60

[[plans]]
key = "studio"
name = "Studio"
included_minutes = 3000
monthly_price_cents = 89000
yearly_price_cents = 961200
overage_rate_cents = 40
"""


def test_catalog_dry_run_reads_the_plans_file_it_is_given(tmp_path):
    (tmp_path / "other.toml").write_text(OTHER_PLANS)
    run = deploy("stripe-catalog", "--plans", "other.toml", "--dry-run", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert "would write plan Solo (solo) into billing_plans" in run.stdout
    assert "would write plan Studio (studio) into billing_plans" in run.stdout
    assert "price mb_studio_yearly" in run.stdout and "price mb_solo_yearly" not in run.stdout
    assert "Starter" not in run.stdout and "mb_setup_fee" not in run.stdout
    same = deploy("stripe-catalog", f"--plans={tmp_path / 'other.toml'}", "--dry-run")
    assert same.returncode == 0 and same.stdout == run.stdout


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (None, "no such plans file"),
        ("currency = 'eur'\n[[plans]\n", "not valid TOML"),
        (OTHER_PLANS.replace("monthly_price_cents = 4900", ""), "has no monthly_price_cents"),
        (OTHER_PLANS.replace("= 4900", "= -1"), "monthly_price_cents must be a whole number"),
        (OTHER_PLANS.replace("= 4900", "= 49.5"), "monthly_price_cents must be a whole number"),
        (OTHER_PLANS.replace("= 60", "= 2147483648"), "overage_rate_cents must be at most"),
        (OTHER_PLANS.replace('"studio"', '"solo"'), "two plans have the key 'solo'"),
        (OTHER_PLANS.replace('"eur"', '"EUR"'), "currency must be"),
        (OTHER_PLANS.split("[[plans]]")[0], "no [[plans]] tables"),
    ],
)
def test_a_missing_or_malformed_plans_file_is_one_line(tmp_path, content, problem):
    if content is not None:
        (tmp_path / "plans.toml").write_text(content)
    run = deploy("stripe-catalog", "--plans", "plans.toml", "--dry-run", cwd=tmp_path)
    assert run.returncode == 1 and run.stdout == ""
    assert run.stderr.startswith(f"deploy.sh stripe-catalog: {tmp_path / 'plans.toml'}: ")
    assert problem in run.stderr
    assert run.stderr.count("\n") == 1 and "Traceback" not in run.stderr


# -- requeue-usage --------------------------------------------------------------------------------


def pending_meter_event(database_url: str) -> tuple[str, str]:
    """An organisation on a plan with one call whose meter event is pending and due:
    (organisation id, usage record id)."""
    tag = uuid.uuid4().hex[:10]
    start = datetime.now(UTC) - timedelta(days=3)
    with psycopg.connect(database_url, autocommit=True) as conn:
        owner = uuid.uuid4()
        conn.execute("insert into auth.users (id, email) values (%s, %s)", (owner, f"{tag}@x.io"))
        org = conn.execute(
            "insert into organisations (name, owner_id, stripe_customer_id)"
            " values ('Ops', %s, %s) returning id",
            (owner, f"cus_{tag}"),
        ).fetchone()
        plan = conn.execute(
            "insert into billing_plans (name, included_minutes, monthly_price_cents,"
            " overage_rate_cents, stripe_price_id, stripe_metered_price_id)"
            " values (%s, 500, 20400, 50, %s, %s) returning id",
            (f"Ops {tag}", f"price_m_{tag}", f"price_u_{tag}"),
        ).fetchone()
        assert org and plan
        sub = conn.execute(
            "insert into subscriptions (organisation_id, plan_id, stripe_subscription_id,"
            " stripe_customer_id, status, billing_period, current_period_start,"
            " current_period_end, stripe_metered_price_id)"
            " values (%s, %s, %s, %s, 'active', 'monthly', %s, %s, %s) returning id",
            (
                org[0],
                plan[0],
                f"sub_{tag}",
                f"cus_{tag}",
                start,
                start + timedelta(days=30),
                f"price_u_{tag}",
            ),
        ).fetchone()
        assert sub
        conn.execute(
            "insert into billing_cycles (organisation_id, subscription_id, period_start,"
            " period_end, included_minutes, overage_rate_cents) values (%s, %s, %s, %s, 500, 50)",
            (org[0], sub[0], start, start + timedelta(days=30)),
        )
        usage = conn.execute(
            "select public.record_usage(p_org_id => %s, p_call_id => 'call', p_duration_seconds"
            " => 90, p_ended_at => null, p_lease_seconds => 1)",
            (org[0],),
        ).fetchone()
        assert usage
        conn.execute(
            "update usage_records set meter_next_attempt_at = now(), meter_claimed_at = null"
            " where organisation_id = %s",
            (org[0],),
        )
    return str(org[0]), str(usage[0]["usage_record_id"])


@pytest.mark.parametrize(
    ("args", "refused"),
    [
        (["--org", "acme"], "argument --org: not an organisation id (a uuid): 'acme'"),
        (["--since", "2026-02-30"], "argument --since: not a date YYYY-MM-DD: '2026-02-30'"),
        (["--since", "yesterday"], "argument --since: not a date YYYY-MM-DD"),
    ],
)
def test_requeue_usage_refuses_a_bad_org_or_date(args, refused):
    run = deploy("requeue-usage", *args, DATABASE_URL="postgresql://127.0.0.1:9/none")
    assert run.returncode == 2 and refused in run.stderr and "Traceback" not in run.stderr


def test_requeue_usage_prints_a_line_per_row_and_a_summary():
    row = {
        "usage_record_id": "u1",
        "organisation_id": "o1",
        "call_id": "c1",
        "billed_minutes": 3,
        "meter_error": "APIConnectionError (no response, -): Unexpected error.\n\n(Network error)",
    }
    result = {
        "requeued": 1,
        "late": 1,
        "rows": [
            {**row, "outcome": "pending"},
            {**row, "outcome": "late"},
            {**row, "outcome": "skipped"},
            {**row, "outcome": "unconfirmed"},
        ],
    }
    done = report_lines(result, dry_run=False)
    assert [line.split(" usage ")[0] for line in done[:4]] == [
        "requeued",
        "requeued late",
        "skipped",
        "unconfirmed",
    ]
    assert done[0] == (
        "requeued usage u1 (organisation o1, call c1, 3 min): pending again in its own cycle;"
        " it had failed with: APIConnectionError (no response, -): Unexpected error."
        " (Network error)"
    )
    assert done[4] == "requeued 1 in their own cycle and 1 late, of 4 failed usage records"
    would = report_lines(result, dry_run=True)
    assert would[1].startswith("would requeue late usage u1") and would[4].startswith("would")
    assert report_lines({"requeued": 0, "late": 0, "rows": []}, dry_run=True) == [
        "no failed usage to requeue"
    ]


def test_requeue_usage_puts_failed_usage_back_to_pending(database_url, db):
    org_id, usage_id = pending_meter_event(database_url)
    db.execute(
        "update usage_records set meter_status = 'failed', meter_claimed_at = null,"
        " meter_error = 'InvalidRequestError (400, resource_missing): No such customer'"
        " where id = %s",
        (usage_id,),
    )
    before = db.execute("select * from usage_records where id = %s", (usage_id,)).fetchone()
    env = {"DATABASE_URL": database_url}

    dry = deploy("requeue-usage", "--org", org_id, "--dry-run", **env)
    assert dry.returncode == 0, dry.stderr
    assert f"would requeue usage {usage_id} (organisation {org_id}, call call, 2 min)" in dry.stdout
    assert "No such customer" in dry.stdout
    assert db.execute("select * from usage_records where id = %s", (usage_id,)).fetchone() == before

    week_ago = (date.today() - timedelta(days=7)).isoformat()
    done = deploy("requeue-usage", "--org", org_id, "--since", week_ago, **env)
    assert done.returncode == 0, done.stderr
    assert f"requeued usage {usage_id}" in done.stdout
    assert "requeued 1 in their own cycle and 0 late, of 1 failed usage records" in done.stdout
    after = db.execute("select * from usage_records where id = %s", (usage_id,)).fetchone()
    assert after["meter_status"] == "pending" and after["meter_error"] is None
    assert after["meter_identifier"] != before["meter_identifier"]  # Stripe may keep the old one

    again = deploy("requeue-usage", "--org", org_id, **env)
    assert again.returncode == 0 and again.stdout == "no failed usage to requeue\n"
    other = deploy("requeue-usage", "--org", str(uuid.uuid4()), "--dry-run", **env)
    assert other.stdout == "no failed usage to requeue\n"
    # Parked: the session's database is shared, and a later test's flush must not deliver it.
    db.execute(
        "update usage_records set meter_next_attempt_at = 'infinity' where id = %s", (usage_id,)
    )
