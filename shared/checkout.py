"""Buying a plan from the browser: a Stripe Checkout Session for our own plan, customer and URLs.

Nothing Stripe-related comes from the browser: the prices come from `billing_plans`, the customer
from `organisations`, and the redirect URLs are paths on WEBSITE_URL. One SQL call checks who may
buy what (`begin_checkout`), Stripe is called with idempotency keys made from our own ids, and one
SQL call records the session with its audit row (`record_checkout_session`).

An organisation has at most one Checkout Session open: paying two would make two live
subscriptions and charge the setup fee twice. Before a new session is opened, the organisation's
other open sessions are expired at Stripe (`close_open_sessions`); `begin_checkout` answers 409
while another choice's session is being opened, or while a payment found complete awaits its
webhook.
"""

from __future__ import annotations

import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from shared.auth import Caller
from shared.cors import website_path, website_url
from shared.db import Database
from shared.errors import Conflict, UpstreamError
from shared.settings import Settings
from shared.stripe_api import stripe_errors
from shared.stripe_lib import stripe

DEFAULT_SUCCESS_PATH = "/billing/success?session_id={CHECKOUT_SESSION_ID}"
DEFAULT_CANCEL_PATH = "/billing/cancel"
# A click within this many seconds of another for the same organisation, plan and period gets
# the same Checkout Session (double clicks, a retried request, several tabs).
REUSE_SECONDS = 60
MAX_PATH_LENGTH = 1000


class CheckoutRequest(BaseModel):
    """The body of POST create-checkout-session; unknown fields (a price, a customer) are refused."""

    model_config = ConfigDict(extra="forbid")

    plan_id: uuid.UUID
    billing_period: Literal["monthly", "yearly"]
    organisation_id: uuid.UUID | None = None
    success_path: str = Field(default=DEFAULT_SUCCESS_PATH, max_length=MAX_PATH_LENGTH)
    cancel_path: str = Field(default=DEFAULT_CANCEL_PATH, max_length=MAX_PATH_LENGTH)

    @field_validator("success_path", "cancel_path")
    @classmethod
    def _on_website(cls, path: str) -> str:
        return website_path(path)


def checkout_line_items(
    plan: dict[str, Any], billing_period: str, *, setup_fee_price_id: str | None
) -> list[dict[str, Any]]:
    """The flat price of the period, the metered price (monthly only), the setup fee if due.

    Checkout cannot mix a yearly and a monthly price: a yearly checkout has no metered item, the
    webhook adds it once the subscription exists (DESIGN.md). A metered item has no quantity.
    """
    if billing_period == "yearly":
        return [{"price": plan["stripe_yearly_price_id"], "quantity": 1}] + (
            [{"price": setup_fee_price_id, "quantity": 1}] if setup_fee_price_id else []
        )
    items: list[dict[str, Any]] = [
        {"price": plan["stripe_price_id"], "quantity": 1},
        {"price": plan["stripe_metered_price_id"]},
    ]
    if setup_fee_price_id:
        items.append({"price": setup_fee_price_id, "quantity": 1})
    return items


def organisation_customer(
    organisation: dict[str, Any], *, database: Database, stripe_client: stripe.StripeClient
) -> str:
    """The organisation's Stripe customer, created at most once.

    Concurrent first clicks send the same idempotency key, so Stripe answers them all with one
    customer; `set_organisation_customer` keeps the first one stored in any case. Stripe keeps keys
    for 24 hours only, which is enough: once stored, the customer is never created again.
    """
    if organisation["stripe_customer_id"]:
        return str(organisation["stripe_customer_id"])
    params: dict[str, Any] = {
        "name": organisation["name"],
        "metadata": {"organisation_id": organisation["id"]},
    }
    if organisation["owner_email"]:
        params["email"] = organisation["owner_email"]
    with stripe_errors():
        customer = stripe_client.v1.customers.create(
            params=params,  # type: ignore[arg-type]
            options={"idempotency_key": f"customer-{organisation['id']}"},
        )
    stored = database.call(
        "set_organisation_customer", p_organisation_id=organisation["id"], p_customer_id=customer.id
    )
    return str(stored["stripe_customer_id"])


