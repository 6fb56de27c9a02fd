"""Plan changes: POST /v1/subscriptions/{id} with items, prorations, payment and pending updates.

Stripe's documented rules (API 2026-10-28.endive, flexible billing mode), as played here:

- A licensed item whose price or quantity changes mid-period is prorated: a credit for the
  unused time of what was debited, a debit for the remaining time at the new price (amounts:
  prorations.py). `proration_date` sets the instant the time left is counted from.
- An interval change (monthly flat -> yearly flat) restarts that item's period now for one new
  interval, billed in full at once, plus the credit for the old unused time; the other items
  keep their own periods (a monthly metered item stays monthly).
- A metered item whose price changes (or that is deleted) gets an invoice item billing the
  usage reported since its period (or last change) began at the OLD price, tiers counted from
  zero, period [start, change]; the new price bills later usage at the renewal, period
  [change, period end], its own tiers from zero. proration_behavior=none bills it nowhere.
- create_prorations (the default) leaves these invoice items pending: the next invoice takes
  them. always_invoice, or an interval change, makes one invoice now (billing_reason
  subscription_update) with them, finalized and paid at once unless the payment fails:
  allow_incomplete (default) applies the change and leaves the invoice open (past_due);
  default_incomplete applies it and leaves the invoice open for confirmation (past_due);
  error_if_incomplete changes nothing and answers 402 card_declined; pending_if_incomplete
  changes nothing and holds the change as `pending_update` until the invoice is paid
  (pending_updates.py).
- Events: customer.subscription.updated, then invoice.paid or invoice.payment_failed for an
  invoice made now (only the types the project's endpoint is registered for).

Invoice line shapes (shared/subscriptions.py normalise_invoice reads them):
- a proration: a line of its subscription item, parent.type `subscription_item_details` with
  {invoice_item: "ii_...", proration: true, proration_details.credited_items, subscription,
  subscription_item}; Stripe's docs and recorded payloads show prorations this way.
- the metered usage billed at a price change: an invoice item line, parent.type
  `invoice_item_details` with {invoice_item: "ii_...", proration: false,
  proration_details: {credited_items: null}, subscription}. Stripe's docs call it "an invoice
  item that bills for previously reported metered usage" and show no payload: this shape is
  the stand-in's choice (it bills part of a period and closes no billing cycle).
- a restarted period's fee: the item's own line (subscription_item_details, proration false,
  invoice_item null), like a renewal's.
All carry pricing.price_details.price (the price billed) and period.
"""

from __future__ import annotations

import copy
from typing import Any

from .catalog import line_price, price_amount
from .invoices import fee_line, new_invoice, payment_fails, settle, sweep_pending_items
from .params import as_bool, as_int, metadata
from .pending_updates import check_pending_params, expire_pending_update, hold_pending_update
from .prorations import Change, close_item, open_item, record
from .state import ID, Call, Json, StripeError, api, new_id, no_such, sim_now
from .subscriptions import (
    PRORATION_BEHAVIORS,
    add_item,
    check_choice,
    check_live,
    new_item,
    set_cancel_at_period_end,
)

PAYMENT_BEHAVIORS = {
    "allow_incomplete",
    "default_incomplete",
    "error_if_incomplete",
    "pending_if_incomplete",
}


def update_subscription(call: Call, object_id: str) -> Json:
    """metadata, cancel_at_period_end, items; all or nothing (edits a copy, then stores it)."""
    p, st = call.params, call.state
    stored = st.get("subscription", object_id, status=404)
    sub = copy.deepcopy(stored)
    if set(p) - {"metadata", "expand"}:
        check_live(sub)
    proration = check_choice(p, "proration_behavior", PRORATION_BEHAVIORS) or "create_prorations"
    payment = check_choice(p, "payment_behavior", PAYMENT_BEHAVIORS) or "allow_incomplete"
    if payment == "pending_if_incomplete":
        check_pending_params(p)
    if sub["schedule"] and "cancel_at_period_end" in p:
        message = (
            f"The subscription is managed by the subscription schedule `{sub['schedule']}`, and"
            " updating any cancelation behavior directly is not allowed. Please update the"
            " schedule instead."
        )
        raise StripeError(400, message, param="cancel_at_period_end")
    now = sim_now(sub)
    if stored["pending_update"] and ("items" in p or "cancel_at_period_end" in p):
        # A newer change replaces it. Voided first, so this change is figured from what was
        # really paid and billed (the held invoice's charges and usage never were).
        expire_pending_update(call, stored, now, force=True)
        sub = copy.deepcopy(stored)
        sub["pending_update"] = None
    change = Change(st, sub, now, proration_date(p, sub, now), proration)
    if "metadata" in p:
        sub["metadata"] = metadata(sub["metadata"], p["metadata"])
    if (cancel := as_bool(p, "cancel_at_period_end")) is not None:
        set_cancel_at_period_end(sub, cancel)
    edits = p.get("items", [])
    for i, edit in enumerate(edits if isinstance(edits, list) else [edits]):
        change_item(change, edit, f"items[{i}]")
    invoice_now = bool(change.fees) or (proration == "always_invoice" and bool(change.charges))
    fails = invoice_now and payment != "default_incomplete" and amount_due(change) > 0
    fails = fails and payment_fails(st, sub["customer"])
    if fails and payment == "error_if_incomplete":  # Stripe: 402, and nothing changes
        raise StripeError(
            402,
            "Your card was declined.",
            code="card_declined",
            type="card_error",
            decline_code="generic_decline",
        )
    record(change)
    if not invoice_now:
        return apply(call, change)
    return invoice_change(call, change, stored, payment=payment, fails=fails)


