"""Invoices and invoice items: lines, finalized invoices, payment attempts, retrieval.

An invoice line is either a subscription item's own line (its fee for a period, or its metered
usage at the end of one) or the line of an invoice item. Invoice items are what a plan change
makes (plan_changes.py): prorations, and a metered price's usage billed when the price goes.
Until an invoice takes them they are pending (`invoice: null`); the subscription's next invoice
takes every pending item of that subscription (`sweep_pending_items`).
"""

from __future__ import annotations

import copy
from typing import Any

from .catalog import price_amount
from .meter_events import move_billed
from .params import as_int
from .state import ID, Call, Json, State, api, fixture, list_object, new_id, sim_now


def invoice_line(invoice_id: str, sub: Json, price: Json, **how: Any) -> Json:
    """One line: a subscription item's fee or usage (`item=`), or a one-time invoice item."""
    quantity, period, item_id = how["quantity"], how["period"], how.get("item")
    details = {"proration": False, "proration_details": {"credited_items": None}}
    details["subscription"] = sub["id"]
    if item_id:
        details.update(invoice_item=None, subscription_item=item_id)
        parent = {"type": "subscription_item_details", "subscription_item_details": details}
    else:
        details.update(invoice_item=new_id("ii"))
        parent = {"type": "invoice_item_details", "invoice_item_details": details}
    amount = price_amount(price, quantity)
    return fixture(
        "line_item",
        id=new_id("il"),
        invoice=invoice_id,
        amount=amount,
        subtotal=amount,
        currency=price["currency"],
        description=f"{quantity} × {price['nickname'] or price['product']}",
        period={"start": period[0], "end": period[1]},
        quantity=quantity,
        subscription=sub["id"],
        parent={"invoice_item_details": None, "subscription_item_details": None} | parent,
        pricing={
            "type": "price_details",
            "price_details": {"price": price["id"], "product": price["product"]},
            "unit_amount_decimal": price["unit_amount_decimal"],
        },
        taxes=[],
        pretax_credit_amounts=[],
    )


def fee_line(invoice_id: str, sub: Json, item: Json) -> Json:
    """The item's own line for its (new) period, billed in advance."""
    period = (item["current_period_start"], item["current_period_end"])
    quantity = item["quantity"]
    return invoice_line(
        invoice_id, sub, item["price"], quantity=quantity, period=period, item=item["id"]
    )


def new_invoiceitem(sub: Json, price: Json, now: int, **how: Any) -> Json:
    """A pending invoice item made by the subscription for one of its items.

    `how`: amount, quantity, period (start, end), item (its id), proration, description, and
    for a credit `credited` (proration_details.credited_items, or None).
    """
    proration = how["proration"]
    return fixture(
        "invoiceitem",
        id=new_id("ii"),
        amount=how["amount"],
        net_amount=how["amount"],
        currency=price["currency"],
        customer=sub["customer"],
        date=now,
        description=how["description"],
        discountable=not proration,  # Stripe: always false for prorations
        invoice=None,
        livemode=False,
        metadata={},
        period={"start": how["period"][0], "end": how["period"][1]},
        proration=proration,
        proration_details={"credited_items": how.get("credited"), "discount_amounts": []},
        frozen_fields=["pricing", "quantity", "discounts"],
        quantity=how["quantity"],
        quantity_decimal=str(how["quantity"]),
        parent={
            "type": "subscription_details",
            "subscription_details": {"subscription": sub["id"], "subscription_item": how["item"]},
        },
        pricing={
            "type": "price_details",
            "price_details": {"price": price["id"], "product": price["product"]},
            "unit_amount_decimal": None,
        },
        unset="customer_account test_clock",
    )


def invoiceitem_line(invoice_id: str, ii: Json) -> Json:
    """The line an invoice item becomes on `invoice_id` (see plan_changes.py for the shapes).

    A proration is a line of its subscription item (`subscription_item_details`, proration
    true, `invoice_item` set); other items (metered usage billed at a price change) are
    `invoice_item_details` lines, proration false.
    """
    subscription = ii["parent"]["subscription_details"]
    credited = (ii["proration_details"] or {}).get("credited_items") or {}
    details: Json = {
        "invoice_item": ii["id"],
        "proration": ii["proration"],
        "proration_details": {"credited_items": credited.get("invoice_line_item_details")},
        "subscription": subscription["subscription"],
    }
    if ii["proration"]:
        details["subscription_item"] = subscription["subscription_item"]
        parent = {"type": "subscription_item_details", "subscription_item_details": details}
    else:
        parent = {"type": "invoice_item_details", "invoice_item_details": details}
    return fixture(
        "line_item",
        id=new_id("il"),
        invoice=invoice_id,
        amount=ii["amount"],
        subtotal=ii["amount"],
        currency=ii["currency"],
        description=ii["description"],
        discountable=ii["discountable"],
        metadata={},
        period=copy.deepcopy(ii["period"]),
        quantity=ii["quantity"],
        subscription=subscription["subscription"],
        parent={"invoice_item_details": None, "subscription_item_details": None} | parent,
        pricing=copy.deepcopy(ii["pricing"]),
        taxes=[],
        pretax_credit_amounts=[],
    )


