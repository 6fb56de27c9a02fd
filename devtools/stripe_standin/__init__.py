"""A local stand-in for Stripe's API, for local runs and end-to-end tests ONLY.

NEVER use it in production, and never point real money at it: it keeps everything in memory,
accepts any `sk_test_` key, charges nobody and simulates the passing of billing periods.

It speaks Stripe's wire format (form-encoded bodies with bracket notation, JSON answers,
Stripe's error shape and status codes, unknown parameters refused, `Idempotency-Key` replay)
for exactly the endpoints metered-billing calls. Every object it returns is a deep copy of
Stripe's own example object (`fixtures3.json`, API 2026-10-28.endive) with ids and fields set.

Routes under `/_standin/` play Stripe's and the customer's part and deliver signed webhook
events to the webhook URL (JSON bodies; each answers what happened and its deliveries):

    POST /_standin/checkout_sessions/{id}/complete      the customer pays a Checkout Session
    POST /_standin/subscriptions/{id}/advance           renewal; {"fail": true}: payment fails
    POST /_standin/subscriptions/{id}/cancel            cancel now
    POST /_standin/invoices/{id}/pay                    retry an open invoice's payment
    POST /_standin/customers/{id}/decline_next_payment  next payment attempt fails; {"count": n}
    GET  /_standin/state                                everything the stand-in holds

Events caused by `/_standin/` routes are delivered before the route answers (deterministic for
tests); events caused by `/v1/` calls are delivered right after the answer is sent, so a webhook
handler that calls back into the stand-in never waits on itself. Only the event types the
project handles are emitted, and only to the one webhook URL given at start (endpoints created
through `/v1/webhook_endpoints` are stored, not delivered to).

    python -m devtools.stripe_standin --port 12111 --webhook-url http://127.0.0.1:8082/ \
        --webhook-secret whsec_... [--meter-event-name voice_call_minutes] [--seed-prices f.json]

One module per Stripe resource family, each importing only the ones above it in this list:

    state.py           errors, ids, Stripe's fixtures, form decoding, routes' shape, State, Call
    customers.py       /v1/customers, and declining a customer's next payment
    catalog.py         /v1/billing/meters, /v1/products, /v1/prices
    webhooks.py        event signing and delivery, /v1/webhook_endpoints
    meter_events.py    /v1/billing/meter_events, and the usage an invoice takes
    invoices.py        invoice items, lines and invoices, payment attempts, /v1/invoices
    subscriptions.py   /v1/subscriptions (retrieve, cancel), /v1/subscription_items
    prorations.py      what a plan change bills: credits, debits, metered usage so far
    pending_updates.py a plan change waiting for its invoice (pending_if_incomplete)
    plan_changes.py    POST /v1/subscriptions/{id}: items, prorations, payment behaviours
    schedules.py       /v1/subscription_schedules, and entering a phase at a renewal
    renewals.py        the end of a billing period (simulated time), paying an open invoice
    checkout.py        /v1/checkout/sessions, and completing one
    portal.py          /v1/billing_portal/sessions, and the hosted pages' stand-ins
    app.py             routing, dispatch, idempotency; create_app, seed_prices, serve_in_thread,
                       main
"""

from .app import ROUTES, StripeStandin, create_app, main, seed_prices, serve_in_thread
from .state import API_VERSION, Call, State, StripeError, decode_form, fixture
from .webhooks import sign

__all__ = [
    "API_VERSION",
    "ROUTES",
    "Call",
    "State",
    "StripeError",
    "StripeStandin",
    "create_app",
    "decode_form",
    "fixture",
    "main",
    "seed_prices",
    "serve_in_thread",
    "sign",
]
