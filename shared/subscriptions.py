"""Subscriptions follow Stripe: fetch the current subscription, normalise it, apply it in one SQL call.

No handler trusts the copy of the subscription inside an event: events arrive late, twice and out
of order, so each one fetches the subscription as Stripe has it NOW and stamps it with the moment
the fetch began. `apply_subscription_state` (sql/0021) applies a state only if it was fetched
after the stored one, and never brings an ended subscription back. Whatever the delivery order,
the last fetch wins, and the last fetch sees Stripe's final state.

One organisation, one live subscription. A second one can still reach Stripe (a Checkout Session
whose id we never stored, a subscription made in the Dashboard); both would charge the flat fee,
and both metered prices would bill the customer's meter events, so the overage twice. When the SQL
reports one (sql/0021: the one Stripe created later is the newer), `sync_subscription` cancels the
newer at Stripe and applies its canceled state; the older is never canceled.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from shared.db import Database
from shared.errors import Unavailable, UpstreamError
from shared.stripe_api import stripe_errors
from shared.stripe_lib import stripe

# Invoice line parents that may bill a cycle's metered usage (see normalise_invoice).
USAGE_LINE_PARENTS = ("subscription_item_details", "invoice_item_details")
# Stripe never brings these back: no metered item is added to them.
ENDED_STATUSES = frozenset({"canceled", "incomplete_expired"})
# Stripe invoices these: an organisation has at most one of them.
LIVE_STATUSES = frozenset({"active", "trialing", "past_due", "unpaid"})
# Each round ends one duplicate (or corrects a stale row): more means something keeps making them.
MAX_DUPLICATE_ROUNDS = 5

# The cancellation comment of a duplicate we cancel. Stripe keeps it on the subscription, so the
# canceled state says what it was even when our process died between the cancel and its apply.
DUPLICATE_COMMENT = "Duplicate subscription: the organisation keeps {kept}."
_DUPLICATE_COMMENT = re.compile(r"Duplicate subscription: the organisation keeps (sub_\w+)\.")


@dataclass(frozen=True)
class Fetched:
    """A subscription as Stripe returned it, and when the request for it began."""

    subscription: dict[str, Any]
    fetched_at: datetime


def stripe_id(value: Any) -> str | None:
    """The id of a reference that may be an id or an expanded object."""
    if isinstance(value, dict):
        value = value.get("id")
    return value if isinstance(value, str) and value else None


def organisation_id(value: Any) -> str | None:
    """`value` as a UUID string, or None: metadata is free text and must not reach a uuid cast."""
    if not isinstance(value, str):
        return None
    try:
        return str(uuid.UUID(value))
    except ValueError:
        return None


def fetch_subscription(
    stripe_client: stripe.StripeClient, subscription_id: str, *, database: Database
) -> Fetched:
    """The subscription as Stripe has it now, stamped with the time the request began.

    The stamp is taken BEFORE the request, from the database's clock: a fetch that began later
    can only see the same or a newer state, so ordering applies by it never lets an older state
    win. One clock for every function instance and operator machine: a machine whose clock runs
    fast would otherwise stamp its fetch "later" than fetches made after it, and the newer states
    those saw would be refused. Prices come embedded in subscription items (`items.data.price`
    is not expandable), so nothing needs expanding.
    """
    started = datetime.fromisoformat(str(database.call("stripe_fetch_started_at")))
    with stripe_errors():
        subscription = stripe_client.v1.subscriptions.retrieve(subscription_id)
    return Fetched(subscription.to_dict(), started)


def duplicate_of(subscription: dict[str, Any]) -> str | None:
    """The subscription kept when we canceled this one as its duplicate, else None."""
    comment = (subscription.get("cancellation_details") or {}).get("comment")
    match = _DUPLICATE_COMMENT.fullmatch(comment) if isinstance(comment, str) else None
    return match.group(1) if match else None


def normalise_subscription(subscription: dict[str, Any]) -> dict[str, Any]:
    """The fields `apply_subscription_state` reads; periods live on items (API 2025+)."""
    items = (subscription.get("items") or {}).get("data") or []
    return {
        "stripe_subscription_id": subscription["id"],
        "stripe_customer_id": stripe_id(subscription.get("customer")),
        "status": subscription.get("status"),
        "organisation_id": organisation_id(
            (subscription.get("metadata") or {}).get("organisation_id")
        ),
        "cancel_at_period_end": bool(subscription.get("cancel_at_period_end")),
        "canceled_at": subscription.get("canceled_at"),
        "created": subscription.get("created"),
        "latest_invoice": stripe_id(subscription.get("latest_invoice")),
        "duplicate_of": duplicate_of(subscription),
        "schedule": stripe_id(subscription.get("schedule")),
        "items": [
            {
                "price_id": stripe_id(item.get("price")),
                "usage_type": ((item.get("price") or {}).get("recurring") or {}).get("usage_type"),
                "current_period_start": item.get("current_period_start"),
                "current_period_end": item.get("current_period_end"),
            }
            for item in items
        ],
    }


def normalise_invoice(invoice: dict[str, Any]) -> dict[str, Any]:
    """The invoice's usage lines: the ones that say which billing cycle's usage it billed.

    A usage line is a subscription item's own line (`parent.type` subscription_item_details), or
    the invoice item that bills a metered price's usage when the price is replaced during a
    period (invoice_item_details, the part of the cycle before the change), not a proration;
    `pricing.price_details.price` says which price (SQL keeps the metered ones, so a setup fee's
    invoice item closes nothing). Prorations bill part of a flat fee, and the invoice's own
    period_start/period_end is not a service period: neither closes a cycle.
    """
    usage = []
    for line in (invoice.get("lines") or {}).get("data") or []:
        parent = line.get("parent") or {}
        kind = parent.get("type")
        item = parent.get(kind) if kind in USAGE_LINE_PARENTS else None
        period = line.get("period") or {}
        if not isinstance(item, dict) or item.get("proration"):
            continue
        price = ((line.get("pricing") or {}).get("price_details") or {}).get("price")
        usage.append(
            {
                "price_id": stripe_id(price),
                "period_start": period.get("start"),
                "period_end": period.get("end"),
            }
        )
    return {"id": invoice["id"], "created": invoice.get("created"), "lines": usage}


def invoice_subscription_id(invoice: dict[str, Any]) -> str | None:
    """An invoice's subscription: `parent.subscription_details.subscription` since API 2025."""
    details = (invoice.get("parent") or {}).get("subscription_details") or {}
    return stripe_id(details.get("subscription"))


