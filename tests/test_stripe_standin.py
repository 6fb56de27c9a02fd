"""The local Stripe stand-in, driven by the real stripe-python client (the project's wire format)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import stripe
from werkzeug.serving import make_server
from werkzeug.wrappers import Request, Response

from devtools.stripe_standin import create_app, decode_form, main, seed_prices, serve_in_thread

SECRET = "whsec_standin_test_secret"


class Receiver:
    """A tiny webhook endpoint that keeps every delivery (raw body and signature header)."""

    def __init__(self) -> None:
        self.deliveries: list[tuple[bytes, str]] = []
        self.server = make_server("127.0.0.1", 0, self.app, threaded=True)
        self.url = f"http://127.0.0.1:{self.server.server_port}/"
        serve = self.server.serve_forever
        threading.Thread(target=serve, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def app(self, environ: Any, start_response: Any) -> Any:
        request = Request(environ)
        self.deliveries.append((request.get_data(), request.headers.get("Stripe-Signature", "")))
        return Response('{"received": true}', mimetype="application/json")(environ, start_response)

    def events(self) -> list[stripe.Event]:
        """Every delivery, its signature checked the way the project's webhook checks it."""
        return [stripe.Webhook.construct_event(body, sig, SECRET) for body, sig in self.deliveries]

    def types(self) -> list[str]:
        return [event.type for event in self.events()]

    def wait_for(self, count: int) -> None:
        deadline = time.monotonic() + 5
        while len(self.deliveries) < count and time.monotonic() < deadline:
            time.sleep(0.02)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    receiver = Receiver()
    yield receiver
    receiver.server.shutdown()


@pytest.fixture
def base_url(receiver: Receiver) -> Iterator[str]:
    url, stop = serve_in_thread(receiver.url, SECRET)
    yield url
    stop()


@pytest.fixture
def client(base_url: str) -> stripe.StripeClient:
    return stripe.StripeClient(
        "sk_test_x",
        base_addresses={"api": base_url},
        http_client=stripe.HTTPXClient(allow_sync_methods=True),
    )


@pytest.fixture
def catalog(client: stripe.StripeClient) -> dict[str, str]:
    """A meter, a product and the plan's prices, created as the operator command would."""
    meter = client.v1.billing.meters.create(
        params={
            "display_name": "Voice call minutes",
            "event_name": "voice_call_minutes",
            "default_aggregation": {"formula": "sum"},
            "customer_mapping": {"event_payload_key": "stripe_customer_id", "type": "by_id"},
            "value_settings": {"event_payload_key": "value"},
        }
    )
    product = client.v1.products.create(params={"id": "prod_pro", "name": "Pro"})

    def price(key: str, amount: int, recurring: dict[str, str] | None) -> str:
        params: dict[str, Any] = {
            "currency": "eur",
            "unit_amount": amount,
            "product": product.id,
            "lookup_key": key,
        }
        if recurring:
            params["recurring"] = recurring
        return client.v1.prices.create(params=params).id  # type: ignore[arg-type]

    return {
        "meter": meter.id,
        "monthly": price("pro_monthly", 4900, {"interval": "month"}),
        "yearly": price("pro_yearly", 49000, {"interval": "year"}),
        "metered": price(
            "pro_overage",
            50,
            {"interval": "month", "usage_type": "metered", "meter": meter.id},
        ),
        "setup": price("setup_fee", 9900, None),
    }


def new_customer(client: stripe.StripeClient) -> str:
    return client.v1.customers.create(params={"email": "owner@example.com", "name": "Acme"}).id


def checkout(
    client: stripe.StripeClient, customer: str, lines: list[dict[str, Any]]
) -> stripe.checkout.Session:
    return client.v1.checkout.sessions.create(
        params={
            "mode": "subscription",
            "customer": customer,
            "line_items": lines,  # type: ignore[typeddict-item]
            "client_reference_id": "org-1",
            "metadata": {"organisation_id": "org-1"},
            "subscription_data": {"metadata": {"organisation_id": "org-1", "plan_id": "p-1"}},
            "success_url": "http://localhost:3000/ok",
            "cancel_url": "http://localhost:3000/cancel",
        }
    )


def monthly_lines(catalog: dict[str, str]) -> list[dict[str, Any]]:
    return [
        {"price": catalog["monthly"], "quantity": 1},
        {"price": catalog["metered"]},
        {"price": catalog["setup"], "quantity": 1},
    ]


