"""deploy.sh check, and the thin-event destination of deploy.sh webhook: a deployment on the local
Stripe stand-in verified line by line, each broken piece named in one FAIL line; respx (Stripe's
shapes) where the stand-in serves no route (updating an endpoint or a destination)."""

from __future__ import annotations

import contextlib
import io
import json
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
import respx
import stripe

from devtools.stripe_standin import serve_in_thread
from ops.catalog import ROOT, ensure_portal_configuration, load_plans, sync_catalog
from ops.check import FLUSH_JOB, check_flush_schedule, main
from ops.migrate import migrate
from ops.webhook import (
    HANDLED_EVENTS,
    THIN_EVENTS,
    ensure_endpoint,
    ensure_thin_destination,
    ensure_webhook,
)
from shared.settings import Settings
from shared.stripe_api import API_VERSION, make_stripe_client
from shared.webhooks import HANDLERS
from tests.conftest import create_database, stripe_fixture
from tests.test_deploy import deploy

CATALOG = load_plans(ROOT / "plans.toml")
KEY = "sk_test_check_deployment"
URL = "https://billing.example.com/stripe-webhook-handler"
PRICES = 3 * 3  # monthly, yearly and metered of each plan in plans.toml


@pytest.fixture(scope="module")
def database_url(pg_server_url: str) -> str:
    """This module's own database: a catalogue run takes every plan it does not list off sale."""
    url = create_database(pg_server_url)
    with contextlib.redirect_stdout(io.StringIO()):
        migrate(url)
    return url


@pytest.fixture
def standin() -> Iterator[str]:
    base, stop = serve_in_thread(None, "whsec_unused")
    yield base
    stop()