def price_ids(subscription: dict[str, Any]) -> list[str]:
    items = (subscription.get("items") or {}).get("data") or []
    return [price for item in items if (price := stripe_id(item.get("price")))]


def ensure_metered_item(
    fetched: Fetched, *, database: Database, stripe_client: stripe.StripeClient
) -> Fetched:
    """Give a yearly plan's subscription its plan's monthly metered price, once.

    Checkout cannot mix a yearly and a monthly price, so a yearly checkout ends without the metered
    item (DESIGN.md). The items are looked at first, and the idempotency key is made of the
    subscription and the price, so a retry, a duplicate event or a concurrent delivery adds no
    second item. Returns the subscription re-fetched after the change (or as it was).
    """
    subscription = fetched.subscription
    if subscription.get("status") in ENDED_STATUSES:
        return fetched
    prices = price_ids(subscription)
    plan = database.call("plan_for_stripe_prices", p_price_ids=prices)
    if not plan or plan["billing_period"] != "yearly" or not plan["stripe_metered_price_id"]:
        return fetched
    metered_price = str(plan["stripe_metered_price_id"])
    if metered_price in prices:
        return fetched
    subscription_id = str(subscription["id"])
    with stripe_errors():
        stripe_client.v1.subscription_items.create(
            params={"subscription": subscription_id, "price": metered_price},
            options={"idempotency_key": f"add-metered-{subscription_id}-{metered_price}"},
        )
    return fetch_subscription(stripe_client, subscription_id, database=database)


def apply_state(
    fetched: Fetched,
    *,
    database: Database,
    event_id: str | None = None,
    organisation: str | None = None,
    invoice: dict[str, Any] | None = None,
    checkout_session: str | None = None,
    actor: str = "stripe-webhook",
    changed_at: datetime | None = None,
) -> dict[str, Any]:
    """Apply a fetched state (and mark `event_id` processed) in one SQL call; its result.

    The result's `duplicate` ({kept, newer}) says the organisation has two live subscriptions;
    `event_id` then stays unprocessed (see `sync_subscription`). `changed_at`: when a change of
    the metered price happened, if known (a cycle is split there; else at the fetch).
    """
    state = normalise_subscription(fetched.subscription)
    if changed_at is not None:
        state["changed_at"] = changed_at.timestamp()
    result: dict[str, Any] = database.call(
        "apply_subscription_state",
        p_state=state,
        p_state_at=fetched.fetched_at.isoformat(),
        p_event_id=event_id,
        p_organisation_id=organisation,
        p_invoice=invoice,
        p_actor=actor,
        p_checkout_session_id=checkout_session,
    )
    return result


