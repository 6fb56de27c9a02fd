"""Stripe webhooks: verify the signature, record the event once in the ledger, dispatch it.

    read_event_body(request)                   413 over MAX_EVENT_BYTES, before anything is parsed
    verify_event(body, signature, secrets)     400 unless one of the secrets signed this body in
                                               the last 300 s; 400 when it is not an event; the
                                               event made storable (see `storable`)
    process_event(event, database, client)     claim in `stripe_events` -> handler -> processed |
                                               ignored | duplicate; a failure is stored, then raised

Stripe delivers at least once, in any order, and retries any non-2xx for days. So: an answer of
200 means the effect is committed (the `processed` mark is written in the same SQL call as the
effect); every failure is stored on the event row and answered 5xx, and its retry (or
`python -m ops.repair failed-events`) claims the row again.

An organisation has one live subscription: a second one that reaches us (a Checkout Session whose
id we never stored, a subscription made in the Dashboard) is canceled at Stripe, the newer of the
two, before the event is answered 200 (shared/subscriptions.py).

A 5xx only where a retry can succeed: Stripe or the database down, the event in progress in
another delivery, a price the catalog does not know yet (503 unknown_price). An event with nothing
of ours in it (an organisation we do not have, a customer no organisation owns and no
organisation_id metadata, an invoice of no subscription or customer of ours, a draft invoice)
is answered 200 `ignored` and keeps the reason on its row: no retry could change it, and the
checkout that links an organisation carries the organisation itself, so ignoring an early
subscription event loses nothing (a draft is recorded when it is finalized).

A completed Checkout Session links an organisation only when we opened it (our
`checkout_sessions` row names the organisation) or its `metadata.organisation_id` does (only our
server writes session metadata). Payment links and pricing tables on the same Stripe account make
sessions too, and their `client_reference_id` is whatever the buyer's page put there: alone, it
links nothing.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from typing import Any

import flask
from pydantic import BaseModel, Field, StrictInt, ValidationError

from shared.db import Database
from shared.errors import BadRequest, BillingError, PayloadTooLarge, UpstreamError
from shared.invoices import FetchedInvoice, apply_invoice, fetch_invoice, invoice_missing
from shared.stripe_api import describe
from shared.stripe_lib import stripe
from shared.subscriptions import (
    invoice_subscription_id,
    normalise_invoice,
    organisation_id,
    stripe_id,
    sync_subscription,
)

# Stripe's events are kilobytes; 512 KiB leaves ample room (metadata is capped at 50 keys of 500
# characters) while an oversized body is refused with 413 before it is read, verified or parsed.
MAX_EVENT_BYTES = 512 * 1024
SIGNATURE_TOLERANCE_SECONDS = 300

# Keys whose values are secrets or bearer links (whoever has one can act on the object: a
# session's or intent's client_secret, a Checkout or recovery `url`, an invoice's hosted page
# and PDF). The ledger keeps the event without them; no handler reads them.
SECRET_KEYS = frozenset(
    {"client_secret", "url", "hosted_invoice_url", "invoice_pdf", "receipt_url"}
)

# What Postgres text and jsonb refuse although JSON allows it: U+0000 (`\u0000`), and a lone
# surrogate (`\ud800` unpaired), which cannot even be encoded as UTF-8. Either one in a customer
# name or a metadata value of a signed event would fail its storage on every retry, forever.
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")
REPLACEMENT = "\ufffd"


class _EventData(BaseModel):
    object: dict[str, Any]


class _Event(BaseModel):
    id: str = Field(pattern=r"^evt_[A-Za-z0-9_]+$", max_length=255)
    type: str = Field(min_length=1, max_length=200)
    created: StrictInt = Field(ge=0)
    data: _EventData


def read_event_body(request: flask.Request) -> bytes:
    """The raw body, exactly as signed; 413 when larger than MAX_EVENT_BYTES."""
    too_large = PayloadTooLarge(
        f"The body is larger than {MAX_EVENT_BYTES} bytes; Stripe events are far smaller."
    )
    if request.content_length is not None and request.content_length > MAX_EVENT_BYTES:
        raise too_large
    body = request.get_data()
    if len(body) > MAX_EVENT_BYTES:
        raise too_large
    return body


def _signed_by(payload: str, signature: str | None, secret: str) -> bool:
    try:
        stripe.WebhookSignature.verify_header(
            payload, signature, secret, SIGNATURE_TOLERANCE_SECONDS
        )
    except stripe.SignatureVerificationError:
        return False
    return True


def verify_event(body: bytes, signature: str | None, secrets: Sequence[str]) -> dict[str, Any]:
    """The event in `body` if one of `secrets` signed it in the last 300 s (any, while rolling)."""
    try:
        payload = body.decode("utf-8")
    except UnicodeDecodeError:
        payload = None
    if payload is None or not any(_signed_by(payload, signature, secret) for secret in secrets):
        raise BadRequest(
            "The Stripe-Signature header is missing, does not match the body, or is older than"
            f" {SIGNATURE_TOLERANCE_SECONDS} seconds.",
            code="invalid_signature",
        )
    try:
        event = storable(json.loads(payload))
    except ValueError as exc:
        raise BadRequest("The body is not valid JSON.", code="invalid_json") from exc
    try:
        _Event.model_validate(event)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(part) for part in first["loc"]) or "body"
        raise BadRequest(
            f"The body is not a Stripe event ({field}: {first['msg']}).", code="invalid_event"
        ) from exc
    return dict(event)


@dataclass(frozen=True)
class EventContext:
    """What a handler needs besides the event's object."""

    event_id: str
    database: Database
    stripe_client: stripe.StripeClient
    created: int = 0  # when Stripe made the event (unix s)
    previous_attributes: dict[str, Any] = field(default_factory=dict)


