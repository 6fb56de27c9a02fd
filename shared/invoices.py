"""Invoices follow Stripe: fetch the invoice, normalise it, apply it in one SQL call.

As for subscriptions (shared/subscriptions.py), no handler trusts the copy inside an event: each
fetches the invoice as Stripe has it now, stamped with the database's clock before the request,
and `apply_invoice_state` (sql/0060) stores it only if it was fetched after the stored one, never
reopening a paid, void or uncollectible invoice. The same call links the invoice to its
organisation, its subscription and the billing cycle whose metered usage it bills (that cycle
then takes no more calls), and marks the event processed.

The invoices table keeps `hosted_invoice_url` and `invoice_pdf` from the fetched invoice: members
need the links. Only the webhook ledger drops them (shared/webhooks.py SECRET_KEYS).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from shared.db import Database
from shared.errors import BillingError
from shared.stripe_api import stripe_errors
from shared.stripe_lib import stripe
from shared.subscriptions import invoice_subscription_id, normalise_invoice, stripe_id

# The largest page Stripe serves: a subscription's invoices, an invoice's lines.
PAGE = 100


@dataclass(frozen=True)
class FetchedInvoice:
    """An invoice as Stripe returned it (every line), and when the request for it began."""

    invoice: dict[str, Any]
    fetched_at: datetime


def fetch_started_at(database: Database) -> datetime:
    """The database's clock now: the stamp a fetch that begins now is ordered by."""
    return datetime.fromisoformat(str(database.call("stripe_fetch_started_at")))


def _with_every_line(stripe_client: stripe.StripeClient, invoice: dict[str, Any]) -> dict[str, Any]:
    """`invoice` with all its lines: an invoice object embeds only the first page of them."""
    lines = invoice.get("lines") or {}
    data = list(lines.get("data") or [])
    if lines.get("has_more") and data:
        rest = stripe_client.v1.invoices.line_items.list(
            str(invoice["id"]), params={"limit": PAGE, "starting_after": str(data[-1]["id"])}
        )
        data.extend(line.to_dict() for line in rest.auto_paging_iter())
    return {**invoice, "lines": {**lines, "data": data, "has_more": False}}


def fetch_invoice(
    stripe_client: stripe.StripeClient, invoice_id: str, *, database: Database
) -> FetchedInvoice:
    """The invoice as Stripe has it now, stamped with the database's clock before the request."""
    started = fetch_started_at(database)
    with stripe_errors():
        invoice = stripe_client.v1.invoices.retrieve(invoice_id).to_dict()
        invoice = _with_every_line(stripe_client, invoice)
    return FetchedInvoice(invoice, started)


def subscription_invoices(
    stripe_client: stripe.StripeClient, subscription_id: str, *, database: Database
) -> list[FetchedInvoice]:
    """Every invoice of the subscription as Stripe has it now (newest first), all stamped with
    the moment the listing began: no later than any of the fetches, so never too new."""
    started = fetch_started_at(database)
    with stripe_errors():
        listing = stripe_client.v1.invoices.list(
            params={"subscription": subscription_id, "limit": PAGE}
        )
        return [
            FetchedInvoice(_with_every_line(stripe_client, invoice.to_dict()), started)
            for invoice in listing.auto_paging_iter()
        ]


def invoice_missing(error: BillingError) -> bool:
    """Whether Stripe answered that the invoice does not exist (a draft deleted since)."""
    cause = error.__cause__
    return isinstance(cause, stripe.InvalidRequestError) and cause.code == "resource_missing"


def invoice_state(invoice: dict[str, Any]) -> dict[str, Any]:
    """The fields `apply_invoice_state` reads: the invoice's own, and its usage lines."""
    return {
        **normalise_invoice(invoice),
        "customer": stripe_id(invoice.get("customer")),
        "subscription": invoice_subscription_id(invoice),
        **{
            key: invoice.get(key)
            for key in (
                "number",
                "status",
                "billing_reason",
                "currency",
                "amount_due",
                "amount_paid",
                "amount_remaining",
                "total",
                "period_start",
                "period_end",
                "hosted_invoice_url",
                "invoice_pdf",
            )
        },
    }


def apply_invoice(
    fetched: FetchedInvoice, *, database: Database, event_id: str | None = None
) -> dict[str, Any]:
    """Apply a fetched invoice (and mark `event_id` processed, or ignored) in one SQL call.

    The result: {status: processed | ignored, reason (ignored), invoice_id, organisation_id,
    subscription_id, billing_cycle_id, invoice_status, created, applied (fresher than the stored
    state), changed (the columns whose values changed)}.
    """
    result: dict[str, Any] = database.call(
        "apply_invoice_state",
        p_invoice=invoice_state(fetched.invoice),
        p_state_at=fetched.fetched_at.isoformat(),
        p_event_id=event_id,
    )
    return result
