"""Verify a deployment against Stripe: one line per check, exit 1 when any fails.

Usage: python -m ops.check --url https://.../stripe-webhook-handler [--plans plans.toml]
Needs STRIPE_SECRET_KEY and DATABASE_URL; reads GCP_PROJECT, GCP_REGION and gcloud for the flush
schedule, STRIPE_PORTAL_CONFIGURATION_ID for the portal. Changes nothing. Each line is
"ok <what>: <found>", "FAIL <what>: <what is wrong>; <what to do>" or "skip <what>: <why>".
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import stripe

from ops.catalog import ROOT, load_plans, same_price, tiers_of, wanted_prices
from ops.cloud_functions import FLUSH_JOB
from ops.errors import reach_database, reach_stripe, run
from ops.webhook import HANDLED_EVENTS, THIN_EVENTS, find_endpoint, find_thin_destination
from shared.settings import Settings
from shared.stripe_api import API_VERSION, make_stripe_client

PRICE_KINDS = (
    ("monthly", "stripe_price_id"),
    ("yearly", "stripe_yearly_price_id"),
    ("metered", "stripe_metered_price_id"),
)


@dataclass(frozen=True)
class Check:
    verdict: str  # "ok", "FAIL" or "skip"
    subject: str
    detail: str

    def __str__(self) -> str:
        return f"{self.verdict} {self.subject}: {self.detail}"


def ok(subject: str, detail: str) -> Check:
    return Check("ok", subject, detail)


def fail(subject: str, problem: str, remedy: str) -> Check:
    return Check("FAIL", subject, f"{problem}; {remedy}")


def skip(subject: str, why: str) -> Check:
    return Check("skip", subject, why)


@dataclass(frozen=True)
class Deployment:
    """What the deployment should be: the settings, the plans file and the webhook URL."""

    settings: Settings
    catalog: dict[str, Any]
    plans_file: Path
    url: str

    @property
    def catalog_step(self) -> str:
        default = self.plans_file == ROOT / "plans.toml"
        return "run ./deploy.sh stripe-catalog" + ("" if default else f" --plans {self.plans_file}")


def check_deployment(deployment: Deployment) -> Iterator[Check]:
    """Every check, in order; Stripe or the database out of reach raises (ops/errors.py)."""
    client = make_stripe_client(deployment.settings)
    meter_check, meter_id = check_meter(client, deployment.settings.STRIPE_METER_EVENT_NAME)
    yield meter_check
    yield from check_prices(client, deployment, meter_id)
    yield check_endpoint(client, deployment.url)
    yield check_thin_destination(client, deployment.url)
    yield check_portal(client, deployment.settings.STRIPE_PORTAL_CONFIGURATION_ID)
    yield check_flush_schedule()


def check_meter(client: stripe.StripeClient, event_name: str) -> tuple[Check, str | None]:
    """The meter report-usage sends to, and its id when it is active."""
    subject = f"meter {event_name}"
    meters = [
        m
        for m in client.v1.billing.meters.list(params={"limit": 100}).auto_paging_iter()
        if m.event_name == event_name
    ]
    active = next((m for m in meters if m.status == "active"), None)
    if active is not None:
        return ok(subject, f"{active.id}, active"), str(active.id)
    if meters:
        problem = f"{meters[0].id} is {meters[0].status}: Stripe refuses usage sent to it"
        return fail(subject, problem, "reactivate it in the Dashboard (Billing > Meters)"), None
    remedy = "run ./deploy.sh stripe-catalog, or set STRIPE_METER_EVENT_NAME to the meter's"
    return fail(subject, "no such meter at Stripe", remedy), None


def check_prices(
    client: stripe.StripeClient, deployment: Deployment, meter_id: str | None
) -> Iterator[Check]:
    """Each active plan's current prices: at Stripe, active, with the terms of the plans file."""
    file_name = deployment.plans_file.name
    try:
        rows = active_plans(deployment.settings)
    except psycopg.errors.UndefinedTable:
        yield fail("plans", "billing_plans does not exist", "run ./deploy.sh migrate")
        return
    wanted = {want["lookup_key"]: want for want in wanted_prices(deployment.catalog, "")}
    for wanted_price in wanted.values():
        if "meter" in wanted_price.get("recurring", {}):
            # Without an active meter (its own FAIL above) the meter is not compared.
            wanted_price["recurring"]["meter"] = meter_id
    listed = {plan["name"]: plan for plan in deployment.catalog["plans"]}
    for name in sorted(set(listed) - {row["name"] for row in rows}):
        problem = f"in {file_name} but not on sale in billing_plans"
        yield fail(f"plan {name}", problem, deployment.catalog_step)
    for row in rows:
        plan = listed.get(row["name"])
        if plan is None:
            problem = f"on sale in billing_plans but not in {file_name}"
            yield fail(f"plan {row['name']}", problem, deployment.catalog_step)
            continue
        for kind, column in PRICE_KINDS:
            want = wanted.get(f"mb_{plan['key']}_{kind}")
            if want is None and row[column] is None:
                continue  # no yearly price, in the file and in the table
            subject = f"price {row['name']} {kind}"
            wrong = price_problem(client, row[column], want, file_name)
            if wrong is None:
                yield ok(subject, f"{row[column]}, active, as in {file_name}")
            else:
                yield fail(subject, wrong, deployment.catalog_step)


