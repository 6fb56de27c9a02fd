"""The Stripe customer portal for owners and admins of a subscribed organisation."""

from __future__ import annotations

import uuid

from pydantic import BaseModel, ConfigDict, Field, field_validator

from shared.auth import Caller
from shared.cors import website_path, website_url
from shared.db import Database
from shared.errors import UpstreamError
from shared.settings import Settings
from shared.stripe_api import stripe_errors
from shared.stripe_lib import stripe

DEFAULT_RETURN_PATH = "/billing"


class PortalRequest(BaseModel):
    """The body of POST create-portal-session; unknown fields (a customer id) are refused."""

    model_config = ConfigDict(extra="forbid")

    organisation_id: uuid.UUID | None = None
    return_path: str = Field(default=DEFAULT_RETURN_PATH, max_length=1000)

    @field_validator("return_path")
    @classmethod
    def _on_website(cls, path: str) -> str:
        return website_path(path)


def open_billing_portal(
    caller: Caller,
    order: PortalRequest,
    *,
    settings: Settings,
    database: Database,
    stripe_client: stripe.StripeClient,
) -> dict[str, str]:
    """`{"portal_url"}` of a Stripe billing-portal session (403/404/422; 409 not_subscribed)."""
    context = database.call(
        "portal_context",
        p_user_id=caller.user_id,
        p_organisation_id=str(order.organisation_id) if order.organisation_id else None,
    )
    # No idempotency key of ours: a second portal session charges nothing and expires on its own.
    with stripe_errors():
        session = stripe_client.v1.billing_portal.sessions.create(
            params={
                "customer": context["stripe_customer_id"],
                "return_url": website_url(settings, order.return_path),
                # ./deploy.sh stripe-catalog's: no plan switching (plans change via change-plan)
                **(
                    {"configuration": settings.STRIPE_PORTAL_CONFIGURATION_ID}
                    if settings.STRIPE_PORTAL_CONFIGURATION_ID
                    else {}
                ),
            }
        )
    if not session.url:
        raise UpstreamError("The payment provider returned no portal page.", code="stripe_error")
    return {"portal_url": session.url}
