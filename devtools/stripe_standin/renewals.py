"""Billing cycles: the renewal at the end of a period, and paying an open invoice (`/_standin/`).

Time is simulated: a renewal moves the subscription to the end of its shortest item period(s),
bills that period's metered usage (everything reported since the usage was last billed, see
meter_events.take_usage) and the licensed fees of the periods that start, and takes every
pending invoice item of the subscription (prorations, usage billed at a price change). On the
way it expires a pending update whose time is up (its invoice is voided) and enters the next
phase of a subscription schedule whose current phase ends there (schedules.py).
"""

from __future__ import annotations

from .invoices import fee_line, invoice_line, new_invoice, settle, sweep_pending_items
from .meter_events import take_usage
from .pending_updates import apply_pending_update, expire_pending_update
from .schedules import due_schedule, ends_subscription, enter_next_phase
from .state import ID, Call, Json, StripeError, control, new_id, period_end_after
from .subscriptions import check_live, item_anchor, usage_start


def advance_subscription(call: Call, object_id: str) -> Json:
    """Renewal: close the shortest period(s), bill their usage (and monthly flat fees), roll on.

    Items whose period ends at the earliest boundary roll one interval; a yearly item keeps
    its period until its year is over. `{"fail": true}` leaves the invoice open (past_due), as
    does a payment declined by `/_standin/customers/{id}/decline_next_payment`. A subscription
    set to cancel at period end (or whose schedule ends with `cancel`) ends instead, with a
    final usage invoice.
    """
    st = call.state
    sub = st.get("subscription", object_id, status=404)
    check_live(sub)
    if not sub["items"]["data"]:
        raise StripeError(400, f"Subscription {object_id} has no items to renew.")
    boundary = min(item["current_period_end"] for item in sub["items"]["data"])
    expire_pending_update(call, sub, boundary)
    schedule = due_schedule(st, sub, boundary)
    ending = (sub["cancel_at_period_end"] and boundary >= (sub["cancel_at"] or 0)) or bool(
        schedule and ends_subscription(schedule)
    )
    invoice_id, lines, started = new_id("in"), [], []
    for item in [x for x in sub["items"]["data"] if x["current_period_end"] <= boundary]:
        price, end = item["price"], item["current_period_end"]
        started.append(item["current_period_start"])
        if price["recurring"]["usage_type"] == "metered":  # billed in arrears
            usage = take_usage(st, sub["customer"], price["recurring"]["meter"], invoice_id)
            period = (usage_start(st, item), end)
            lines.append(
                invoice_line(invoice_id, sub, price, quantity=usage, period=period, item=item["id"])
            )
        if not ending:
            next_end = period_end_after(item_anchor(st, item), price["recurring"], end)
            item["current_period_start"], item["current_period_end"] = end, next_end
    if schedule is not None:
        enter_next_phase(st, sub, schedule, boundary)
    if not ending:  # licensed fees are billed in advance for the periods that start now
        lines += [
            fee_line(invoice_id, sub, item)
            for item in sub["items"]["data"]
            if item["price"]["recurring"]["usage_type"] == "licensed"
            and item["current_period_start"] == boundary
        ]
    lines = sweep_pending_items(st, sub, invoice_id) + lines
    period = (min(started), boundary)
    invoice = new_invoice(st, sub, invoice_id, lines, reason="subscription_cycle", period=period)
    paid = settle(st, invoice, fail=True if call.params.get("fail") else None)
    if ending:
        sub.update(status="canceled", ended_at=boundary)
    else:
        sub["status"] = "active" if paid else "past_due"
    call.emit("invoice.paid" if paid else "invoice.payment_failed", invoice)
    call.emit(f"customer.subscription.{'deleted' if ending else 'updated'}", sub)
    return {"subscription": sub["id"], "invoice": invoice["id"], "status": sub["status"]}


def pay_invoice(call: Call, object_id: str) -> Json:
    """Retry an open invoice's payment (it fails again while the customer has a decline waiting).

    Paid: the subscription is active again, and a pending update waiting for this invoice is
    applied."""
    st = call.state
    invoice = st.get("invoice", object_id, status=404)
    if invoice["status"] != "open":
        raise StripeError(400, f"Invoice {object_id} is {invoice['status']}, not open.")
    sub = st.store["subscription"][invoice["parent"]["subscription_details"]["subscription"]]
    answer = {"subscription": sub["id"], "invoice": invoice["id"]}
    if not settle(st, invoice):
        call.emit("invoice.payment_failed", invoice)
        return answer | {"status": sub["status"], "invoice_status": invoice["status"]}
    apply_pending_update(st, sub, invoice["id"])
    if sub["status"] == "past_due":
        sub["status"] = "active"
    call.emit("invoice.paid", invoice)
    call.emit("customer.subscription.updated", sub)
    return answer | {"status": sub["status"], "invoice_status": invoice["status"]}


ROUTES = [
    control("POST", "/_standin/subscriptions" + ID + "/advance", advance_subscription),
    control("POST", "/_standin/invoices" + ID + "/pay", pay_invoice),
]
