"""Register the Stripe webhook endpoint (handled events, pinned API version) and thin destination.

The thin-event destination carries Stripe's asynchronous verdicts on meter events to the same URL.

Usage: python -m ops.webhook --url https://.../stripe-webhook-handler [--dry-run]
Needs STRIPE_SECRET_KEY. Idempotent: the endpoint and the destination with the same URL are found
again and brought up to date (events, enabled). Each signing secret is printed once, when its
endpoint or destination is created (Stripe never shows it again through the API): both go into
STRIPE_WEBHOOK_SECRET, comma-separated.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

import stripe

from ops.errors import run
from shared.settings import Settings
from shared.stripe_api import API_VERSION, make_stripe_client
from shared.webhooks import HANDLERS

HANDLED_EVENTS = tuple(HANDLERS)
# Thin events come through an event destination (API v2), never a v1 webhook endpoint.
THIN_EVENTS = ("v1.billing.meter.error_report_triggered", "v1.billing.meter.no_meter_found")
DESTINATION_NAME = "metered-billing meter errors"


def find_endpoint(client: stripe.StripeClient, url: str) -> stripe.WebhookEndpoint | None:
    """The webhook endpoint delivering to `url` (the first Stripe lists), or None."""
    endpoints = client.v1.webhook_endpoints.list(params={"limit": 100})
    return next((e for e in endpoints.auto_paging_iter() if e.url == url), None)


def find_thin_destination(client: stripe.StripeClient, url: str) -> Any | None:
    """The thin-payload webhook destination delivering to `url`, or None (Stripe shows a
    destination's URL only when asked to include it)."""
    destinations = client.v2.core.event_destinations.list(
        params={"include": ["webhook_endpoint.url"], "limit": 100}
    )
    return next(
        (
            d
            for d in destinations.auto_paging_iter()
            if d.type == "webhook_endpoint"
            and d.event_payload == "thin"
            and d.webhook_endpoint is not None
            and d.webhook_endpoint.url == url
        ),
        None,
    )


def ensure_webhook(settings: Settings, url: str, *, dry_run: bool) -> None:
    if dry_run:
        print(
            f"would ensure webhook endpoint {url} (API {API_VERSION}) for: {', '.join(HANDLED_EVENTS)}"
        )
        print(f"would ensure thin-event destination {url} for: {', '.join(THIN_EVENTS)}")
        return
    client = make_stripe_client(settings)
    ensure_endpoint(client, url)
    ensure_thin_destination(client, url)


def ensure_endpoint(client: stripe.StripeClient, url: str) -> None:
    endpoint = find_endpoint(client, url)
    if endpoint is None:
        # Typed as Any: the SDK's types list literal event names and API versions.
        params: Any = {
            "url": url,
            "enabled_events": list(HANDLED_EVENTS),
            "api_version": API_VERSION,
            "description": "metered-billing",
        }
        created = client.v1.webhook_endpoints.create(params=params)
        print(f"webhook {created.id}: created for {url}")
        print(f"signing secret (shown once; put it in STRIPE_WEBHOOK_SECRET): {created.secret}")
        return
    if endpoint.api_version not in (None, API_VERSION):
        sys.exit(
            f"webhook {endpoint.id} for {url} renders events in API {endpoint.api_version}, not "
            f"{API_VERSION}; delete it in the Dashboard and run this again."
        )
    changes: dict[str, Any] = {}
    if set(endpoint.enabled_events) != set(HANDLED_EVENTS):
        changes["enabled_events"] = list(HANDLED_EVENTS)
    if endpoint.status == "disabled":
        changes["disabled"] = False
    if changes:
        client.v1.webhook_endpoints.update(endpoint.id, params=changes)  # type: ignore[arg-type]
        print(f"webhook {endpoint.id}: {' and '.join(_said(changes))} for {url}")
    else:
        print(f"webhook {endpoint.id}: already registered for {url}")


def create_thin_destination(client: stripe.StripeClient, url: str) -> tuple[str, str]:
    """A new thin-event destination delivering to `url`: (its id, its signing secret), which
    Stripe shows only now."""
    created = client.v2.core.event_destinations.create(
        params={
            "name": DESTINATION_NAME,
            "description": "Stripe's verdicts on meter events, for stripe-webhook-handler",
            "type": "webhook_endpoint",
            "event_payload": "thin",
            "enabled_events": list(THIN_EVENTS),
            "webhook_endpoint": {"url": url},
            "include": ["webhook_endpoint.signing_secret", "webhook_endpoint.url"],
        }
    )
    secret = created.webhook_endpoint.signing_secret if created.webhook_endpoint else None
    if not secret:
        raise RuntimeError(f"the thin-event destination {created.id} came without its secret")
    return str(created.id), str(secret)


def ensure_thin_destination(client: stripe.StripeClient, url: str) -> None:
    destination = find_thin_destination(client, url)
    if destination is None:
        created, secret = create_thin_destination(client, url)
        print(f"thin-event destination {created}: created for {url}")
        print(
            "its signing secret (shown once; add it to STRIPE_WEBHOOK_SECRET, comma-separated"
            f" after the webhook endpoint's): {secret}"
        )
        return
    done = []
    if not set(THIN_EVENTS) <= set(destination.enabled_events):
        events = sorted({*destination.enabled_events, *THIN_EVENTS})
        client.v2.core.event_destinations.update(destination.id, params={"enabled_events": events})
        done.append("events updated")
    if destination.status != "enabled":
        client.v2.core.event_destinations.enable(destination.id)
        done.append("enabled again")
    if done:
        print(f"thin-event destination {destination.id}: {' and '.join(done)} for {url}")
    else:
        print(f"thin-event destination {destination.id}: already exists for {url}")


def _said(changes: dict[str, Any]) -> list[str]:
    return [
        {"enabled_events": "events updated", "disabled": "enabled again"}[name] for name in changes
    ]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True, help="the public URL of stripe-webhook-handler")
    parser.add_argument("--dry-run", action="store_true")
    args = parser.parse_args(argv)
    if not args.url.startswith("https://") and not args.url.startswith("http://127.0.0.1"):
        sys.exit("--url must be https:// (Stripe delivers live events only over HTTPS)")
    settings = Settings()
    if not args.dry_run:
        settings.require("STRIPE_SECRET_KEY")
    ensure_webhook(settings, args.url, dry_run=args.dry_run)


if __name__ == "__main__":
    run("webhook", main)
