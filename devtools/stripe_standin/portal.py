"""The customer portal's sessions, and the pages where Stripe's hosted pages would be."""

from __future__ import annotations

import html
import time

from .state import ID, Call, Json, api, control, fixture, new_id, required


def create_portal_session(call: Call) -> Json:
    p = call.params
    customer = call.state.get("customer", required(p, "customer"), "customer")
    session_id = new_id("bps")
    session = fixture(
        "billing_portal.session",
        id=session_id,
        created=int(time.time()),
        customer=customer["id"],
        configuration=new_id("bpc"),
        livemode=False,
        return_url=p.get("return_url"),
        url=f"{call.base_url}/portal/{session_id}",
        unset="flow",
    )
    return call.state.put(session)


def standin_page(call: Call, object_id: str) -> str:
    """A tiny page where Stripe's hosted Checkout or portal would be."""
    oid = html.escape(object_id)
    return (
        "<!doctype html><title>Stripe stand-in</title>"
        "<h1>Local Stripe stand-in (not Stripe, never for production)</h1>"
        f"<p>Session <code>{oid}</code>. Nothing is charged here; tests complete checkouts with "
        f"<code>POST /_standin/checkout_sessions/{oid}/complete</code>.</p>"
    )


ROUTES = [
    api("POST", "/v1/billing_portal/sessions", create_portal_session, "customer return_url"),
    control("GET", "/checkout" + ID, standin_page, kind="page"),
    control("GET", "/portal" + ID, standin_page, kind="page"),
]