def invoice_change(call: Call, change: Change, stored: Json, *, payment: str, fails: bool) -> Json:
    """Invoice the change now and collect: applied when paid (or as payment_behavior says)."""
    st, sub, now = call.state, change.sub, change.now
    pending = fails and payment == "pending_if_incomplete"
    owner, invoice_id = stored if pending else sub, new_id("in")
    lines = sweep_pending_items(st, owner, invoice_id)
    lines += [fee_line(invoice_id, sub, item) for item in change.fees]
    invoice = new_invoice(
        st, owner, invoice_id, lines, reason="subscription_update", period=(now, now)
    )
    if payment == "default_incomplete" and invoice["amount_due"] > 0:
        sub["status"] = "past_due"  # waits for the customer to confirm the payment
        return apply(call, change)
    if settle(st, invoice, fail=fails):
        apply(call, change)
        call.emit("invoice.paid", invoice)
        return sub
    if pending:
        hold_pending_update(
            st,
            stored,
            call.params,
            invoice_id,
            now=now,
            changed=sub,
            touched=change.touched,
            removed=change.removed,
            clocks=change.clocks,
        )
        call.emit("customer.subscription.updated", stored)
        call.emit("invoice.payment_failed", invoice)
        return stored
    sub["status"] = "past_due"
    apply(call, change)
    call.emit("invoice.payment_failed", invoice)
    return sub


def proration_date(p: Json, sub: Json, now: int) -> int:
    """`proration_date` if given (within the items' current periods), else now."""
    at = as_int(p, "proration_date")
    if at is None:
        return now
    items = sub["items"]["data"]
    start = min((i["current_period_start"] for i in items), default=now)
    end = max((i["current_period_end"] for i in items), default=now)
    if not start <= at <= end:
        message = "proration_date must be within the subscription's current billing period."
        raise StripeError(400, message, param="proration_date")
    return at


def change_item(change: Change, edit: Any, prefix: str) -> None:
    """items[i][price] adds an item; items[i][id] with [price], [quantity] or [deleted] edits one."""
    st, sub = change.st, change.sub
    if not isinstance(edit, dict) or "id" not in edit:
        change.touched.append(add_item(st, sub, edit, prefix)["id"])
        return
    items = sub["items"]["data"]
    item = next((x for x in items if x["id"] == edit["id"]), None)
    if item is None:
        raise no_such("subscription item", edit["id"], f"{prefix}[id]")
    if as_bool(edit, "deleted"):
        close_item(change, item)
        items.remove(item)
        change.removed.append(item["id"])
        return
    price = st.get("price", edit.get("price", item["price"]["id"]), f"{prefix}[price]")
    line = {"price": price["id"], "quantity": edit.get("quantity", item["quantity"] or 1)}
    if price["recurring"]["usage_type"] == "metered" and "quantity" not in edit:
        line.pop("quantity")
    line_price(st, line, prefix)
    if any(x["price"]["id"] == price["id"] and x is not item for x in items):
        message = f"Cannot add multiple subscription items with the same price: {price['id']}"
        raise StripeError(400, message, param=f"{prefix}[price]")
    quantity = as_int(line, "quantity")
    if (price["id"], quantity) == (item["price"]["id"], item["quantity"]):
        return
    old = item["price"]["recurring"]
    restart = (old["interval"], old["interval_count"]) != (
        price["recurring"]["interval"],
        price["recurring"]["interval_count"],
    )
    close_item(change, item)
    start = change.now if restart else item["current_period_start"]
    swapped = new_item(sub["id"], price, quantity, start)
    item.update(price=swapped["price"], plan=swapped["plan"], quantity=swapped["quantity"])
    change.clock(item)["usage_start"] = change.now
    if restart:
        item.update(current_period_start=start, current_period_end=swapped["current_period_end"])
        change.clock(item)["anchor"] = start
    open_item(change, item, restart)
    change.touched.append(item["id"])


def amount_due(change: Change) -> int:
    """What an invoice made now would ask: pending items, the new charges and fees, the balance."""
    st, sub = change.st, change.sub
    pending = [
        ii["amount"]
        for ii in st.store["invoiceitem"].values()
        if ii["invoice"] is None
        and ii["parent"]["subscription_details"]["subscription"] == sub["id"]
    ]
    charges = [ii["amount"] for ii in change.charges]
    fees = [price_amount(item["price"], item["quantity"]) for item in change.fees]
    balance: int = st.store["customer"][sub["customer"]].get("balance") or 0
    return int(sum(pending) + sum(charges) + sum(fees) + balance)


def apply(call: Call, change: Change) -> Json:
    """Store the changed subscription (and its items' clocks) and say so."""
    call.state.item_clocks.update(change.clocks)
    call.emit("customer.subscription.updated", change.sub)
    return call.state.put(change.sub)


ROUTES = [
    api(
        "POST",
        "/v1/subscriptions" + ID,
        update_subscription,
        "metadata[*] cancel_at_period_end proration_behavior proration_date payment_behavior"
        " items[][price] items[][id] items[][quantity] items[][deleted]",
    ),
]