def cancel_duplicate(
    fetched: Fetched,
    *,
    kept: str,
    database: Database,
    stripe_client: stripe.StripeClient,
    **apply_options: Any,
) -> dict[str, Any]:
    """Cancel `fetched`, the newer of two live subscriptions, at Stripe now; apply its end.

    No final invoice and no proration: the accident bills nothing more. Its payments are NOT
    refunded here: refunding is a person's decision, so the audit row
    (subscription.duplicate_canceled) lists the invoices to look at. Stripe refuses to cancel a
    canceled subscription (idempotency keys do nothing on DELETE), so a concurrent delivery that
    canceled it first shows as a refusal; the re-fetch then finds it canceled, which is terminal.
    """
    subscription_id = str(fetched.subscription["id"])
    if subscription_id == kept:
        raise ValueError(f"refusing to cancel {kept}: it is the subscription to keep")
    if fetched.subscription.get("status") in LIVE_STATUSES:
        refused: UpstreamError | None = None
        try:
            with stripe_errors():
                stripe_client.v1.subscriptions.cancel(
                    subscription_id,
                    params={
                        "invoice_now": False,
                        "prorate": False,
                        "cancellation_details": {"comment": DUPLICATE_COMMENT.format(kept=kept)},
                    },
                    options={"idempotency_key": f"cancel-duplicate-{subscription_id}"},
                )
        except UpstreamError as error:
            refused = error
        fetched = fetch_subscription(stripe_client, subscription_id, database=database)
        if refused is not None and fetched.subscription.get("status") not in ENDED_STATUSES:
            raise refused
    return apply_state(fetched, database=database, **apply_options)


def sync_subscription(
    subscription_id: str,
    *,
    database: Database,
    stripe_client: stripe.StripeClient,
    event_id: str | None = None,
    organisation: str | None = None,
    invoice: dict[str, Any] | None = None,
    checkout_session: str | None = None,
    add_metered_item: bool = False,
    actor: str = "stripe-webhook",
    changed_at: datetime | None = None,
) -> dict[str, Any]:
    """Fetch the subscription from Stripe and apply its current state; the SQL result.

    `organisation` is the owner named by a checkout session, `checkout_session` its id (marked
    complete); `invoice` (normalised) closes the cycle it billed; `add_metered_item` completes a
    yearly checkout. A duplicate live subscription is settled before this returns, and
    `event_id` is marked processed only then: a failure on the way (Stripe down) leaves it to
    Stripe's retry.
    """
    fetched = fetch_subscription(stripe_client, subscription_id, database=database)
    if add_metered_item:
        fetched = ensure_metered_item(fetched, database=database, stripe_client=stripe_client)
    options: dict[str, Any] = {
        "event_id": event_id,
        "organisation": organisation,
        "invoice": invoice,
        "checkout_session": checkout_session,
        "actor": actor,
        "changed_at": changed_at,
    }
    for _ in range(MAX_DUPLICATE_ROUNDS):
        result = apply_state(fetched, database=database, **options)
        if not result.get("duplicate"):
            return result
        kept, newer = str(result["duplicate"]["kept"]), str(result["duplicate"]["newer"])
        # Our row of the kept one may be stale (canceled at Stripe, its event still on its way):
        # Stripe's word first, so a legitimate new subscription is never canceled for it.
        if kept != subscription_id and not _live_at_stripe(
            kept, database=database, stripe_client=stripe_client, actor=actor
        ):
            continue  # its row is corrected: apply again
        if newer == subscription_id:
            return cancel_duplicate(
                fetched, kept=kept, database=database, stripe_client=stripe_client, **options
            )
        cancel_duplicate(
            fetch_subscription(stripe_client, newer, database=database),
            kept=kept,
            database=database,
            stripe_client=stripe_client,
            event_id=event_id,
            actor=actor,
        )
    raise Unavailable(
        f"Subscription {subscription_id}'s organisation still has several live subscriptions"
        f" after {MAX_DUPLICATE_ROUNDS} rounds of canceling the newer ones.",
        code="duplicate_subscriptions",
    )


def _live_at_stripe(
    subscription_id: str, *, database: Database, stripe_client: stripe.StripeClient, actor: str
) -> bool:
    """Whether Stripe still has the subscription live, after applying what it has."""
    result = sync_subscription(
        subscription_id, database=database, stripe_client=stripe_client, actor=actor
    )
    return result.get("subscription_status") in LIVE_STATUSES