def _ignore(context: EventContext, reason: str) -> str:
    context.database.call("ignore_stripe_event", p_id=context.event_id, p_reason=reason)
    return "ignored"


def _sync(context: EventContext, subscription_id: str, **options: Any) -> str:
    result = sync_subscription(
        subscription_id,
        database=context.database,
        stripe_client=context.stripe_client,
        event_id=context.event_id,
        **options,
    )
    return str(result["status"])


def checkout_owner(session: dict[str, Any], context: EventContext) -> tuple[str | None, str]:
    """(organisation, "") for a session of ours, else (None, why it links nothing).

    Ours: our `checkout_sessions` row opened it (its organisation, whatever the session says),
    or, without a row (lost), its `metadata.organisation_id`. client_reference_id never counts:
    on a payment link or pricing table the buyer's page sets it to anything, another
    organisation's id included. Metadata naming another organisation than our row is not
    guessed between: nothing is linked and a person looks at the stored reason.
    """
    session_id = stripe_id(session.get("id"))
    metadata = session.get("metadata") or {}
    claimed = metadata.get("organisation_id")
    row = (
        context.database.call("checkout_session_organisation", p_stripe_session_id=session_id)
        if session_id
        else None
    )
    if row is not None:
        ours = str(row["organisation_id"])
        if claimed is not None and organisation_id(claimed) != ours:
            return None, (
                f"checkout session {session_id} was opened for organisation {ours} but its"
                f" metadata.organisation_id is {claimed!r}: nothing linked"
            )
        return ours, ""
    if (organisation := organisation_id(claimed)) is not None:
        return organisation, ""
    return None, (
        f"checkout session {session.get('id')} is not one we opened (no checkout_sessions row)"
        " and has no metadata.organisation_id; its client_reference_id"
        f" {session.get('client_reference_id')!r} alone links nothing"
    )


