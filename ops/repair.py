"""Repair what the Stripe webhook could not finish. Each command is idempotent and prints what it did.

    python -m ops.repair failed-events [--dry-run]
        process again every `failed` event of the ledger, and every claim older than the lease
        (its process died); an event that succeeds is marked processed, one that fails keeps
        its new error and attempt count.
    python -m ops.repair resync --subscription sub_... [--dry-run]
    python -m ops.repair resync --all [--dry-run]
        fetch the subscription(s) from Stripe and apply the current state (only ever newer than
        what is stored), then each of its invoices the same way; --all takes every subscription
        that has not ended.

Reads DATABASE_URL (or SUPABASE_URL + SUPABASE_SERVICE_ROLE_KEY) and STRIPE_SECRET_KEY.
Exit status 1 when something could not be repaired; the database or Stripe out of reach stops the
command at once, with one line naming the variable.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

import stripe

from ops.errors import is_unreachable, reach_database, run
from shared.db import Database, get_database
from shared.errors import BillingError, ConfigError
from shared.invoices import apply_invoice, subscription_invoices
from shared.meter_errors import process_thin_notification
from shared.settings import get_settings
from shared.stripe_api import make_stripe_client
from shared.subscriptions import fetch_subscription, normalise_subscription, sync_subscription
from shared.webhooks import failure_reason, process_event


def retry_failed_events(
    *, database: Database, stripe_client: stripe.StripeClient, dry_run: bool
) -> int:
    """Process the ledger's failed (and abandoned) events again; the number still failing."""
    events: list[dict[str, Any]] = database.call("stripe_events_to_retry")
    if not events:
        print("no failed events")
    failures = 0
    for row in events:
        label = f"{row['id']} ({row['type']}, {row['status']}, attempts {row['attempts']})"
        if dry_run:
            print(f"would process {label}: last error {row['error'] or '-'}")
            continue
        try:
            payload = row["payload"]
            # A thin event (a meter error report) is kept as its notification.
            process = (
                process_thin_notification
                if payload.get("object") == "v2.core.event"
                else process_event
            )
            status = process(payload, database=database, stripe_client=stripe_client)
        except Exception as error:
            if is_unreachable(error):
                raise  # every other event would fail the same way
            failures += 1
            print(f"failed {label}: {failure_reason(error)}")
        else:
            print(f"{status} {label}")
    return failures


def resync_invoices(
    subscription_id: str,
    *,
    database: Database,
    stripe_client: stripe.StripeClient,
    dry_run: bool,
) -> None:
    """Fetch every invoice of the subscription from Stripe and apply each (only ever newer)."""
    fetched = subscription_invoices(stripe_client, subscription_id, database=database)
    if dry_run:
        for one in fetched:
            print(f"would apply invoice {one.invoice['id']}: {one.invoice.get('status')}")
        return
    counts = {"recorded": 0, "synced": 0, "unchanged": 0, "ignored": 0}
    for one in fetched:
        result = apply_invoice(one, database=database)
        if result["status"] == "ignored":
            counts["ignored"] += 1
            print(f"ignored invoice {one.invoice['id']}: {result['reason']}")
        elif result["created"]:
            counts["recorded"] += 1
            print(f"recorded invoice {one.invoice['id']}: {result['invoice_status']}")
        elif result["changed"]:
            counts["synced"] += 1
            changed = ", ".join(result["changed"])
            print(f"synced invoice {one.invoice['id']}: {result['invoice_status']} ({changed})")
        else:
            counts["unchanged"] += 1
    summary = ", ".join(f"{count} {what}" for what, count in counts.items())
    print(f"invoices of {subscription_id}: {len(fetched)} at Stripe ({summary})")


def resync(
    subscription_ids: Sequence[str],
    *,
    database: Database,
    stripe_client: stripe.StripeClient,
    dry_run: bool,
) -> int:
    """Fetch each subscription and its invoices from Stripe and apply them; the number of
    subscriptions that could not be synced."""
    if not subscription_ids:
        print("no subscriptions to re-sync")
    failures = 0
    for subscription_id in subscription_ids:
        try:
            if dry_run:
                fetched = fetch_subscription(stripe_client, subscription_id, database=database)
                state = normalise_subscription(fetched.subscription)
                prices = ", ".join(str(item["price_id"]) for item in state["items"])
                print(f"would apply {subscription_id}: {state['status']}, prices {prices}")
                resync_invoices(
                    subscription_id, database=database, stripe_client=stripe_client, dry_run=True
                )
                continue
            # The webhook's own path: a duplicate live subscription is settled here too.
            result = sync_subscription(
                subscription_id, database=database, stripe_client=stripe_client, actor="ops-repair"
            )
            if result["status"] == "ignored":
                print(f"ignored {subscription_id}: {result['reason']}")
                continue
            if not result["applied"]:
                print(f"unchanged {subscription_id}: the stored state is newer or ended")
            else:
                changed = ", ".join(result["changed"]) or "nothing changed"
                verb = "created" if result["created"] else "synced"
                print(f"{verb} {subscription_id}: {result['subscription_status']} ({changed})")
            # After the subscription: its row links the invoices to it and their cycles.
            resync_invoices(
                subscription_id, database=database, stripe_client=stripe_client, dry_run=False
            )
        except (BillingError, stripe.StripeError) as error:
            if is_unreachable(error):
                raise  # every other subscription would fail the same way
            failures += 1
            print(f"failed {subscription_id}: {failure_reason(error)}")
    return failures


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ops.repair", description=__doc__.split("\n")[0]
    )
    commands = parser.add_subparsers(dest="command", required=True)
    failed = commands.add_parser("failed-events", help="process failed webhook events again")
    failed.add_argument("--dry-run", action="store_true", help="list them, change nothing")
    again = commands.add_parser(
        "resync", help="re-sync subscriptions and their invoices from Stripe"
    )
    which = again.add_mutually_exclusive_group(required=True)
    which.add_argument("--subscription", metavar="SUB_ID", help="one Stripe subscription id")
    which.add_argument("--all", action="store_true", help="every subscription that has not ended")
    again.add_argument("--dry-run", action="store_true", help="fetch and show, change nothing")
    args = parser.parse_args(argv)

    if args.command == "resync" and args.subscription and not args.subscription.startswith("sub_"):
        parser.error("--subscription takes a Stripe subscription id (sub_...)")
    try:
        settings = get_settings().require("STRIPE_SECRET_KEY").require_database()
        reach_database(settings.DATABASE_URL)
        database = get_database(settings)
        stripe_client = make_stripe_client(settings)
        if args.command == "failed-events":
            failures = retry_failed_events(
                database=database, stripe_client=stripe_client, dry_run=args.dry_run
            )
        else:
            ids = (
                [args.subscription]
                if args.subscription
                else database.call("subscriptions_to_resync")
            )
            failures = resync(
                ids, database=database, stripe_client=stripe_client, dry_run=args.dry_run
            )
    except (ConfigError, BillingError) as error:
        if is_unreachable(error):
            raise
        parser.exit(2, f"error: {getattr(error, 'message', error)}\n")
    return 1 if failures else 0


if __name__ == "__main__":
    run("repair-events" if sys.argv[1:2] == ["failed-events"] else "resync", main)
