"""Checkout Sessions (subscription mode), and the customer paying one (`/_standin/`)."""

from __future__ import annotations

import copy
import time

from .catalog import line_price, price_amount
from .customers import create_customer
from .invoices import invoice_line, new_invoice, settle
from .params import as_bool, as_int, as_object, metadata, required
from .state import ID, Call, Json, StripeError, _fixtures, api, control, fixture, new_id
from .subscriptions import new_item


def create_checkout_session(call: Call) -> Json:
    p, st = call.params, call.state
    if required(p, "mode") != "subscription":
        raise StripeError(400, "The stand-in only supports mode=subscription.", param="mode")
    if p.get("customer") is not None:
        st.get("customer", p["customer"], "customer")
    lines = required(p, "line_items")
    if not isinstance(lines, list):
        raise StripeError(400, "Invalid array", param="line_items")
    prices = [line_price(st, line, f"line_items[{i}]") for i, line in enumerate(lines)]
    recurring = [x["recurring"] for x in prices if x["recurring"]]
    if not recurring:
        message = "You must specify at least one recurring price in `subscription` mode."
        raise StripeError(400, message, param="line_items")
    if len({(r["interval"], r["interval_count"]) for r in recurring}) > 1:
        message = "Checkout does not support multiple prices with different billing intervals."
        raise StripeError(400, message, param="line_items")
    order = [
        {"price": x["id"], "quantity": as_int(line, "quantity")}
        for x, line in zip(prices, lines, strict=True)
    ]
    amount = sum(price_amount(x, o["quantity"] or 0) for x, o in zip(prices, order, strict=True))
    subscription_metadata = as_object(as_object(p, "subscription_data"), "metadata")
    session_id, now = new_id("cs_test"), int(time.time())
    session = fixture(
        "checkout.session",
        id=session_id,
        created=now,
        expires_at=now + 86400,
        mode="subscription",
        status="open",
        payment_status="unpaid",
        customer=p.get("customer"),
        client_reference_id=p.get("client_reference_id"),
        metadata=metadata({}, p.get("metadata", {})),
        success_url=p.get("success_url"),
        cancel_url=p.get("cancel_url"),
        allow_promotion_codes=as_bool(p, "allow_promotion_codes"),
        currency=prices[0]["currency"],
        amount_subtotal=amount,
        amount_total=amount,
        total_details={"amount_discount": 0, "amount_shipping": 0, "amount_tax": 0},
        url=f"{call.base_url}/checkout/{session_id}",
        ui_mode="hosted_page",
        custom_text=dict.fromkeys(_fixtures()["checkout.session"]["custom_text"]),
        adaptive_pricing={"enabled": False},
        managed_payments={"enabled": False},
        unset="payment_intent invoice invoice_creation customer_details after_expiration"
        " consent_collection shipping_address_collection shipping_cost subscription"
        " collected_information currency_conversion payment_method_configuration_details",
    )
    st.session_orders[session_id] = {
        "lines": order,
        "subscription_metadata": metadata({}, subscription_metadata),
    }
    return st.put(session)


def get_checkout_session(call: Call, object_id: str) -> Json:
    return call.state.get("checkout.session", object_id, status=404)


def expire_checkout_session(call: Call, object_id: str) -> Json:
    """Only an open session can be expired, as Stripe: a complete or expired one is a 400."""
    session = call.state.get("checkout.session", object_id, status=404)
    if session["status"] != "open":
        message = (
            'Only Checkout Sessions with a status in ["open"] can be expired. This Checkout '
            f"Session has a status of `{session['status']}`."
        )
        raise StripeError(400, message)
    session.update(status="expired", url=None)
    return session


def complete_checkout(call: Call, object_id: str) -> Json:
    """The customer pays: subscription, first invoice (flat + setup fee), three events."""
    st = call.state
    session = st.get("checkout.session", object_id, status=404)
    if session["status"] != "open":
        raise StripeError(400, f"Checkout session {object_id} is {session['status']}, not open.")
    if session["customer"] is None:
        session["customer"] = create_customer(Call(st, {}))["id"]
    customer, order = st.store["customer"][session["customer"]], st.session_orders[object_id]
    now, invoice_id = int(time.time()), new_id("in")
    sub = fixture(
        "subscription",
        id=new_id("sub"),
        customer=customer["id"],
        created=now,
        start_date=now,
        billing_cycle_anchor=now,
        status="active",
        currency=session["currency"],
        metadata=copy.deepcopy(order["subscription_metadata"]),
        billing_mode={"type": "flexible", "flexible": {"proration_discounts": "included"}},
        cancel_at_period_end=False,
        cancellation_details={"comment": None, "feedback": None, "reason": None},
        billing_schedules=[],
        managed_payments={"enabled": False},
        unset="cancel_at canceled_at ended_at trial_start trial_end billing_cycle_anchor_config"
        " billing_thresholds next_pending_invoice_item_invoice pause_collection pending_update"
        " pending_invoice_item_interval transfer_data",
    )
    sub["billing_mode"]["updated_at"] = now
    sub["items"].update(data=[], url=f"/v1/subscription_items?subscription={sub['id']}")
    lines = []
    for line in order["lines"]:
        price, quantity = st.store["price"][line["price"]], line["quantity"]
        if price["recurring"] is None:  # one-time (setup fee): on the first invoice only
            lines.append(invoice_line(invoice_id, sub, price, quantity=quantity, period=(now, now)))
            continue
        item = new_item(sub["id"], price, quantity, now)
        sub["items"]["data"].append(item)
        if item["quantity"] is not None:  # flexible billing: metered items not on this invoice
            period = (now, item["current_period_end"])
            fee = invoice_line(
                invoice_id, sub, price, quantity=quantity, period=period, item=item["id"]
            )
            lines.append(fee)
    invoice = new_invoice(
        st, sub, invoice_id, lines, reason="subscription_create", period=(now, now)
    )
    settle(st, invoice, fail=False)  # Checkout took the payment before making the subscription
    st.put(sub)
    details = fixture("checkout.session")["customer_details"]
    details.update(email=customer["email"], name=customer["name"], address=None)
    session.update(
        status="complete",
        payment_status="paid",
        subscription=sub["id"],
        invoice=invoice["id"],
        customer_details=details,
    )
    call.emit("checkout.session.completed", session)
    call.emit("customer.subscription.created", sub)
    call.emit("invoice.paid", invoice)
    return {"subscription": sub["id"], "invoice": invoice["id"]}


ROUTES = [
    api(
        "POST",
        "/v1/checkout/sessions",
        create_checkout_session,
        "mode customer line_items[][price] line_items[][quantity] client_reference_id"
        " metadata[*] subscription_data[metadata][*] success_url cancel_url"
        " allow_promotion_codes",
    ),
    api("GET", "/v1/checkout/sessions" + ID, get_checkout_session),
    api("POST", "/v1/checkout/sessions" + ID + "/expire", expire_checkout_session),
    control("POST", "/_standin/checkout_sessions" + ID + "/complete", complete_checkout),
]