def control(base_url: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
    reply = httpx.post(f"{base_url}/_standin/{path}", json=body or {}, timeout=10)
    assert reply.status_code == 200, reply.text
    answer: dict[str, Any] = reply.json()
    return answer


def subscribe_monthly(
    client: stripe.StripeClient, base_url: str, catalog: dict[str, str]
) -> dict[str, Any]:
    session = checkout(client, new_customer(client), monthly_lines(catalog))
    return control(base_url, f"checkout_sessions/{session.id}/complete")


def report(client: stripe.StripeClient, customer: str, identifier: str, minutes: int) -> None:
    client.v1.billing.meter_events.create(
        params={
            "event_name": "voice_call_minutes",
            "payload": {"stripe_customer_id": customer, "value": str(minutes)},
            "identifier": identifier,
            "timestamp": int(time.time()),
        }
    )


# ---------------------------------------------------------------- wire format and API rules


def test_decode_form_builds_nested_dicts_and_lists() -> None:
    pairs = [
        ("line_items[0][price]", "price_a"),
        ("line_items[1][price]", "price_b"),
        ("line_items[1][quantity]", "2"),
        ("metadata[0]", "zero"),
        ("expand[]", "latest_invoice"),
        ("expand[]", "customer"),
        ("mode", "subscription"),
    ]
    assert decode_form(pairs) == {
        "line_items": [{"price": "price_a"}, {"price": "price_b", "quantity": "2"}],
        "metadata": {"0": "zero"},
        "expand": ["latest_invoice", "customer"],
        "mode": "subscription",
    }


def test_catalog_objects_have_stripe_shapes(
    client: stripe.StripeClient, catalog: dict[str, str]
) -> None:
    found = client.v1.prices.list(params={"lookup_keys": ["pro_overage"], "active": True})
    assert [p.id for p in found.data] == [catalog["metered"]]
    price = found.data[0]
    assert price.object == "price"
    assert price.recurring is not None
    assert price.recurring.usage_type == "metered"
    assert price.recurring.meter == catalog["meter"]
    assert price.unit_amount == 50
    assert price.type == "recurring"
    meters = client.v1.billing.meters.list()
    assert [m.event_name for m in meters.data] == ["voice_call_minutes"]
    assert catalog["setup"].startswith("price_")
    moved = client.v1.prices.create(
        params={
            "currency": "eur",
            "unit_amount": 5900,
            "product": "prod_pro",
            "recurring": {"interval": "month"},
            "lookup_key": "pro_monthly",
            "transfer_lookup_key": True,
        }
    )
    found = client.v1.prices.list(params={"lookup_keys": ["pro_monthly"]})
    assert [p.id for p in found.data] == [moved.id]
    endpoint = client.v1.webhook_endpoints.create(
        params={"url": "https://example.com/hook", "enabled_events": ["invoice.paid"]}
    )
    assert endpoint.secret is not None and endpoint.secret.startswith("whsec_")
    listed = client.v1.webhook_endpoints.list()
    assert "secret" not in listed.data[0]


def test_monthly_checkout_session_with_flat_metered_and_setup_fee(
    client: stripe.StripeClient, base_url: str, catalog: dict[str, str]
) -> None:
    customer = new_customer(client)
    session = checkout(client, customer, monthly_lines(catalog))
    assert session.id.startswith("cs_")
    assert session.object == "checkout.session"
    assert session.mode == "subscription"
    assert session.status == "open"
    assert session.url == f"{base_url}/checkout/{session.id}"
    assert session.customer == customer
    assert session.client_reference_id == "org-1"
    assert session.amount_total == 4900 + 9900
    again = client.v1.checkout.sessions.retrieve(session.id)
    assert again.to_dict() == session.to_dict()
    page = httpx.get(session.url or "")
    assert page.status_code == 200
    assert "stand-in" in page.text


def test_mixed_intervals_are_refused(client: stripe.StripeClient, catalog: dict[str, str]) -> None:
    lines = [{"price": catalog["yearly"], "quantity": 1}, {"price": catalog["metered"]}]
    with pytest.raises(stripe.InvalidRequestError) as refused:
        checkout(client, new_customer(client), lines)
    assert refused.value.http_status == 400
    assert "different billing intervals" in str(refused.value.user_message)


def test_quantity_rules_for_metered_and_licensed_prices(
    client: stripe.StripeClient, catalog: dict[str, str]
) -> None:
    customer = new_customer(client)
    with pytest.raises(stripe.InvalidRequestError) as metered:
        checkout(client, customer, [{"price": catalog["metered"], "quantity": 1}])
    assert metered.value.http_status == 400
    assert metered.value.param == "line_items[0][quantity]"
    with pytest.raises(stripe.InvalidRequestError) as licensed:
        checkout(client, customer, [{"price": catalog["monthly"]}])
    assert licensed.value.code == "parameter_missing"
    with pytest.raises(stripe.InvalidRequestError) as unknown:
        checkout(client, customer, [{"price": "price_nope", "quantity": 1}])
    assert unknown.value.code == "resource_missing"


def test_unknown_parameters_are_refused_by_name(
    client: stripe.StripeClient, catalog: dict[str, str]
) -> None:
    with pytest.raises(stripe.InvalidRequestError) as top:
        client.v1.customers.create(params={"email": "a@example.com", "colour": "red"})  # type: ignore[typeddict-unknown-key]
    assert top.value.http_status == 400
    assert top.value.code == "parameter_unknown"
    assert top.value.param == "colour"
    with pytest.raises(stripe.InvalidRequestError) as nested:
        checkout(
            client, new_customer(client), [{"price": catalog["monthly"], "quantity": 1, "x": 1}]
        )
    assert nested.value.param == "line_items[0][x]"
    assert "Received unknown parameter: line_items[0][x]" in str(nested.value.user_message)


def test_authentication_and_missing_resources(base_url: str, client: stripe.StripeClient) -> None:
    assert httpx.post(f"{base_url}/v1/customers").status_code == 401
    live = stripe.StripeClient(
        "sk_live_x",
        base_addresses={"api": base_url},
        http_client=stripe.HTTPXClient(allow_sync_methods=True),
    )
    with pytest.raises(stripe.AuthenticationError):
        live.v1.customers.create()
    with pytest.raises(stripe.InvalidRequestError) as missing:
        client.v1.customers.retrieve("cus_missing")
    assert missing.value.http_status == 404
    assert missing.value.code == "resource_missing"
    basic = httpx.get(f"{base_url}/v1/billing/meters", auth=("sk_test_curl", ""))  # curl -u
    assert basic.status_code == 200
    unrouted = httpx.get(f"{base_url}/v1/nothing", headers={"Authorization": "Bearer sk_test_x"})
    assert unrouted.status_code == 404
    assert unrouted.json()["error"]["type"] == "invalid_request_error"


def test_idempotency_key_replays_and_conflicts(base_url: str, client: stripe.StripeClient) -> None:
    options: Any = {"idempotency_key": "org-1:customer"}
    first = client.v1.customers.create(params={"email": "a@example.com"}, options=options)
    second = client.v1.customers.create(params={"email": "a@example.com"}, options=options)
    assert second.id == first.id
    raw = httpx.post(
        f"{base_url}/v1/customers",
        content="email=a%40example.com",
        headers={
            "Authorization": "Bearer sk_test_x",
            "Idempotency-Key": "org-1:customer",
            "Content-Type": "application/x-www-form-urlencoded",
        },
    )
    assert raw.headers["Idempotent-Replayed"] == "true"
    assert raw.json()["id"] == first.id
    with pytest.raises(stripe.IdempotencyError):
        client.v1.customers.create(params={"email": "b@example.com"}, options=options)
    state = httpx.get(f"{base_url}/_standin/state").json()
    assert len(state["customers"]) == 1


# ---------------------------------------------------------------- the customer's and Stripe's part


def test_complete_delivers_signed_events_and_builds_the_subscription(
    client: stripe.StripeClient, base_url: str, catalog: dict[str, str], receiver: Receiver
) -> None:
    customer = new_customer(client)
    session = checkout(client, customer, monthly_lines(catalog))
    answer = control(base_url, f"checkout_sessions/{session.id}/complete")

    assert [d["type"] for d in answer["deliveries"]] == [
        "checkout.session.completed",
        "customer.subscription.created",
        "invoice.paid",
    ]
    assert {d["status_code"] for d in answer["deliveries"]} == {200}
    completed, created, paid = receiver.events()  # each signature verified
    assert completed.api_version == "2026-10-28.endive"
    assert completed.data.object["status"] == "complete"
    assert completed.data.object["subscription"] == answer["subscription"]
    with pytest.raises(stripe.SignatureVerificationError):
        body, header = receiver.deliveries[0]
        stripe.Webhook.construct_event(body, header, "whsec_other")

    sub = client.v1.subscriptions.retrieve(
        answer["subscription"], params={"expand": ["latest_invoice"]}
    )
    assert sub.status == "active"
    assert sub.customer == customer
    assert sub.metadata.to_dict() == {"organisation_id": "org-1", "plan_id": "p-1"}
    assert sub.billing_mode.type == "flexible"
    assert created.data.object["id"] == sub.id
    items = {item.price.id: item for item in sub["items"].data}
    assert set(items) == {catalog["monthly"], catalog["metered"]}  # no one-time item
    for item in items.values():
        days = (item.current_period_end - item.current_period_start) / 86400
        assert 28 <= days <= 31
    assert items[catalog["metered"]].quantity is None

    invoice = sub.latest_invoice
    assert isinstance(invoice, stripe.Invoice)
    assert invoice.id == answer["invoice"] == paid.data.object["id"]
    assert invoice.status == "paid"
    assert invoice.parent is not None and invoice.parent.subscription_details is not None
    assert invoice.parent.subscription_details.subscription == sub.id
    assert invoice.parent.subscription_details.metadata == sub.metadata
    assert sorted(line.amount for line in invoice.lines.data) == [4900, 9900]  # metered excluded
    assert invoice.amount_paid == invoice.total == 14800

    done = client.v1.checkout.sessions.retrieve(session.id)
    assert (done.status, done.subscription, done.customer) == ("complete", sub.id, customer)
    again = httpx.post(f"{base_url}/_standin/checkout_sessions/{session.id}/complete")
    assert again.status_code == 400


def test_expire_closes_an_open_session_for_good(
    client: stripe.StripeClient, base_url: str, catalog: dict[str, str]
) -> None:
    customer = new_customer(client)
    session = checkout(client, customer, monthly_lines(catalog))

    expired = client.v1.checkout.sessions.expire(session.id, params={"expand": ["customer"]})

    assert (expired.id, expired.status, expired.url) == (session.id, "expired", None)
    assert isinstance(expired.customer, stripe.Customer) and expired.customer.id == customer
    assert client.v1.checkout.sessions.retrieve(session.id).status == "expired"
    # Nobody can pay it any more, and Stripe refuses to expire it twice.
    paying = httpx.post(f"{base_url}/_standin/checkout_sessions/{session.id}/complete")
    assert paying.status_code == 400
    with pytest.raises(stripe.InvalidRequestError) as twice:
        client.v1.checkout.sessions.expire(session.id)
    assert twice.value.http_status == 400
    assert twice.value.user_message == (
        'Only Checkout Sessions with a status in ["open"] can be expired. This Checkout Session'
        " has a status of `expired`."
    )
    state = httpx.get(f"{base_url}/_standin/state").json()
    assert [s["status"] for s in state["checkout_sessions"]] == ["expired"]
    assert state["subscriptions"] == []


def test_expire_refuses_a_paid_session_and_names_missing_ones(
    client: stripe.StripeClient, base_url: str, catalog: dict[str, str]
) -> None:
    session = checkout(client, new_customer(client), monthly_lines(catalog))
    paid = control(base_url, f"checkout_sessions/{session.id}/complete")

    with pytest.raises(stripe.InvalidRequestError) as refused:
        client.v1.checkout.sessions.expire(session.id)
    with pytest.raises(stripe.InvalidRequestError) as missing:
        client.v1.checkout.sessions.expire("cs_test_missing")
    with pytest.raises(stripe.InvalidRequestError) as unknown:
        client.v1.checkout.sessions.expire(session.id, params={"reason": "x"})  # type: ignore[arg-type]

    assert (refused.value.http_status, refused.value.error.type) == (400, "invalid_request_error")  # type: ignore[union-attr]
    assert refused.value.user_message == (
        'Only Checkout Sessions with a status in ["open"] can be expired. This Checkout Session'
        " has a status of `complete`."
    )
    done = client.v1.checkout.sessions.retrieve(session.id)
    assert (done.status, done.subscription) == ("complete", paid["subscription"])
    assert (missing.value.http_status, missing.value.code) == (404, "resource_missing")
    assert (unknown.value.code, unknown.value.param) == ("parameter_unknown", "reason")


def test_meter_events_are_billed_on_the_renewal_invoice(
    client: stripe.StripeClient, base_url: str, catalog: dict[str, str], receiver: Receiver
) -> None:
    started = subscribe_monthly(client, base_url, catalog)
    sub = client.v1.subscriptions.retrieve(started["subscription"])
    for n, minutes in enumerate([10, 20, 5]):
        report(client, sub.customer, f"call-{n}", minutes)  # type: ignore[arg-type]
    with pytest.raises(stripe.InvalidRequestError) as duplicate:
        report(client, sub.customer, "call-0", 10)  # type: ignore[arg-type]
    assert duplicate.value.code == "resource_already_exists"
    assert "An event already exists with identifier call-0" in str(duplicate.value.user_message)

    answer = control(base_url, f"subscriptions/{sub.id}/advance")
    assert [d["type"] for d in answer["deliveries"]] == [
        "invoice.paid",
        "customer.subscription.updated",
    ]
    invoice = client.v1.invoices.retrieve(answer["invoice"])
    amounts = {line.pricing.price_details.price: line.amount for line in invoice.lines.data}  # type: ignore[union-attr]
    assert amounts == {catalog["metered"]: 1750, catalog["monthly"]: 4900}
    assert invoice.status == "paid"
    assert invoice.billing_reason == "subscription_cycle"
    old = {item.price.id: item for item in sub["items"].data}
    renewed = client.v1.subscriptions.retrieve(sub.id)
    for item in renewed["items"].data:
        assert item.current_period_start == old[item.price.id].current_period_end
    listed = client.v1.invoices.list(params={"subscription": sub.id})
    assert [i.id for i in listed.data] == [answer["invoice"], started["invoice"]]

    next_answer = control(base_url, f"subscriptions/{sub.id}/advance")
    later = client.v1.invoices.retrieve(next_answer["invoice"])
    assert later.total == 4900  # usage is billed once


def test_meter_event_rules(client: stripe.StripeClient, catalog: dict[str, str]) -> None:
    customer = new_customer(client)

    def refused(**params: Any) -> stripe.InvalidRequestError:
        base: dict[str, Any] = {
            "event_name": "voice_call_minutes",
            "payload": {"stripe_customer_id": customer, "value": "3"},
            "identifier": "call-x",
        }
        with pytest.raises(stripe.InvalidRequestError) as error:
            client.v1.billing.meter_events.create(params={**base, **params})
        assert error.value.http_status == 400
        return error.value

    # As Stripe: a missing meter or an unknown customer is accepted now and reported later in
    # an error report (tests/test_standin_meters.py); only the request itself is checked here.
    for accepted in (
        {"event_name": "other", "identifier": "call-no-meter"},
        {"payload": {"stripe_customer_id": "cus_nope", "value": "3"}, "identifier": "call-nope"},
    ):
        base = {
            "event_name": "voice_call_minutes",
            "payload": {"stripe_customer_id": customer, "value": "3"},
        }
        assert client.v1.billing.meter_events.create(params={**base, **accepted}).identifier
    assert refused(timestamp=int(time.time()) - 36 * 86400).param == "timestamp"
    assert refused(timestamp=int(time.time()) + 600).param == "timestamp"
    assert refused(identifier="x" * 101).param == "identifier"
    event = client.v1.billing.meter_events.create(
        params={
            "event_name": "voice_call_minutes",
            "payload": {"stripe_customer_id": customer, "value": "3"},
            "identifier": "call-x",
        }
    )
    assert (event.object, event.identifier, event.payload["value"]) == (
        "billing.meter_event",
        "call-x",
        "3",
    )


def test_failed_renewal_then_recovery(
    client: stripe.StripeClient, base_url: str, catalog: dict[str, str], receiver: Receiver
) -> None:
    sub_id = subscribe_monthly(client, base_url, catalog)["subscription"]
    failed = control(base_url, f"subscriptions/{sub_id}/advance", {"fail": True})
    assert [d["type"] for d in failed["deliveries"]] == [
        "invoice.payment_failed",
        "customer.subscription.updated",
    ]
    assert client.v1.subscriptions.retrieve(sub_id).status == "past_due"
    invoice = client.v1.invoices.retrieve(failed["invoice"])
    assert (invoice.status, invoice.amount_paid, invoice.amount_due) == ("open", 0, 4900)

    paid = control(base_url, f"invoices/{failed['invoice']}/pay")
    assert [d["type"] for d in paid["deliveries"]] == [
        "invoice.paid",
        "customer.subscription.updated",
    ]
    assert client.v1.subscriptions.retrieve(sub_id).status == "active"
    assert client.v1.invoices.retrieve(failed["invoice"]).status == "paid"
    assert receiver.types()[-2:] == ["invoice.paid", "customer.subscription.updated"]


def test_cancel_sends_subscription_deleted(
    client: stripe.StripeClient, base_url: str, catalog: dict[str, str], receiver: Receiver
) -> None:
    first = subscribe_monthly(client, base_url, catalog)["subscription"]
    answer = control(base_url, f"subscriptions/{first}/cancel")
    assert [d["type"] for d in answer["deliveries"]] == ["customer.subscription.deleted"]
    sub = client.v1.subscriptions.retrieve(first)
    assert sub.status == "canceled"
    assert sub.canceled_at is not None and sub.ended_at is not None

    second = subscribe_monthly(client, base_url, catalog)["subscription"]
    delivered = len(receiver.deliveries)
    canceled = client.v1.subscriptions.cancel(second)  # the API call: delivered after the answer
    assert canceled.status == "canceled"
    receiver.wait_for(delivered + 1)
    assert receiver.types()[-1] == "customer.subscription.deleted"
    with pytest.raises(stripe.InvalidRequestError):
        client.v1.subscriptions.cancel(second)


def test_cancel_takes_stripes_cancel_parameters_and_refuses_others(
    client: stripe.StripeClient, base_url: str, catalog: dict[str, str]
) -> None:
    sub_id = subscribe_monthly(client, base_url, catalog)["subscription"]
    with pytest.raises(stripe.InvalidRequestError) as unknown:
        client.v1.subscriptions.cancel(sub_id, params={"invoice_now": False, "refund": True})  # type: ignore[typeddict-unknown-key]
    assert unknown.value.param == "refund" and unknown.value.code == "parameter_unknown"
    with pytest.raises(stripe.InvalidRequestError) as feedback:
        client.v1.subscriptions.cancel(
            sub_id, params={"cancellation_details": {"feedback": "bored"}}
        )
    assert feedback.value.param == "cancellation_details[feedback]"
    assert client.v1.subscriptions.retrieve(sub_id).status == "active"  # refused: nothing done

    canceled = client.v1.subscriptions.cancel(
        sub_id,
        params={
            "invoice_now": False,
            "prorate": False,
            "cancellation_details": {"comment": "Duplicate subscription.", "feedback": "other"},
        },
        options={"idempotency_key": f"cancel-duplicate-{sub_id}"},
    )

    assert canceled.status == "canceled"
    stored = client.v1.subscriptions.retrieve(sub_id)
    assert stored.status == "canceled"
    assert stored.cancellation_details.to_dict() == {
        "comment": "Duplicate subscription.",
        "feedback": "other",
        "reason": "cancellation_requested",
    }


def test_cancel_at_period_end_ends_at_the_renewal(
    client: stripe.StripeClient, base_url: str, catalog: dict[str, str]
) -> None:
    sub_id = subscribe_monthly(client, base_url, catalog)["subscription"]
    sub = client.v1.subscriptions.update(
        sub_id, params={"cancel_at_period_end": True, "metadata": {"note": "leaving"}}
    )
    assert sub.cancel_at_period_end is True
    assert sub.cancel_at == sub["items"].data[0].current_period_end
    answer = control(base_url, f"subscriptions/{sub_id}/advance")
    assert [d["type"] for d in answer["deliveries"]] == [
        "invoice.paid",
        "customer.subscription.deleted",
    ]
    assert client.v1.invoices.retrieve(answer["invoice"]).total == 0  # usage only, no new month


def test_portal_session(client: stripe.StripeClient, base_url: str) -> None:
    portal = client.v1.billing_portal.sessions.create(
        params={"customer": new_customer(client), "return_url": "http://localhost:3000/billing"}
    )
    assert portal.id.startswith("bps_")
    assert portal.url == f"{base_url}/portal/{portal.id}"
    assert portal.return_url == "http://localhost:3000/billing"


def test_yearly_checkout_then_monthly_metered_item(
    client: stripe.StripeClient, base_url: str, catalog: dict[str, str], receiver: Receiver
) -> None:
    session = checkout(
        client,
        new_customer(client),
        [{"price": catalog["yearly"], "quantity": 1}, {"price": catalog["setup"], "quantity": 1}],
    )
    sub_id = control(base_url, f"checkout_sessions/{session.id}/complete")["subscription"]
    delivered = len(receiver.deliveries)
    item = client.v1.subscription_items.create(
        params={
            "subscription": sub_id,
            "price": catalog["metered"],
            "proration_behavior": "none",
        }
    )
    assert item.object == "subscription_item"
    assert 28 <= (item.current_period_end - item.current_period_start) / 86400 <= 31
    receiver.wait_for(delivered + 1)
    assert receiver.types()[-1] == "customer.subscription.updated"
    with pytest.raises(stripe.InvalidRequestError):  # the same price twice
        client.v1.subscription_items.create(
            params={"subscription": sub_id, "price": catalog["metered"]}
        )

    sub = client.v1.subscriptions.retrieve(sub_id)
    yearly = next(i for i in sub["items"].data if i.price.id == catalog["yearly"])
    assert 365 <= (yearly.current_period_end - yearly.current_period_start) / 86400 <= 366
    report(client, sub.customer, "yearly-call", 7)  # type: ignore[arg-type]
    answer = control(base_url, f"subscriptions/{sub_id}/advance")
    invoice = client.v1.invoices.retrieve(answer["invoice"])
    assert [line.amount for line in invoice.lines.data] == [350]  # the yearly fee is not renewed
    after = client.v1.subscriptions.retrieve(sub_id)
    periods = {
        i.price.id: (i.current_period_start, i.current_period_end) for i in after["items"].data
    }
    assert periods[catalog["yearly"]] == (yearly.current_period_start, yearly.current_period_end)
    assert periods[catalog["metered"]][0] == item.current_period_end


def test_state_dump_lists_what_happened(
    client: stripe.StripeClient, base_url: str, catalog: dict[str, str]
) -> None:
    started = subscribe_monthly(client, base_url, catalog)
    state = httpx.get(f"{base_url}/_standin/state").json()
    assert [s["id"] for s in state["subscriptions"]] == [started["subscription"]]
    assert [i["id"] for i in state["invoices"]] == [started["invoice"]]
    assert [e["type"] for e in state["events"]] == [
        "checkout.session.completed",
        "customer.subscription.created",
        "invoice.paid",
    ]
    assert all(e["deliveries"][0]["status_code"] == 200 for e in state["events"])
    json.dumps(state)  # plain JSON throughout


def test_concurrent_requests_with_one_idempotency_key_make_one_customer(
    base_url: str, client: stripe.StripeClient
) -> None:
    options: Any = {"idempotency_key": "org-2:customer"}
    ids: list[str] = []

    def create() -> None:
        ids.append(client.v1.customers.create(params={"name": "Acme"}, options=options).id)

    threads = [threading.Thread(target=create) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(ids) == 8
    assert len(set(ids)) == 1


def test_subscription_update_is_all_or_nothing(
    client: stripe.StripeClient, base_url: str, catalog: dict[str, str]
) -> None:
    sub_id = subscribe_monthly(client, base_url, catalog)["subscription"]
    with pytest.raises(stripe.InvalidRequestError) as refused:
        client.v1.subscriptions.update(
            sub_id,
            params={
                "metadata": {"plan_id": "p-2"},
                "items": [{"price": catalog["yearly"], "quantity": 1}, {"price": "price_nope"}],
            },
        )
    assert refused.value.param == "items[1][price]"
    unchanged = client.v1.subscriptions.retrieve(sub_id)
    assert unchanged.metadata["plan_id"] == "p-1"
    assert len(unchanged["items"].data) == 2
    updated = client.v1.subscriptions.update(
        sub_id,
        params={
            "items": [{"price": catalog["yearly"], "quantity": 1}],
            "proration_behavior": "none",
        },
    )
    assert {item.price.id for item in updated["items"].data} == {
        catalog["monthly"],
        catalog["metered"],
        catalog["yearly"],
    }


def test_seeded_prices_and_meters_for_local_runs() -> None:
    app = create_app(None, SECRET, meter_event_names=["voice_call_minutes"])
    prices = seed_prices(
        app,
        [
            {
                "id": "price_pro_monthly",
                "currency": "eur",
                "unit_amount": 4900,
                "interval": "month",
            },
            {
                "id": "price_pro_overage",
                "currency": "eur",
                "unit_amount": 50,
                "usage_type": "metered",
            },
            {"id": "price_setup", "currency": "eur", "unit_amount": 9900, "product": "prod_setup"},
        ],
    )
    assert [p["id"] for p in prices] == ["price_pro_monthly", "price_pro_overage", "price_setup"]
    meters = list(app.state.store["billing.meter"].values())
    assert len(meters) == 1  # the metered price reuses the pre-registered meter
    assert prices[1]["recurring"] == {
        "interval": "month",
        "interval_count": 1,
        "meter": meters[0]["id"],
        "usage_type": "metered",
        "trial_period_days": None,
    }
    assert prices[2]["type"] == "one_time"
    assert prices[2]["recurring"] is None


def test_help_says_never_for_production(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "NEVER for production" in capsys.readouterr().out


@pytest.fixture
def calling_back() -> Iterator[tuple[str, stripe.StripeClient, dict[str, str], list[str]]]:
    """A stand-in whose webhook handler, like the project's, adds the metered item to a
    subscription when its checkout completes; the handler serves one request at a time."""
    seen: list[str] = []
    prices: dict[str, str] = {}

    def handler(environ: Any, start_response: Any) -> Any:
        request = Request(environ)
        body, header = request.get_data(), request.headers.get("Stripe-Signature", "")
        event = stripe.Webhook.construct_event(body, header, SECRET)
        seen.append(event.type)
        if event.type == "checkout.session.completed":
            subscription = event.data.object["subscription"]
            client.v1.subscription_items.create(
                params={"subscription": subscription, "price": prices["metered"]}
            )
        return Response('{"received": true}')(environ, start_response)

    hook = make_server("127.0.0.1", 0, handler, threaded=False)
    threading.Thread(target=hook.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    base_url, stop = serve_in_thread(f"http://127.0.0.1:{hook.server_port}/", SECRET)
    client = stripe.StripeClient(
        "sk_test_x",
        base_addresses={"api": base_url},
        http_client=stripe.HTTPXClient(allow_sync_methods=True),
    )
    meter = client.v1.billing.meters.create(
        params={
            "display_name": "minutes",
            "event_name": "voice_call_minutes",
            "default_aggregation": {"formula": "sum"},
        }
    )
    client.v1.products.create(params={"id": "prod_pro", "name": "Pro"})
    for key, amount, recurring in [
        ("yearly", 49000, {"interval": "year"}),
        ("metered", 50, {"interval": "month", "usage_type": "metered", "meter": meter.id}),
    ]:
        params: Any = {"currency": "eur", "unit_amount": amount, "product": "prod_pro"}
        prices[key] = client.v1.prices.create(params={**params, "recurring": recurring}).id
    yield base_url, client, prices, seen
    stop()
    hook.shutdown()


def test_a_webhook_handler_may_call_back_while_handling_an_event(
    calling_back: tuple[str, stripe.StripeClient, dict[str, str], list[str]],
) -> None:
    base_url, client, prices, seen = calling_back
    session = checkout(client, new_customer(client), [{"price": prices["yearly"], "quantity": 1}])
    started = time.monotonic()
    answer = control(base_url, f"checkout_sessions/{session.id}/complete")
    assert time.monotonic() - started < 5  # nobody waited for a timeout
    assert {d["status_code"] for d in answer["deliveries"]} == {200}
    deadline = time.monotonic() + 5
    while "customer.subscription.updated" not in seen and time.monotonic() < deadline:
        time.sleep(0.02)
    assert [t for t in seen if t != "customer.subscription.updated"] == [
        "checkout.session.completed",
        "customer.subscription.created",
        "invoice.paid",
    ]
    assert seen.count("customer.subscription.updated") == 1
    sub = client.v1.subscriptions.retrieve(answer["subscription"])
    assert {item.price.id for item in sub["items"].data} == {prices["yearly"], prices["metered"]}
