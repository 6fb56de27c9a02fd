"""Stripe's asynchronous verdicts on meter events: thin error-report events, recorded once, applied.

    is_thin_event(body)                      whether the body is a thin event notification
                                             (`"object": "v2.core.event"`), not a snapshot event
    process_thin_event(body, signature, ...) 400 unless one of the secrets signed it in the last
                                             300 s; then process_thin_notification
    process_thin_notification(payload, ...)  claim in `stripe_events` -> fetch the full event ->
                                             apply_meter_error_report -> processed | ignored |
                                             duplicate; a failure is stored, then raised

Stripe accepts a meter event, validates it later and reports the invalid ones through an event
destination with the thin payload style: `v1.billing.meter.error_report_triggered` (per meter)
and `v1.billing.meter.no_meter_found` (no meter has the event name). A notification carries only
the event's id and type; the full event (`GET /v2/core/events/{id}`) carries the error counts
per reason code, a few SAMPLES of the rejected events (`sample_errors[].request.identifier`: our
meter identifier) and the validation window. The rows sampled become `failed` with Stripe's reason
in one SQL call, which also marks their cycles for reconciliation.

Why reconciliation is recorded to do, not run here: the report names samples, so finding the rest
takes Stripe's meter event summaries for every cycle touched (a summaries request per cycle part,
the meter and perhaps the invoice besides), for possibly many customers at once (no_meter_found
hits them all); the summaries are eventually consistent, so right after a validation window they
may still miss or hold its events; and Stripe expects the delivery answered within seconds, while
a slow or rate-limited read would turn an applied report into a 5xx and a retry. The drift rows
written here make the next `./deploy.sh reconcile` (run daily) check those cycles first.

The ledger is the snapshot events' (sql/0020): recorded once by id, a duplicate is a 200 no-op, a
failure stays on the event row and answers 5xx so Stripe retries.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from shared.db import Database
from shared.errors import BadRequest
from shared.stripe_api import stripe_errors
from shared.stripe_lib import stripe
from shared.webhooks import SIGNATURE_TOLERANCE_SECONDS, failure_reason, storable

THIN_OBJECT = "v2.core.event"
HANDLED = frozenset({"v1.billing.meter.error_report_triggered", "v1.billing.meter.no_meter_found"})


def is_thin_event(body: bytes) -> bool:
    """Whether `body` is a thin event notification (verified later, like any event)."""
    try:
        parsed = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return False
    return isinstance(parsed, dict) and parsed.get("object") == THIN_OBJECT


def verify_thin_event(
    client: stripe.StripeClient, body: bytes, signature: str | None, secrets: Sequence[str]
) -> Any:
    """The notification in `body` if one of `secrets` signed it in the last 300 s; else 400."""
    for secret in secrets:
        try:
            notification = client.parse_event_notification(
                body, signature, secret, SIGNATURE_TOLERANCE_SECONDS
            )
        except stripe.SignatureVerificationError:
            continue
        except (ValueError, KeyError, TypeError) as exc:
            raise BadRequest(
                f"The body is not a Stripe thin event notification ({exc}).", code="invalid_event"
            ) from exc
        if not str(notification.id).startswith("evt_"):
            raise BadRequest("The thin event's id is not an event id.", code="invalid_event")
        try:
            datetime.fromisoformat(str(notification.created))
        except ValueError as exc:
            raise BadRequest(
                "The thin event's created is not an ISO-8601 time.", code="invalid_event"
            ) from exc
        return notification
    raise BadRequest(
        "The Stripe-Signature header is missing, does not match the body, or is older than"
        f" {SIGNATURE_TOLERANCE_SECONDS} seconds.",
        code="invalid_signature",
    )


def error_samples(event: dict[str, Any]) -> list[dict[str, str]]:
    """[{identifier, code, message}] of every sample error in a fetched error report."""
    reason = (event.get("data") or {}).get("reason") or {}
    samples = []
    for error_type in reason.get("error_types") or []:
        for sample in error_type.get("sample_errors") or []:
            identifier = (sample.get("request") or {}).get("identifier")
            if isinstance(identifier, str) and identifier:
                samples.append(
                    {
                        "identifier": identifier,
                        "code": str(error_type.get("code") or "meter_event_invalid"),
                        "message": str(sample.get("error_message") or ""),
                    }
                )
    return samples


def apply_error_report(
    event: dict[str, Any], *, database: Database, event_id: str
) -> dict[str, Any]:
    """Mark the sampled rows failed and their cycles to reconcile, in one SQL call."""
    data = event.get("data") or {}
    result: dict[str, Any] = database.call(
        "apply_meter_error_report",
        p_event_id=event_id,
        p_event=storable(event),
        p_samples=error_samples(event),
        p_validation_start=data.get("validation_start"),
        p_validation_end=data.get("validation_end"),
    )
    return result


def process_thin_event(
    body: bytes,
    signature: str | None,
    secrets: Sequence[str],
    *,
    database: Database,
    stripe_client: stripe.StripeClient,
) -> tuple[str, str]:
    """(event id, 'processed' | 'ignored' | 'duplicate') of a delivered thin event."""
    notification = verify_thin_event(stripe_client, body, signature, secrets)
    status = process_thin_notification(
        storable(json.loads(body)), database=database, stripe_client=stripe_client
    )
    return str(notification.id), status


def process_thin_notification(
    notification: dict[str, Any], *, database: Database, stripe_client: stripe.StripeClient
) -> str:
    """'processed', 'ignored' or 'duplicate' for a verified thin notification, or one the ledger
    kept (`./deploy.sh repair-events` retries a failed one with its stored payload, whose `object`
    is "v2.core.event"). A failure is stored on the event row, then raised."""
    event_id, event_type = str(notification["id"]), str(notification["type"])
    claim = database.call(
        "claim_stripe_event",
        p_id=event_id,
        p_type=event_type,
        p_created=int(datetime.fromisoformat(str(notification["created"])).timestamp()),
        p_payload={key: value for key, value in notification.items() if key != "event"},
        p_handled=event_type in HANDLED,
    )
    if event_type not in HANDLED or claim["status"] != "claimed":
        return str(claim["status"])  # 'ignored' or 'duplicate'
    try:
        with stripe_errors():
            event = stripe_client.v2.core.events.retrieve(event_id).to_dict()
        result = apply_error_report(event, database=database, event_id=event_id)
    except Exception as error:
        # Recorded, then re-raised: the answer is a 5xx and Stripe retries.
        database.call("fail_stripe_event", p_id=event_id, p_error=failure_reason(error))
        raise
    return str(result["status"])