def active_plans(settings: Settings) -> list[dict[str, Any]]:
    assert settings.DATABASE_URL is not None
    with psycopg.connect(settings.DATABASE_URL, row_factory=psycopg.rows.dict_row) as conn:
        return conn.execute(
            "select name, stripe_price_id, stripe_yearly_price_id, stripe_metered_price_id"
            " from public.billing_plans where active order by sort_order, name"
        ).fetchall()


def price_problem(
    client: stripe.StripeClient, price_id: str | None, want: dict[str, Any] | None, file_name: str
) -> str | None:
    """What is wrong with the price billing_plans names, or None."""
    if price_id is None:
        return f"billing_plans names none, but {file_name} has one"
    if want is None:
        return f"billing_plans names {price_id}, but {file_name} has none"
    try:
        found = client.v1.prices.retrieve(price_id, params={"expand": ["tiers"]})
    except stripe.InvalidRequestError as error:
        if error.http_status != 404:
            raise
        return f"{price_id}: no such price at Stripe"
    if not found.active:
        return f"{price_id} is archived at Stripe"
    if same_price(found, want):
        return None
    return f"{price_id} differs from {file_name}: " + ", ".join(differences(found, want))


def differences(found: Any, want: dict[str, Any]) -> list[str]:
    """Each term in which the price at Stripe differs from the wanted one, both values named."""
    wanted_tiers = [
        (None if tier["up_to"] == "inf" else tier["up_to"], tier["unit_amount"])
        for tier in want.get("tiers", [])
    ]
    recurring = want.get("recurring") or {}
    have = found.recurring
    pairs = [
        ("currency", found.currency, want["currency"]),
        ("amount", found.unit_amount, want.get("unit_amount")),
        ("tiers", tier_text(tiers_of(found)), tier_text(wanted_tiers)),
        ("interval", have.interval if have else None, recurring.get("interval")),
        ("usage type", have.usage_type if have else None, recurring.get("usage_type")),
    ]
    if recurring.get("meter") is not None:
        pairs.append(("meter", have.meter if have else None, recurring["meter"]))
    return [f"{name} {at} (file: {wanted})" for name, at, wanted in pairs if at != wanted] or [
        "other terms"
    ]


def tier_text(tiers: list[tuple[int | None, int]]) -> str | None:
    if not tiers:
        return None
    return ", ".join(
        f"{amount} up to {up_to}" if up_to else f"{amount} above" for up_to, amount in tiers
    )


def check_endpoint(client: stripe.StripeClient, url: str) -> Check:
    endpoint = find_endpoint(client, url)
    if endpoint is None:
        return fail("webhook endpoint", f"none for {url}", "run ./deploy.sh webhook")
    subject = f"webhook endpoint {endpoint.id}"
    if endpoint.api_version not in (None, API_VERSION):
        problem = f"renders events in API {endpoint.api_version}, not {API_VERSION}"
        remedy = "delete it in the Dashboard, run ./deploy.sh webhook, store its new secret"
        return fail(subject, problem, remedy)
    problems = []
    if endpoint.status != "enabled":
        problems.append(str(endpoint.status))
    events = set(endpoint.enabled_events)
    missing = [] if "*" in events else [e for e in HANDLED_EVENTS if e not in events]
    if missing:
        problems.append("lacks " + ", ".join(missing))
    if problems:
        return fail(subject, ", ".join(problems), "run ./deploy.sh webhook")
    detail = f"enabled for {url}, API {API_VERSION}, all {len(HANDLED_EVENTS)} handled events"
    return ok(subject, detail)


