"""One meter event through the v1 API, and what a failed attempt tells (both kinds of delivery).

`deliver` sends one claimed event; reconciliation's repairs use it. Each attempt has its own
idempotency key (identifier + attempt number): Stripe replays the first answer to a key for 24
hours, a 500 included, so one key for every attempt would keep a retried event undelivered for a
day. `failure_outcome` is the rule the batched flush (shared/meter_flush.py) applies too.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import httpx

from shared.db import Database
from shared.settings import Settings
from shared.stripe_api import describe, is_retriable
from shared.stripe_lib import stripe

log = logging.getLogger("metered_billing")

Outcome = Literal["sent", "retry", "unknown", "failed"]


@dataclass(frozen=True)
class MeterEvent:
    usage_record_id: str
    identifier: str
    customer: str
    value: int
    timestamp: int
    attempt: int


def deliver(
    database: Database, client: stripe.StripeClient, settings: Settings, event: MeterEvent
) -> str:
    """Send one claimed meter event and keep the outcome; the event's meter_status after it."""
    outcome, error = send_meter_event(client, settings, event)
    saved = database.call(
        "record_meter_result",
        p_usage_record_id=event.usage_record_id,
        p_attempt=event.attempt,
        p_outcome=outcome,
        p_error=error,
    )
    status: str = saved["meter_status"]
    return status


def send_meter_event(
    client: stripe.StripeClient, settings: Settings, event: MeterEvent
) -> tuple[Outcome, str | None]:
    """POST one meter event: ("sent", None), or the outcome to keep and Stripe's reason."""
    try:
        client.v1.billing.meter_events.create(
            params={
                "event_name": settings.STRIPE_METER_EVENT_NAME,
                "identifier": event.identifier,
                "payload": {"stripe_customer_id": event.customer, "value": str(event.value)},
                "timestamp": event.timestamp,
            },
            # One try within STRIPE_TIMEOUT_SECONDS: retrying is the outbox's job. A retry of a
            # request Stripe did process is refused for its identifier: `already_recorded`.
            options={
                "max_network_retries": 0,
                "idempotency_key": f"{event.identifier}-{event.attempt}",
            },
        )
    except stripe.StripeError as error:
        if already_recorded(error):
            return "sent", None
        reason = describe(error)
        log.warning("meter event %s not delivered: %s", event.identifier, reason)
        return failure_outcome(error), reason
    return "sent", None


def failure_outcome(error: stripe.StripeError) -> Outcome:
    """What a failed attempt tells: refused for good, not recorded, or perhaps recorded.

    "failed": Stripe rejected the event itself (400: too old, malformed); no later attempt can
    succeed. "retry": Stripe certainly did not record it (no connection was made, 429, our own
    key refused (401, 403), which an operator fixes without the usage being lost meanwhile).
    "unknown": no answer or a 5xx; Stripe may have recorded it, so it is resent only within
    Stripe's identifier window (the SQL makes it `unconfirmed` after that).
    """
    if isinstance(error, stripe.APIConnectionError):
        not_sent = isinstance(error.__cause__, httpx.ConnectError | httpx.ConnectTimeout)
        return "retry" if not_sent else "unknown"
    status = error.http_status or 0
    if status in (401, 403, 429):
        return "retry"
    if status == 400 and not is_retriable(error):
        return "failed"
    return "unknown"


def already_recorded(error: stripe.StripeError) -> bool:
    """Stripe's answer to an identifier it has seen: "An event already exists with identifier"."""
    if error.http_status != 400:
        return False
    message = str(error.user_message or "").lower()
    return error.code == "resource_already_exists" or (
        "already exists" in message and "identifier" in message
    )
