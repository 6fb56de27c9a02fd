"""POST stripe-webhook-handler: Stripe's events, verified, recorded once and applied (DESIGN.md)."""

from __future__ import annotations

import flask

from shared.db import get_database
from shared.http import endpoint, json_response
from shared.meter_errors import is_thin_event, process_thin_event
from shared.settings import get_settings
from shared.stripe_api import make_stripe_client
from shared.webhooks import process_event, read_event_body, verify_event

# Checked at start: a missing secret stops the function here, naming the variable.
settings = get_settings().require("STRIPE_SECRET_KEY", "STRIPE_WEBHOOK_SECRET").require_database()
stripe_client = make_stripe_client(settings)


@endpoint(methods=("POST",))
def stripe_webhook_handler(request: flask.Request) -> flask.Response:
    body = read_event_body(request)
    signature = request.headers.get("Stripe-Signature")
    if is_thin_event(body):  # Stripe's meter error reports (thin payload style)
        event_id, status = process_thin_event(
            body,
            signature,
            settings.webhook_secrets,
            database=get_database(settings),
            stripe_client=stripe_client,
        )
        return json_response({"received": True, "event_id": event_id, "status": status})
    event = verify_event(body, signature, settings.webhook_secrets)
    status = process_event(event, database=get_database(settings), stripe_client=stripe_client)
    return json_response({"received": True, "event_id": event["id"], "status": status})