def check_thin_destination(client: stripe.StripeClient, url: str) -> Check:
    destination = find_thin_destination(client, url)
    if destination is None:
        remedy = "run ./deploy.sh webhook and add the secret it prints to STRIPE_WEBHOOK_SECRET"
        return fail("thin-event destination", f"none for {url}", remedy)
    subject = f"thin-event destination {destination.id}"
    problems = []
    if destination.status != "enabled":
        problems.append(str(destination.status))
    missing = [e for e in THIN_EVENTS if e not in destination.enabled_events]
    if missing:
        problems.append("lacks " + ", ".join(missing))
    if problems:
        return fail(subject, ", ".join(problems), "run ./deploy.sh webhook")
    return ok(subject, f"enabled for {url}, {', '.join(THIN_EVENTS)}")


def check_portal(client: stripe.StripeClient, configuration_id: str | None) -> Check:
    subject = "portal configuration"
    if not configuration_id:
        return skip(subject, "STRIPE_PORTAL_CONFIGURATION_ID is not set (Stripe's default is used)")
    remedy = (
        "run ./deploy.sh stripe-catalog and set STRIPE_PORTAL_CONFIGURATION_ID to the id it prints"
    )
    # Found in the list: the local stand-in serves no retrieve, and the list holds inactive ones.
    configurations = client.v1.billing_portal.configurations.list(params={"limit": 100})
    found = next((c for c in configurations.auto_paging_iter() if c.id == configuration_id), None)
    subject = f"portal configuration {configuration_id}"
    if found is None:
        return fail(subject, "no such configuration at Stripe", remedy)
    if not found.active:
        return fail(subject, "inactive", remedy)
    if found.features.subscription_update.enabled:
        problem = "subscription_update is enabled (the portal cannot switch our plans' two items)"
        return fail(subject, problem, remedy)
    return ok(subject, "active, subscription_update disabled")


def check_flush_schedule() -> Check:
    """The Cloud Scheduler job `functions` makes; skipped without gcloud or GCP_PROJECT."""
    subject = "flush schedule"
    project, region = os.environ.get("GCP_PROJECT"), os.environ.get("GCP_REGION", "europe-west1")
    gcloud = shutil.which(os.environ.get("GCLOUD", "gcloud"))
    if not project:
        return skip(subject, "GCP_PROJECT is not set (no Cloud Scheduler to look at)")
    if gcloud is None:
        return skip(subject, "gcloud is not installed, so Cloud Scheduler cannot be asked")
    command = [gcloud, "scheduler", "jobs", "describe", FLUSH_JOB]
    command += ["--location", region, "--project", project, "--format", "json"]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    except subprocess.TimeoutExpired:
        return fail(subject, "gcloud did not answer in 60 s", "try again")
    subject = f"flush schedule {FLUSH_JOB}"
    if done.returncode != 0:
        reason = (done.stderr.strip().splitlines() or ["no reason given"])[-1]
        if "NOT_FOUND" in done.stderr or "not found" in done.stderr.lower():
            return fail(subject, f"no such job in {project}/{region}", "run ./deploy.sh functions")
        return fail(subject, f"gcloud failed: {reason}", "check gcloud auth list and the project")
    job = json.loads(done.stdout or "{}")
    if job.get("state") != "ENABLED":
        problem = f"its state is {job.get('state') or 'unknown'}"
        remedy = f"gcloud scheduler jobs resume {FLUSH_JOB} --location {region} --project {project}"
        return fail(subject, problem, remedy)
    return ok(subject, f"enabled, {job.get('schedule', 'no schedule')} in {project}/{region}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True, help="the public URL of stripe-webhook-handler")
    parser.add_argument("--plans", type=Path, default=ROOT / "plans.toml", metavar="FILE")
    args = parser.parse_args(argv)
    deployment = Deployment(Settings(), load_plans(args.plans), args.plans, args.url)
    deployment.settings.require("STRIPE_SECRET_KEY", "DATABASE_URL")
    reach_database(deployment.settings.DATABASE_URL)
    reach_stripe(make_stripe_client(deployment.settings))
    failed = 0
    for check in check_deployment(deployment):
        print(check, flush=True)
        failed += check.verdict == "FAIL"
    return 1 if failed else 0


if __name__ == "__main__":
    run("check", main)