def sweep_pending_items(st: State, sub: Json, invoice_id: str) -> list[Json]:
    """Lines for every pending invoice item of `sub`, now taken by `invoice_id`."""
    lines = []
    for ii in st.store["invoiceitem"].values():
        if (
            ii["invoice"] is None
            and ii["parent"]["subscription_details"]["subscription"] == sub["id"]
        ):
            ii["invoice"] = invoice_id
            move_billed(st, ii["id"], invoice_id)  # usage held by the item: billed here now
            lines.append(invoiceitem_line(invoice_id, ii))
    return lines


def new_invoice(st: State, sub: Json, invoice_id: str, lines: list[Json], **how: Any) -> Json:
    """A finalized, open invoice for `sub` (`settle` pays it); it becomes the latest invoice.

    The customer's balance (a credit is negative) is applied: amount_due is never negative, and
    what a credit leaves over stays on the balance for the next invoice.
    """
    customer = st.store["customer"][sub["customer"]]
    now, total = sim_now(sub), sum(line["amount"] for line in lines)
    number = f"{customer['invoice_prefix']}-{customer['next_invoice_sequence']:04d}"
    customer["next_invoice_sequence"] += 1
    starting = customer.get("balance") or 0
    due, ending = max(total + starting, 0), min(total + starting, 0)
    customer["balance"] = ending
    invoice = fixture(
        "invoice",
        id=invoice_id,
        number=number,
        created=now,
        effective_at=now,
        customer=customer["id"],
        customer_email=customer["email"],
        customer_name=customer["name"],
        currency=sub["currency"],
        billing_reason=how["reason"],
        period_start=how["period"][0],
        period_end=how["period"][1],
        lines={"object": "list", "data": lines, "has_more": False},
        subtotal=total,
        subtotal_excluding_tax=total,
        total=total,
        total_excluding_tax=total,
        starting_balance=starting,
        ending_balance=ending,
        amount_due=due,
        amount_paid=0,
        amount_remaining=due,
        amount_overpaid=0,
        attempted=False,
        attempt_count=0,
        status="open",
        parent={
            "type": "subscription_details",
            "quote_details": None,
            "subscription_details": {
                "metadata": copy.deepcopy(sub["metadata"]),
                "subscription": sub["id"],
            },
        },
        total_taxes=[],
        total_pretax_credit_amounts=[],
        hosted_invoice_url=f"{st.public_url}/invoice/{invoice_id}" if st.public_url else None,
        unset="due_date from_invoice last_finalization_error next_payment_attempt shipping_cost"
        " shipping_details webhooks_delivered_at",
    )
    invoice["lines"]["url"] = f"/v1/invoices/{invoice_id}/lines"
    invoice["status_transitions"].update(finalized_at=now, paid_at=None)
    invoice.pop("subscription", None)  # gone since API "basil": see parent.subscription_details
    sub["latest_invoice"] = invoice_id
    return st.put(invoice)


def settle(st: State, invoice: Json, *, fail: bool | None = None) -> bool:
    """Attempt to collect an open invoice: True when it is paid.

    Nothing due: paid without a charge. Otherwise one attempt, which fails when `fail` says so
    or, with `fail` None, when the customer has a decline waiting (`decline_next_payment`).
    """
    invoice["attempted"] = True
    if invoice["amount_due"] > 0:
        invoice["attempt_count"] += 1
        if payment_fails(st, invoice["customer"]) if fail is None else fail:
            return False
    mark_paid(invoice)
    return True


def payment_fails(st: State, customer_id: str) -> bool:
    """Whether this payment is declined: uses up one of the customer's waiting declines."""
    waiting = st.declines.get(customer_id, 0)
    if waiting:
        st.declines[customer_id] = waiting - 1
    return bool(waiting)


def mark_paid(invoice: Json) -> None:
    invoice.update(status="paid", amount_paid=invoice["amount_due"], amount_remaining=0)
    invoice["status_transitions"]["paid_at"] = invoice["status_transitions"]["finalized_at"]


def void_invoice(st: State, invoice: Json, at: int) -> None:
    """Void an open invoice: nothing on it is owed, and the usage it held is unbilled again."""
    invoice.update(status="void", amount_remaining=0)
    invoice["status_transitions"]["voided_at"] = at
    move_billed(st, invoice["id"], None)


def get_invoice(call: Call, object_id: str) -> Json:
    return call.state.get("invoice", object_id, status=404)


def list_invoices(call: Call) -> Json:
    p = call.params
    invoices = list(reversed(call.state.store["invoice"].values()))
    if "subscription" in p:
        wanted = p["subscription"]
        invoices = [
            x for x in invoices if x["parent"]["subscription_details"]["subscription"] == wanted
        ]
    for name in ("customer", "status"):
        if name in p:
            invoices = [x for x in invoices if x[name] == p[name]]
    return list_object("/v1/invoices", invoices, as_int(p, "limit"))


ROUTES = [
    api("GET", "/v1/invoices" + ID, get_invoice),
    api("GET", "/v1/invoices", list_invoices, "subscription customer status limit"),
]