def on_checkout_completed(session: dict[str, Any], context: EventContext) -> str:
    """The organisation gets its customer, its subscription and its first cycle; a yearly plan its
    metered item; our `checkout_sessions` row is marked complete. A session that is not ours (see
    `checkout_owner`) or made no subscription is ignored."""
    subscription_id = stripe_id(session.get("subscription"))
    if session.get("mode") != "subscription" or subscription_id is None:
        return _ignore(context, f"checkout session {session.get('id')} created no subscription")
    organisation, reason = checkout_owner(session, context)
    if organisation is None:
        return _ignore(context, reason)
    return _sync(
        context,
        subscription_id,
        organisation=organisation,
        checkout_session=stripe_id(session.get("id")),
        add_metered_item=True,
    )


def on_subscription_event(subscription: dict[str, Any], context: EventContext) -> str:
    """created / updated / deleted: the subscription's current state, whatever the event held."""
    subscription_id = stripe_id(subscription.get("id"))
    if subscription_id is None:
        return _ignore(context, "the event's subscription has no id")
    # The event of a change of the items' prices says when it happened (a cycle is split there:
    # sql/0050); any other event says nothing about it, an edit of the items that kept their
    # prices (metadata, tax rates) included: taken for a change, it moved a settled split.
    before = item_prices(context.previous_attributes.get("items"))
    changed = "items" in context.previous_attributes and (
        before is None or before != item_prices(subscription.get("items"))
    )
    changed_at = datetime.fromtimestamp(context.created, UTC) if changed else None
    return _sync(context, subscription_id, changed_at=changed_at)


def item_prices(items: Any) -> set[str | None] | None:
    """The price ids of a subscription's item list; None when it holds no list to read."""
    data = items.get("data") if isinstance(items, dict) else None
    if not isinstance(data, list):
        return None
    return {stripe_id(item.get("price")) for item in data if isinstance(item, dict)}


def _record_invoice(context: EventContext, fetched: FetchedInvoice) -> str:
    result = apply_invoice(fetched, database=context.database, event_id=context.event_id)
    return str(result["status"])


def on_invoice_event(invoice: dict[str, Any], context: EventContext, *, paid: bool) -> str:
    """paid: the renewal's cycle opens (from the fetched state) and the billed one closes with the
    invoice id. payment_failed: the subscription's state (past_due) as Stripe has it now. Both:
    the invoice is recorded as Stripe has it now (shared/invoices.py).

    Two SQL calls, each one transaction, both idempotent: the subscription first, without the
    event id, so the invoice finds its subscription's row (the first invoice may come before the
    checkout's event); then the invoice, whose call marks the event processed. A failure between
    them leaves the event unprocessed, and Stripe's retry does both again.
    """
    invoice_id = stripe_id(invoice.get("id"))
    if invoice_id is None:
        return _ignore(context, "the event's invoice has no id")
    fetched = fetch_invoice(context.stripe_client, invoice_id, database=context.database)
    subscription_id = invoice_subscription_id(fetched.invoice)
    if subscription_id is not None:
        sync_subscription(
            subscription_id,
            database=context.database,
            stripe_client=context.stripe_client,
            invoice=normalise_invoice(fetched.invoice) if paid else None,
            changed_at=price_changed_at(fetched.invoice),
        )
    return _record_invoice(context, fetched)


def on_invoice_changed(invoice: dict[str, Any], context: EventContext) -> str:
    """finalized / voided / marked_uncollectible / updated: the invoice as Stripe has it now.
    A draft is not recorded (sql/0060); one deleted before we fetched it is ignored."""
    invoice_id = stripe_id(invoice.get("id"))
    if invoice_id is None:
        return _ignore(context, "the event's invoice has no id")
    try:
        fetched = fetch_invoice(context.stripe_client, invoice_id, database=context.database)
    except UpstreamError as error:
        if not invoice_missing(error):
            raise
        return _ignore(
            context, f"invoice {invoice_id} no longer exists at Stripe (a deleted draft)"
        )
    return _record_invoice(context, fetched)