def expire_at_stripe(session_id: str, stripe_client: stripe.StripeClient) -> tuple[str, str | None]:
    """Expire an open Checkout Session: `(status, subscription id)` as Stripe now has it."""
    with stripe_errors():
        try:
            session = stripe_client.v1.checkout.sessions.expire(session_id)
        except stripe.InvalidRequestError as refused:
            if refused.code == "resource_missing":  # not in this Stripe account: nobody can pay it
                return "expired", None
            # Stripe refuses to expire a session that is no longer open: read what became of it.
            session = stripe_client.v1.checkout.sessions.retrieve(session_id)
            if session.status == "open":
                raise
    made = session.subscription  # an id, or the object if expanded
    return str(session.status), made if isinstance(made, str | None) else made.id


def close_open_sessions(
    sessions: list[dict[str, Any]],
    *,
    caller: Caller,
    database: Database,
    stripe_client: stripe.StripeClient,
) -> None:
    """Expire each session at Stripe and record it; 409 checkout_completed if one was paid."""
    for other in sessions:
        status, subscription_id = expire_at_stripe(other["stripe_session_id"], stripe_client)
        database.call(
            "record_checkout_closed",
            p_checkout_id=other["id"],
            p_status=status,
            p_stripe_subscription_id=subscription_id,
            p_user_id=caller.user_id,
        )
        if status == "complete":
            raise Conflict(
                "A payment for this organisation has just completed; wait a moment and reload.",
                code="checkout_completed",
            )


def start_checkout(
    caller: Caller,
    order: CheckoutRequest,
    *,
    settings: Settings,
    database: Database,
    stripe_client: stripe.StripeClient,
) -> dict[str, str]:
    """`{"checkout_url", "session_id"}` of the Checkout Session for this purchase (403/404/409/422).

    The organisation's other open sessions are expired first (503 if Stripe cannot be reached,
    409 if one was just paid): nothing new is opened unless they are.
    """
    context = database.call(
        "begin_checkout",
        p_user_id=caller.user_id,
        p_organisation_id=str(order.organisation_id) if order.organisation_id else None,
        p_plan_id=str(order.plan_id),
        p_billing_period=order.billing_period,
        p_success_url=website_url(settings, order.success_path),
        p_cancel_url=website_url(settings, order.cancel_path),
        p_reuse_seconds=REUSE_SECONDS,
    )
    claim = context["checkout"]
    if claim["stripe_session_id"]:
        return {"checkout_url": claim["url"], "session_id": claim["stripe_session_id"]}

    close_open_sessions(
        context["open_sessions"], caller=caller, database=database, stripe_client=stripe_client
    )
    organisation = context["organisation"]
    customer_id = organisation_customer(
        organisation, database=database, stripe_client=stripe_client
    )
    setup_fee = None if context["has_had_subscription"] else settings.STRIPE_SETUP_FEE_PRICE_ID
    metadata = {
        "organisation_id": organisation["id"],
        "plan_id": context["plan"]["id"],
        "billing_period": order.billing_period,
    }
    params = {
        "mode": "subscription",
        "customer": customer_id,
        "client_reference_id": organisation["id"],
        "line_items": checkout_line_items(
            context["plan"], order.billing_period, setup_fee_price_id=setup_fee or None
        ),
        "metadata": metadata,
        "subscription_data": {"metadata": metadata},
        # The claimed row's URLs: every click converging on this key sends the same parameters.
        "success_url": claim["success_url"],
        "cancel_url": claim["cancel_url"],
    }
    # The key is the claimed row's: concurrent clicks share it and Stripe opens one session (a
    # request still in flight answers 409, which the client retries).
    with stripe_errors():
        session = stripe_client.v1.checkout.sessions.create(
            params=params,  # type: ignore[arg-type]
            options={"idempotency_key": claim["idempotency_key"]},
        )
    if not session.url:
        raise UpstreamError("The payment provider returned no checkout page.", code="stripe_error")
    recorded = database.call(
        "record_checkout_session",
        p_checkout_id=claim["id"],
        p_stripe_session_id=session.id,
        p_url=session.url,
        p_expires_at=session.expires_at,
    )
    return {"checkout_url": recorded["checkout_url"], "session_id": recorded["session_id"]}
