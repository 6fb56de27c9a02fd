"""A local stand-in for Stripe's API, for local runs and end-to-end tests ONLY.

NEVER use it in production, and never point real money at it: it keeps everything in memory,
accepts any `sk_test_` key, charges nobody and simulates the passing of billing periods.

It speaks Stripe's wire format (form-encoded bodies with bracket notation, JSON answers,
Stripe's error shape and status codes, unknown parameters refused, `Idempotency-Key` replay)
for exactly the endpoints metered-billing calls. Every object it returns is a deep copy of
Stripe's own example object (`fixtures3.json`, API 2026-10-28.endive) with ids and fields set;
API v2 objects, which the fixtures lack, follow stripe-python 16's classes field by field.

Routes under `/_standin/` play Stripe's and the customer's part and deliver signed webhook
events to the webhook URL (JSON bodies; each answers what happened and its deliveries):

    POST /_standin/checkout_sessions/{id}/complete      the customer pays a Checkout Session
    POST /_standin/subscriptions/{id}/advance           renewal; {"fail": true}: payment fails
    POST /_standin/subscriptions/{id}/cancel            cancel now
    POST /_standin/invoices/{id}/pay                    retry an open invoice's payment
    POST /_standin/customers/{id}/decline_next_payment  next payment attempt fails; {"count": n}
    POST /_standin/meter_events/drop_next               next meter event(s) lost; {"count": n}
    POST /_standin/meter_events/stray                   Stripe holds an event nobody sent:
                                                        {"customer", "value", "timestamp"?, ...}
    POST /_standin/meter_error_reports/deliver          report the invalid meter events now
    POST /_standin/clock/advance                        {"seconds": n}: the meter events' clock
    GET  /_standin/state                                everything the stand-in holds

Where Stripe's hosted pages would be, HTML forms a person can click through (hosted_pages.py):
`/checkout/{id}` (Pay, Fail payment, Cancel), `/portal/{id}` (cancel at period end, as the
portal configuration allows; Return) and `/invoice/{id}` (the invoices' hosted_invoice_url).

Events caused by `/_standin/` routes are delivered before the route answers (deterministic for
tests); events caused by `/v1/` and `/v2/` calls are delivered right after the answer is sent,
so a webhook handler that calls back into the stand-in never waits on itself. Only the event
types the project handles are emitted, and only to the one webhook URL given at start
(endpoints created through `/v1/webhook_endpoints` are stored, not delivered to). Thin events
(the meter error reports) go to the event destinations created through
`/v2/core/event_destinations` with `event_payload: thin`, each signed with its own secret.

Meter events: Stripe validates a meter event's meter, customer and value after accepting it and
reports the invalid ones in error reports (thin events); so does the stand-in (created with
`async_meter_validation=False`, `--sync-meter-validation`, it refuses them with a 400 at once). The v2 meter event stream is always validated asynchronously. Time
for meter events is the wall clock (moved by `/_standin/clock/advance`), while renewals
simulate the passing of billing periods: see meter_summaries.py for how to choose the windows
of event summaries in a test.

    python -m devtools.stripe_standin --port 12111 --webhook-url http://127.0.0.1:8082/ \
        --webhook-secret whsec_... [--meter-event-name voice_call_minutes] [--seed-prices f.json] \
        [--sync-meter-validation] [--meter-error-report-interval 10]

One module per Stripe resource family, each importing only the ones above it in this list:

    state.py              errors, ids, Stripe's fixtures, routes' shape, State (and its clock),
                          Call
    params.py             form and JSON decoding, unknown parameters refused, typed parameters,
                          metadata updates
    customers.py          /v1/customers, and declining a customer's next payment
    catalog.py            /v1/billing/meters (and deactivate, reactivate), /v1/products,
                          /v1/prices
    webhooks.py           event signing and delivery, /v1/webhook_endpoints
    event_destinations.py /v2/core/event_destinations, /v2/core/events: thin events, delivered
    meter_errors.py       invalid meter events found asynchronously, and their error reports
    meter_events.py       /v1/billing/meter_events, /v1/billing/meter_event_adjustments, lost
                          and stray events, and the usage an invoice takes
    meter_stream.py       /v2/billing/meter_event_session, /v2/billing/meter_event_stream
    meter_summaries.py    /v1/billing/meters/{id}/event_summaries
    invoices.py           invoice items, lines and invoices, payment attempts, /v1/invoices
    subscriptions.py      /v1/subscriptions (retrieve, cancel), /v1/subscription_items
    prorations.py         what a plan change bills: credits, debits, metered usage so far
    pending_updates.py    a plan change waiting for its invoice (pending_if_incomplete)
    plan_changes.py       POST /v1/subscriptions/{id}: items, prorations, payment behaviours
    schedules.py          /v1/subscription_schedules, and entering a phase at a renewal
    renewals.py           the end of a billing period (simulated time), paying an open invoice
    checkout.py           /v1/checkout/sessions, and completing one
    portal.py             /v1/billing_portal/sessions and configurations
    hosted_pages.py       the Checkout, portal and invoice pages a person clicks through
    app.py                routing, dispatch, idempotency
    launch.py             create_app, seed_prices, serve_in_thread, main
"""

from .app import ROUTES, StripeStandin
from .launch import create_app, main, seed_prices, serve_in_thread
from .params import decode_form
from .state import API_VERSION, Call, State, StripeError, fixture
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