def price_changed_at(invoice: dict[str, Any]) -> datetime | None:
    """When a metered price was replaced, if this invoice says: the end of the invoice item that
    billed the old price's usage up to the change (docs/plan-changes.md)."""
    ends: list[int] = []
    for line in (invoice.get("lines") or {}).get("data") or []:
        parent = line.get("parent") or {}
        period = line.get("period") or {}
        start, end = period.get("start"), period.get("end")
        if (
            parent.get("type") == "invoice_item_details"
            and not (parent.get("invoice_item_details") or {}).get("proration")
            and isinstance(start, int)
            and isinstance(end, int)
            and end > start
        ):
            ends.append(end)
    return datetime.fromtimestamp(max(ends), UTC) if ends else None


Handler = Callable[[dict[str, Any], EventContext], str]

HANDLERS: dict[str, Handler] = {
    "checkout.session.completed": on_checkout_completed,
    "customer.subscription.created": on_subscription_event,
    "customer.subscription.updated": on_subscription_event,
    "customer.subscription.deleted": on_subscription_event,
    "invoice.paid": partial(on_invoice_event, paid=True),
    "invoice.payment_failed": partial(on_invoice_event, paid=False),
    "invoice.finalized": on_invoice_changed,
    "invoice.voided": on_invoice_changed,
    "invoice.marked_uncollectible": on_invoice_changed,
    "invoice.updated": on_invoice_changed,
}


def storable(value: Any) -> Any:
    """`value` with every U+0000 and lone surrogate, in keys and strings, replaced by U+FFFD.

    Replaced, not removed: the stored event still shows that a character was there, and two keys
    merge only if Stripe sent both spellings (the later one then wins, as in `json.loads`).
    """
    if isinstance(value, str):
        return _UNSTORABLE.sub(REPLACEMENT, value)
    if isinstance(value, dict):
        return {storable(key): storable(item) for key, item in value.items()}
    if isinstance(value, list):
        return [storable(item) for item in value]
    return value


def without_secrets(value: Any) -> Any:
    """`value` with every string under a SECRET_KEYS key replaced by "[redacted]"."""
    if isinstance(value, dict):
        return {
            key: "[redacted]"
            if key in SECRET_KEYS and isinstance(item, str) and item
            else without_secrets(item)
            for key, item in value.items()
        }
    if isinstance(value, list):
        return [without_secrets(item) for item in value]
    return value


def failure_reason(error: BaseException) -> str:
    """What an operator needs on the event row: Stripe's account of its error, or ours."""
    cause = error.__cause__
    if isinstance(cause, stripe.StripeError):
        return describe(cause)
    if isinstance(error, BillingError):
        return f"{error.code}: {error.message}"[:2000]
    return f"{type(error).__name__}: {error}"[:2000]


def process_event(
    event: dict[str, Any], *, database: Database, stripe_client: stripe.StripeClient
) -> str:
    """'processed', 'ignored' or 'duplicate'. A failure is stored on the event row, then raised.

    A duplicate that finds the event claimed by another delivery within the lease gets 503
    event_in_progress from `claim_stripe_event`: Stripe retries it, and it is a no-op then.
    """
    handler = HANDLERS.get(event["type"])
    claim = database.call(
        "claim_stripe_event",
        p_id=event["id"],
        p_type=event["type"],
        p_created=event["created"],
        p_payload=without_secrets(event),
        p_handled=handler is not None,
    )
    if handler is None or claim["status"] != "claimed":
        return str(claim["status"])  # 'ignored' or 'duplicate'
    context = EventContext(
        event["id"],
        database,
        stripe_client,
        int(event["created"]),
        event["data"].get("previous_attributes") or {},
    )
    try:
        return handler(event["data"]["object"], context)
    except Exception as error:
        # Recorded, then re-raised: the answer is a 5xx and Stripe retries.
        database.call("fail_stripe_event", p_id=event["id"], p_error=failure_reason(error))
        raise