@pytest.fixture
def settings(standin: str, database_url: str, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """The operator's environment for this stand-in (no Google Cloud: the schedule is skipped)."""
    env = {"STRIPE_SECRET_KEY": KEY, "STRIPE_API_BASE": standin, "DATABASE_URL": database_url}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    for name in ("GCP_PROJECT", "GCP_REGION", "GCLOUD", "STRIPE_PORTAL_CONFIGURATION_ID"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("STRIPE_METER_EVENT_NAME", raising=False)
    return Settings(**env)  # type: ignore[arg-type]


@pytest.fixture
def client(settings: Settings) -> stripe.StripeClient:
    return make_stripe_client(settings)


@pytest.fixture
def catalog_deployed(settings: Settings, client: stripe.StripeClient, monkeypatch) -> str:
    """stripe-catalog done (meter, prices, billing_plans, portal); the portal configuration id,
    set as STRIPE_PORTAL_CONFIGURATION_ID."""
    with contextlib.redirect_stdout(io.StringIO()):
        sync_catalog(settings, CATALOG, dry_run=False)
        portal = ensure_portal_configuration(client)
    monkeypatch.setenv("STRIPE_PORTAL_CONFIGURATION_ID", portal)
    return portal


@pytest.fixture
def deployed(catalog_deployed: str, settings: Settings) -> str:
    """A fresh local deployment: stripe-catalog, then webhook."""
    with contextlib.redirect_stdout(io.StringIO()):
        ensure_webhook(settings, URL, dry_run=False)
    return catalog_deployed


def check(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, list[str]]:
    status = main(["--url", URL, *args])
    return status, capsys.readouterr().out.splitlines()


def only_failure(lines: list[str]) -> str:
    failures = [line for line in lines if not line.startswith(("ok ", "skip "))]
    assert len(failures) == 1, "\n".join(lines)
    assert failures[0].startswith("FAIL ")
    return failures[0]


# -- a fresh deployment passes --------------------------------------------------------------------


def test_a_fresh_local_deployment_passes_every_check(deployed: str, standin: str, database_url):
    run = deploy(
        "check",
        DATABASE_URL=database_url,
        STRIPE_SECRET_KEY=KEY,
        STRIPE_API_BASE=standin,
        WEBHOOK_URL=URL,
        STRIPE_PORTAL_CONFIGURATION_ID=deployed,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    lines = run.stdout.splitlines()
    assert run.stderr == ""
    assert [line.split(":")[0] for line in lines] == [
        "ok meter voice_call_minutes",
        *(
            f"ok price {plan} {kind}"
            for plan in ("Starter", "Growth", "Enterprise")
            for kind in ("monthly", "yearly", "metered")
        ),
        lines[PRICES + 1].split(":")[0],  # ok webhook endpoint we_...
        lines[PRICES + 2].split(":")[0],  # ok thin-event destination ed_...
        f"ok portal configuration {deployed}",
        "skip flush schedule",
    ]
    assert lines[PRICES + 1].startswith("ok webhook endpoint we_")
    assert f"API {API_VERSION}, all {len(HANDLERS)} handled events" in lines[PRICES + 1]
    assert lines[PRICES + 2].startswith("ok thin-event destination ed_")
    assert (
        lines[-1] == "skip flush schedule: GCP_PROJECT is not set (no Cloud Scheduler to look at)"
    )


# -- each broken piece is one FAIL line -----------------------------------------------------------


def archive_meter(client: stripe.StripeClient, database_url: str) -> tuple[str, ...]:
    meter = next(iter(client.v1.billing.meters.list(params={"status": "active"}).data))
    client.v1.billing.meters.deactivate(meter.id)
    return (
        f"FAIL meter voice_call_minutes: {meter.id} is inactive: Stripe refuses usage sent to it;",
        "reactivate it",
    )


def other_tiers(client: stripe.StripeClient, database_url: str) -> tuple[str, ...]:
    meter = next(iter(client.v1.billing.meters.list(params={"status": "active"}).data))
    params: Any = {
        "product": "mb_plan_starter",
        "currency": "eur",
        "billing_scheme": "tiered",
        "tiers_mode": "graduated",
        "tiers": [{"up_to": 999, "unit_amount": 0}, {"up_to": "inf", "unit_amount": 50}],
        "recurring": {"interval": "month", "usage_type": "metered", "meter": meter.id},
    }
    other = client.v1.prices.create(params=params)
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(
            "update billing_plans set stripe_metered_price_id = %s where name = 'Starter'",
            (other.id,),
        )
    return (
        f"FAIL price Starter metered: {other.id} differs from plans.toml:"
        " tiers 0 up to 999, 50 above (file: 0 up to 500, 50 above);"
        " run ./deploy.sh stripe-catalog",
    )


def archived_price(client: stripe.StripeClient, database_url: str) -> tuple[str, ...]:
    with psycopg.connect(database_url) as conn:
        row = conn.execute("select stripe_price_id from billing_plans where name = 'Growth'")
        (price_id,) = row.fetchone() or ("",)
    client.v1.prices.update(price_id, params={"active": False})
    return (f"FAIL price Growth monthly: {price_id} is archived at Stripe; run ./deploy.sh",)


def portal_switching(client: stripe.StripeClient, database_url: str) -> tuple[str, ...]:
    portal = next(iter(client.v1.billing_portal.configurations.list().data))
    features: Any = {"subscription_update": {"enabled": True}}
    client.v1.billing_portal.configurations.update(portal.id, params={"features": features})
    return (
        f"FAIL portal configuration {portal.id}: subscription_update is enabled",
        "run ./deploy.sh stripe-catalog and set STRIPE_PORTAL_CONFIGURATION_ID",
    )


def disabled_destination(client: stripe.StripeClient, database_url: str) -> tuple[str, ...]:
    (destination,) = client.v2.core.event_destinations.list().data
    client.v2.core.event_destinations.disable(destination.id)
    return (f"FAIL thin-event destination {destination.id}: disabled; run ./deploy.sh webhook",)


BREAKS: dict[str, Callable[[stripe.StripeClient, str], tuple[str, ...]]] = {
    "archived meter": archive_meter,
    "a price with other tiers": other_tiers,
    "an archived price": archived_price,
    "portal with subscription_update": portal_switching,
    "disabled thin destination": disabled_destination,
}


@pytest.mark.parametrize("broken", BREAKS)
def test_a_broken_piece_is_named_in_one_line(
    broken, deployed, client, database_url, capsys
) -> None:
    expected = BREAKS[broken](client, database_url)
    status, lines = check(capsys)
    assert status == 1
    failure = only_failure(lines)
    for part in expected:
        assert part in failure
    assert len(lines) == 1 + PRICES + 4


def test_an_endpoint_missing_an_event_is_named(catalog_deployed, client, capsys) -> None:
    events: Any = [e for e in HANDLED_EVENTS if e != "invoice.voided"]
    endpoint = client.v1.webhook_endpoints.create(
        params={"url": URL, "enabled_events": events, "api_version": API_VERSION}
    )
    with contextlib.redirect_stdout(io.StringIO()):
        ensure_thin_destination(client, URL)
    status, lines = check(capsys)
    assert status == 1
    assert only_failure(lines) == (
        f"FAIL webhook endpoint {endpoint.id}: lacks invoice.voided; run ./deploy.sh webhook"
    )


def test_an_endpoint_with_another_api_version_is_named(catalog_deployed, client, capsys) -> None:
    params: Any = {"url": URL, "enabled_events": ["*"], "api_version": "2025-03-31.basil"}
    endpoint = client.v1.webhook_endpoints.create(params=params)
    with contextlib.redirect_stdout(io.StringIO()):
        ensure_thin_destination(client, URL)
    status, lines = check(capsys)
    assert status == 1
    assert only_failure(lines) == (
        f"FAIL webhook endpoint {endpoint.id}: renders events in API 2025-03-31.basil, not"
        f" {API_VERSION}; delete it in the Dashboard, run ./deploy.sh webhook, store its new secret"
    )


def test_no_thin_destination_is_named(catalog_deployed, client, capsys) -> None:
    with contextlib.redirect_stdout(io.StringIO()):
        ensure_endpoint(client, URL)
    # One for another URL does not count.
    with contextlib.redirect_stdout(io.StringIO()):
        ensure_thin_destination(client, "https://elsewhere.example.com/hook")
    status, lines = check(capsys)
    assert status == 1
    assert only_failure(lines) == (
        f"FAIL thin-event destination: none for {URL}; run ./deploy.sh webhook and add the"
        " secret it prints to STRIPE_WEBHOOK_SECRET"
    )


def test_nothing_deployed_fails_every_check_but_the_skipped(settings, capsys) -> None:
    assert settings.DATABASE_URL
    with psycopg.connect(settings.DATABASE_URL, autocommit=True) as conn:
        conn.execute("update billing_plans set active = false where active")  # none on sale
    status, lines = check(capsys)
    assert status == 1
    assert lines[0] == (
        "FAIL meter voice_call_minutes: no such meter at Stripe; run ./deploy.sh stripe-catalog,"
        " or set STRIPE_METER_EVENT_NAME to the meter's"
    )
    assert lines[1] == (
        "FAIL plan Enterprise: in plans.toml but not on sale in billing_plans;"
        " run ./deploy.sh stripe-catalog"
    )
    assert [line.split(":")[0] for line in lines[4:]] == [
        "FAIL webhook endpoint",
        "FAIL thin-event destination",
        "skip portal configuration",
        "skip flush schedule",
    ]


def test_a_plans_file_that_differs_names_each_price(deployed, tmp_path: Path, capsys) -> None:
    text = (ROOT / "plans.toml").read_text().replace("= 36600", "= 39900")
    (tmp_path / "dearer.toml").write_text(text)
    status, lines = check(capsys, "--plans", str(tmp_path / "dearer.toml"))
    assert status == 1
    failure = only_failure(lines)
    assert failure.startswith("FAIL price Growth monthly: price_")
    assert failure.endswith(
        f"differs from dearer.toml: amount 36600 (file: 39900);"
        f" run ./deploy.sh stripe-catalog --plans {tmp_path / 'dearer.toml'}"
    )


# -- the flush schedule, through gcloud -----------------------------------------------------------

FAKE_GCLOUD = """#!/usr/bin/env bash
printf '%s\\n' "$*" >> "$(dirname "$0")/calls"
case "$FAKE_JOB" in
  missing) echo 'ERROR: (gcloud.scheduler.jobs.describe) NOT_FOUND: Job not found.' >&2; exit 1 ;;
  auth) echo 'ERROR: (gcloud.scheduler.jobs.describe) You do not currently have an active account selected.' >&2; exit 1 ;;
  *) printf '{"name": "projects/demo/locations/europe-west3/jobs/%s", "schedule": "* * * * *", "state": "%s"}\\n' "$2" "$FAKE_JOB" ;;
esac
"""


@pytest.fixture
def gcloud(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    script = tmp_path / "gcloud"
    script.write_text(FAKE_GCLOUD)
    script.chmod(0o755)
    monkeypatch.setenv("GCLOUD", str(script))
    monkeypatch.setenv("GCP_PROJECT", "demo")
    monkeypatch.setenv("GCP_REGION", "europe-west3")
    return tmp_path / "calls"


@pytest.mark.parametrize(
    ("job", "line"),
    [
        (
            "ENABLED",
            f"ok flush schedule {FLUSH_JOB}: enabled, * * * * * in demo/europe-west3",
        ),
        (
            "PAUSED",
            f"FAIL flush schedule {FLUSH_JOB}: its state is PAUSED; gcloud scheduler jobs resume"
            f" {FLUSH_JOB} --location europe-west3 --project demo",
        ),
        (
            "missing",
            f"FAIL flush schedule {FLUSH_JOB}: no such job in demo/europe-west3;"
            " run ./deploy.sh functions",
        ),
        (
            "auth",
            f"FAIL flush schedule {FLUSH_JOB}: gcloud failed: ERROR:"
            " (gcloud.scheduler.jobs.describe) You do not currently have an active account"
            " selected.; check gcloud auth list and the project",
        ),
    ],
)
def test_the_flush_schedule_is_asked_of_cloud_scheduler(gcloud, monkeypatch, job, line) -> None:
    monkeypatch.setenv("FAKE_JOB", job)
    assert str(check_flush_schedule()) == line
    assert gcloud.read_text() == (
        f"scheduler jobs describe {FLUSH_JOB} --location europe-west3 --project demo"
        " --format json\n"
    )


def test_without_gcloud_or_a_project_the_schedule_is_skipped(gcloud, monkeypatch) -> None:
    monkeypatch.setenv("GCLOUD", "/nonexistent/gcloud")
    assert str(check_flush_schedule()) == (
        "skip flush schedule: gcloud is not installed, so Cloud Scheduler cannot be asked"
    )
    monkeypatch.delenv("GCP_PROJECT")
    assert str(check_flush_schedule()).startswith("skip flush schedule: GCP_PROJECT is not set")
    assert not gcloud.exists()


# -- out of reach, and options --------------------------------------------------------------------


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_an_unreachable_database_or_stripe_is_one_line(database_url: str) -> None:
    port = closed_port()
    down = deploy(
        "check",
        DATABASE_URL=f"postgresql://billing:pw-secret@127.0.0.1:{port}/postgres",
        STRIPE_SECRET_KEY=KEY,
        WEBHOOK_URL=URL,
    )
    assert down.returncode == 1 and down.stdout == ""
    assert down.stderr == (
        f"deploy.sh check: cannot reach the database at 127.0.0.1:{port} (DATABASE_URL):"
        " connection refused\n"
    )
    stripe_down = deploy(
        "check",
        DATABASE_URL=database_url,
        STRIPE_SECRET_KEY=KEY,
        STRIPE_API_BASE=f"http://127.0.0.1:{port}",
        STRIPE_MAX_NETWORK_RETRIES="0",
        WEBHOOK_URL=URL,
    )
    assert stripe_down.returncode == 1 and stripe_down.stdout == ""
    assert stripe_down.stderr.startswith(
        f"deploy.sh check: cannot reach Stripe at http://127.0.0.1:{port}"
        " (STRIPE_API_BASE / STRIPE_SECRET_KEY): "
    )
    assert stripe_down.stderr.count("\n") == 1 and KEY not in stripe_down.stderr


@pytest.mark.parametrize(
    ("args", "refused"),
    [
        (["--dry-run"], "deploy.sh: check does not take the option --dry-run"),
        (["--url", URL], "deploy.sh: check does not take the option --url"),
        ([], "deploy.sh: WEBHOOK_URL is not set (nor GCP_PROJECT to derive it from)."),
    ],
)
def test_check_refuses_what_it_does_not_take(args, refused) -> None:
    run = deploy("check", *args, STRIPE_SECRET_KEY=KEY, DATABASE_URL="postgresql://x@127.0.0.1/x")
    assert run.returncode == 2 and run.stdout == ""
    assert run.stderr.startswith(refused) and run.stderr.count("\n") == 1


# -- deploy.sh webhook: the thin-event destination ------------------------------------------------


def test_webhook_creates_the_destination_once_and_prints_its_secret_once(
    settings, client, standin
) -> None:
    first = io.StringIO()
    with contextlib.redirect_stdout(first):
        ensure_webhook(settings, URL, dry_run=False)
    lines = first.getvalue().splitlines()
    assert lines[0].startswith("webhook we_") and lines[0].endswith(f": created for {URL}")
    assert lines[2].startswith("thin-event destination ed_")
    assert lines[2].endswith(f": created for {URL}")
    assert lines[3].startswith(
        "its signing secret (shown once; add it to STRIPE_WEBHOOK_SECRET, comma-separated"
        " after the webhook endpoint's): whsec_"
    )
    state = httpx.get(f"{standin}/_standin/state").json()
    (destination,) = state["event_destinations"]
    assert destination["event_payload"] == "thin" and destination["type"] == "webhook_endpoint"
    assert destination["enabled_events"] == list(THIN_EVENTS)
    assert destination["webhook_endpoint"]["url"] == URL
    assert lines[3].endswith(destination["webhook_endpoint"]["signing_secret"])
    (endpoint,) = state["webhook_endpoints"]
    assert endpoint["enabled_events"] == list(HANDLERS) and endpoint["api_version"] == API_VERSION

    client.v2.core.event_destinations.disable(destination["id"])
    again = io.StringIO()
    with contextlib.redirect_stdout(again):
        ensure_webhook(settings, URL, dry_run=False)
    assert again.getvalue().splitlines() == [
        f"webhook {endpoint['id']}: already registered for {URL}",
        f"thin-event destination {destination['id']}: enabled again for {URL}",
    ]
    third = io.StringIO()
    with contextlib.redirect_stdout(third):
        ensure_webhook(settings, URL, dry_run=False)
    assert third.getvalue().splitlines()[1] == (
        f"thin-event destination {destination['id']}: already exists for {URL}"
    )
    assert "whsec_" not in again.getvalue() + third.getvalue()


def test_webhook_dry_run_names_the_thin_destination() -> None:
    run = deploy("webhook", "--dry-run", WEBHOOK_URL=URL)
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines()[1] == (
        f"would ensure thin-event destination {URL} for: {', '.join(THIN_EVENTS)}"
    )


def v2_destination(**fields: Any) -> dict[str, Any]:
    """An event destination as Stripe's API v2 shows it (stripe-python 16's class, field by
    field), its URL included."""
    return {
        "id": "ed_test_61Thin",
        "object": "v2.core.event_destination",
        "amazon_eventbridge": None,
        "azure_event_grid": None,
        "created": "2026-11-01T10:00:00.000Z",
        "description": "",
        "enabled_events": list(THIN_EVENTS),
        "event_payload": "thin",
        "events_from": ["@self"],
        "livemode": False,
        "metadata": {},
        "name": "metered-billing meter errors",
        "snapshot_api_version": None,
        "status": "enabled",
        "status_details": None,
        "type": "webhook_endpoint",
        "updated": "2026-11-01T10:00:00.000Z",
        "webhook_endpoint": {"signing_secret": None, "url": URL},
        **fields,
    }


@respx.mock(base_url="https://api.stripe.com", assert_all_called=True)
def test_webhook_brings_an_endpoint_and_a_destination_up_to_date(respx_mock, monkeypatch) -> None:
    monkeypatch.delenv("STRIPE_API_BASE", raising=False)
    endpoint = stripe_fixture("webhook_endpoint") | {
        "id": "we_test_1",
        "url": URL,
        "api_version": API_VERSION,
        "enabled_events": ["invoice.paid"],
        "status": "disabled",
    }
    respx_mock.get("/v1/webhook_endpoints").respond(
        json={
            "object": "list",
            "data": [endpoint],
            "has_more": False,
            "url": "/v1/webhook_endpoints",
        }
    )
    updated = respx_mock.post("/v1/webhook_endpoints/we_test_1").respond(
        json=endpoint | {"status": "enabled", "enabled_events": list(HANDLED_EVENTS)}
    )
    destination = v2_destination(
        enabled_events=["v1.billing.meter.no_meter_found"], status="disabled"
    )
    listed = respx_mock.get("/v2/core/event_destinations").respond(
        json={"data": [destination], "next_page_url": None, "previous_page_url": None}
    )
    events = respx_mock.post("/v2/core/event_destinations/ed_test_61Thin").respond(
        json=destination | {"enabled_events": sorted(THIN_EVENTS)}
    )
    enabled = respx_mock.post("/v2/core/event_destinations/ed_test_61Thin/enable").respond(
        json=v2_destination()
    )
    out = io.StringIO()
    settings = Settings(STRIPE_SECRET_KEY=KEY, STRIPE_MAX_NETWORK_RETRIES=0)
    with contextlib.redirect_stdout(out):
        ensure_webhook(settings, URL, dry_run=False)
    assert out.getvalue().splitlines() == [
        f"webhook we_test_1: events updated and enabled again for {URL}",
        f"thin-event destination ed_test_61Thin: events updated and enabled again for {URL}",
    ]
    form = httpx.QueryParams(updated.calls.last.request.content.decode()).multi_items()
    assert ("disabled", "false") in form
    assert [v for k, v in form if k.startswith("enabled_events")] == list(HANDLED_EVENTS)
    assert "webhook_endpoint.url" in str(listed.calls.last.request.url)
    assert json.loads(events.calls.last.request.content) == {"enabled_events": sorted(THIN_EVENTS)}
    assert enabled.called
