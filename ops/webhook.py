"""Register the Stripe webhook endpoint for the handled events, with the pinned API version.

Usage: python -m ops.webhook --url https://.../stripe-webhook-handler [--dry-run]
Needs STRIPE_SECRET_KEY. Idempotent: an endpoint with the same URL is found again and its events
brought up to date. The signing secret is printed once, when the endpoint is created: store it as
STRIPE_WEBHOOK_SECRET (Stripe never shows it again through the API).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ops.errors import run
from shared.settings import Settings
from shared.stripe_api import API_VERSION, make_stripe_client

HANDLED_EVENTS = (
    "checkout.session.completed",
    "customer.subscription.created",
    "customer.subscription.updated",
    "customer.subscription.deleted",
    "invoice.paid",
    "invoice.payment_failed",
)


def ensure_webhook(settings: Settings, url: str, *, dry_run: bool) -> None:
    if dry_run:
        print(
            f"would ensure webhook endpoint {url} (API {API_VERSION}) for: {', '.join(HANDLED_EVENTS)}"
        )
        return
    client = make_stripe_client(settings)
    for endpoint in client.v1.webhook_endpoints.list(params={"limit": 100}).data:
        if endpoint.url != url:
            continue
        if endpoint.api_version not in (None, API_VERSION):
            sys.exit(
                f"webhook {endpoint.id} for {url} renders events in API {endpoint.api_version}, not "
                f"{API_VERSION}; delete it in the Dashboard and run this again."
            )
        if sorted(endpoint.enabled_events) != sorted(HANDLED_EVENTS):
            client.v1.webhook_endpoints.update(
                endpoint.id, params={"enabled_events": list(HANDLED_EVENTS)}
            )
            print(f"webhook {endpoint.id}: events updated")
        else:
            print(f"webhook {endpoint.id}: already registered for {url}")
        return
    created = client.v1.webhook_endpoints.create(
        params={
            "url": url,
            "enabled_events": list(HANDLED_EVENTS),
            "api_version": API_VERSION,
            "description": "metered-billing",
        }
    )
    print(f"webhook {created.id}: created for {url}")
    print(f"signing secret (shown once; set STRIPE_WEBHOOK_SECRET to it): {created.secret}")


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
